#!/usr/bin/env python3
"""Soak benchmark (issue 12): a steady mixed load for a long time, sampled, with the slope of
every sample series. Flat slopes mean nothing grows without bound.

  python3 scripts/bench/soak.py --bin target/bench-fast/outpost [--minutes 10] [--rate 1000]
                                [--coap-share 0.3] [--out target/soak-results.json]

What it runs (everything on 127.0.0.1, free ports, a fresh data directory under
target/bench-tmp/, every process it started stopped by PID at the end):
- an upstream mosquitto with a QoS 1 subscriber (paho, in this process) that measures each
  reading's sensor -> cloud latency from the send time carried in the payload;
- the gateway with its defaults (durability full, MQTT 5 upstream), CoAP on, status endpoint on;
- --rate readings per second in all: (1 - coap_share) as MQTT QoS 1 over one paho connection,
  coap_share as CoAP confirmable POSTs (raw UDP, text/plain) to /t/soak/<n>, paced per 10 ms tick.
Every 10 s it samples the gateway's RSS (VmRSS), open fds, store size (database + WAL), backlog
(buffered_records) and the interval's latency p50/p99; at the end it prints the table, the
least-squares slope of each series per hour, and writes everything to --out as JSON.
"""

import argparse
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import paho.mqtt.client as mqtt


def free_port(kind=socket.SOCK_STREAM):
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def slope_per_hour(xs, ys):
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    if den == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den * 3600.0


def pct(values, p):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(p / 100.0 * len(v)))]


def coap_post(mid, token, path, payload):
    # CON POST, token 4 bytes, Uri-Path options, Content-Format 0 (text/plain), payload.
    out = bytes([0x40 | 4, 0x02]) + struct.pack(">H", mid) + token
    last = 0
    for seg in path:
        b = seg.encode()
        delta = 11 - last
        out += bytes([(delta << 4) | len(b)]) + b
        last = 11
    out += bytes([((12 - last) << 4) | 0])  # Content-Format 0, empty value
    return out + b"\xff" + payload


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--coap-share", type=float, default=0.3)
    ap.add_argument("--out", default="target/soak-results.json")
    args = ap.parse_args()

    os.makedirs("target/bench-tmp", exist_ok=True)
    work = tempfile.mkdtemp(prefix="soak-", dir="target/bench-tmp")
    up, mq, coap, http = free_port(), free_port(), free_port(socket.SOCK_DGRAM), free_port()
    with open(f"{work}/m.conf", "w") as f:
        f.write(f"listener {up} 127.0.0.1\nallow_anonymous true\nlog_dest none\nmax_queued_messages 0\n")
    with open(f"{work}/c.toml", "w") as f:
        f.write(
            f'[node]\nname = "soak"\n[broker]\nlisteners = ["127.0.0.1:{mq}"]\n'
            f'[coap]\nlisteners = ["127.0.0.1:{coap}"]\n[storage]\ndata_dir = "{work}/data"\n'
            f'[health]\nlisten = "127.0.0.1:{http}"\n[upstream]\nurl = "mqtt://127.0.0.1:{up}"\n'
        )
    procs = []
    mosq = subprocess.Popen(["mosquitto", "-c", f"{work}/m.conf"])
    procs.append(mosq)
    time.sleep(0.3)

    lat_lock = threading.Lock()
    latencies = []
    received = [0]

    def on_message(c, u, msg):
        try:
            sent = float(msg.payload.split(b"|")[1])
        except (IndexError, ValueError):
            return
        with lat_lock:
            latencies.append(time.time() - sent)
            received[0] += 1

    cloud = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="soak-cloud", protocol=mqtt.MQTTv5)
    cloud.on_message = on_message
    cloud.connect("127.0.0.1", up)
    cloud.subscribe("outpost/soak/#", qos=1)
    cloud.loop_start()

    log = open(f"{work}/gw.log", "w")
    gw = subprocess.Popen([args.bin, "run", "--config", f"{work}/c.toml"], stderr=log, stdout=log)
    procs.append(gw)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", mq), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)

    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="soak-mqtt")
    pub.max_inflight_messages_set(200)
    pub.connect("127.0.0.1", mq)
    pub.loop_start()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setblocking(False)

    def status():
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/status", timeout=3) as r:
            return json.load(r)

    def sample(t0):
        with open(f"/proc/{gw.pid}/status") as f:
            rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
        fds = len(os.listdir(f"/proc/{gw.pid}/fd"))
        size = sum(
            os.path.getsize(f"{work}/data/{n}")
            for n in os.listdir(f"{work}/data")
            if n.startswith("outpost.db")
        )
        try:
            backlog = status().get("buffered_records")
        except OSError:
            backlog = None
        with lat_lock:
            lats = latencies[:]
            latencies.clear()
        return {
            "t_s": round(time.time() - t0, 1),
            "rss_kb": rss,
            "fds": fds,
            "store_bytes": size,
            "backlog": backlog,
            "lat_p50_ms": None if not lats else round(pct(lats, 50) * 1000, 2),
            "lat_p99_ms": None if not lats else round(pct(lats, 99) * 1000, 2),
            "delivered": len(lats),
        }

    samples = []
    sent_mqtt = sent_coap = coap_answers = 0
    mid = random.randrange(65536)
    t0 = time.time()
    end = t0 + args.minutes * 60
    next_sample = t0 + 10
    tick = 0.01
    per_tick = args.rate * tick
    carry = 0.0
    n = 0
    while time.time() < end:
        t_tick = time.time()
        carry += per_tick
        k = int(carry)
        carry -= k
        for _ in range(k):
            n += 1
            body = f"r|{time.time():.6f}|".encode().ljust(100, b".")
            if random.random() < args.coap_share:
                mid = (mid + 1) & 0xFFFF
                try:
                    udp.sendto(coap_post(mid, struct.pack(">I", n), ["t", "soak", str(n % 50)], body), ("127.0.0.1", coap))
                    sent_coap += 1
                except BlockingIOError:
                    pass
            else:
                pub.publish(f"soak/{n % 50}", body, qos=1)
                sent_mqtt += 1
        try:
            while True:
                udp.recv(2048)
                coap_answers += 1
        except BlockingIOError:
            pass
        if time.time() >= next_sample:
            samples.append(sample(t0))
            print(json.dumps(samples[-1]), flush=True)
            next_sample += 10
        time.sleep(max(0.0, tick - (time.time() - t_tick)))

    time.sleep(2)
    samples.append(sample(t0))
    pub.loop_stop()
    cloud.loop_stop()
    for p in reversed(procs):
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
    xs = [s["t_s"] for s in samples]
    slopes = {}
    for key in ["rss_kb", "fds", "store_bytes", "backlog", "lat_p50_ms", "lat_p99_ms"]:
        pts = [(x, s[key]) for x, s in zip(xs, samples) if s[key] is not None]
        slopes[key + "_per_hour"] = round(slope_per_hour([p[0] for p in pts], [p[1] for p in pts]), 3)
    result = {
        "minutes": args.minutes,
        "rate": args.rate,
        "coap_share": args.coap_share,
        "sent_mqtt": sent_mqtt,
        "sent_coap": sent_coap,
        "coap_answers": coap_answers,
        "delivered_upstream": received[0],
        "samples": samples,
        "slopes": slopes,
        "first": samples[0] if samples else None,
        "last": samples[-1] if samples else None,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
