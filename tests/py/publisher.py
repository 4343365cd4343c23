#!/usr/bin/env python3
"""QoS 1 sensor publisher for the scenario tests (paho-mqtt 2.x).

Publishes `--count` readings on each of `--topics` (comma separated), either interleaved
(t0/0, t1/0, ..., t0/1, ...) or sequentially (all of t0, then all of t1, ...). The payload of
reading `counter` on `topic` is `payload(topic, counter, size)` below; the Rust harness builds the
same bytes (`outpost_tests::payload`), so a test can check payloads byte for byte.

Every reading the broker acknowledges (PUBACK, paho's on_publish) is appended to `--acked` as
a line `<topic> <counter>` the moment the ack arrives (line-buffered), so a test that kills the
broker knows exactly what was acknowledged. On losing the connection the publisher stops (no
reconnect: a resent message would blur what was acked before the crash), writes a summary to
stdout and exits 0; it exits 2 if it could not connect at all.

At most `--window` readings are outstanding (published, not yet acked): paho's message ids wrap
at 65535, and a larger backlog would reuse an id still waiting in paho's queue.

As a probe (the flood scenarios): `--interval S` paces the readings (one every S seconds, on a
fixed schedule), `--stop-file F` ends publishing once F exists (the outstanding ones are still
waited for), and `--latencies F` gets a line `<topic> <counter> <seconds>` per PUBACK: the time
from handing the reading to paho to its PUBACK.
"""
import argparse
import os
import sys
import threading
import time

import paho.mqtt.client as mqtt

from mqtt_connect import connect_and_wait


def payload(topic: str, counter: int, size: int) -> bytes:
    head = f"{topic}|{counter}|".encode()
    if len(head) >= size:
        return head
    return head + b"." * (size - len(head))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--topics", required=True)
    ap.add_argument("--count", type=int, required=True, help="readings per topic")
    ap.add_argument("--start", type=int, default=0, help="first counter value")
    ap.add_argument("--size", type=int, default=100, help="payload bytes")
    ap.add_argument("--order", choices=["interleave", "sequential"], default="interleave")
    ap.add_argument("--protocol", choices=["3.1.1", "5"], default="3.1.1")
    ap.add_argument("--client-id", default="")
    ap.add_argument("--acked", required=True, help="file receiving '<topic> <counter>' per PUBACK")
    ap.add_argument("--window", type=int, default=200)
    ap.add_argument("--inflight", type=int, default=100)
    ap.add_argument("--connect-timeout", type=float, default=30.0)
    ap.add_argument("--interval", type=float, default=0.0, help="seconds between readings")
    ap.add_argument("--stop-file", help="stop publishing once this file exists")
    ap.add_argument("--latencies", help="file receiving '<topic> <counter> <seconds>' per PUBACK")
    args = ap.parse_args()

    topics = [t for t in args.topics.split(",") if t]
    if args.order == "interleave":
        plan = [(t, c) for c in range(args.start, args.start + args.count) for t in topics]
    else:
        plan = [(t, c) for t in topics for c in range(args.start, args.start + args.count)]

    proto = mqtt.MQTTv5 if args.protocol == "5" else mqtt.MQTTv311
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=args.client_id, protocol=proto)
    client.max_inflight_messages_set(args.inflight)
    client.max_queued_messages_set(0)

    acked_file = open(args.acked, "w", buffering=1)
    latency_file = open(args.latencies, "w", buffering=1) if args.latencies else None
    sent_at = {}
    lock = threading.Condition()
    state = {"connected": False, "lost": False, "connack": None, "acked": 0, "outstanding": 0}
    by_mid = {}
    early = set()

    def record(entry):
        acked_file.write(f"{entry[0]} {entry[1]}\n")
        if latency_file is not None:
            latency = time.monotonic() - sent_at.pop(entry)
            latency_file.write(f"{entry[0]} {entry[1]} {latency:.6f}\n")
        state["acked"] += 1
        state["outstanding"] -= 1

    def on_publish(client, userdata, mid, reason_code, properties):
        # Runs on paho's network thread while paho holds its own locks: only touch ours here,
        # and never call paho while holding ours (see the main loop).
        with lock:
            if reason_code is not None and reason_code.is_failure:
                return
            entry = by_mid.pop(mid, None)
            if entry is None:
                early.add(mid)
            else:
                record(entry)
            lock.notify_all()

    client.on_publish = on_publish
    if not connect_and_wait(client, args.host, args.port, lock, state, args.connect_timeout):
        return 2

    published = 0
    start = time.monotonic()
    for i, (topic, counter) in enumerate(plan):
        if args.stop_file and os.path.exists(args.stop_file):
            break
        if args.interval > 0:
            delay = start + i * args.interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        with lock:
            while state["outstanding"] >= args.window and not state["lost"]:
                lock.wait(0.5)
            if state["lost"]:
                break
            state["outstanding"] += 1
            if latency_file is not None:
                sent_at[(topic, counter)] = time.monotonic()
        info = client.publish(topic, payload(topic, counter, args.size), qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS and info.rc != mqtt.MQTT_ERR_NO_CONN:
            print(f"publish error rc={info.rc}", flush=True)
        with lock:
            if info.mid in early:
                early.discard(info.mid)
                record((topic, counter))
            else:
                by_mid[info.mid] = (topic, counter)
        published += 1

    with lock:
        while state["outstanding"] > 0 and not state["lost"]:
            lock.wait(0.5)
    lost = state["lost"]
    if not lost:
        client.disconnect()
    client.loop_stop()
    with lock:
        acked_file.flush()
        acked_file.close()
        if latency_file is not None:
            latency_file.close()
        print(f"published={published} acked={state['acked']} lost_connection={lost}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
