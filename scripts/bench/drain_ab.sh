#!/usr/bin/env bash
# Drain check for A/B comparisons of two gateway builds, by hand:
#   scripts/bench/drain_ab.sh BINARY [5|3.1.1]      (DRAIN_N=1000000 for a 1M backlog; default 100000)
# Fills DRAIN_N x 100 B QoS 1 readings (mqttwrk, 10 publishers) with the upstream down, then starts
# mosquitto on the upstream port with a QoS 1 subscriber attached and times until
# `outpost status --json` shows buffered_records == 0, and reports the gateway's CPU time (user +
# system, from /proc) per synced record over the drain. Run two binaries alternately, several times:
# on shared machines single runs vary by 2x. Needs mosquitto, mosquitto_sub and mqttwrk (MQTTWRK=path).
set -euo pipefail
bin=$1; proto=${2:-5}; n=${DRAIN_N:-100000}
mqttwrk=${MQTTWRK:-mqttwrk}
work=$(mktemp -d); trap 'kill ${pid:-} ${spid:-} ${mpid:-} 2>/dev/null || true; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up=$(free_port); port=$(free_port)
cat > "$work/c.toml" <<TOML
[node]
name = "drain"
[broker]
listeners = ["127.0.0.1:$port"]
[coap]
listeners = []
[storage]
data_dir = "$work/data"
[health]
listen = "off"
[discovery]
implicit = false
[upstream]
url = "mqtt://127.0.0.1:$up"
protocol = "$proto"
TOML
"$bin" run --config "$work/c.toml" 2>"$work/gw.log" & pid=$!
sleep 0.7
"$mqttwrk" bench -S 127.0.0.1 -P "$port" -p 10 -n $((n / 10)) --publish-qos 1 -m 100 >/dev/null 2>&1
printf 'listener %s 127.0.0.1\nallow_anonymous true\nlog_dest none\n' "$up" > "$work/m.conf"
cpu() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
c0=$(cpu); t0=$(date +%s.%N); mosquitto -c "$work/m.conf" & mpid=$!
sleep 0.05; mosquitto_sub -p "$up" -t 'outpost/#' -q 1 > /dev/null & spid=$!
until [ "$("$bin" status --config "$work/c.toml" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["buffered_records"])')" = 0 ]; do sleep 0.1; done
t1=$(date +%s.%N); c1=$(cpu); hz=$(getconf CLK_TCK)
echo "$(basename "$bin") proto=$proto drain $n: $(python3 -c "print(round($n/($t1-$t0)))") rec/s, gateway CPU $(python3 -c "print(round(($c1-$c0)/$hz*1e6/$n, 2))") us/record"
