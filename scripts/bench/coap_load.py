#!/usr/bin/env python3
"""CoAP ingest load generator for scripts/bench.sh (issue 4), raw UDP sockets, no CoAP library.

  coap_load.py --port P [--clients 8] [--inflight 64] [--count 12500] [--procs 2]

Each client is one UDP socket (its own source port, so the gateway sees one endpoint per
client) that keeps --inflight confirmable POSTs to /t/bench/<client> in flight, Content-Format
112 (application/senml+cbor), each body a valid --size byte (100 by default) SenML CBOR pack, until
it has --count answered. It handles what RFC 7252 allows the server to do:
  - piggy-backed response (ACK carrying 2.01): done;
  - empty ACK, then a separate response (CON or NON, matched by token): the CON one is ACKed;
  - no answer: the same datagram (same message id, so the server's duplicate detection applies)
    is sent again after ACK_TIMEOUT (2 s, x1.0-1.5 random), doubling, at most 4 times
    (RFC 7252 section 4.8), then the request counts as lost;
  - any other response code (4.00, 5.03, ...) or a RST counts as a failure, by code.
Clients are spread over --procs worker processes (Python would otherwise be the bottleneck
sooner); all start at the same instant. Prints one JSON object: responses by code, rate
(2.01s / (last answer - start)), retransmissions, latency percentiles (send -> 2.01) and the
generator's own CPU seconds.
"""

import argparse
import json
import os
import random
import resource
import selectors
import socket
import struct
import subprocess
import sys
import time

ACK_TIMEOUT = 2.0
ACK_RANDOM_FACTOR = 1.5
MAX_RETRANSMIT = 4

CON, NON, ACK, RST = 0, 1, 2, 3
CREATED = (2 << 5) | 1  # 2.01
CHANGED = (2 << 5) | 4  # 2.04


def code_str(c):
    return f"{c >> 5}.{c & 31:02d}"


# ---------------------------------------------------------------- SenML CBOR payload


def cbor_head(major, n):
    m = major << 5
    if n < 24:
        return bytes([m | n])
    if n < 256:
        return bytes([m | 24, n])
    if n < 65536:
        return bytes([m | 25]) + struct.pack(">H", n)
    return bytes([m | 26]) + struct.pack(">I", n)


def cbor_int(i):
    return cbor_head(0, i) if i >= 0 else cbor_head(1, -1 - i)


def cbor_text(s):
    b = s.encode()
    return cbor_head(3, len(b)) + b


def cbor_f64(x):
    return b"\xfb" + struct.pack(">d", x)


def senml_pack(size, client):
    """[{bn: "urn:dev:...:<client>:", bt: <now>, n: "temperature", u: "Cel", v: 23.125}] as
    SenML CBOR (RFC 8428 labels bn -2, bt -3, n 0, u 1, v 2), the base name padded so the pack
    is exactly `size` bytes."""
    def build(pad):
        bn = f"urn:dev:bench:{client:04d}:{'0' * pad}"
        return (cbor_head(4, 1) + cbor_head(5, 5)
                + cbor_int(-2) + cbor_text(bn) + cbor_int(-3) + cbor_f64(float(int(time.time())))
                + cbor_int(0) + cbor_text("temperature") + cbor_int(1) + cbor_text("Cel")
                + cbor_int(2) + cbor_f64(23.125))
    for pad in range(0, size):
        b = build(pad)
        if len(b) == size:
            return b
        if len(b) > size:
            break
    raise SystemExit(f"cannot build a {size}-byte SenML CBOR pack")


# ---------------------------------------------------------------- CoAP encoding


def coap_option(delta, value):
    """One option with a delta < 13 and a value shorter than 13 bytes (all we send)."""
    assert delta < 13 and len(value) < 13
    return bytes([(delta << 4) | len(value)]) + value


def post_template(path, content_format, payload):
    """CON POST with a 4-byte token; message id (bytes 2-3) and token (4-7) patched per request."""
    opts = b""
    last = 0
    for seg in path:  # Uri-Path, option 11
        opts += coap_option(11 - last, seg.encode())
        last = 11
    cf = bytes([content_format]) if content_format < 256 else struct.pack(">H", content_format)
    opts += coap_option(12 - last, cf)  # Content-Format, option 12
    hdr = bytes([0x40 | (CON << 4) | 4, 0x02, 0, 0]) + b"\0\0\0\0"
    return bytearray(hdr + opts + b"\xff" + payload)


def empty_ack(mid):
    return bytes([0x40 | (ACK << 4), 0, mid >> 8, mid & 0xFF])


# ---------------------------------------------------------------- one worker process


class Client:
    def __init__(self, idx, a, host, port):
        self.idx = idx
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.connect((host, port))
        self.sock.setblocking(False)
        self.tmpl = post_template(["t", "bench", str(idx)], 112, senml_pack(a.size, idx))
        self.mid = random.randrange(65536)
        self.token = random.randrange(1 << 32)
        self.to_send = a.count
        self.pending = {}  # mid -> [datagram, token, first_sent, next_timeout_at, timeout, attempts]
        self.by_token = {}  # token -> mid, for separate responses
        self.acked_empty = set()  # mids whose empty ACK came: no more retransmissions
        self.done = 0

    def send_new(self, now):
        self.mid = (self.mid + 1) & 0xFFFF
        self.token = (self.token + 1) & 0xFFFFFFFF
        d = self.tmpl
        struct.pack_into(">HI", d, 2, self.mid, self.token)
        b = bytes(d)
        t = ACK_TIMEOUT * (1 + random.random() * (ACK_RANDOM_FACTOR - 1))
        tok = b[4:8]
        self.pending[self.mid] = [b, tok, now, now + t, t, 0]
        self.by_token[tok] = self.mid
        self.to_send -= 1
        try:
            self.sock.send(b)
        except BlockingIOError:
            self.pending[self.mid][3] = now  # retry from the timer pass
        return self.mid


def worker(a, clients_idx, start_at):
    sel = selectors.DefaultSelector()
    clients = [Client(i, a, a.host, a.port) for i in clients_idx]
    for c in clients:
        sel.register(c.sock, selectors.EVENT_READ, c)
    codes = {}
    retrans = 0
    lost = 0
    separate = 0
    rst = 0
    lat = []
    last_answer = None
    while time.monotonic() < start_at:
        time.sleep(0.0005)
    t0 = time.monotonic()
    for c in clients:
        for _ in range(min(a.inflight, c.to_send)):
            c.send_new(t0)
    open_count = sum(len(c.pending) for c in clients)
    next_timer = t0 + 0.05
    while open_count > 0:
        events = sel.select(0.05)
        now = time.monotonic()
        for key, _ in events:
            c = key.data
            for _ in range(64):
                try:
                    data = c.sock.recv(2048)
                except (BlockingIOError, InterruptedError):
                    break
                except ConnectionRefusedError:
                    raise SystemExit(f"coap_load: port {a.port} refuses (ICMP): no CoAP listener")
                if len(data) < 4:
                    continue
                b0 = data[0]
                typ = (b0 >> 4) & 3
                tkl = b0 & 0xF
                code = data[1]
                mid = (data[2] << 8) | data[3]
                if typ == ACK and code == 0:  # empty ACK: a separate response follows
                    if mid in c.pending:
                        c.acked_empty.add(mid)
                    continue
                if typ == RST:
                    if mid in c.pending:
                        rst += 1
                        ent = c.pending.pop(mid)
                        c.by_token.pop(ent[1], None)
                        c.acked_empty.discard(mid)
                        c.done += 1
                        codes["RST"] = codes.get("RST", 0) + 1
                        open_count -= 1
                        if c.to_send > 0:
                            c.send_new(now)
                            open_count += 1
                    continue
                tok = bytes(data[4:4 + tkl])
                if typ == ACK:
                    req_mid = mid if mid in c.pending and c.pending[mid][1] == tok else None
                else:  # CON or NON separate response
                    if typ == CON:
                        c.sock.send(empty_ack(mid))
                    req_mid = c.by_token.get(tok)
                    if req_mid is not None:
                        separate += 1
                if req_mid is None:
                    continue  # a duplicate answer to something already counted
                ent = c.pending.pop(req_mid)
                c.by_token.pop(ent[1], None)
                c.acked_empty.discard(req_mid)
                k = code_str(code)
                codes[k] = codes.get(k, 0) + 1
                if code in (CREATED, CHANGED):
                    lat.append(now - ent[2])
                last_answer = now
                c.done += 1
                open_count -= 1
                if c.to_send > 0:
                    c.send_new(now)
                    open_count += 1
        if now >= next_timer:
            next_timer = now + 0.05
            for c in clients:
                for mid, ent in list(c.pending.items()):
                    if now < ent[3]:
                        continue
                    if mid in c.acked_empty:
                        # Acknowledged: the separate response may take longer; give up only
                        # after EXCHANGE_LIFETIME-like patience (60 s here).
                        if now - ent[2] > 60:
                            c.pending.pop(mid)
                            c.by_token.pop(ent[1], None)
                            lost += 1
                            open_count -= 1
                        continue
                    if ent[5] >= MAX_RETRANSMIT:
                        c.pending.pop(mid)
                        c.by_token.pop(ent[1], None)
                        lost += 1
                        open_count -= 1
                        if c.to_send > 0:
                            c.send_new(now)
                            open_count += 1
                        continue
                    ent[5] += 1
                    ent[4] *= 2
                    ent[3] = now + ent[4]
                    retrans += 1
                    try:
                        c.sock.send(ent[0])
                    except BlockingIOError:
                        pass
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"t0": t0, "last_answer": last_answer, "codes": codes, "retransmissions": retrans,
            "lost": lost, "separate_responses": separate, "rst": rst, "latencies": lat,
            "cpu_s": r.ru_utime + r.ru_stime, "clients": len(clients)}


def pct(xs, p):
    if not xs:
        return None
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--inflight", type=int, default=64)
    ap.add_argument("--count", type=int, default=12500, help="answered requests per client")
    ap.add_argument("--size", type=int, default=100, help="SenML CBOR pack size in bytes")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # comma-separated client indexes
    ap.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker is not None:
        res = worker(a, [int(x) for x in a.worker.split(",")], a.start_at)
        json.dump(res, sys.stdout)
        return
    procs = max(1, min(a.procs, a.clients))
    groups = [list(range(i, a.clients, procs)) for i in range(procs)]
    start_at = time.monotonic() + 0.5  # CLOCK_MONOTONIC is system-wide on Linux
    children = []
    for g in groups:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", ",".join(map(str, g)),
               "--start-at", repr(start_at)] + [f"--{k}={v}" for k, v in
                                              (("host", a.host), ("port", a.port),
                                               ("inflight", a.inflight), ("count", a.count),
                                               ("size", a.size))]
        children.append(subprocess.Popen(cmd, stdout=subprocess.PIPE))
    results = []
    for p in children:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"coap_load worker failed ({p.returncode})")
        results.append(json.loads(out))
    codes = {}
    for r in results:
        for k, v in r["codes"].items():
            codes[k] = codes.get(k, 0) + v
    lat = sorted(x for r in results for x in r["latencies"])
    ends = [r["last_answer"] for r in results if r["last_answer"] is not None]
    elapsed = (max(ends) - start_at) if ends else None
    created = codes.get("2.01", 0)
    out = {
        "clients": a.clients, "inflight": a.inflight, "count_per_client": a.count, "size": a.size,
        "procs": procs, "sent": a.clients * a.count, "codes": codes, "created": created,
        "elapsed_s": elapsed, "rate": created / elapsed if elapsed else None,
        "retransmissions": sum(r["retransmissions"] for r in results),
        "lost": sum(r["lost"] for r in results),
        "separate_responses": sum(r["separate_responses"] for r in results),
        "client_cpu_s": sum(r["cpu_s"] for r in results),
        "latency_ms": {"p50": pct(lat, 0.5) and pct(lat, 0.5) * 1e3,
                       "p99": pct(lat, 0.99) and pct(lat, 0.99) * 1e3,
                       "max": lat[-1] * 1e3 if lat else None},
        "payload_hex": senml_pack(a.size, 0).hex(),
    }
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
