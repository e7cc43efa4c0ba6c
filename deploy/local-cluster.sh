#!/usr/bin/env bash
# A fail-over cluster on loopback, to try by hand: etcd, two coordinators (coord-a, coord-b) with
# `--membership etcd` and three nodes that follow whichever coordinator leads.
#
#   deploy/local-cluster.sh [MODEL_DIR]          # runs until Ctrl-C; prints what to try
#   deploy/local-cluster.sh --demo [MODEL_DIR]   # also does the fail-over itself and exits
#
# MODEL_DIR defaults to ../shared/models/stories260K/hf next to the repository. The binary is
# $LOCKSTEP, else target/release/lockstep, else target/debug/lockstep (build it first:
# `cargo build --release`). Needs `etcd` (Debian: apt-get install etcd-server) and curl.
# Everything (certificates, etcd data, logs) goes to a temporary directory, removed on exit.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
DEMO=0
if [ "${1:-}" = "--demo" ]; then
    DEMO=1
    shift
fi
MODEL="${1:-$REPO/../shared/models/stories260K/hf}"
LOCKSTEP="${LOCKSTEP:-}"
if [ -z "$LOCKSTEP" ]; then
    for b in "$REPO/target/release/lockstep" "$REPO/target/debug/lockstep"; do
        if [ -x "$b" ]; then LOCKSTEP="$b"; break; fi
    done
fi
[ -n "$LOCKSTEP" ] && [ -x "$LOCKSTEP" ] || { echo "no lockstep binary: cargo build --release (or set LOCKSTEP)" >&2; exit 1; }
command -v etcd >/dev/null || { echo "no etcd: apt-get install etcd-server" >&2; exit 1; }
[ -e "$MODEL/config.json" ] || { echo "no model at $MODEL" >&2; exit 1; }

ETCD_CLIENT=127.0.0.1:23790
ETCD_PEER=127.0.0.1:23800
HTTP_A=127.0.0.1:8101
HTTP_B=127.0.0.1:8102
CLUSTER_A=127.0.0.1:7101
CLUSTER_B=127.0.0.1:7102
CLUSTER_NAME=local
WORK="$(mktemp -d -t lockstep-local-cluster.XXXXXX)"
PIDS=()

cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

health() { curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$1/health" || true; }

wait_for() { # WHAT SECONDS COMMAND…: poll COMMAND every 0.2 s
    local what="$1" secs="$2"
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@"; do
        if [ "$SECONDS" -ge "$deadline" ]; then echo "timed out waiting for $what (logs in $WORK)" >&2; tail -n 20 "$WORK"/*.log >&2; exit 1; fi
        sleep 0.2
    done
}

echo "work directory: $WORK"
"$LOCKSTEP" certs init --dir "$WORK/tls" 2>/dev/null
for n in coord-a coord-b node-0 node-1 node-2; do "$LOCKSTEP" certs issue --dir "$WORK/tls" --name "$n" 2>/dev/null; done

etcd --name local --data-dir "$WORK/etcd" \
    --listen-client-urls "http://$ETCD_CLIENT" --advertise-client-urls "http://$ETCD_CLIENT" \
    --listen-peer-urls "http://$ETCD_PEER" --initial-advertise-peer-urls "http://$ETCD_PEER" \
    --initial-cluster "local=http://$ETCD_PEER" --heartbeat-interval 10 --election-timeout 100 \
    >"$WORK/etcd.log" 2>&1 &
PIDS+=($!)
wait_for etcd 30 sh -c "curl -s --max-time 1 http://$ETCD_CLIENT/health | grep -q true"

coordinator() { # NAME HTTP CLUSTER
    "$LOCKSTEP" serve --model "$MODEL" --served-model-name local --tp 2 --node-threads 1 --no-h3 --canary-every 0 \
        --membership etcd --etcd-endpoints "http://$ETCD_CLIENT" --cluster-name "$CLUSTER_NAME" \
        --name "$1" --tls-dir "$WORK/tls" --listen "$2" --cluster-listen "$3" >"$WORK/$1.log" 2>&1 &
    PIDS+=($!)
    eval "PID_${1//-/_}=$!"
}
coordinator coord-a "$HTTP_A" "$CLUSTER_A"
coordinator coord-b "$HTTP_B" "$CLUSTER_B"
for i in 0 1 2; do
    "$LOCKSTEP" node --membership etcd --etcd-endpoints "http://$ETCD_CLIENT" --cluster-name "$CLUSTER_NAME" \
        --tls-dir "$WORK/tls" --name "node-$i" --threads 1 >"$WORK/node-$i.log" 2>&1 &
    PIDS+=($!)
done

leader_is_up() { [ "$(health "$HTTP_A")" = 200 ] || [ "$(health "$HTTP_B")" = 200 ]; }
wait_for "a leader" 300 leader_is_up
if [ "$(health "$HTTP_A")" = 200 ]; then
    LEADER=coord-a LEADER_HTTP=$HTTP_A LEADER_PID=$PID_coord_a STANDBY_HTTP=$HTTP_B
else
    LEADER=coord-b LEADER_HTTP=$HTTP_B LEADER_PID=$PID_coord_b STANDBY_HTTP=$HTTP_A
fi
echo "leader: $LEADER on http://$LEADER_HTTP (pid $LEADER_PID); standby on http://$STANDBY_HTTP"
echo "standby /health: $(curl -s "http://$STANDBY_HTTP/health")"

REQUEST='{"model":"local","prompt":"Once upon a time","max_tokens":32,"temperature":0.8,"seed":42}'
complete() { curl -s --max-time 60 "http://$1/v1/completions" -H 'Content-Type: application/json' -d "$REQUEST"; }
text_of() { grep -o '"text":"[^"]*"' || echo "no completion"; }

if [ "$DEMO" = 0 ]; then
    cat <<EOF

Try:
  curl -s http://$LEADER_HTTP/v1/completions -H 'Content-Type: application/json' -d '$REQUEST'
  curl -s http://$STANDBY_HTTP/health            # 503 {"status":"standby","leader":"$LEADER",…}
  kill -9 $LEADER_PID                             # the leader dies …
  curl -s http://$STANDBY_HTTP/health            # … and within seconds the standby serves
  curl -s http://$LEADER_HTTP/ops/cluster | jq .discovery
Logs: $WORK/*.log. Ctrl-C stops everything.
EOF
    wait "${PIDS[0]}"
    exit 0
fi

BEFORE="$(complete "$LEADER_HTTP" | text_of)"
echo "on $LEADER:  $BEFORE"
kill -9 "$LEADER_PID"
START=$SECONDS
wait_for "the standby to take over" 60 sh -c "[ \"\$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 http://$STANDBY_HTTP/health)\" = 200 ]"
AFTER="$(complete "$STANDBY_HTTP" | text_of)"
echo "standby took over in $((SECONDS - START)) s"
echo "on the new leader: $AFTER"
if [ "$BEFORE" != "no completion" ] && [ "$BEFORE" = "$AFTER" ]; then
    echo "identical bytes after fail-over"
else
    echo "the answers differ" >&2
    exit 1
fi
