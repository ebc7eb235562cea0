#!/usr/bin/env bash
# Instructions per request: apiwarden and the hyper floor, each run under valgrind's callgrind
# behind the same nginx upstream, counted over the same kind of wrk load. A count of
# instructions does not drift with the machine's load as req/s does, so a change to the hot
# path can be judged with it in one run, where `bench/run.sh`'s ratios need many rounds.
# It counts user-space instructions only: the kernel's share (the TCP path, the ledger's page
# cache) and cache misses do not show. See bench/README.md.
set -euo pipefail

DURATION="${DURATION:-10s}"
WARMUP="${WARMUP:-3s}"
CONNECTIONS="${CONNECTIONS:-10}"
DURABILITY="${DURABILITY:-batched}"
# How many functions of apiwarden's own profile to list (by instructions per request).
TOP="${TOP:-20}"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
cd "$REPO_ROOT"
APIWARDEN_BIN="${APIWARDEN_BIN:-target/release/apiwarden}"
FLOOR_BIN="${FLOOR_BIN:-target/release/examples/hyper_floor}"

log() { printf '[instructions] %s\n' "$*" >&2; }
die() { printf '[instructions] ERROR: %s\n' "$*" >&2; exit 1; }

for tool in valgrind callgrind_control nginx wrk curl python3; do
    command -v "$tool" >/dev/null 2>&1 \
        || die "$tool not found (apt-get install -y valgrind nginx wrk curl python3)"
done
# The default binaries are built (cargo does nothing when they are current), so that a run
# after a change counts the changed code; a binary named by the caller must exist.
if [[ "$APIWARDEN_BIN" == target/release/apiwarden ]]; then
    cargo build --release -p apiwarden >&2 || die "cargo build --release failed"
fi
if [[ "$FLOOR_BIN" == target/release/examples/hyper_floor ]]; then
    cargo build --release -p apiwarden-gateway --example hyper_floor >&2 \
        || die "building the hyper_floor example failed"
fi
[[ -x "$APIWARDEN_BIN" ]] || die "APIWARDEN_BIN=$APIWARDEN_BIN does not exist"
[[ -x "$FLOOR_BIN" ]] || die "FLOOR_BIN=$FLOOR_BIN does not exist"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/apiwarden-instr.XXXXXX")"
chmod 755 "$TMP"
PIDS=()
cleanup() {
    local rc=$? pid
    for pid in "${PIDS[@]+"${PIDS[@]}"}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]+"${PIDS[@]}"}"; do wait "$pid" 2>/dev/null || true; done
    [[ "${KEEP_TMP:-0}" == 1 ]] && log "keeping $TMP" || rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

read -r UP_PORT FLOOR_PORT AW_PORT AW_ADMIN_PORT < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)

# The upstream: nginx, one worker, a fixed small answer (as in bench/run.sh).
mkdir -p "$TMP/up/logs"
cat >"$TMP/up/nginx.conf" <<EOF
worker_processes 1;
pid $TMP/up/nginx.pid;
error_log $TMP/up/logs/error.log;
events { worker_connections 1024; }
http {
    access_log off;
    server {
        listen 127.0.0.1:$UP_PORT;
        keepalive_requests 1000000;
        location / { return 200 "hello from upstream\n"; }
    }
}
EOF
nginx -p "$TMP/up/" -c "$TMP/up/nginx.conf" -g 'daemon off;' >"$TMP/up/logs/stderr.log" 2>&1 &
PIDS+=("$!")

mkdir -p "$TMP/aw"
cat >"$TMP/aw/apiwarden.toml" <<EOF
[gateway]
listen = "127.0.0.1:$AW_PORT"
[admin]
listen = "127.0.0.1:$AW_ADMIN_PORT"
[storage]
data_dir = "$TMP/aw/data"
[audit]
durability = "$DURABILITY"
[[upstreams]]
name = "bench"
url = "http://127.0.0.1:$UP_PORT"
[[routes]]
name = "open"
path_prefix = "/"
upstream = "bench"
auth = ["none"]
EOF

wait_up() {
    local url="$1" pid="$2" i
    for i in $(seq 1 300); do
        curl -fsS --max-time 5 -o /dev/null "$url" 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.2
    done
    return 1
}

# measure NAME PORT CMD...: runs CMD under callgrind, warms it up, counts DURATION of load.
declare -A REQUESTS OUT
measure() {
    local name="$1" port="$2"
    shift 2
    local url="http://127.0.0.1:$port/bench"
    log "[$name] starting under callgrind"
    valgrind --tool=callgrind --callgrind-out-file="$TMP/$name.cg" "$@" \
        >"$TMP/$name.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_up "$url" "$pid" || { cat "$TMP/$name.log" >&2; die "$name did not answer on $url"; }
    log "[$name] warm-up $WARMUP"
    wrk -t1 -c"$CONNECTIONS" -d"$WARMUP" "$url" >/dev/null
    callgrind_control --zero "$pid" >/dev/null
    log "[$name] counting $DURATION (wrk -t1 -c$CONNECTIONS)"
    wrk -t1 -c"$CONNECTIONS" -d"$DURATION" "$url" >"$TMP/$name.wrk"
    callgrind_control --dump "$pid" >/dev/null
    REQUESTS[$name]="$(awk '/requests in/ {print $1}' "$TMP/$name.wrk")"
    grep -qE 'Non-2xx|Socket errors' "$TMP/$name.wrk" && die "$name: wrk saw errors: $(cat "$TMP/$name.wrk")"
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    # Waited for: not to be signalled again by `cleanup` (its number may be reused).
    local keep=() p
    for p in "${PIDS[@]}"; do [[ "$p" == "$pid" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
    OUT[$name]="$(ls -t "$TMP/$name".cg.* | head -1)"
}

wait_up "http://127.0.0.1:$UP_PORT/" "${PIDS[0]}" || die "the upstream nginx did not start"
measure hyper-floor "$FLOOR_PORT" "$FLOOR_BIN" "127.0.0.1:$FLOOR_PORT" "127.0.0.1:$UP_PORT"
measure apiwarden "$AW_PORT" "$APIWARDEN_BIN" serve --config "$TMP/aw/apiwarden.toml"

python3 - "$TOP" "$DURABILITY" "$DURATION" "$CONNECTIONS" \
    "${OUT[hyper-floor]}" "${REQUESTS[hyper-floor]}" "${OUT[apiwarden]}" "${REQUESTS[apiwarden]}" <<'PY'
import collections, re, sys

top, durability, duration, conns = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
runs = {"hyper-floor": (sys.argv[5], int(sys.argv[6])), "apiwarden": (sys.argv[7], int(sys.argv[8]))}
# valgrind's CPU has no SHA extensions: sha2 falls back to its portable code there, many
# times the instructions of the SHA-NI code that runs outside valgrind. Reported apart.
SOFT_SHA = "sha2::sha256::compress256"

def self_costs(path):
    """Instructions spent in each function itself (callgrind's self cost)."""
    names, costs, current, call_line = {}, collections.Counter(), None, False
    def name(tok):
        m = re.match(r"\((\d+)\)(?: (.*))?", tok)
        if m.group(2):
            names[m.group(1)] = m.group(2)
        return names[m.group(1)]
    with open(path) as f:
        for line in f:
            if line.startswith("fn="):
                current = name(line[3:].strip())
            elif line.startswith("cfn="):
                name(line[4:].strip())
            elif line.startswith("calls="):
                call_line = True  # the next cost line is the callee's, not this function's
            elif line[:1].isdigit() or line[:1] in "+-*":
                parts = line.split()
                if len(parts) >= 2:
                    if call_line:
                        call_line = False
                    else:
                        costs[current] += int(parts[1])
    return costs

per_req = {}
print(f"- callgrind, wrk -t1 -c{conns} -d{duration} after a warm-up; apiwarden's ledger: {durability}")
print(f"- user-space instructions only; `{SOFT_SHA}` (valgrind has no SHA extensions) counted apart")
print()
print("| target | requests | instructions/request | without software SHA-256 | SHA-256 (software) |")
print("|---|---:|---:|---:|---:|")
profiles = {}
for target, (path, n) in runs.items():
    costs = self_costs(path)
    profiles[target] = (costs, n)
    total = sum(costs.values()) / n
    sha = costs.get(SOFT_SHA, 0) / n
    per_req[target] = total - sha
    if target == "apiwarden" and sha == 0:
        print(f"WARNING: no `{SOFT_SHA}` in apiwarden's profile (renamed or inlined?): "
              "the column without SHA-256 includes it", file=sys.stderr)
    print(f"| {target} | {n} | {total:,.0f} | {total - sha:,.0f} | {sha:,.0f} |")
print()
print(f"apiwarden/hyper-floor instructions per request (without software SHA-256): "
      f"{per_req['apiwarden'] / per_req['hyper-floor']:.2f}")
print()
costs, n = profiles["apiwarden"]
print(f"apiwarden's top {top} functions by their own instructions per request:")
print()
print("| instructions/request | function |")
print("|---:|---|")
for fn, c in [fc for fc in costs.most_common(top + 1) if fc[0] != SOFT_SHA][:top]:
    print(f"| {c / n:,.0f} | `{fn[:110]}` |")
PY
