#!/usr/bin/env python3
"""MQTT 3.1.1 load from raw sockets, for the broker benchmarks (scripts/bench/broker.py).

Two modes, both on 127.0.0.1 only, both with a username/password and over TLS when asked (which
mqttwrk cannot do: it has no credentials option):

  publish  N publishers, each on its own connection, each sends M QoS 1 PUBLISHes of S bytes
           to its own topic and keeps at most W unacknowledged (refilled in batches); the
           publishers are spread over worker processes, each an asyncio loop. Prints one JSON
           object: acked, throughput (sum over publishers of count / own elapsed, from its
           CONNACK to its last PUBACK: mqttwrk's aggregate), wall rate, errors.

           mqtt_load.py publish --port P [--publishers 10 --count 10000 --size 100
               --inflight 100 --batch 32 --write-each --workers 2 --topic 'bench/{user}/data'
               --client-prefix pub- --user-prefix pub- --password PW --tls-ca ca.crt]

           By default the window is refilled with one write of at least --batch PUBLISHes
           (cheap for the generator; over TLS that is one record for many PUBLISHes);
           --write-each writes every PUBLISH on its own (over TLS: one record each).

  idle     Opens C connections (CONNECT with a long keep-alive, clean or persistent session),
           waits for every CONNACK, and holds them. With --steps 1000,10000 it stops at each
           step, prints {"connected": n, ...} and waits for a line on stdin before going on;
           after the last step a line on stdin (or EOF) sends DISCONNECT on every connection and
           closes them, then it prints {"closed": n}.

           mqtt_load.py idle --port P --connections 10000 [--steps 1000,10000 --keep-alive 3600
               --persistent --concurrency 200 --client-prefix idle-]

The packets are made by hand (a CONNECT, PUBLISH from a template with the packet id patched
in); only PUBACKs are expected back on a publishing connection, so they are counted four bytes
at a time (and checked to be PUBACKs).
"""

import argparse
import asyncio
import json
import multiprocessing
import resource
import socket
import ssl
import struct
import sys
import time


def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_str(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack(">H", len(b)) + b


def connect_packet(client_id, keep_alive, clean=True, username=None, password=None):
    flags = 0x02 if clean else 0x00
    payload = mqtt_str(client_id)
    if username is not None:
        flags |= 0x80
        payload += mqtt_str(username)
        if password is not None:
            flags |= 0x40
            payload += mqtt_str(password)
    var = mqtt_str("MQTT") + bytes([4, flags]) + struct.pack(">H", keep_alive)
    body = var + payload
    return bytes([0x10]) + varint(len(body)) + body


def publish_template(topic, size):
    """A QoS 1 PUBLISH frame with packet id 0, and the offset of the packet id."""
    t = mqtt_str(topic)
    body_len = len(t) + 2 + size
    head = bytes([0x32]) + varint(body_len) + t
    frame = head + b"\x00\x00" + b"x" * size
    return frame, len(head)


def client_ssl(ca):
    if not ca:
        return None
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = True  # the server certificate names IP 127.0.0.1
    return ctx


async def open_conn(port, ctx):
    r, w = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1" if ctx else None)
    sock = w.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return r, w


async def read_connack(r):
    ack = await r.readexactly(4)
    if ack[0] != 0x20 or ack[3] != 0:
        raise RuntimeError(f"CONNACK refused: {ack.hex()}")


# ---------------------------------------------------------------- publish


async def one_publisher(i, a, ctx):
    cid = f"{a.client_prefix}{i:05d}"
    user = f"{a.user_prefix}{i:05d}" if a.user_prefix else None
    topic = a.topic.format(user=user or cid, client=cid, i=i)
    r, w = await open_conn(a.port, ctx)
    w.write(connect_packet(cid, 60, True, user, a.password if user else None))
    await read_connack(r)
    frame, off = publish_template(topic, a.size)
    flen = len(frame)
    t0 = time.perf_counter()
    sent = acked = 0
    pkid = 1
    pending = b""
    batch = max(1, min(a.batch, a.inflight))
    while acked < a.count:
        free = a.inflight - (sent - acked)
        left = a.count - sent
        n = min(free, left)
        if n > 0 and (n >= batch or n == left or sent == acked):
            chunk = bytearray(frame * n)
            for k in range(n):
                struct.pack_into(">H", chunk, k * flen + off, pkid)
                pkid = pkid + 1 if pkid < 65535 else 1
            if a.write_each:
                # One write (over TLS: one record) per PUBLISH, as a sensor would send them.
                view = memoryview(chunk)
                for k in range(n):
                    w.write(view[k * flen:(k + 1) * flen])
            else:
                w.write(chunk)
            sent += n
            await w.drain()
        data = await r.read(65536)
        if not data:
            raise RuntimeError(f"{cid}: connection closed after {acked} PUBACKs")
        pending += data
        m = len(pending) // 4
        if pending[0:m * 4:4] != b"\x40" * m:
            raise RuntimeError(f"{cid}: expected only PUBACKs, got {pending[:16].hex()}")
        acked += m
        pending = pending[m * 4:]
    t1 = time.perf_counter()
    w.write(b"\xe0\x00")
    try:
        await w.drain()
        w.close()
        await w.wait_closed()
    except (ConnectionError, ssl.SSLError):
        pass
    return {"client": cid, "acked": acked, "elapsed": t1 - t0}


async def run_publishers(indices, a):
    ctx = client_ssl(a.tls_ca)
    results = await asyncio.gather(*[one_publisher(i, a, ctx) for i in indices],
                                   return_exceptions=True)
    out = []
    for i, res in zip(indices, results):
        if isinstance(res, BaseException):
            out.append({"client": i, "acked": 0, "elapsed": None, "error": repr(res)})
        else:
            out.append(res)
    return out


def worker(indices, a, conn):
    try:
        conn.send(asyncio.run(run_publishers(indices, a)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send([{"client": i, "acked": 0, "elapsed": None, "error": repr(e)} for i in indices])
    conn.close()


def publish(a):
    workers = max(1, min(a.workers, a.publishers))
    groups = [list(range(w, a.publishers, workers)) for w in range(workers)]
    t0 = time.perf_counter()
    procs = []
    for g in groups:
        parent, child = multiprocessing.Pipe(duplex=False)
        p = multiprocessing.Process(target=worker, args=(g, a, child))
        p.start()
        procs.append((p, parent))
    results = []
    for p, parent in procs:
        results += parent.recv()
        p.join()
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    acked = sum(r["acked"] for r in results)
    errors = [r["error"] for r in results if r.get("error")]
    throughput = sum(r["acked"] / r["elapsed"] for r in results if r.get("elapsed"))
    print(json.dumps({
        "expected": a.publishers * a.count, "acked": acked, "throughput": throughput,
        "wall_s": wall, "wall_rate": acked / wall if wall > 0 else None,
        "client_cpu_s": ru.ru_utime + ru.ru_stime, "errors": errors,
        "per_publisher": results,
    }), flush=True)
    return 0 if not errors and acked == a.publishers * a.count else 1


# ---------------------------------------------------------------- idle


async def idle(a):
    ctx = client_ssl(a.tls_ca)
    sem = asyncio.Semaphore(a.concurrency)
    conns = []
    failures = []
    loop = asyncio.get_running_loop()

    async def one(i):
        async with sem:
            cid = f"{a.client_prefix}{i:05d}"
            try:
                r, w = await open_conn(a.port, ctx)
                w.write(connect_packet(cid, a.keep_alive, not a.persistent))
                await asyncio.wait_for(read_connack(r), 30)
                conns.append((r, w))
            except Exception as e:  # noqa: BLE001 - counted and reported
                failures.append(f"{cid}: {e!r}")

    steps = sorted({int(s) for s in a.steps.split(",") if s} | {a.connections})
    done = 0
    t0 = time.perf_counter()
    for step in steps:
        await asyncio.gather(*[one(i) for i in range(done, step)])
        done = step
        print(json.dumps({"connected": len(conns), "target": step, "failures": len(failures),
                          "first_failures": failures[:3],
                          "seconds": time.perf_counter() - t0,
                          "client_rss": rss_self()}), flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
    for _r, w in conns:
        try:
            w.write(b"\xe0\x00")
        except (ConnectionError, RuntimeError):
            pass
    await asyncio.sleep(0.2)
    for _r, w in conns:
        w.close()
    await asyncio.gather(*[w.wait_closed() for _r, w in conns], return_exceptions=True)
    print(json.dumps({"closed": len(conns)}), flush=True)
    return 0


def rss_self():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("publish")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--publishers", type=int, default=10)
    p.add_argument("--count", type=int, default=10_000)
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--inflight", type=int, default=100)
    p.add_argument("--batch", type=int, default=32, help="refill the window by at least this many")
    p.add_argument("--write-each", action="store_true",
                   help="one write per PUBLISH (default: one write per refill of the window)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--topic", default="bench/{user}/data")
    p.add_argument("--client-prefix", default="pub-")
    p.add_argument("--user-prefix", default=None, help="log in as PREFIX<nnnnn>")
    p.add_argument("--password", default=None)
    p.add_argument("--tls-ca", default=None)
    i = sub.add_parser("idle")
    i.add_argument("--port", type=int, required=True)
    i.add_argument("--connections", type=int, default=10_000)
    i.add_argument("--steps", default="")
    i.add_argument("--keep-alive", type=int, default=3600)
    i.add_argument("--persistent", action="store_true", help="clean session 0")
    i.add_argument("--concurrency", type=int, default=200, help="connects in progress at once")
    i.add_argument("--client-prefix", default="idle-")
    i.add_argument("--tls-ca", default=None)
    a = ap.parse_args()
    if a.mode == "publish":
        return publish(a)
    return asyncio.run(idle(a))


if __name__ == "__main__":
    sys.exit(main())
