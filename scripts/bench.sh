#!/usr/bin/env bash
# Outpost benchmark: ingest, drain, latency, RSS, open time, disk writes, each against mosquitto
# measured in the same run on the same machine; CoAP ingest against MQTT ingest, and SenML
# decode throughput against serde_json. Results: BENCHMARKS.md explains them.
#
#   bash scripts/bench.sh                # full run (1,000,000-record backlog), ~6 min on 2 cores
#   BENCH_QUICK=1 bash scripts/bench.sh  # 100,000-record backlog, 5 s latency runs, ~3 min
#   BENCH_ONLY=coap bash scripts/bench.sh  # only the CoAP/SenML section, ~1.5 min
#   BENCH_ONLY=broker bash scripts/bench.sh  # only the broker section (auth/ACL and TLS ingest,
#                                            # 10,000 idle connections), ~4 min; not in the default
#
# Environment:
#   BENCH_QUICK=1      smaller run
#   BENCH_ONLY=a,b     run only some sections: ingest, backlog, latency, coap (the default: all
#                      four), broker (scripts/bench/broker.py; only when named)
#   BENCH_IDLE_CONNECTIONS=N  idle clients in the broker section (default 10000; needs
#                      `ulimit -n` above N + 2000 for the broker and the connector)
#   BENCH_COMMIT_INTERVAL=5ms  storage.commit_interval of the Outpost runs (default: the config
#                      default, 0ms)
#   BENCH_COMPARE_INTERVAL=5ms also run Outpost with this commit_interval in the ingest and latency
#                      sections, same run (default 5ms, the old default; empty: skip)
#   BENCH_REPS=N       rounds of the ingest runs and open-time runs (default 3; the median is reported)
#   BENCH_NO_BRIDGE=1  skip the mosquitto-bridge latency run
#   BENCH_KEEP=1       keep the temporary directory (logs, databases, configs)
#   BENCH_TMPDIR=DIR   parent of the temporary directory (default target/bench-tmp: on the disk
#                      the gateway would use, not a tmpfs, so fsync and write_bytes mean something)
#   MQTTWRK=PATH       the mqttwrk binary (default: on PATH, else `cargo install`ed into target/)
#   OUTPOST_BIN=PATH   skip the build and use this binary
#   SENML_BENCH=PATH   skip building scripts/bench/senml-decode and use this binary
#
# Needs what `bash scripts/test.sh` installs (mosquitto, mosquitto-clients, paho-mqtt 2.x) and
# builds the gateway with `cargo build -p outpost --profile bench-fast`.
# Everything listens on free 127.0.0.1 ports; only processes started here are stopped, by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

bash scripts/install-test-deps.sh

find_bin() {
  local name=$1
  if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return; fi
  for d in /usr/sbin /usr/local/sbin /sbin; do
    if [ -x "$d/$name" ]; then echo "$d/$name"; return; fi
  done
  echo "bench.sh: $name not found" >&2
  exit 1
}
MOSQUITTO=$(find_bin mosquitto)
MOSQUITTO_SUB=$(find_bin mosquitto_sub)
MOSQUITTO_PASSWD=$(find_bin mosquitto_passwd)

# bench.py runs the sections it knows; "broker" is scripts/bench/broker.py.
ONLY="${BENCH_ONLY:-ingest,backlog,latency,coap}"
PY_ONLY=$(echo ",$ONLY," | sed 's/,broker,/,/g; s/^,*//; s/,*$//')
RUN_BROKER=0
[[ ",$ONLY," == *,broker,* ]] && RUN_BROKER=1

TOOLS="$ROOT/target/bench-tools"
if [ -n "${MQTTWRK:-}" ]; then
  [ -x "$MQTTWRK" ] || { echo "bench.sh: MQTTWRK=$MQTTWRK is not executable" >&2; exit 1; }
elif command -v mqttwrk >/dev/null 2>&1; then
  MQTTWRK=$(command -v mqttwrk)
elif [ -x "$TOOLS/bin/mqttwrk" ]; then
  MQTTWRK="$TOOLS/bin/mqttwrk"
else
  echo "bench.sh: installing mqttwrk into $TOOLS (once)"
  cargo install mqttwrk --locked --root "$TOOLS"
  MQTTWRK="$TOOLS/bin/mqttwrk"
fi

if [ -n "${OUTPOST_BIN:-}" ]; then
  OUTPOST="$OUTPOST_BIN"
else
  cargo build -p outpost --profile bench-fast --locked
  OUTPOST="$ROOT/target/bench-fast/outpost"
fi

# The SenML decode benchmark: a standalone project (its own [workspace]) on ../../../protocols.
SENML=""
if [[ ",${BENCH_ONLY:-coap}," == *,coap,* ]]; then
  if [ -n "${SENML_BENCH:-}" ]; then
    SENML="$SENML_BENCH"
  else
    cargo build --profile bench-fast --manifest-path scripts/bench/senml-decode/Cargo.toml \
      --target-dir "$ROOT/target/senml-decode"
    SENML="$ROOT/target/senml-decode/bench-fast/senml-decode-bench"
  fi
fi

TMPPARENT="${BENCH_TMPDIR:-$ROOT/target/bench-tmp}"
mkdir -p "$TMPPARENT"
RESULTS="$ROOT/target/bench-results.json"

args=(--outpost "$OUTPOST" --mqttwrk "$MQTTWRK" --mosquitto "$MOSQUITTO"
      --mosquitto-sub "$MOSQUITTO_SUB" --tmpdir "$TMPPARENT" --results "$RESULTS")
[ "${BENCH_QUICK:-0}" = "1" ] && args+=(--quick)
[ "${BENCH_KEEP:-0}" = "1" ] && args+=(--keep)
[ "${BENCH_NO_BRIDGE:-0}" = "1" ] && args+=(--no-bridge)
[ -n "${BENCH_ONLY:-}" ] && args+=(--only "$PY_ONLY")
[ -n "$SENML" ] && args+=(--senml-bench "$SENML")

broker_args=(--outpost "$OUTPOST" --mqttwrk "$MQTTWRK" --mosquitto "$MOSQUITTO"
             --mosquitto-passwd "$MOSQUITTO_PASSWD" --tmpdir "$TMPPARENT"
             --results "$ROOT/target/bench-broker.json")
[ "${BENCH_QUICK:-0}" = "1" ] && broker_args+=(--quick)
[ "${BENCH_KEEP:-0}" = "1" ] && broker_args+=(--keep)

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), kernel $(uname -r)"
echo "outpost: $OUTPOST; mqttwrk: $MQTTWRK; $("$MOSQUITTO" -h 2>&1 | head -1)"

# The driver starts and stops every server and client itself (by PID, with its own cleanup on
# exit and on SIGINT/SIGTERM). If this script is interrupted, stop the driver and let it clean up.
DRIVER=""
cleanup() {
  if [ -n "$DRIVER" ] && kill -0 "$DRIVER" 2>/dev/null; then
    kill -TERM "$DRIVER" 2>/dev/null || true
    wait "$DRIVER" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

run_driver() {
  python3 -u "$@" &
  DRIVER=$!
  set +e
  wait "$DRIVER"
  local rc=$?
  set -e
  DRIVER=""
  return "$rc"
}

rc=0
if [ -n "$PY_ONLY" ]; then
  run_driver "$ROOT/scripts/bench/bench.py" "${args[@]}" || rc=$?
fi
if [ "$RUN_BROKER" = "1" ]; then
  # 10,000 idle clients need as many descriptors in the broker and in the connector.
  want=$(( ${BENCH_IDLE_CONNECTIONS:-10000} + 2000 ))
  if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$want" ]; then
    ulimit -n "$want" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
  fi
  run_driver "$ROOT/scripts/bench/broker.py" "${broker_args[@]}" || rc=$?
fi
exit "$rc"
