#!/usr/bin/env python3
"""MQTT 3.1.1 floods from raw sockets, for the flood scenarios (tests/tests/flood_*.rs).

paho spends tens of microseconds per message in Python; a flood of 100,000s of messages or
10,000 connections needs the packets made by hand. Two modes, both on 127.0.0.1:

  publish   One connection (clean session) sends --count PUBLISHes, message i on topic
            --topic formatted with {i}, payload --payload formatted with {topic} and {i}
            (UTF-8) and padded with '.' to --size bytes, at --qos 0 or 1, retained with
            --retain. QoS 0 goes out as fast as the socket takes it (large writes);
            QoS 1 keeps at most --window unacknowledged and counts PUBACKs. After the last
            one it sends DISCONNECT and waits (--linger seconds at most) for the gateway to
            close the socket: the gateway reads a connection's packets in order, so by then it
            has read every PUBLISH before the DISCONNECT.

  sessions  --count clients, --concurrency at a time, each on its own connection: CONNECT
            with clean session 0 and client id --client-prefix + i, SUBSCRIBE (QoS 1) to
            --subscribe formatted with {i} if the CONNACK accepted it, then DISCONNECT and
            close: a persistent session whose client never comes back.

Prints one JSON object on the last line of stdout (see `summary` in each mode); exits 0 when
the flood ran to the end (refusals by the gateway are results, not errors), 2 when the first
connection failed.
"""
import argparse
import asyncio
import json
import socket
import struct
import sys
import time

CONNACK, PUBACK, SUBACK = 0x20, 0x40, 0x90


def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_str(b):
    return struct.pack(">H", len(b)) + b


def packet(first_byte, body):
    return bytes([first_byte]) + varint(len(body)) + body


def connect_packet(client_id, clean, keep_alive=60):
    flags = 0x02 if clean else 0x00
    body = mqtt_str(b"MQTT") + bytes([4, flags]) + struct.pack(">H", keep_alive)
    return packet(0x10, body + mqtt_str(client_id.encode()))


def publish_packet(topic, payload, qos, retain, pkid):
    first = 0x30 | (qos << 1) | (1 if retain else 0)
    body = mqtt_str(topic.encode()) + (struct.pack(">H", pkid) if qos else b"") + payload
    return packet(first, body)


def subscribe_packet(pkid, topic_filter, qos=1):
    return packet(0x82, struct.pack(">H", pkid) + mqtt_str(topic_filter.encode()) + bytes([qos]))


DISCONNECT = b"\xe0\x00"


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


# ---------------------------------------------------------------- publish


def publish(a):
    summary = {"mode": "publish", "count": a.count, "sent": 0, "acked": 0, "closed_early": False,
               "connack": None, "elapsed_s": None}
    try:
        sock = socket.create_connection(("127.0.0.1", a.port), timeout=30)
    except OSError as e:
        print(f"connect failed: {e}", flush=True)
        return summary, 2
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(connect_packet(a.client_id, True))
    ack = recv_exact(sock, 4)
    summary["connack"] = None if ack is None else ack[3]
    if ack is None or ack[0] != CONNACK or ack[3] != 0:
        print(f"CONNACK refused: {ack!r}", flush=True)
        return summary, 2
    def message(i):
        # str.replace, not format: a payload may hold braces (JSON).
        topic = a.topic.replace("{i}", str(i))
        body = a.payload.replace("{topic}", topic).replace("{i}", str(i)).encode()
        return topic, body + b"." * (a.size - len(body))

    t0 = time.monotonic()
    try:
        if a.qos == 0:
            chunk = []
            for i in range(a.count):
                chunk.append(publish_packet(*message(i), 0, a.retain, 0))
                if len(chunk) == 512 or i == a.count - 1:
                    sock.sendall(b"".join(chunk))
                    summary["sent"] += len(chunk)
                    chunk = []
        else:
            pending = b""
            pkid = 0
            while summary["acked"] < a.count:
                out = []
                while summary["sent"] < a.count and summary["sent"] - summary["acked"] < a.window:
                    pkid = pkid % 65535 + 1
                    out.append(publish_packet(*message(summary["sent"]), 1, a.retain, pkid))
                    summary["sent"] += 1
                if out:
                    sock.sendall(b"".join(out))
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed by the gateway")
                pending += data
                n = len(pending) // 4
                if pending[0:n * 4:4] != bytes([PUBACK]) * n:
                    raise ConnectionError(f"expected only PUBACKs, got {pending[:16].hex()}")
                summary["acked"] += n
                pending = pending[n * 4:]
        sock.sendall(DISCONNECT)
        # The gateway closes the connection once it has read the DISCONNECT.
        sock.settimeout(a.linger)
        while sock.recv(65536):
            pass
    except (OSError, ConnectionError) as e:
        print(f"connection ended early: {e}", flush=True)
        summary["closed_early"] = True
    summary["elapsed_s"] = round(time.monotonic() - t0, 3)
    sock.close()
    return summary, 0


# ---------------------------------------------------------------- sessions


async def one_session(a, i, summary):
    client_id = f"{a.client_prefix}{i}"
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", a.port), 30)
    except (OSError, asyncio.TimeoutError):
        summary["connect_failed"] += 1
        return
    try:
        w.write(connect_packet(client_id, False))
        ack = await asyncio.wait_for(r.readexactly(4), 60)
        if ack[0] != CONNACK:
            summary["protocol_errors"] += 1
            return
        rc = str(ack[3])
        if ack[3] != 0:
            summary["refused"][rc] = summary["refused"].get(rc, 0) + 1
            return
        summary["accepted"] += 1
        w.write(subscribe_packet(1, a.subscribe.replace("{i}", str(i))))
        sub = await asyncio.wait_for(r.readexactly(5), 60)
        if sub[0] == SUBACK and sub[4] in (0, 1, 2):
            summary["subscribed"] += 1
        else:
            summary["subscribe_failed"] += 1
        w.write(DISCONNECT)
        await w.drain()
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        summary["closed_without_answer"] += 1
    finally:
        w.close()
        try:
            await w.wait_closed()
        except OSError:
            pass


async def sessions(a):
    summary = {"mode": "sessions", "count": a.count, "accepted": 0, "refused": {},
               "subscribed": 0, "subscribe_failed": 0, "closed_without_answer": 0,
               "connect_failed": 0, "protocol_errors": 0, "elapsed_s": None}
    t0 = time.monotonic()
    next_i = 0

    async def runner():
        nonlocal next_i
        while next_i < a.count:
            i = next_i
            next_i += 1
            await one_session(a, i, summary)

    await asyncio.gather(*[runner() for _ in range(a.concurrency)])
    summary["elapsed_s"] = round(time.monotonic() - t0, 3)
    return summary, 0


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("publish")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--topic", required=True, help="'{i}' is replaced by the message's index")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--qos", type=int, choices=[0, 1], required=True)
    p.add_argument("--retain", action="store_true")
    p.add_argument("--payload", required=True, help="'{topic}' and '{i}' are replaced")
    p.add_argument("--size", type=int, default=0, help="pad the payload with '.' to this size")
    p.add_argument("--window", type=int, default=200)
    p.add_argument("--client-id", default="flood")
    p.add_argument("--linger", type=float, default=120.0)
    s = sub.add_parser("sessions")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--count", type=int, required=True)
    s.add_argument("--client-prefix", required=True)
    s.add_argument("--subscribe", required=True, help="'{i}' is replaced by the index")
    s.add_argument("--concurrency", type=int, default=32)
    a = ap.parse_args()
    if a.mode == "publish":
        summary, rc = publish(a)
    else:
        summary, rc = asyncio.run(sessions(a))
    print(json.dumps(summary), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
