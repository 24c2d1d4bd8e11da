#!/usr/bin/env bash
# Peak memory with hostile images (not a test): 16 flat 8000x8000 JPEGs and 4 flat 8000x8000 PNGs
# (tiny files, 192 MB each decoded) beside 20 photos, through `imageindex index` and through 16
# concurrent searches on `imageindex serve`, once with the decode memory budget and DCT-scaled
# large JPEGs (the defaults) and once without them (the baseline: what the code did before).
# Prints peak RSS (VmHWM) of each process next to the budget.
source "$(dirname "$0")/lib.sh"
"$ROOT/hack/services.sh" up
model=$("$ROOT/hack/model.sh")
source "$STATE/env"
cd "$ROOT"
cargo build --locked --quiet
dir=$CACHE/photos/hostile-memory
if [[ ! -f $dir/done ]]; then
  "$PY" "$ROOT/hack/make-photos.py" "$dir" --count 20 --seed 11 >&2
  "$PY" - "$dir/photos" <<'PY'
import sys
from PIL import Image
for i in range(16):
    Image.new("RGB", (8000, 8000), (20 * i % 256, 90, 200)).save(f"{sys.argv[1]}/flat-{i:02}.jpg", quality=80)
for i in range(4):
    Image.new("RGB", (8000, 8000), (200, 20 * i, 90)).save(f"{sys.argv[1]}/flat-{i:02}.png")
PY
  touch "$dir/done"
fi
export IMAGEINDEX_MODEL=$model RUST_LOG=${RUST_LOG:-warn} BIN=$CARGO_TARGET_DIR/debug/imageindex PHOTOS=$dir/photos
"$PY" - <<'PY'
import os, subprocess, threading, time, urllib.request, json, glob, socket

BIN, PHOTOS = os.environ["BIN"], os.environ["PHOTOS"]
configs = [
    ("budget 512 MiB, DCT-scaled large JPEGs (now)", ["--decode-memory-mib", "512"]),
    ("no budget, exact decode (before)", ["--decode-memory-mib", "1000000", "--exact-max-pixels", "1000000000"]),
]

def vm_hwm(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return 0

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def post(url, path, token=None):
    body, boundary = open(path, "rb").read(), "imageindexbench"
    data = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q\"\r\n\r\n").encode() + body + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        return urllib.request.urlopen(req, timeout=120).status
    except urllib.error.HTTPError as e:
        return e.code

rows = []
for name, flags in configs:
    collection = "bench_memory_" + ("now" if "now" in name else "before")
    common = ["--collection", collection] + flags
    # The sync: peak RSS of the whole process, from the kernel's accounting at exit.
    started = time.time()
    p = subprocess.Popen([BIN, "index", PHOTOS, "--json"] + common, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    summary = json.loads(out) if status == 0 else {}
    sync_rss = usage.ru_maxrss // 1024
    sync_result = f"indexed {summary.get('indexed')} failed {summary.get('failed')}" if status == 0 else f"exit status {status}"
    # The search service: 20 concurrent searches with the hostile files.
    port = free_port()
    token = "bench-memory-token"
    s = subprocess.Popen([BIN, "serve", "--listen", f"127.0.0.1:{port}", "--token", token, "--allow-drop"] + common,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if urllib.request.urlopen(base + "/readyz", timeout=2).status == 200: break
        except Exception: time.sleep(0.2)
    post(base + "/img/search", sorted(glob.glob(PHOTOS + "/*.jpg"))[0])  # warm
    idle = vm_hwm(s.pid)
    statuses = []
    hostile = sorted(glob.glob(PHOTOS + "/flat-*"))
    threads = [threading.Thread(target=lambda f=f: statuses.append(post(base + "/img/search", f))) for f in hostile]
    [t.start() for t in threads]; [t.join() for t in threads]
    serve_rss = vm_hwm(s.pid)
    urllib.request.urlopen(urllib.request.Request(base + "/img/drop", method="POST", headers={"Authorization": f"Bearer {token}"}))
    s.terminate(); s.wait()
    counts = {c: statuses.count(c) for c in sorted(set(statuses))}
    rows.append((name, sync_rss, sync_result, idle, serve_rss, counts))

print(f"\n{'configuration':48} {'index peak RSS':>15}  {'index result':22} {'serve idle':>10} {'serve peak':>10}  search statuses")
for name, sync_rss, sync_result, idle, serve_rss, counts in rows:
    print(f"{name:48} {sync_rss:>12} MB  {sync_result:22} {idle:>7} MB {serve_rss:>7} MB  {counts}")
print("\n(the budget bounds what decoding adds to a process: peak - idle <= budget, plus the request bodies in flight)")
PY
