#!/usr/bin/env bash
# Memory under a flood of source addresses: an IP-keyed limit, every request from a new
# X-Forwarded-For address, RSS of the gateway before and after.
#   bench/flood.sh [LIMIT_KEYS] [DURATION]     (defaults 10000 and 60s)
# Needs wrk and a release build (target/release/apiwarden). The route's upstream is a closed
# port: the limit stage runs before forwarding, so the answers (502) do not matter here.
set -euo pipefail
KEYS="${1:-10000}"
DURATION="${2:-60s}"
cd "$(dirname "$0")/.."
BIN="${APIWARDEN_BIN:-target/release/apiwarden}"
[[ -x "$BIN" ]] || { echo "build first: cargo build --release" >&2; exit 1; }
command -v wrk >/dev/null || { echo "wrk not found (apt-get install -y wrk)" >&2; exit 1; }
TMP="$(mktemp -d)"
read -r PORT ADMIN < <(python3 -c 'import socket
s=[socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1",0)) for x in s]
print(*[x.getsockname()[1] for x in s])')
cat >"$TMP/flood.toml" <<EOT
[gateway]
listen = "127.0.0.1:$PORT"
trusted_proxies = ["127.0.0.1"]
[admin]
listen = "127.0.0.1:$ADMIN"
[storage]
data_dir = "$TMP/data"
limit_keys = $KEYS
[audit]
durability = "async"
[[upstreams]]
name = "u"
url = "http://127.0.0.1:9"
connect_timeout = "1s"
[[routes]]
name = "f"
path_prefix = "/"
upstream = "u"
auth = ["none"]
limits = ["per-ip"]
[limits.per-ip]
rate = "10/h"
key = "ip"
EOT
"$BIN" serve --config "$TMP/flood.toml" 2>"$TMP/log" &
PID=$!
trap 'kill -INT $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$TMP"' EXIT
for _ in $(seq 50); do curl -sf -o /dev/null "http://127.0.0.1:$ADMIN/readyz" && break; sleep 0.2; done
before=$(awk '/VmRSS/ {print $2}' /proc/$PID/status)
wrk -t2 -c50 -d"$DURATION" -s bench/flood.lua "http://127.0.0.1:$PORT/" >"$TMP/wrk.txt" 2>&1
after=$(awk '/VmRSS/ {print $2}' /proc/$PID/status)
curl -s "http://127.0.0.1:$ADMIN/metrics" | grep -E "^apiwarden_limit_(tracked|max|evictions)"
echo "limit_keys=$KEYS requests=$(awk '/requests in/ {print $1}' "$TMP/wrk.txt") rss_before_kib=$before rss_after_kib=$after"
