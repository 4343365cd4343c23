#!/usr/bin/env bash
# ARM smoke test (CI runs it from .ci/run): builds the statically linked aarch64 `outpost` once, with
# Debian's Rust toolchain, and runs it under qemu-aarch64 against a real mosquitto on loopback:
#
#   x86 paho-mqtt --QoS 1--> outpost (aarch64, emulated) --MQTT 5--> mosquitto --> mosquitto_sub
#
#   1. 150 readings while the upstream is up: every one PUBACKed, every one reaches the cloud
#      subscriber with a `seq` user property, `outpost status --json` shows them acked, none buffered;
#   2. upstream stopped, 50 more readings: PUBACKed (so committed), `status` shows exactly those
#      50 as buffered_records, none reaches the subscriber;
#      the gateway is stopped (SIGTERM, exit 0) and started again: the 50 are still buffered;
#   3. upstream back: the 50 drain, the buffer is empty, seqs are unique and increasing;
#   4. SIGTERM: the gateway exits 0 and `status` says it stopped.
#
# Exits non-zero with a message naming the failed check. Kills only the processes it started.
#
# Environment:
#   OUTPOST_ARM_PROFILE=release    cargo profile of the ARM build (release = the shipping profile)
#   OUTPOST_ARM_BIN=PATH           test this aarch64 binary instead of building one
#   OUTPOST_ARM_SKIP_INSTALL=1     do not install the toolchain (fail if it is missing)
#   CARGO_TARGET_DIR               default <repo>/target/cross
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

TARGET=aarch64-unknown-linux-gnu
PROFILE="${OUTPOST_ARM_PROFILE:-release}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/cross}"
N_LIVE=150
N_OUTAGE=50
N_TOTAL=$((N_LIVE + N_OUTAGE))

T0=$SECONDS
say() { printf 'arm-smoke: %s\n' "$*"; }
fail() {
  printf 'arm-smoke: FAILED: %s\n' "$*" >&2
  if [ -n "${WORK:-}" ] && [ -d "$WORK" ]; then
    for f in gateway.log mosquitto.log sub.out sub.err; do
      [ -s "$WORK/$f" ] && { printf -- '--- last lines of %s ---\n' "$f" >&2; tail -n 25 "$WORK/$f" >&2; }
    done
  fi
  exit 1
}

# ---------------------------------------------------------------------------------------------
# 1. Toolchain: Debian's rustc-web/cargo-web 1.96 with the arm64 std (Multi-Arch), the aarch64 gcc
#    for the bundled SQLite and as linker, qemu-user. Idempotent: installs only what is missing.
# ---------------------------------------------------------------------------------------------
have_toolchain() {
  [ -x /usr/bin/rustc ] && [ -x /usr/bin/cargo ] && command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 &&
    command -v qemu-aarch64 >/dev/null 2>&1 &&
    [ -d "$(/usr/bin/rustc --print sysroot 2>/dev/null)/lib/rustlib/$TARGET/lib" ]
}

if [ -z "${OUTPOST_ARM_BIN:-}" ] || ! command -v qemu-aarch64 >/dev/null 2>&1; then
  if have_toolchain; then
    say "toolchain present: $(/usr/bin/rustc --version)"
  elif [ "${OUTPOST_ARM_SKIP_INSTALL:-0}" = 1 ]; then
    fail "Debian's aarch64 Rust toolchain or qemu-user is missing and OUTPOST_ARM_SKIP_INSTALL=1"
  else
    say "installing Debian's aarch64 Rust toolchain and qemu-user"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    dpkg --print-foreign-architectures | grep -qx arm64 || $SUDO dpkg --add-architecture arm64
    # An index that fails to download (a mirror mid-sync) makes apt keep the old lists of that
    # whole suite: retry a few times, then let the install below say what is missing.
    for attempt in 1 2 3; do
      if $SUDO apt-get update -qq; then break; fi
      say "apt-get update failed (attempt $attempt); retrying in 10 s"
      sleep 10
    done
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
      rustc-web cargo-web "libstd-rust-web-dev:arm64" gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
      binutils-aarch64-linux-gnu qemu-user ||
      fail "apt-get could not install the aarch64 toolchain (libstd-rust-web-dev:arm64 must have \
the same version as rustc-web: both come from bookworm-security)"
    have_toolchain || fail "toolchain installed but incomplete: /usr/bin/rustc has no $TARGET std"
    say "toolchain installed: $(/usr/bin/rustc --version)"
  fi
fi
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ] ||
  ! command -v mosquitto_sub >/dev/null 2>&1 ||
  ! python3 -c 'import paho.mqtt' 2>/dev/null; then
  bash scripts/install-test-deps.sh
fi
MOSQUITTO="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
T_INSTALL=$((SECONDS - T0))

# ---------------------------------------------------------------------------------------------
# 2. Build once: static (+crt-static: dynamically linked binaries hang in pthread_create under
#    qemu-user on these hosts), with the shipping profile unless told otherwise.
# ---------------------------------------------------------------------------------------------
T1=$SECONDS
if [ -n "${OUTPOST_ARM_BIN:-}" ]; then
  BIN="$OUTPOST_ARM_BIN"
else
  PROFILE="$PROFILE" OUTPOST_STATIC=1 bash cross/build.sh "$TARGET" ||
    fail "the aarch64 build failed (see the cargo output above)"
  BIN="$CARGO_TARGET_DIR/$TARGET/$PROFILE/outpost"
fi
T_BUILD=$((SECONDS - T1))
[ -x "$BIN" ] || fail "no binary at $BIN"
READELF="$(command -v aarch64-linux-gnu-readelf || command -v readelf || true)"
if [ -n "$READELF" ]; then
  "$READELF" -h "$BIN" | grep -q 'AArch64' || fail "$BIN is not an AArch64 executable"
  if "$READELF" -l "$BIN" | grep -q 'INTERP'; then
    fail "$BIN is dynamically linked (it would hang in pthread_create under qemu-user)"
  fi
fi
SIZE=$(stat -c %s "$BIN")
say "binary: $BIN, $SIZE bytes ($(awk -v s="$SIZE" 'BEGIN { printf "%.2f", s / 1048576 }') MiB), built in ${T_BUILD}s"

# ---------------------------------------------------------------------------------------------
# 3. The emulated run.
# ---------------------------------------------------------------------------------------------
T2=$SECONDS
WORK="$(mktemp -d "${TMPDIR:-/tmp}/outpost-arm-smoke.XXXXXX")"
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  if [ "${KEEP_WORK:-0}" = 1 ]; then say "work dir kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
# Drops a PID we have waited for, so cleanup never signals a recycled PID.
forget() {
  local keep=() pid
  for pid in "${PIDS[@]}"; do [ "$pid" = "$1" ] || keep+=("$pid"); done
  PIDS=("${keep[@]}")
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
wait_port() { # PORT SECONDS
  python3 - "$1" "$2" <<'EOF'
import socket, sys, time
port, deadline = int(sys.argv[1]), time.time() + float(sys.argv[2])
while time.time() < deadline:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit(1)
EOF
}
qemu_run() { qemu-aarch64 "$BIN" "$@"; }
status_json() { qemu_run status --config "$WORK/outpost.toml" --json; }
# Prints the value of a dotted path of `outpost status --json`.
status_field() {
  status_json | python3 -c '
import json, sys
v = json.load(sys.stdin)
for k in sys.argv[1].split("."):
    v = v[k] if v is not None else None
print(json.dumps(v) if isinstance(v, (dict, list)) or v is None else v)' "$1"
}
# Waits until `status_field PATH` prints VALUE.
wait_status() { # PATH VALUE SECONDS
  local deadline=$((SECONDS + $3)) got=""
  while [ $SECONDS -lt $deadline ]; do
    got="$(status_field "$1" 2>/dev/null || true)"
    [ "$got" = "$2" ] && return 0
    sleep 0.5
  done
  fail "status: $1 is '$got' after ${3}s, expected $2"
}
# Waits until `status_field PATH` is a number >= VALUE. (The gateway also stores records of its
# own, e.g. health samples, so store counters are checked as lower bounds; that every reading got
# through is proven at the cloud subscriber.)
wait_status_ge() { # PATH VALUE SECONDS
  local deadline=$((SECONDS + $3)) got=""
  while [ $SECONDS -lt $deadline ]; do
    got="$(status_field "$1" 2>/dev/null || true)"
    [[ "$got" =~ ^[0-9]+$ ]] && [ "$got" -ge "$2" ] && return 0
    sleep 0.5
  done
  fail "status: $1 is '$got' after ${3}s, expected at least $2"
}
wait_sub() { # COUNT SECONDS
  local deadline=$((SECONDS + $2))
  while [ $SECONDS -lt $deadline ]; do
    [ "$(sort -u "$WORK/sub.out" 2>/dev/null | grep -c .)" -ge "$1" ] && return 0
    sleep 0.2
  done
  fail "the upstream subscriber received $(sort -u "$WORK/sub.out" | grep -c .) distinct readings after ${2}s, expected $1"
}

UP_PORT=$(free_port)
GW_PORT=$(free_port)
while [ "$GW_PORT" = "$UP_PORT" ]; do GW_PORT=$(free_port); done
HEALTH_PORT=$(free_port)
while [ "$HEALTH_PORT" = "$UP_PORT" ] || [ "$HEALTH_PORT" = "$GW_PORT" ]; do HEALTH_PORT=$(free_port); done
mkdir -p "$WORK/mosquitto" "$WORK/data"

cat >"$WORK/mosquitto.conf" <<EOF
listener $UP_PORT 127.0.0.1
allow_anonymous true
log_dest stderr
max_queued_messages 0
# Sessions survive the restart in phase 2, so the cloud subscriber misses nothing while it reconnects.
persistence true
persistence_location $WORK/mosquitto/
user $(id -un)
EOF

start_upstream() {
  "$MOSQUITTO" -c "$WORK/mosquitto.conf" >>"$WORK/mosquitto.log" 2>&1 &
  UP_PID=$!
  PIDS+=("$UP_PID")
  wait_port "$UP_PORT" 10 || fail "mosquitto did not listen on 127.0.0.1:$UP_PORT"
}
stop_upstream() {
  kill -TERM "$UP_PID"
  wait "$UP_PID" 2>/dev/null || true
  forget "$UP_PID"
}

start_upstream
# The cloud consumer of the readings (not of the gateway's own lifecycle topics): MQTT 5, QoS 1,
# persistent session (-c, expiry 1 h); one line per message: topic payload user-properties.
mosquitto_sub -h 127.0.0.1 -p "$UP_PORT" -V mqttv5 -q 1 -c -i arm-smoke-cloud -x 3600 \
  -t 'outpost/arm-smoke/sensors/#' -F '%t %p %P' >"$WORK/sub.out" 2>"$WORK/sub.err" &
SUB_PID=$!
PIDS+=("$SUB_PID")
for _ in $(seq 50); do
  grep -q 'as arm-smoke-cloud' "$WORK/mosquitto.log" && break
  sleep 0.1
done
grep -q 'as arm-smoke-cloud' "$WORK/mosquitto.log" || fail "mosquitto_sub did not connect"

# The gateway's configuration: loopback listener, data in the temp dir, MQTT 5 upstream by name
# ("localhost": the static binary resolves it through glibc's getaddrinfo).
cat >"$WORK/outpost.toml" <<EOF
[node]
name = "arm-smoke"

[broker]
listeners = ["127.0.0.1:$GW_PORT"]

[storage]
data_dir = "$WORK/data"

[upstream]
url = "mqtt://localhost:$UP_PORT"
client_id = "outpost-arm-smoke"
protocol = "5"
keep_alive = "5s"

[health]
listen = "127.0.0.1:$HEALTH_PORT"

[sync]
backoff_min = "100ms"
backoff_max = "1s"

[log]
level = "info"
EOF
qemu_run check-config "$WORK/outpost.toml" >/dev/null || fail "outpost check-config rejected the test configuration"

start_gateway() {
  qemu-aarch64 "$BIN" run --config "$WORK/outpost.toml" >>"$WORK/gateway.log" 2>&1 &
  GW_PID=$!
  PIDS+=("$GW_PID")
  wait_port "$GW_PORT" 60 || fail "the emulated gateway did not listen on 127.0.0.1:$GW_PORT within 60s"
}
# SIGTERM: the gateway must exit 0 within 30 s and leave a "stopped" status behind.
stop_gateway() {
  kill -TERM "$GW_PID"
  local rc=0 deadline=$((SECONDS + 30))
  while kill -0 "$GW_PID" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
  kill -0 "$GW_PID" 2>/dev/null && fail "the gateway did not exit within 30s of SIGTERM"
  wait "$GW_PID" || rc=$?
  forget "$GW_PID"
  [ "$rc" = 0 ] || fail "the gateway exited $rc after SIGTERM, expected 0"
  [ "$(status_field gateway_running)" = False ] || fail "status says the gateway is running after it exited"
}

start_gateway
wait_status runtime.uplink_state connected 30
say "gateway up under qemu-aarch64 (pid $GW_PID), broker 127.0.0.1:$GW_PORT, upstream localhost:$UP_PORT"

# Publishes COUNT QoS 1 readings "<prefix>-<i>" on sensors/<prefix> and checks every one was PUBACKed.
publish() { # PREFIX COUNT
  python3 - "$GW_PORT" "$1" "$2" <<'EOF' || fail "publishing the $1 readings failed"
import sys, paho.mqtt.client as mqtt
port, prefix, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"arm-smoke-sensor-{prefix}")
c.connect("127.0.0.1", port, keepalive=30)
c.loop_start()
infos = [c.publish(f"sensors/{prefix}", f"{prefix}-{i:04d}", qos=1) for i in range(count)]
for i, info in enumerate(infos):
    info.wait_for_publish(timeout=60)
    if not info.is_published():
        sys.exit(f"reading {prefix}-{i:04d} was not acknowledged within 60 s")
c.disconnect()
c.loop_stop()
EOF
}

# Phase 1: upstream up.
publish live "$N_LIVE"
wait_sub "$N_LIVE" 60
wait_status buffered_records 0 30
wait_status_ge store.appended_total "$N_LIVE" 10
wait_status_ge store.acked_total "$N_LIVE" 30
say "phase 1: $N_LIVE readings acked by the gateway, delivered upstream, acked by upstream"

# Phase 2: upstream down. Readings are acknowledged because they are stored, and stay stored.
stop_upstream
wait_status runtime.uplink_state connecting 30
ACKED_BEFORE="$(status_field store.acked_total)"
BUFFERED_BEFORE="$(status_field buffered_records)"
publish outage "$N_OUTAGE"
BUFFERED_MIN=$((BUFFERED_BEFORE + N_OUTAGE))
wait_status_ge buffered_records "$BUFFERED_MIN" 30
[ "$(status_field store.acked_total)" = "$ACKED_BEFORE" ] || fail "records were acked while the upstream was down"
grep -q ' outage-' "$WORK/sub.out" && fail "outage readings reached the subscriber while the upstream was down"
say "phase 2: upstream stopped, $N_OUTAGE readings acked by the gateway and buffered in its store"

# The backlog survives a restart of the gateway.
stop_gateway
wait_status_ge buffered_records "$BUFFERED_MIN" 1
start_gateway
wait_status runtime.uplink_state connecting 30
wait_status_ge buffered_records "$BUFFERED_MIN" 1
say "phase 2b: gateway stopped with SIGTERM (exit 0) and restarted; the $N_OUTAGE readings are still buffered"

# Phase 3: upstream back; the buffer drains.
start_upstream
wait_sub "$N_TOTAL" 60
wait_status buffered_records 0 30
wait_status_ge store.acked_total "$N_TOTAL" 30
say "phase 3: upstream restarted, the $N_OUTAGE buffered readings drained"

# What the cloud saw: every reading, with its seq, unique and increasing in publish order.
python3 - "$WORK/sub.out" "$N_LIVE" "$N_OUTAGE" <<'EOF' || fail "upstream messages are not what the contract says"
import sys
path, n_live, n_outage = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seq_of = {}
for line in open(path):
    parts = line.split()
    if not parts:
        continue
    topic, payload, props = parts[0], parts[1], dict(p.split(":", 1) for p in parts[2:])
    prefix = payload.split("-")[0]
    expect = f"outpost/arm-smoke/sensors/{prefix}"
    if topic != expect:
        sys.exit(f"{payload}: topic {topic}, expected {expect}")
    if "seq" not in props or "ingested_at" not in props:
        sys.exit(f"{payload}: missing seq/ingested_at user properties: {line.strip()}")
    seq = int(props["seq"])
    if seq_of.setdefault(payload, seq) != seq:
        sys.exit(f"{payload} was delivered with two different seqs {seq_of[payload]} and {seq}")
want = [f"live-{i:04d}" for i in range(n_live)] + [f"outage-{i:04d}" for i in range(n_outage)]
missing = [p for p in want if p not in seq_of]
if missing:
    sys.exit(f"{len(missing)} readings never reached the upstream, first {missing[0]}")
seqs = [seq_of[p] for p in want]
if len(set(seqs)) != len(seqs):
    sys.exit("two readings share a seq")
if seqs != sorted(seqs):
    sys.exit("seq does not increase in publish order")
print(f"arm-smoke: upstream saw all {len(want)} readings, seq {seqs[0]}..{seqs[-1]}, "
      f"{sum(1 for _ in open(path)) - len(want)} redelivered duplicate(s)")
EOF

# Phase 4: SIGTERM, clean exit.
stop_gateway
[ "$(status_field buffered_records)" = 0 ] || fail "records left in the buffer after shutdown"
T_RUN=$((SECONDS - T2))

say "PASS: aarch64 $PROFILE binary ($SIZE bytes, static) under qemu-aarch64: $N_TOTAL QoS 1 readings \
stored and delivered with seq, $N_OUTAGE of them through an upstream outage and a gateway restart, clean SIGTERM exits"
say "times: toolchain ${T_INSTALL}s, build ${T_BUILD}s, emulated run ${T_RUN}s, total $((SECONDS - T0))s"
