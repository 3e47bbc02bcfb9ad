#!/usr/bin/env bash
# Runs every loadgen scenario against roomvisor, the limit server and the Socket.IO peer, one
# server after another for each scenario (so a drift in the machine's load hits all three
# alike), each freshly started, and writes BENCHMARKS.md from the results.
#
#   benches/run.sh                          # everything, one round (about 10 minutes)
#   ROUNDS=3 benches/run.sh                 # the report takes the median of the rounds
#   SCENARIOS="fanout" SERVERS="roomvisor limit" SECONDS_PER_PHASE=5 benches/run.sh
#
# Needs only what the repository's CI installs: cargo, Node.js and npm (the peer's packages
# are installed here from its lock file).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-1}
SCENARIOS=${SCENARIOS:-"cold-start fanout many-rooms idle rooms-memory"}
SERVERS=${SERVERS:-"roomvisor limit peer"}
SECONDS_PER_PHASE=${SECONDS_PER_PHASE:-10}
REPORT=${REPORT:-BENCHMARKS.md}
# release for figures worth reporting; CI's smoke run uses debug, which cargo test has built.
PROFILE=${PROFILE:-release}
# Extra loadgen flags (e.g. "--clients 50 --rooms 10" for a smoke run); empty for the presets.
LOADGEN_ARGS=${LOADGEN_ARGS:-}
results=target/bench-results
logs=target/bench-logs

# 10,000 sockets on each side of the loopback need more descriptors than a usual soft limit.
ulimit -n "$(ulimit -Hn)"

echo "== building ($PROFILE)"
if [ "$PROFILE" = release ]; then
  cargo build --release --locked -p roomvisor -p limit-server -p loadgen
else
  cargo build --locked -p roomvisor -p limit-server -p loadgen
fi
bin="target/$PROFILE"
case " $SERVERS " in
  *" peer "*)
    echo "== installing the peer's npm packages"
    (cd benches/peer && npm ci --no-audit --no-fund --loglevel=error) ;;
esac

rm -rf "$results" "$logs"
mkdir -p "$results" "$logs"

server_pid=""
server_url=""

# Starts a server on a free port; sets server_pid and server_url from the address it prints.
start_server() {
  local name=$1 log="$logs/$2.log" out="$logs/$2.out"
  case "$name" in
    # The per-socket rate limit would cap a fan-out sender at 50 pushes/s, and 2,000 rooms
    # exceed the default live-room limit; the other limits stay at their defaults.
    roomvisor) "$bin/gateway" --port 0 --rate-per-sec 1000000 --rate-burst 1000000 \
                 --max-rooms 100000 >"$out" 2>"$log" & ;;
    limit)     "$bin/limit-server" --port 0 >"$out" 2>"$log" & ;;
    peer)      node benches/peer/server.js --port 0 >"$out" 2>"$log" & ;;
    *) echo "unknown server $name" >&2; exit 2 ;;
  esac
  server_pid=$!
  for _ in $(seq 100); do
    server_url=$(grep -o 'http://[^ ]*' "$out" 2>/dev/null | tail -n 1 || true)
    [ -n "$server_url" ] && return 0
    sleep 0.1
  done
  echo "$name did not start; see $log" >&2
  exit 1
}

stop_server() {
  kill -TERM "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
}
trap stop_server EXIT

protocol_of() {
  case "$1" in peer) echo socketio ;; *) echo phoenix ;; esac
}

failed=0
for round in $(seq "$ROUNDS"); do
  for scenario in $SCENARIOS; do
    for server in $SERVERS; do
      echo "== round $round: $scenario against $server"
      start_server "$server" "$round-$scenario-$server"
      if ! "$bin/loadgen" run --name "$server" --protocol "$(protocol_of "$server")" \
          --scenario "$scenario" --url "$server_url" --pid "$server_pid" \
          --seconds "$SECONDS_PER_PHASE" $LOADGEN_ARGS --json "$results/$round-$scenario-$server.json"; then
        echo "!! $scenario against $server failed" >&2
        failed=1
      fi
      stop_server
      # Let the kernel retire the last run's sockets before the next one connects thousands.
      sleep 2
    done
  done
done

"$bin/loadgen" report --out "$REPORT" --command "benches/run.sh (ROUNDS=$ROUNDS)" "$results"/*.json
echo "results: $results; server logs: $logs"
exit "$failed"
