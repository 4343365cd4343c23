#!/usr/bin/env bash
# What a persistent session costs the publishers, by hand:
#   MQTTWRK=path [DURABILITY=full|normal] scripts/bench/persistent_subscriber.sh BINARY [ROUNDS]
# 10 mqttwrk publishers x 10,000 QoS 1 x 100 B into a broker with one QoS 1 subscriber on '#'
# (mosquitto_sub), which has either a clean session or a persistent one (-c: every message it is
# sent is first written to the store, and the publisher's PUBACK waits for that). The same load
# against mosquitto (persistence off, its default) is the peer. Rounds alternate the four
# set-ups; prints msg/s per run as mqttwrk reports it, and how many messages the subscriber got.
set -euo pipefail
bin=$1; rounds=${2:-3}
mqttwrk=${MQTTWRK:-mqttwrk}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }

run() { # broker session
  local broker=$1 session=$2 port bpid spid out rate got
  port=$(free_port)
  rm -rf "$work/data"
  if [ "$broker" = outpost ]; then
    cat > "$work/c.toml" <<TOML
[node]
name = "bench"
[broker]
listeners = ["127.0.0.1:$port"]
# As mosquitto's max_queued_messages 0 below: no subscriber queue limit to drop at.
max_queued_messages = 1000000
max_queued_bytes = "1GiB"
[coap]
listeners = []
[storage]
data_dir = "$work/data"
durability = "${DURABILITY:-full}"
[health]
listen = "off"
[discovery]
implicit = false
TOML
    "$bin" run --config "$work/c.toml" 2>"$work/gw.log" & bpid=$!
  else
    printf 'listener %s 127.0.0.1\nallow_anonymous true\nlog_dest none\nmax_queued_messages 0\n' "$port" > "$work/m.conf"
    mosquitto -c "$work/m.conf" & bpid=$!
  fi
  pids+=("$bpid")
  wait_port "$port"
  local flags=(-p "$port" -t '#' -q 1)
  [ "$session" = persistent ] && flags+=(-c -i "bench-sub")
  mosquitto_sub "${flags[@]}" > "$work/sub.out" & spid=$!
  pids+=("$spid")
  sleep 0.5
  out=$("$mqttwrk" bench -S 127.0.0.1 -P "$port" -p 10 -n 10000 --publish-qos 1 -m 100 2>&1)
  # mqttwrk prints `PubStats { outgoing_publish: N, throughput: R, ... }` (what bench.py reads).
  rate=$(printf '%s\n' "$out" | tr -d '\n' | grep -oE 'throughput: *[0-9.]+' | head -1 | grep -oE '[0-9.]+$' || echo "?")
  # Let the subscriber catch up (at most 20 s), then count.
  for _ in $(seq 200); do [ "$(wc -l < "$work/sub.out")" -ge 100000 ] && break; sleep 0.1; done
  got=$(wc -l < "$work/sub.out")
  kill "$spid" "$bpid" 2>/dev/null || true
  wait "$spid" "$bpid" 2>/dev/null || true
  echo "$broker $session: ${rate} msg/s, subscriber got $got/100000"
}

for r in $(seq "$rounds"); do
  echo "round $r"
  run outpost clean
  run outpost persistent
  run mosquitto clean
  run mosquitto persistent
done
