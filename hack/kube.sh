#!/usr/bin/env bash
# A real Kubernetes control plane on loopback: etcd (Debian's etcd-server) and kube-apiserver
# 1.20.2 (built from Debian's source package by hack/kube-build.sh). No kubelet, scheduler or
# controller-manager: tests play their part (run a Job's command, mark it complete).
#   hack/kube.sh up       start (builds the apiserver first if missing), install the CRD and the chart
#   hack/kube.sh down     stop
#   hack/kube.sh env      print exports: KUBECTL, IMAGEINDEX_TEST_KUBECONFIG (admin) and
#                         IMAGEINDEX_TEST_CONTROLLER_KUBECONFIG (the chart's ServiceAccount, RBAC-bound)
# Two identities, by static token: `admin` (system:masters) and the controller's ServiceAccount
# user, which has exactly the chart's RBAC rules and nothing else.
source "$(dirname "$0")/lib.sh"
KUBE=$CACHE/kube
KDIR=$STATE/kube
ETCD_PORT=${ETCD_PORT:-12379}
KUBE_PORT=${KUBE_PORT:-16443}
SA_NS=imageindex-system
SA_NAME=imageindex-controller
KUBECTL=$KUBE/bin/kubectl
HELM=$KUBE/bin/helm

apiserver_ready() { [[ $(curl -fsS --cacert "$KDIR/ca.crt" -H "Authorization: Bearer $(cat "$KDIR/admin.token")" \
  "https://127.0.0.1:$KUBE_PORT/readyz") == ok ]]; }

kubeconfig() { # FILE TOKEN-FILE USER
  write_kubeconfig "$1" "https://127.0.0.1:$KUBE_PORT" "$KDIR/ca.crt" "$3" "tokenFile: \"$2\""
}

certs() {
  [[ -f $KDIR/apiserver.crt ]] && return
  mkdir -p "$KDIR"
  log "making a CA, a serving certificate and the service-account key"
  make_ca "$KDIR" imageindex-local-ca
  make_cert "$KDIR" apiserver "/CN=kube-apiserver" "IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc"
  make_sa_key "$KDIR"
  new_token >"$KDIR/admin.token"
  new_token >"$KDIR/controller.token"
  {
    echo "$(cat "$KDIR/admin.token"),admin,admin,\"system:masters\""
    echo "$(cat "$KDIR/controller.token"),system:serviceaccount:$SA_NS:$SA_NAME,$SA_NAME,\"system:serviceaccounts,system:serviceaccounts:$SA_NS,system:authenticated\""
  } >"$KDIR/tokens.csv"
  kubeconfig "$KDIR/admin.kubeconfig" "$KDIR/admin.token" admin
  kubeconfig "$KDIR/controller.kubeconfig" "$KDIR/controller.token" "$SA_NAME"
}

up() {
  [[ -x $KUBE/bin/kube-apiserver && -x $KUBECTL ]] || "$ROOT/hack/kube-build.sh"
  mkdir -p "$KDIR"
  certs
  if [[ -z $(running_pid etcd) ]]; then
    port_free "$ETCD_PORT" etcd ETCD_PORT || exit 1
    log "starting etcd (:$ETCD_PORT)"
    start_etcd etcd "$KDIR" imageindex "$ETCD_PORT"
  fi
  if [[ -z $(running_pid kube-apiserver) ]]; then
    port_free "$KUBE_PORT" kube-apiserver KUBE_PORT || exit 1
    log "starting kube-apiserver (:$KUBE_PORT)"
    start_daemon kube-apiserver "$KDIR" "$KDIR/apiserver.log" "$KUBE/bin/kube-apiserver" \
      --etcd-servers "http://127.0.0.1:$ETCD_PORT" --bind-address 127.0.0.1 --advertise-address 127.0.0.1 \
      --secure-port "$KUBE_PORT" --insecure-port 0 \
      --tls-cert-file "$KDIR/apiserver.crt" --tls-private-key-file "$KDIR/apiserver.key" \
      --client-ca-file "$KDIR/ca.crt" --token-auth-file "$KDIR/tokens.csv" --authorization-mode RBAC \
      --service-account-key-file "$KDIR/sa.pub" --service-account-signing-key-file "$KDIR/sa.key" \
      --service-account-issuer https://kubernetes.default.svc --api-audiences https://kubernetes.default.svc \
      --service-cluster-ip-range 10.96.0.0/16 --allow-privileged=false --profiling=false
    wait_for kube-apiserver 90 apiserver_ready || { tail -20 "$KDIR/apiserver.log" >&2; exit 1; }
  fi
  local k=("$KUBECTL" --kubeconfig "$KDIR/admin.kubeconfig")
  # The CRD from the types, and the chart's RBAC, ServiceAccount and operator Deployment, exactly
  # as `helm install` would create them. Nothing runs the Deployment's pod here; tests run the
  # controller as a process with the ServiceAccount's identity instead.
  "${k[@]}" apply -f "$ROOT/crds/imageindex.yaml" >/dev/null
  "${k[@]}" wait --for condition=established --timeout=60s crd/imageindexes.imageindex.dev >/dev/null
  "${k[@]}" create namespace "$SA_NS" --dry-run=client -o yaml | "${k[@]}" apply -f - >/dev/null
  "$HELM" template imageindex "$ROOT/charts/imageindex" --namespace "$SA_NS" |
    "${k[@]}" apply -f - >/dev/null
  log "kube-apiserver $("$KUBE/bin/kube-apiserver" --version | awk '{print $2}') ready on https://127.0.0.1:$KUBE_PORT"
  print_env >"$STATE/kube.env"
}

down() {
  for name in kube-apiserver etcd; do
    local pid
    pid=$(running_pid "$name") || true
    if [[ -n $pid ]]; then
      log "stopping $name"
      kill -- -"$pid" 2>/dev/null || kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
    rm -f "$STATE/$name.pid"
  done
}

print_env() {
  echo "export KUBECTL=$KUBECTL"
  echo "export HELM=$HELM"
  echo "export IMAGEINDEX_TEST_KUBECONFIG=$KDIR/admin.kubeconfig"
  echo "export IMAGEINDEX_TEST_CONTROLLER_KUBECONFIG=$KDIR/controller.kubeconfig"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  env) print_env ;;
  *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
