#!/usr/bin/env bash
# Hostile load on the search service (a script, not a test; loopback only, bounded in count and
# time): IDLE connections that send nothing (2,000) and SLOW clients (200) that announce a query
# and trickle its body in a byte a second, while /healthz (a new connection each time) and real
# searches are timed. The same searches and probes are timed first with nothing else on the
# server: the baseline, from the same run. Prints p50/p99 and the statuses of each.
#   IDLE=2000 SLOW=200 SECONDS_UNDER_LOAD=8 hack/loadtest-hostile.sh   (idle ones are cut after
# the 10 s header timeout: the window under load is shorter than that)
#   hack/loadtest-hostile.sh --check   the test command's run: the dev build (the one the tests
# built), the table kept in .state/artifacts/loadtest-hostile.txt, and a failure when any search
# or probe under load got anything but a 200. Latencies are printed, never judged.
source "$(dirname "$0")/lib.sh"
"$ROOT/hack/install.sh"
"$ROOT/hack/services.sh" up
source "$STATE/env"
export IMAGEINDEX_MODEL=${IMAGEINDEX_MODEL:-$("$ROOT/hack/model.sh")} IMAGEINDEX_COLLECTION=loadtest_hostile RUST_LOG=warn
profile=release
[[ ${1:-} == --check ]] && profile=dev
(cd "$ROOT" && cargo build --locked --profile "$profile" --quiet --bin imageindex)
bin=$CARGO_TARGET_DIR/$([[ $profile == dev ]] && echo debug || echo release)/imageindex
samples=$STATE/samples
[[ -d $samples ]] || "$PY" "$ROOT/hack/make-sample-images.py" "$samples"
"$bin" index "$samples" >/dev/null
ulimit -n 16384
port=18083
# Room for every hostile connection: the point is what they hold inside, not the accept limit
# (which `tests/local_services/hostile.rs` checks on its own).
"$bin" serve --listen "127.0.0.1:$port" --max-connections 4096 --header-timeout 10 --request-timeout 30 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done
query=$(find "$samples" -name '*.jpg' | sort | sed -n 1p)
mkdir -p "$STATE/artifacts"
"$PY" - "$port" "$query" "${IDLE:-2000}" "${SLOW:-200}" "${SECONDS_UNDER_LOAD:-8}" <<'PYEOF' | tee "$STATE/artifacts/loadtest-hostile.txt"
import asyncio, statistics, sys, time
port, query, idle_n, slow_n, seconds = int(sys.argv[1]), open(sys.argv[2], "rb").read(), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
B = "hostileloadtest"
body = (f"--{B}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n\r\n").encode() + query + f"\r\n--{B}--\r\n".encode()
search = (f"POST /img/search?topk=5 HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: multipart/form-data; boundary={B}\r\n"
          f"Content-Length: {len(body)}\r\n\r\n").encode() + body
probe = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

async def request(raw):
    t = time.perf_counter()
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        w.write(raw); await w.drain()
        status = (await asyncio.wait_for(r.readline(), 30)).split()[1].decode()
        await asyncio.wait_for(r.read(), 30)
        w.close()
    except Exception as e:
        status = type(e).__name__
    return status, (time.perf_counter() - t) * 1e3

async def timed(raw, every, until):
    out = []
    while time.perf_counter() < until:
        out.append(await request(raw))
        await asyncio.sleep(every)
    return out

async def idle(stop):
    conns = []
    for _ in range(idle_n):
        try:
            conns.append(await asyncio.open_connection("127.0.0.1", port))
        except OSError:
            break
    await stop.wait()
    for _, w in conns:
        w.close()
    return len(conns)

async def slow(stop):
    head = (f"POST /img/search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={B}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    conns = []
    for _ in range(slow_n):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(head + body[:100]); conns.append(w)
    sent = 100
    while not stop.is_set() and sent < len(body) - 1:
        for w in conns:
            if not w.is_closing():
                w.write(body[sent:sent + 1])
        sent += 1
        try:
            await asyncio.wait_for(stop.wait(), 1)
        except asyncio.TimeoutError:
            pass
    for w in conns:
        w.close()
    return len(conns)

def line(what, results):
    ms = sorted(m for _, m in results)
    statuses = {}
    for s, _ in results:
        statuses[s] = statuses.get(s, 0) + 1
    p = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]
    print(f"| {what} | {len(ms)} | {statistics.median(ms):.1f} ms | {p(0.99):.1f} ms | {statuses} |")

async def main():
    print("| what | requests | p50 | p99 | statuses |\n| --- | --- | --- | --- | --- |")
    until = time.perf_counter() + seconds / 2
    s, h = await asyncio.gather(timed(search, 0.05, until), timed(probe, 0.1, until))
    line("search, nothing else (baseline)", s); line("/healthz, nothing else (baseline)", h)
    stop = asyncio.Event()
    hostile = [asyncio.create_task(idle(stop)), asyncio.create_task(slow(stop))]
    await asyncio.sleep(2)
    until = time.perf_counter() + seconds
    s, h = await asyncio.gather(timed(search, 0.05, until), timed(probe, 0.1, until))
    stop.set()
    opened = [await t for t in hostile]
    line(f"search beside {opened[0]} idle connections and {opened[1]} slow bodies", s)
    line(f"/healthz beside {opened[0]} idle connections and {opened[1]} slow bodies", h)
    unanswered = [st for st, _ in s + h if st != "200"]
    if unanswered or min(len(s), len(h)) == 0 or opened[0] < idle_n or opened[1] < slow_n:
        print(f"under load: {len(unanswered)} requests not answered 200 ({unanswered[:10]}), "
              f"{opened[0]}/{idle_n} idle and {opened[1]}/{slow_n} slow connections opened")
        sys.exit(1)

asyncio.run(main())
PYEOF
