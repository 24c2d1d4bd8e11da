#!/usr/bin/env bash
# A real single-node Kubernetes on this machine, from registry packages only: etcd, and
# kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kube-proxy 1.20.2 built
# from Debian's source package (hack/kube-build.sh --node); containerd, runc and the CNI plugins
# from Debian. Pods live on a bridge this script makes (iibr0, 10.244.0.0/24, gateway
# 10.244.0.1); they reach the host's Milvus, MariaDB and S3 server through forwarders on the
# gateway address, and nothing else: forwarded traffic leaving the bridge is dropped.
#   hack/cluster.sh up       build what is missing, start everything, import the images
#   hack/cluster.sh down     stop everything, remove the pods' sandboxes and the bridge
#   hack/cluster.sh env      print exports: CLUSTER_KUBECONFIG, CLUSTER_IMAGE, CLUSTER_GATEWAY
#   hack/cluster.sh status   what runs
# No image can be pulled here: the pause image is built from the kubernetes source, the
# imageindex image from the release binary, ONNX Runtime's library and the test model, both as
# OCI images made with umoci and imported into containerd. This control plane is separate from
# hack/kube.sh's (own etcd, ports and state), so both can run at once.
source "$(dirname "$0")/lib.sh"
KUBE=$CACHE/kube
CDIR=$STATE/cluster
BRIDGE=iibr0
GW=10.244.0.1
POD_CIDR=10.244.0.0/24
SVC_CIDR=10.97.0.0/16
SVC_KUBERNETES=10.97.0.1
NODE=imageindex-node
ETCD_PORT=${CLUSTER_ETCD_PORT:-22379}
API_PORT=${CLUSTER_API_PORT:-26443}
PAUSE_IMAGE=imageindex.local/pause:3.4
KUBECTL=$KUBE/bin/kubectl
sock=$CDIR/containerd/containerd.sock
DAEMONS=(cluster-kube-proxy cluster-kubelet cluster-scheduler cluster-controller-manager cluster-apiserver
  cluster-etcd cluster-containerd cluster-fwd-milvus cluster-fwd-mysql cluster-fwd-s3)

k() { "$KUBECTL" --kubeconfig "$CDIR/admin.kubeconfig" "$@"; }
ctr_() { ctr --address "$sock" -n k8s.io "$@"; }

kubeconfig() { # FILE USER TOKEN
  write_kubeconfig "$1" "https://$GW:$API_PORT" "$CDIR/ca.crt" "$2" "token: \"$3\""
}

# One CA; the apiserver's serving certificate (for the gateway address, the kubernetes Service's
# ClusterIP and loopback); a client certificate for the apiserver's calls to the kubelet; the
# service-account key; a static token per component. Made once per state folder.
certs() {
  [[ -f $CDIR/tokens.csv ]] && return
  mkdir -p "$CDIR"
  log "cluster: making a CA, certificates, the service-account key and tokens"
  make_ca "$CDIR" imageindex-cluster-ca
  make_cert "$CDIR" apiserver "/CN=kube-apiserver" \
    "IP:$GW,IP:$SVC_KUBERNETES,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
  make_cert "$CDIR" apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  make_sa_key "$CDIR"
  : >"$CDIR/tokens.csv"
  local who user groups token
  for who in admin controller-manager scheduler kubelet kube-proxy; do
    case $who in
      admin) user=admin groups=system:masters ;;
      controller-manager) user=system:kube-controller-manager groups=system:authenticated ;;
      scheduler) user=system:kube-scheduler groups=system:authenticated ;;
      kubelet) user=system:node:$NODE groups=system:nodes ;;
      kube-proxy) user=system:kube-proxy groups=system:authenticated ;;
    esac
    token=$(new_token)
    echo "$token,$user,$user,\"$groups\"" >>"$CDIR/tokens.csv"
    kubeconfig "$CDIR/$who.kubeconfig" "$user" "$token"
  done
}

# The pods' bridge, made before anything binds its address; CNI's bridge plugin then uses it.
network() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    log "cluster: bridge $BRIDGE $GW/24"
    ip link add "$BRIDGE" type bridge
    ip addr add "$GW/24" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
  # Service addresses route to the bridge too: the host's own connections to a ClusterIP then
  # leave from the gateway address (kube-proxy's DNAT picks the pod), and one that no rule
  # rewrites stays on this machine instead of taking the default route out.
  ip route replace "$SVC_CIDR" dev "$BRIDGE" src "$GW"
  drop_rules
  modprobe br_netfilter 2>/dev/null || true
  sysctl -qw net.bridge.bridge-nf-call-iptables=1 net.ipv4.ip_forward=1
  # Forwarding is for traffic between pods (a Service's ClusterIP rewritten to a pod): anything
  # else a pod sends through the host is dropped, and from pods the host answers only on the
  # gateway address. mangle runs after kube-proxy's DNAT, and kube-proxy never edits it.
  iptables -t mangle -A FORWARD -i "$BRIDGE" ! -o "$BRIDGE" -j DROP
  iptables -t mangle -A FORWARD -o "$BRIDGE" ! -i "$BRIDGE" -j DROP
  # To the host, pods open only the apiserver and the three services on the gateway address;
  # replies to what the host opened (a search through a ClusterIP) come back.
  local rule
  for rule in "-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT" \
    "-p tcp -d $GW -m multiport --dports $API_PORT,$MILVUS_PORT,$MYSQL_PORT,$S3_PORT -j ACCEPT" "-j DROP"; do
    # shellcheck disable=SC2086 # the rule is words
    iptables -t mangle -A INPUT -i "$BRIDGE" $rule
  done
  mkdir -p "$CDIR/cni"
  cat >"$CDIR/cni/10-imageindex.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "imageindex", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR", "rangeStart": "10.244.0.10", "gateway": "$GW"}]],
            "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$CDIR/cni-ipam"}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOF
}

# Removes this script's mangle rules (all of them name the bridge), so that `up` adds them in order.
drop_rules() {
  local rule
  { iptables -t mangle -S 2>/dev/null || true; } | { grep -E -- "-(i|o) $BRIDGE( |$)" || true; } | sed 's/^-A /-D /' |
    while read -r rule; do
      # shellcheck disable=SC2086 # the rule is words
      iptables -t mangle $rule
    done
}

listening() { [[ -n $(ss -Hltn "src $1") ]]; } # ADDR:PORT

# Host services, reachable from pods at the gateway address (they listen on loopback only).
forwarders() {
  local name port
  for name in milvus mysql s3; do
    case $name in milvus) port=$MILVUS_PORT ;; mysql) port=$MYSQL_PORT ;; s3) port=$S3_PORT ;; esac
    [[ -n $(running_pid "cluster-fwd-$name") ]] && continue
    # Milvus 2.3 has no flag to choose its listen address: it listens on every interface, so
    # pods reach it on the gateway address without a forwarder.
    if ss -Hltn "sport = :$port" | awk '{print $4}' | grep -qE '^(\*|0\.0\.0\.0|\[::\]):'; then
      log "cluster: $name listens on every interface; pods reach it at $GW:$port directly"
      continue
    fi
    start_daemon "cluster-fwd-$name" "$CDIR" "$CDIR/fwd-$name.log" \
      socat "TCP-LISTEN:$port,bind=$GW,reuseaddr,fork" "TCP:127.0.0.1:$port"
    wait_for "the $name forwarder on $GW:$port" 10 listening "$GW:$port" ||
      { tail -3 "$CDIR/fwd-$name.log" >&2; exit 1; }
  done
}

containerd_up() {
  [[ -n $(running_pid cluster-containerd) ]] && return
  mkdir -p "$CDIR/containerd" "$CACHE/cluster/containerd"
  # Images and snapshots live in the cache (they survive fresh clones); state is per clone.
  cat >"$CDIR/containerd/config.toml" <<EOF
version = 2
root = "$CACHE/cluster/containerd"
state = "$CDIR/containerd/state"
[grpc]
  address = "$sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # This VM does not let even root lower oom_score_adj below its own (the sandbox asks for -998).
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$CDIR/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
EOF
  log "cluster: starting containerd"
  start_daemon cluster-containerd "$CDIR" "$CDIR/containerd.log" containerd --config "$CDIR/containerd/config.toml"
  wait_for containerd 30 ctr --address "$sock" version
}

# An OCI image from a folder: umoci writes the layout, ctr imports it under NAME:TAG.
import_image() { # NAME TAG ROOTFS ENTRYPOINT USER [ENV...]
  local name=$1 tag=$2 rootfs=$3 entry=$4 user=$5; shift 5
  if ctr_ images ls -q | grep -qx "$name:$tag"; then return; fi
  log "cluster: building image $name:$tag"
  local layout=$CDIR/oci-$$
  rm -rf "$layout"
  umoci init --layout "$layout"
  umoci new --image "$layout:$tag"
  umoci insert --image "$layout:$tag" "$rootfs" /
  local envs=()
  for e in "$@"; do envs+=(--config.env "$e"); done
  umoci config --image "$layout:$tag" --config.entrypoint "$entry" --config.user "$user" "${envs[@]}" \
    --os linux --architecture amd64
  tar -C "$layout" -cf "$layout.tar" .
  ctr_ images import --base-name "$name" "$layout.tar" >/dev/null
  rm -rf "$layout" "$layout.tar"
  ctr_ images ls -q | grep -qx "$name:$tag" || { log "image $name:$tag did not import"; return 1; }
}

images() {
  local stage=$CDIR/stage
  if ! ctr_ images ls -q | grep -qx "$PAUSE_IMAGE"; then
    rm -rf "$stage" && mkdir -p "$stage"
    gcc -Os -Wall -Werror -static -DVERSION=v3.4-imageindex \
      -o "$stage/pause" "$KUBE/src/kubernetes/build/pause/linux/pause.c"
    import_image imageindex.local/pause 3.4 "$stage" /pause 65535:65535
  fi
  # The imageindex image, as the Dockerfile's last stage lays it out, tagged by its content.
  local bin=$CARGO_TARGET_DIR/release/imageindex ort model
  (cd "$ROOT" && cargo build --release --locked -q)
  ort=$(ort_dylib)
  model=$CACHE/models/resnet50-random.onnx
  [[ -f $model ]] || model=$("$ROOT/hack/model.sh")
  # A second model of another width, beside the first: the e2e changes the index's model.
  local second
  second=$("$ROOT/hack/model.sh" --resnet18)
  local tag
  # Tagged by what goes in and by this script, which lays it out.
  tag=0.1.0-$(cat "$bin" "$ort" "$model" "$second" "$ROOT/hack/cluster.sh" | sha256sum | head -c 12)
  if ! ctr_ images ls -q | grep -qx "imageindex.local/imageindex:$tag"; then
    rm -rf "$stage" && mkdir -p "$stage"/{usr/local/bin,opt/onnxruntime,models,etc/ssl/certs,tmp,lib64,lib/x86_64-linux-gnu}
    chmod 1777 "$stage/tmp"
    cp "$bin" "$stage/usr/local/bin/imageindex"
    cp "$ort" "$stage/opt/onnxruntime/"
    cp "$model" "$stage/models/resnet50.onnx"
    cp "$second" "$stage/models/resnet18.onnx"
    # glibc, libstdc++ and libgcc, as ldd finds them for the binary and ONNX Runtime.
    local lib
    for lib in $( (ldd "$bin"; ldd "$ort") | grep -oE '/[^ ]+\.so[^ ]*' | sort -u); do
      cp -L "$lib" "$stage$lib"
    done
    # Where distroless has them: rustls' platform verifier wants roots even for http:// clients.
    cp /etc/ssl/certs/ca-certificates.crt "$stage/etc/ssl/certs/"
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$stage/etc/passwd"
    printf 'root:x:0:\nnonroot:x:65532:\n' >"$stage/etc/group"
    import_image imageindex.local/imageindex "$tag" "$stage" /usr/local/bin/imageindex 65532:65532 \
      "ORT_DYLIB_PATH=/opt/onnxruntime/$(basename "$ort")" IMAGEINDEX_MODEL=/models/resnet50.onnx
  fi
  rm -rf "$stage"
  echo "imageindex.local/imageindex:$tag" >"$CDIR/image"
}

control_plane() {
  if [[ -z $(running_pid cluster-etcd) ]]; then
    log "cluster: starting etcd (127.0.0.1:$ETCD_PORT)"
    start_etcd cluster-etcd "$CDIR" cluster "$ETCD_PORT"
  fi
  if [[ -z $(running_pid cluster-apiserver) ]]; then
    log "cluster: starting kube-apiserver ($GW:$API_PORT)"
    start_daemon cluster-apiserver "$CDIR" "$CDIR/apiserver.log" "$KUBE/bin/kube-apiserver" \
      --etcd-servers "http://127.0.0.1:$ETCD_PORT" --bind-address "$GW" --advertise-address "$GW" \
      --secure-port "$API_PORT" --insecure-port 0 \
      --tls-cert-file "$CDIR/apiserver.crt" --tls-private-key-file "$CDIR/apiserver.key" \
      --client-ca-file "$CDIR/ca.crt" --token-auth-file "$CDIR/tokens.csv" --authorization-mode Node,RBAC \
      --kubelet-client-certificate "$CDIR/apiserver-kubelet-client.crt" \
      --kubelet-client-key "$CDIR/apiserver-kubelet-client.key" --kubelet-preferred-address-types InternalIP \
      --service-account-key-file "$CDIR/sa.pub" --service-account-signing-key-file "$CDIR/sa.key" \
      --service-account-issuer https://kubernetes.default.svc --api-audiences https://kubernetes.default.svc \
      --service-cluster-ip-range "$SVC_CIDR" --allow-privileged=false --profiling=false \
      --enable-admission-plugins NodeRestriction
    wait_for kube-apiserver 90 k get --raw /readyz || { tail -20 "$CDIR/apiserver.log" >&2; exit 1; }
  fi
  if [[ -z $(running_pid cluster-controller-manager) ]]; then
    log "cluster: starting kube-controller-manager"
    start_daemon cluster-controller-manager "$CDIR" "$CDIR/controller-manager.log" \
      "$KUBE/bin/kube-controller-manager" --kubeconfig "$CDIR/controller-manager.kubeconfig" \
      --authentication-kubeconfig "$CDIR/controller-manager.kubeconfig" \
      --authorization-kubeconfig "$CDIR/controller-manager.kubeconfig" \
      --bind-address 127.0.0.1 --port 0 --leader-elect=false --use-service-account-credentials \
      --service-account-private-key-file "$CDIR/sa.key" --root-ca-file "$CDIR/ca.crt" \
      --service-cluster-ip-range "$SVC_CIDR" --controllers '*,-csrsigning,-bootstrapsigner,-tokencleaner'
  fi
  if [[ -z $(running_pid cluster-scheduler) ]]; then
    log "cluster: starting kube-scheduler"
    start_daemon cluster-scheduler "$CDIR" "$CDIR/scheduler.log" "$KUBE/bin/kube-scheduler" \
      --kubeconfig "$CDIR/scheduler.kubeconfig" --authentication-kubeconfig "$CDIR/scheduler.kubeconfig" \
      --authorization-kubeconfig "$CDIR/scheduler.kubeconfig" \
      --bind-address 127.0.0.1 --port 0 --leader-elect=false
  fi
}

node_up() {
  if [[ -z $(running_pid cluster-kubelet) ]]; then
    mkdir -p "$CDIR/kubelet"
    cat >"$CDIR/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $GW
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$CDIR/ca.crt"}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
failSwapOn: false
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
imageGCHighThresholdPercent: 100
serializeImagePulls: false
resolvConf: /etc/resolv.conf
EOF
    log "cluster: starting kubelet ($NODE)"
    start_daemon cluster-kubelet "$CDIR" "$CDIR/kubelet.log" "$KUBE/bin/kubelet" \
      --config "$CDIR/kubelet.yaml" --kubeconfig "$CDIR/kubelet.kubeconfig" --root-dir "$CDIR/kubelet" \
      --cert-dir "$CDIR/kubelet/pki" --hostname-override "$NODE" --node-ip "$GW" \
      --container-runtime remote --container-runtime-endpoint "unix://$sock" \
      --pod-infra-container-image "$PAUSE_IMAGE"
  fi
  wait_for "node $NODE" 120 bash -c "'$KUBECTL' --kubeconfig '$CDIR/admin.kubeconfig' get node $NODE \
    -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True" ||
    { tail -30 "$CDIR/kubelet.log" >&2; exit 1; }
  if [[ -z $(running_pid cluster-kube-proxy) ]]; then
    log "cluster: starting kube-proxy (iptables)"
    start_daemon cluster-kube-proxy "$CDIR" "$CDIR/kube-proxy.log" "$KUBE/bin/kube-proxy" \
      --kubeconfig "$CDIR/kube-proxy.kubeconfig" --hostname-override "$NODE" --proxy-mode iptables \
      --cluster-cidr "$POD_CIDR" --bind-address "$GW" --metrics-bind-address 127.0.0.1:10249 \
      --healthz-bind-address 127.0.0.1:10256 --conntrack-max-per-core 0
  fi
}

up() {
  for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy; do
    [[ -x $KUBE/bin/$b ]] || { "$ROOT/hack/kube-build.sh" --node; break; }
  done
  local p
  for p in containerd runc containernetworking-plugins umoci socat iptables conntrack etcd-server; do
    dpkg -s "$p" >/dev/null 2>&1 && continue
    log "apt-get install containerd runc containernetworking-plugins umoci socat iptables conntrack etcd-server"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends containerd runc \
      containernetworking-plugins umoci socat iptables conntrack etcd-server >/dev/null
    break
  done
  mkdir -p "$CDIR"
  certs
  network
  forwarders
  containerd_up
  images
  control_plane
  node_up
  print_env >"$STATE/cluster.env"
  log "cluster ready: node $NODE, image $(cat "$CDIR/image"), kubeconfig $CDIR/admin.kubeconfig"
}

down() {
  local name pid
  for name in "${DAEMONS[@]}"; do
    pid=$(running_pid "$name") || true
    if [[ -n $pid ]]; then
      [[ $name == cluster-kubelet ]] && stop_pods
      log "stopping $name"
      kill -- -"$pid" 2>/dev/null || kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
    rm -f "$STATE/$name.pid"
  done
  # Containers' shims outlive containerd; stop them and unmount what they left.
  pkill -f "containerd-shim-runc-v2 -namespace k8s.io -address $sock" 2>/dev/null || true
  local m ns
  for m in $(grep -oE " ($CDIR|$CACHE/cluster/containerd)/[^ ]+" /proc/mounts | sort -r || true); do
    umount -l "$m" 2>/dev/null || true
  done
  # Killing a sandbox does not run CNI's teardown: remove the veths on the bridge, and the pods'
  # network namespaces (CRI names them cni-*) that no process uses any more.
  for m in $(ip -o link show master "$BRIDGE" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
    ip link del "$m" 2>/dev/null || true
  done
  for ns in $(ip netns list 2>/dev/null | awk '/^cni-/{print $1}'); do
    [[ -z $(ip netns pids "$ns" 2>/dev/null) ]] && ip netns del "$ns" 2>/dev/null
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  drop_rules
  rm -rf "$CDIR/cni-ipam"
}

# Stops the pods' sandboxes while containerd still runs, so their netns and veths go with them.
stop_pods() {
  [[ -S $sock ]] || return 0
  local c
  for c in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s KILL "$c" >/dev/null 2>&1 || true; done
}

status() {
  local name
  for name in "${DAEMONS[@]}"; do
    printf '%-28s %s\n' "$name" "$( [[ -n $(running_pid "$name") ]] && echo running || echo stopped)"
  done
}

print_env() {
  echo "export KUBECTL=$KUBECTL"
  echo "export HELM=$KUBE/bin/helm"
  echo "export CLUSTER_KUBECONFIG=$CDIR/admin.kubeconfig"
  echo "export CLUSTER_IMAGE=$(cat "$CDIR/image" 2>/dev/null)"
  echo "export CLUSTER_GATEWAY=$GW"
  echo "export CLUSTER_CONTAINERD=$sock"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  env) print_env ;;
  status) status ;;
  *) echo "usage: $0 up|down|env|status" >&2; exit 2 ;;
esac
