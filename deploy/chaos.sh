#!/usr/bin/env bash
# Kill one serving node of an embedded cluster every INTERVAL seconds (kill -9), for fault soaks.
#
#   deploy/chaos.sh URL INTERVAL DURATION [OPS_KEY]
#
# URL is the coordinator's base URL (http://127.0.0.1:8000). The victim is a node that is in a
# group and has a pid (embedded mode: the coordinator's supervisor respawns it): the first one whose
# name sorts after the previous victim's (wrapping around), so every node dies in turn even though
# a respawned node may come back as a spare. Each kill is printed as `unix_time name pid`.
# Loopback only: the script refuses any other host.
set -euo pipefail
url=${1:?URL}; interval=${2:?INTERVAL seconds}; duration=${3:?DURATION seconds}; key=${4:-}
case "$url" in
  http://127.*|http://localhost*|http://\[::1\]*) ;;
  *) echo "chaos.sh: refusing non-loopback URL $url" >&2; exit 2 ;;
esac
auth=()
[ -n "$key" ] && auth=(-H "Authorization: Bearer $key")
end=$(( $(date +%s) + duration ))
last=""
while [ "$(date +%s)" -lt "$end" ]; do
  sleep "$interval"
  [ "$(date +%s)" -lt "$end" ] || break
  victim=$(curl -fsS "${auth[@]}" "$url/ops/cluster" | python3 -c '
import json, sys
last = sys.argv[1]
nodes = [n for n in json.load(sys.stdin)["nodes"] if n.get("pid") and n.get("group") is not None]
nodes.sort(key=lambda n: n["name"])
after = [n for n in nodes if n["name"] > last]
if nodes:
    n = (after or nodes)[0]
    print(n["name"], n["pid"])
' "$last") || { echo "$(date +%s) cluster unreachable" ; continue; }
  if [ -n "$victim" ]; then
    set -- $victim
    kill -9 "$2" 2>/dev/null && echo "$(date +%s) $1 $2"
    last=$1
  else
    echo "$(date +%s) no serving node to kill"
  fi
done
