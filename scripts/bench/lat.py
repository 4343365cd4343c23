#!/usr/bin/env python3
"""Latency probe for scripts/bench.sh (paho-mqtt 2.x).

  lat.py pub --port P --rate 1000 --duration 20 --out pub.json
      A sensor: QoS 1 publishes on `sensors/lat` at a steady rate. Each payload is
      b"LAT1 <seq> <send time ns> " padded to --size bytes. Records the publish->PUBACK time
      (what the sensor waits for: for Outpost, the storage commit).

  lat.py sub --port P --out sub.json [--expect N]
      The cloud consumer: MQTT 5, subscribes to '#' at QoS 1 and computes
      receive time - send time for every LAT1 payload (same machine, same clock).
      Prints "ready" once subscribed; stops when it has N distinct seqs (once --expect is
      known, written later to the file named by --expect-file) or after --idle seconds
      without a message, or on SIGTERM. Writes its summary as JSON.
"""

import argparse
import json
import os
import signal
import sys
import threading
import time

import socket

import paho.mqtt.client as mqtt

MAGIC = b"LAT1 "


def set_nodelay(client, enabled):
    """paho 2.x leaves Nagle on. A QoS 1 publisher whose PUBACK comes back later than its next
    publish then has that next PUBLISH held by the kernel until the broker's TCP ACK arrives
    (Nagle + delayed ACK), which adds up to the broker's ack delay again. --nodelay measures the
    broker path without that client-side effect."""
    if not enabled:
        return

    def on_socket_open(c, userdata, sock):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass

    client.on_socket_open = on_socket_open


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    k = (len(sorted_vals) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def summary_ms(ns_values):
    v = sorted(ns_values)
    out = {"n": len(v)}
    for name, p in (("p50", 50), ("p90", 90), ("p99", 99), ("p999", 99.9), ("max", 100)):
        x = pct(v, p)
        out[name + "_ms"] = None if x is None else round(x / 1e6, 3)
    out["mean_ms"] = round(sum(v) / len(v) / 1e6, 3) if v else None
    return out


def run_pub(a):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"lat-pub-{os.getpid()}",
                    protocol=mqtt.MQTTv311)
    set_nodelay(c, a.nodelay)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    sent_at = {}  # mid -> send ns
    ack_lat = []
    connected = threading.Event()

    def on_connect(client, userdata, flags, rc, props):
        if not rc.is_failure:
            connected.set()

    # No lock around publish(): paho may run on_publish while holding its own mutex, so
    # a PUBACK that beats the bookkeeping below is parked in early_ack and matched later.
    early_ack = {}

    def on_publish(client, userdata, mid, rc, props):
        now = time.time_ns()
        t = sent_at.pop(mid, None)
        if t is None:
            early_ack[mid] = now
        else:
            ack_lat.append(now - t)

    c.on_connect = on_connect
    c.on_publish = on_publish
    c.connect("127.0.0.1", a.port, keepalive=30)
    c.loop_start()
    if not connected.wait(10):
        print("lat.py pub: could not connect", file=sys.stderr)
        sys.exit(2)
    total = int(a.rate * a.duration)
    interval = 1.0 / a.rate
    t0 = time.monotonic()
    late = 0
    for i in range(total):
        due = t0 + i * interval
        d = due - time.monotonic()
        if d > 0:
            time.sleep(d)
        elif d < -0.005:
            late += 1
        now = time.time_ns()
        body = MAGIC + f"{i} {now} ".encode()
        payload = body + b"." * max(0, a.size - len(body))
        info = c.publish(a.topic, payload, qos=1)
        sent_at[info.mid] = now
        ack = early_ack.pop(info.mid, None)
        if ack is not None and sent_at.pop(info.mid, None) is not None:
            ack_lat.append(ack - now)
    elapsed = time.monotonic() - t0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(ack_lat) + len(early_ack) < total:
        time.sleep(0.01)
    for mid, ack in list(early_ack.items()):  # the rare race: both sides parked
        t = sent_at.pop(mid, None)
        if t is not None:
            ack_lat.append(ack - t)
    c.disconnect()
    c.loop_stop()
    res = {"sent": total, "acked": len(ack_lat), "elapsed_s": round(elapsed, 3),
           "achieved_rate": round(total / elapsed, 1), "late_sends": late,
           "puback": summary_ms(ack_lat)}
    with open(a.out, "w") as f:
        json.dump(res, f)


def run_sub(a):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"lat-sub-{os.getpid()}",
                    protocol=mqtt.MQTTv5)
    set_nodelay(c, a.nodelay)
    lat = []
    seen = set()
    dups = 0
    other = 0
    last_msg = [time.monotonic()]
    subscribed = threading.Event()
    stop = threading.Event()

    def on_connect(client, userdata, flags, rc, props):
        client.subscribe("#", qos=1)

    def on_subscribe(client, userdata, mid, rcs, props):
        subscribed.set()

    def on_message(client, userdata, msg):
        nonlocal dups, other
        now = time.time_ns()
        p = msg.payload
        if not p.startswith(MAGIC):
            other += 1
            return
        parts = p[len(MAGIC):].split(b" ")
        seq, t = int(parts[0]), int(parts[1])
        last_msg[0] = time.monotonic()
        if seq in seen:
            dups += 1
            return
        seen.add(seq)
        lat.append(now - t)

    c.on_connect = on_connect
    c.on_subscribe = on_subscribe
    c.on_message = on_message
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    c.connect("127.0.0.1", a.port, keepalive=30)
    c.loop_start()
    if not subscribed.wait(10):
        print("lat.py sub: could not subscribe", file=sys.stderr)
        sys.exit(2)
    print("ready", flush=True)
    while not stop.is_set():
        expect = None
        if a.expect_file and os.path.exists(a.expect_file):
            try:
                with open(a.expect_file) as f:
                    expect = int(f.read().strip())
            except ValueError:
                expect = None
        if expect is not None:
            if len(seen) >= expect or time.monotonic() - last_msg[0] > a.idle:
                break
        time.sleep(0.05)
    c.disconnect()
    c.loop_stop()
    res = {"received": len(seen), "duplicates": dups, "other_messages": other,
           "latency": summary_ms(lat)}
    with open(a.out, "w") as f:
        json.dump(res, f)


def main():
    ap = argparse.ArgumentParser()
    sp = ap.add_subparsers(dest="mode", required=True)
    p = sp.add_parser("pub")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--rate", type=float, default=1000)
    p.add_argument("--duration", type=float, default=20)
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--topic", default="sensors/lat")
    p.add_argument("--out", required=True)
    p.add_argument("--nodelay", action="store_true", help="set TCP_NODELAY on the client socket")
    s = sp.add_parser("sub")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--expect-file")
    s.add_argument("--idle", type=float, default=10)
    s.add_argument("--nodelay", action="store_true", help="set TCP_NODELAY on the client socket")
    a = ap.parse_args()
    if a.mode == "pub":
        run_pub(a)
    else:
        run_sub(a)


if __name__ == "__main__":
    main()
