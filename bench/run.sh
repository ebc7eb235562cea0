#!/usr/bin/env bash
# Load benchmark: wrk against (1) a fast nginx upstream directly, (2) nginx as a
# plain reverse proxy in front of it, (3) apiwarden in front of it.
# Prints a Markdown report on stdout; progress and diagnostics go to stderr.
# See bench/README.md for the knobs.
set -euo pipefail

# ---------------------------------------------------------------- settings --
THREADS="${THREADS:-2}"
CONNECTIONS="${CONNECTIONS:-50}"
DURATION="${DURATION:-10s}"
WARMUP="${WARMUP:-2s}"
BENCH_PATH="${BENCH_PATH:-/bench}"
SKIP_APIWARDEN="${SKIP_APIWARDEN:-0}"
READY_TIMEOUT="${READY_TIMEOUT:-30}"
# Each target is measured ROUNDS times, the targets taking turns, and the median is reported:
# on a shared machine, drift then hits every target alike.
ROUNDS="${ROUNDS:-1}"
# The limit runs: the same route with one local limit, and with one Redis limit (skipped when
# nothing answers at REDIS_HOST:REDIS_PORT). LIMITS=0 skips both.
LIMITS="${LIMITS:-1}"
REDIS_HOST="${REDIS_HOST:-127.0.0.1}"
REDIS_PORT="${REDIS_PORT:-6379}"
# The JWT run: the open route behind an ES256 JWT (a key and token made with Python's
# `cryptography`, the JWKS served on loopback). JWT=0 skips it.
JWT="${JWT:-1}"
# The audit ledger's durability for the apiwarden runs: strict | batched | async.
DURABILITY="${DURABILITY:-batched}"
# FLOOR=1 adds a target: hyper alone in apiwarden's layout, without any of its stages
# (crates/apiwarden-gateway/examples/hyper_floor.rs, built here): the floor under apiwarden's
# cost, to tell hyper's share of the distance to nginx from apiwarden's own.
FLOOR="${FLOOR:-0}"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
cd "$REPO_ROOT"

DEFAULT_APIWARDEN_BIN="target/release/apiwarden"
APIWARDEN_BIN="${APIWARDEN_BIN:-$DEFAULT_APIWARDEN_BIN}"

log()  { printf '[bench] %s\n' "$*" >&2; }
die()  { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }
# Never die silently under set -e.
set -E
trap 'rc=$?; printf "[bench] ERROR: command failed (exit %s) at line %s: %s\n" "$rc" "$LINENO" "$BASH_COMMAND" >&2' ERR

# ------------------------------------------------------------ prerequisites --
NGINX_BIN="${NGINX_BIN:-}"
if [[ -z "$NGINX_BIN" ]]; then
    NGINX_BIN="$(command -v nginx 2>/dev/null || true)"
    [[ -z "$NGINX_BIN" && -x /usr/sbin/nginx ]] && NGINX_BIN=/usr/sbin/nginx
fi
[[ -n "$NGINX_BIN" && -x "$NGINX_BIN" ]] || die "nginx not found (apt-get install -y nginx, or set NGINX_BIN)"
command -v wrk     >/dev/null 2>&1 || die "wrk not found (apt-get install -y wrk)"
command -v curl    >/dev/null 2>&1 || die "curl not found"
command -v python3 >/dev/null 2>&1 || die "python3 not found (used to pick free ports)"

for v in THREADS CONNECTIONS ROUNDS; do
    [[ "${!v}" =~ ^[0-9]+$ && "${!v}" -gt 0 ]] || die "$v must be a positive integer (got '${!v}')"
done
(( CONNECTIONS >= THREADS )) || die "CONNECTIONS ($CONNECTIONS) must be >= THREADS ($THREADS) for wrk"
[[ "$BENCH_PATH" == /* ]] || die "BENCH_PATH must start with '/' (got '$BENCH_PATH')"

# Resolve (and if needed build) apiwarden before starting anything else.
if [[ "$SKIP_APIWARDEN" != 1 ]]; then
    if [[ "$APIWARDEN_BIN" == "$DEFAULT_APIWARDEN_BIN" ]]; then
        # Always: a binary left from an earlier build would measure older code (cargo does
        # nothing when it is up to date).
        command -v cargo >/dev/null 2>&1 || die "cargo is not installed: build apiwarden or set APIWARDEN_BIN"
        log "cargo build --release (the working tree's code)"
        cargo build --release >&2 || die "cargo build --release failed"
        [[ -x "$APIWARDEN_BIN" ]] || die "cargo build --release succeeded but $APIWARDEN_BIN does not exist"
    elif [[ ! -x "$APIWARDEN_BIN" ]]; then
        die "APIWARDEN_BIN=$APIWARDEN_BIN does not exist or is not executable"
    fi
fi

FLOOR_BIN="target/release/examples/hyper_floor"
if [[ "$FLOOR" == 1 ]]; then
    command -v cargo >/dev/null 2>&1 || die "FLOOR=1 needs cargo to build $FLOOR_BIN"
    log "FLOOR=1: cargo build --release -p apiwarden-gateway --example hyper_floor"
    cargo build --release -p apiwarden-gateway --example hyper_floor >&2 \
        || die "building the hyper_floor example failed"
fi

# -------------------------------------------------------- temp dir + cleanup --
TMP="$(mktemp -d "${TMPDIR:-/tmp}/apiwarden-bench.XXXXXX")"
# nginx workers may run as an unprivileged user when started as root.
chmod 755 "$TMP"
PIDS=()

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local pid
    for pid in "${PIDS[@]+"${PIDS[@]}"}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]+"${PIDS[@]}"}"; do
        local i
        for i in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "process $pid did not exit on TERM, sending KILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    if [[ "${KEEP_TMP:-0}" == 1 ]]; then
        log "keeping temp dir $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# --------------------------------------------------------------- free ports --
# Bind all sockets at once so the ports are distinct, then release them.
read -r UP_PORT NGINX_PORT AW_PORT AW_ADMIN_PORT JWKS_PORT FLOOR_PORT < <(python3 - <<'EOF'
import socket
socks = []
for _ in range(6):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
)
[[ -n "${AW_ADMIN_PORT:-}" ]] || die "could not pick free ports with python3"
log "ports: upstream=$UP_PORT nginx=$NGINX_PORT apiwarden=$AW_PORT admin=$AW_ADMIN_PORT"

# ------------------------------------------------------------------ helpers --
# wait_http NAME URL PID LOGFILE: poll URL until it answers 2xx, or fail.
wait_http() {
    local name="$1" url="$2" pid="$3" logfile="$4"
    local deadline=$(( $(date +%s) + READY_TIMEOUT ))
    while :; do
        if curl -sf -o /dev/null --max-time 2 "$url"; then
            log "$name is ready ($url)"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            log "$name (pid $pid) exited before becoming ready; last lines of $logfile:"
            tail -n 40 "$logfile" >&2 2>/dev/null || true
            die "$name failed to start"
        fi
        if (( $(date +%s) >= deadline )); then
            log "$name not ready after ${READY_TIMEOUT}s; last lines of $logfile:"
            tail -n 40 "$logfile" >&2 2>/dev/null || true
            die "$name did not become ready at $url within ${READY_TIMEOUT}s"
        fi
        sleep 0.2
    done
}

# start_nginx NAME DIR: run nginx (daemon off) as a background child of this
# shell; sets STARTED_PID.
STARTED_PID=""
start_nginx() {
    local name="$1" dir="$2"
    "$NGINX_BIN" -t -q -p "$dir/" -e "$dir/logs/error.log" -c "$dir/nginx.conf" \
        >"$dir/logs/stderr.log" 2>&1 \
        || { cat "$dir/logs/stderr.log" "$dir/logs/error.log" >&2 2>/dev/null || true; die "nginx config test failed for $name"; }
    "$NGINX_BIN" -p "$dir/" -e "$dir/logs/error.log" -c "$dir/nginx.conf" \
        >>"$dir/logs/stderr.log" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
}

# Writes DIR/nginx.conf: what both nginx instances share, then the http-level blocks read
# from standard input.
write_nginx_conf() {
    local dir=$1 workers=$2 access_log=$3
    mkdir -p "$dir/logs" "$dir/tmp"
    {
        cat <<EOF
daemon off;
worker_processes $workers;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;

events {
    worker_connections 4096;
}

http {
    access_log $access_log;
    default_type text/plain;
    client_body_temp_path $dir/tmp/client_body;
    proxy_temp_path       $dir/tmp/proxy;
    fastcgi_temp_path     $dir/tmp/fastcgi;
    uwsgi_temp_path       $dir/tmp/uwsgi;
    scgi_temp_path        $dir/tmp/scgi;

    keepalive_requests 1000000;
    keepalive_timeout  300s;

EOF
        cat
        echo "}"
    } >"$dir/nginx.conf"
}

# ------------------------------------------------------------ 1. upstream --
UP_DIR="$TMP/nginx-upstream"
write_nginx_conf "$UP_DIR" 1 off <<EOF
    server {
        listen 127.0.0.1:$UP_PORT;
        location / {
            return 200 "hello from upstream\n";
        }
    }
EOF
log "starting upstream nginx on 127.0.0.1:$UP_PORT"
start_nginx upstream "$UP_DIR"
UP_PID="$STARTED_PID"
wait_http "upstream nginx" "http://127.0.0.1:$UP_PORT$BENCH_PATH" "$UP_PID" "$UP_DIR/logs/error.log"

# --------------------------------------------------------- 2. nginx proxy --
NG_DIR="$TMP/nginx-proxy"
write_nginx_conf "$NG_DIR" 2 "$NG_DIR/logs/access.log" <<EOF
    upstream bench_upstream {
        server 127.0.0.1:$UP_PORT;
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }

    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
        }
    }
EOF
log "starting proxy nginx on 127.0.0.1:$NGINX_PORT"
start_nginx proxy "$NG_DIR"
NG_PID="$STARTED_PID"
wait_http "proxy nginx" "http://127.0.0.1:$NGINX_PORT$BENCH_PATH" "$NG_PID" "$NG_DIR/logs/error.log"

# ------------------------------------------------------------ 3. apiwarden --
if [[ "$SKIP_APIWARDEN" == 1 ]]; then
    log "SKIP_APIWARDEN=1: not starting apiwarden"
else
    AW_DIR="$TMP/apiwarden"
    mkdir -p "$AW_DIR" "$TMP/apiwarden-data"
    REDIS_OK=0
    if [[ "$LIMITS" == 1 ]] && (exec 3<>"/dev/tcp/$REDIS_HOST/$REDIS_PORT") 2>/dev/null; then
        REDIS_OK=1
    elif [[ "$LIMITS" == 1 ]]; then
        log "no Redis at $REDIS_HOST:$REDIS_PORT: the Redis limit run is skipped"
    fi
    REDIS_LINE=""
    [[ "$REDIS_OK" == 1 ]] && REDIS_LINE="redis = \"redis://$REDIS_HOST:$REDIS_PORT/\"
redis_prefix = \"bench-$$\""
    JWT_OK=0
    if [[ "$JWT" == 1 ]] && python3 -c 'import cryptography' 2>/dev/null; then
        mkdir -p "$TMP/jwks"
        JWT_TOKEN="$(python3 - "$TMP/jwks/jwks.json" <<'PY'
import base64, json, sys, time
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
b = lambda v: base64.urlsafe_b64encode(v).rstrip(b"=").decode()
key = ec.generate_private_key(ec.SECP256R1())
n = key.public_key().public_numbers()
jwk = {"kty": "EC", "crv": "P-256", "kid": "bench", "x": b(n.x.to_bytes(32, "big")), "y": b(n.y.to_bytes(32, "big"))}
open(sys.argv[1], "w").write(json.dumps({"keys": [jwk]}))
head = b(json.dumps({"alg": "ES256", "kid": "bench", "typ": "JWT"}).encode())
claims = b(json.dumps({"iss": "bench", "aud": "bench", "sub": "bench-user", "client_id": "bench",
                       "scope": "orders:read", "exp": int(time.time()) + 86400}).encode())
r, s = decode_dss_signature(key.sign(f"{head}.{claims}".encode(), ec.ECDSA(hashes.SHA256())))
print(f"{head}.{claims}.{b(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}")
PY
)" || die "could not make a JWT for the jwt route"
        (cd "$TMP/jwks" && exec python3 -m http.server --bind 127.0.0.1 "$JWKS_PORT") >"$TMP/jwks.log" 2>&1 &
        PIDS+=("$!")
        JWT_OK=1
    elif [[ "$JWT" == 1 ]]; then
        log "python3 has no cryptography module: the JWT run is skipped"
    fi
    cat >"$TMP/apiwarden.toml" <<EOF
[gateway]
listen = "127.0.0.1:$AW_PORT"
[admin]
listen = "127.0.0.1:$AW_ADMIN_PORT"
[storage]
data_dir = "$TMP/apiwarden-data"
$REDIS_LINE
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
# The same route behind an API key (issue 3: at least 0.95x the open route).
[[routes]]
name = "keyed"
path_prefix = "/keyed"
upstream = "bench"
auth = ["api_key"]
[[consumers]]
name = "bench"
# The same route with one limit high enough never to refuse: what is measured is the cost
# of deciding.
[[routes]]
name = "limited-local"
path_prefix = "/limited-local"
upstream = "bench"
auth = ["none"]
limits = ["local"]
[limits.local]
rate = "1000000/s"
key = "ip"
store = "local"
EOF
    if [[ "$REDIS_OK" == 1 ]]; then
        cat >>"$TMP/apiwarden.toml" <<EOF
[[routes]]
name = "limited-redis"
path_prefix = "/limited-redis"
upstream = "bench"
auth = ["none"]
limits = ["shared"]
[limits.shared]
rate = "1000000/s"
key = "ip"
store = "redis"
EOF
    fi
    if [[ "$JWT_OK" == 1 ]]; then
        cat >>"$TMP/apiwarden.toml" <<EOF
# The same route behind an ES256 JWT, verified once and then cached (issue 3: at least 0.9x).
[jwt.bench]
issuer = "bench"
jwks_url = "http://127.0.0.1:$JWKS_PORT/jwks.json"
audiences = ["bench"]
[[routes]]
name = "jwt"
path_prefix = "/jwt"
upstream = "bench"
auth = ["jwt"]
EOF
    fi
    API_KEY="$("$APIWARDEN_BIN" keys create --consumer bench --json --config "$TMP/apiwarden.toml" \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["secret"])')" \
        || die "could not issue an API key for the keyed route"
    log "starting apiwarden ($APIWARDEN_BIN) on 127.0.0.1:$AW_PORT (admin $AW_ADMIN_PORT)"
    "$APIWARDEN_BIN" serve --config "$TMP/apiwarden.toml" >"$AW_DIR/apiwarden.log" 2>&1 &
    AW_PID=$!
    PIDS+=("$AW_PID")
    wait_http "apiwarden admin" "http://127.0.0.1:$AW_ADMIN_PORT/readyz" "$AW_PID" "$AW_DIR/apiwarden.log"
    # Make sure the data path actually works before measuring it.
    body="$(curl -sf --max-time 5 "http://127.0.0.1:$AW_PORT$BENCH_PATH")" \
        || { tail -n 40 "$AW_DIR/apiwarden.log" >&2 || true; die "apiwarden did not proxy GET $BENCH_PATH successfully"; }
    [[ "$body" == "hello from upstream" ]] || die "unexpected body through apiwarden: '$body'"
fi

# ------------------------------------------------------ 3b. the hyper floor --
if [[ "$FLOOR" == 1 ]]; then
    log "starting hyper_floor on 127.0.0.1:$FLOOR_PORT"
    "$FLOOR_BIN" "127.0.0.1:$FLOOR_PORT" "127.0.0.1:$UP_PORT" >"$TMP/hyper_floor.log" 2>&1 &
    FLOOR_PID=$!
    PIDS+=("$FLOOR_PID")
    wait_http "hyper_floor" "http://127.0.0.1:$FLOOR_PORT$BENCH_PATH" "$FLOOR_PID" "$TMP/hyper_floor.log"
fi

# ---------------------------------------------------------------- 4. wrk --
# to_ms VALUE: wrk time (e.g. 812.00us, 1.23ms, 2.01s, 1.00m) -> milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        if (match(v, /^[0-9.]+/) == 0) { print "NaN"; exit 1 }
        n = substr(v, 1, RLENGTH); u = substr(v, RLENGTH + 1)
        if (u == "us") f = 0.001; else if (u == "ms") f = 1; else if (u == "s") f = 1000;
        else if (u == "m") f = 60000; else if (u == "h") f = 3600000;
        else { print "NaN"; exit 1 }
        printf "%.3f", n * f
    }'
}

declare -A RPS P50 P99 RPS_ALL P50_ALL P99_ALL
ERRORS=""

declare -A HEADER
run_wrk() {
    local name="$1" url="$2"
    local out="$TMP/wrk-$name.txt"
    local hdr=()
    [[ -n "${HEADER[$name]:-}" ]] && hdr=(-H "${HEADER[$name]}")
    log "[$name] warm-up ${WARMUP}: $url"
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$WARMUP" "${hdr[@]}" "$url" >"$TMP/wrk-$name-warmup.txt" 2>&1 \
        || { cat "$TMP/wrk-$name-warmup.txt" >&2; die "wrk warm-up failed for $name"; }
    log "[$name] measuring ${DURATION} (-t$THREADS -c$CONNECTIONS --latency)"
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "${hdr[@]}" "$url" >"$out" 2>&1 \
        || { cat "$out" >&2; die "wrk failed for $name"; }

    local rps p50 p99
    rps="$(awk '/^Requests\/sec:/ {print $2}' "$out")"
    p50="$(awk '/Latency Distribution/ {d=1; next} d && $1=="50%" {print $2; exit}' "$out")"
    p99="$(awk '/Latency Distribution/ {d=1; next} d && $1=="99%" {print $2; exit}' "$out")"
    if [[ -z "$rps" || -z "$p50" || -z "$p99" ]]; then
        cat "$out" >&2
        die "could not parse wrk output for $name (raw output above)"
    fi
    RPS[$name]="$(awk -v r="$rps" 'BEGIN {printf "%.0f", r}')"
    P50[$name]="$(to_ms "$p50")" || die "unknown latency unit in '$p50' for $name"
    P99[$name]="$(to_ms "$p99")" || die "unknown latency unit in '$p99' for $name"
    RPS_ALL[$name]+="${RPS[$name]} "
    P50_ALL[$name]+="${P50[$name]} "
    P99_ALL[$name]+="${P99[$name]} "

    local errs
    errs="$(grep -E 'Socket errors:|Non-2xx or 3xx responses:' "$out" || true)"
    if [[ -n "$errs" ]]; then
        log "[$name] wrk reported errors:"
        printf '%s\n' "$errs" | sed 's/^ */    /' >&2
        ERRORS+="- $name:"$'\n'"$(printf '%s\n' "$errs" | sed 's/^ */    - /')"$'\n'
    fi
    log "[$name] ${RPS[$name]} req/s, p50 ${P50[$name]} ms, p99 ${P99[$name]} ms"
}

declare -A URL
TARGETS=(direct nginx)
URL[direct]="http://127.0.0.1:$UP_PORT$BENCH_PATH"
URL[nginx]="http://127.0.0.1:$NGINX_PORT$BENCH_PATH"
if [[ "$FLOOR" == 1 ]]; then
    TARGETS+=(hyper-floor)
    URL[hyper-floor]="http://127.0.0.1:$FLOOR_PORT$BENCH_PATH"
fi
if [[ "$SKIP_APIWARDEN" != 1 ]]; then
    TARGETS+=(apiwarden)
    URL[apiwarden]="http://127.0.0.1:$AW_PORT$BENCH_PATH"
    TARGETS+=(apiwarden-apikey)
    URL[apiwarden-apikey]="http://127.0.0.1:$AW_PORT/keyed$BENCH_PATH"
    HEADER[apiwarden-apikey]="Authorization: Bearer $API_KEY"
    if [[ "$JWT_OK" == 1 ]]; then
        TARGETS+=(apiwarden-jwt)
        URL[apiwarden-jwt]="http://127.0.0.1:$AW_PORT/jwt$BENCH_PATH"
        HEADER[apiwarden-jwt]="Authorization: Bearer $JWT_TOKEN"
    fi
    if [[ "$LIMITS" == 1 ]]; then
        TARGETS+=(apiwarden-limit-local)
        URL[apiwarden-limit-local]="http://127.0.0.1:$AW_PORT/limited-local$BENCH_PATH"
        if [[ "$REDIS_OK" == 1 ]]; then
            TARGETS+=(apiwarden-limit-redis)
            URL[apiwarden-limit-redis]="http://127.0.0.1:$AW_PORT/limited-redis$BENCH_PATH"
        fi
    fi
fi
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
for round in $(seq 1 "$ROUNDS"); do
    (( ROUNDS > 1 )) && log "round $round of $ROUNDS"
    for t in "${TARGETS[@]}"; do
        run_wrk "$t" "${URL[$t]}"
    done
done
for t in "${TARGETS[@]}"; do
    RPS[$t]="$(printf '%s' "${RPS_ALL[$t]}" | median)"
    P50[$t]="$(printf '%s' "${P50_ALL[$t]}" | median)"
    P99[$t]="$(printf '%s' "${P99_ALL[$t]}" | median)"
done

# -------------------------------------------------------------- 5. report --
CPU_MODEL="$(awk -F': *' '/^model name/ {print $2; exit}' /proc/cpuinfo 2>/dev/null || true)"
[[ -n "$CPU_MODEL" ]] || CPU_MODEL="$(awk -F': *' '/^(Hardware|Processor|cpu model)/ {print $2; exit}' /proc/cpuinfo 2>/dev/null || true)"
[[ -n "$CPU_MODEL" ]] || CPU_MODEL="unknown"
NGINX_VERSION="$("$NGINX_BIN" -v 2>&1 | sed 's/^nginx version: //')"
WRK_VERSION="$({ wrk -v 2>&1 || true; } | awk 'NR == 1 {print $2}')"

echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "- nproc: $(nproc)"
echo "- cpu: $CPU_MODEL"
echo "- wrk ${WRK_VERSION:-?}: -t$THREADS -c$CONNECTIONS -d$DURATION --latency (after ${WARMUP} warm-up), GET $BENCH_PATH; $ROUNDS round(s), targets in turn, medians"
echo "- upstream: $NGINX_VERSION, 1 worker, return 200; nginx proxy: 2 workers, access log on, upstream keepalive 64"
echo "- apiwarden: audit ledger durability $DURABILITY"
echo
echo "| target | req/s | p50 ms | p99 ms | req/s of each round |"
echo "|---|---:|---:|---:|---|"
for t in "${TARGETS[@]}"; do
    printf '| %s | %.0f | %.2f | %.2f | %s |\n' "$t" "${RPS[$t]}" "${P50[$t]}" "${P99[$t]}" "${RPS_ALL[$t]% }"
done
echo
if [[ "$SKIP_APIWARDEN" != 1 ]]; then
    awk -v a="${RPS[apiwarden]}" -v n="${RPS[nginx]}" \
        'BEGIN {printf "apiwarden/nginx throughput ratio: %s\n", (n > 0 ? sprintf("%.2f", a / n) : "n/a")}'
    awk -v a="${P99[apiwarden]}" -v n="${P99[nginx]}" \
        'BEGIN {printf "apiwarden/nginx p99 ratio: %s\n", (n > 0 ? sprintf("%.2f", a / n) : "n/a")}'
    if (( ROUNDS > 1 )); then
        # Within each round too (the two runs seconds apart), as for the other pairs below.
        per_round="$(awk -v a="${RPS_ALL[apiwarden]}" -v n="${RPS_ALL[nginx]}" 'BEGIN {
            k = split(a, x, " "); split(n, y, " ");
            for (i = 1; i <= k; i++) printf "%.2f ", (y[i] > 0 ? x[i] / y[i] : 0) }')"
        printf 'apiwarden/nginx throughput per round: %s(median %s)\n' "$per_round" "$(printf '%s' "$per_round" | median)"
    fi
    for t in apiwarden-apikey apiwarden-jwt apiwarden-limit-local apiwarden-limit-redis; do
        [[ -n "${RPS[$t]:-}" ]] || continue
        awk -v a="${RPS[$t]}" -v n="${RPS[apiwarden]}" -v t="$t" \
            'BEGIN {printf "%s/apiwarden (open route) throughput ratio: %s\n", t, (n > 0 ? sprintf("%.2f", a / n) : "n/a")}'
        # The same ratio within each round (the two runs seconds apart), and its median: less
        # exposed to drift on a shared machine than the ratio of the two medians.
        per_round="$(awk -v a="${RPS_ALL[$t]}" -v n="${RPS_ALL[apiwarden]}" 'BEGIN {
            k = split(a, x, " "); split(n, y, " ");
            for (i = 1; i <= k; i++) printf "%.2f ", (y[i] > 0 ? x[i] / y[i] : 0) }')"
        printf '%s/apiwarden per round: %s(median %s)\n' "$t" "$per_round" "$(printf '%s' "$per_round" | median)"
    done
    if [[ "$FLOOR" == 1 ]]; then
        awk -v a="${RPS[hyper-floor]}" -v n="${RPS[nginx]}" \
            'BEGIN {printf "hyper-floor/nginx throughput ratio: %s\n", (n > 0 ? sprintf("%.2f", a / n) : "n/a")}'
        per_round="$(awk -v a="${RPS_ALL[apiwarden]}" -v n="${RPS_ALL[hyper-floor]}" 'BEGIN {
            k = split(a, x, " "); split(n, y, " ");
            for (i = 1; i <= k; i++) printf "%.2f ", (y[i] > 0 ? x[i] / y[i] : 0) }')"
        printf 'apiwarden/hyper-floor per round: %s(median %s)\n' "$per_round" "$(printf '%s' "$per_round" | median)"
    fi
else
    echo "apiwarden/nginx throughput ratio: n/a (SKIP_APIWARDEN=1)"
    echo "apiwarden/nginx p99 ratio: n/a (SKIP_APIWARDEN=1)"
fi

if [[ -n "$ERRORS" ]]; then
    echo
    echo "**wrk reported errors (results above are suspect):**"
    echo
    printf '%s' "$ERRORS"
    log "wrk reported socket errors or non-2xx/3xx responses; exiting with status 2"
    exit 2
fi
