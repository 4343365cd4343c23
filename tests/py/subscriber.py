#!/usr/bin/env python3
"""MQTT subscriber for the scenario tests (paho-mqtt 2.x), by default MQTT 5 at QoS 1.

Every message received becomes one JSON line in `--out`:
    {"topic": ..., "payload_hex": ..., "qos": n, "retain": bool, "dup": bool, "props": {name: value},
     "props_len": n | null, "content_type": str | null}
where `props` holds the MQTT 5 user properties (a repeated name keeps the last value),
`props_len` the length of the PUBLISH's whole encoded property block (its length prefix included;
null over 3.1.1), so a test can compute the size of the packet the sender wrote, and
`content_type` the MQTT 5 Content Type property.

With `--envelope` every payload is decoded as the gateway's CBOR envelope (cbor2, the decoder a
cloud consumer would use): `payload_hex` is then the envelope's "payload", and the line gets
    "envelope": {"keys": [...], "types": {key: type}, "v": .., "seq": .., "ingested_at": ..,
                 "content_type": ..}
(`types`: "uint", "int", "bytes", "text", or the Python type name), or
`"envelope_error": "..."` when the payload is not one CBOR map with nothing after it (the raw
payload is then in `payload_hex`).
`--ready` is created once the SUBACK has arrived, so a test can start publishing.

With `--session-expiry S` the session is persistent (clean start only on the first connect,
session kept for S seconds) and the client reconnects after the broker goes away, so a test can
restart the broker under it (with broker persistence on, the subscription survives the restart).
Without it, losing the connection ends the process (exit 3).

Stops after `--count` messages, or after `--idle` seconds without a message once one has
arrived, or when killed. Output is line-buffered.
"""
import argparse
import io
import json
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes


def cbor_type(v) -> str:
    if type(v) is int:
        return "uint" if v >= 0 else "int"
    if isinstance(v, bytes):
        return "bytes"
    if isinstance(v, str):
        return "text"
    return type(v).__name__


def decode_envelope(raw: bytes) -> dict:
    """The envelope fields of the line (see the module doc), or {"envelope_error": ...}."""
    import cbor2  # only the envelope scenarios need it

    try:
        fp = io.BytesIO(raw)
        doc = cbor2.CBORDecoder(fp).decode()
        if fp.tell() != len(raw):
            return {"envelope_error": f"{len(raw) - fp.tell()} bytes after the CBOR item"}
    except Exception as e:  # noqa: BLE001 - any decoding failure is the finding
        return {"envelope_error": f"not CBOR: {e!r}"}
    if not isinstance(doc, dict):
        return {"envelope_error": f"not a CBOR map but {cbor_type(doc)}"}
    keys = [k if isinstance(k, str) else repr(k) for k in doc]
    env = {"keys": keys, "types": {k: cbor_type(doc[k]) for k in doc if isinstance(k, str)}}
    for k in ("v", "seq", "ingested_at", "content_type"):
        v = doc.get(k)
        env[k] = v if isinstance(v, (int, str)) and type(v) is not bool else None
    out = {"envelope": env}
    if isinstance(doc.get("payload"), bytes):
        out["payload_hex"] = doc["payload"].hex()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--topic", action="append", required=True)
    ap.add_argument("--qos", type=int, default=1)
    ap.add_argument("--protocol", choices=["3.1.1", "5"], default="5")
    ap.add_argument("--client-id", default="")
    ap.add_argument("--session-expiry", type=int, default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ready", required=True)
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--idle", type=float, default=0.0)
    ap.add_argument("--envelope", action="store_true",
                    help="decode every payload as the gateway's CBOR envelope")
    args = ap.parse_args()

    proto = mqtt.MQTTv5 if args.protocol == "5" else mqtt.MQTTv311
    persistent = args.session_expiry is not None
    if proto == mqtt.MQTTv5:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=args.client_id, protocol=proto)
    else:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=args.client_id,
                             protocol=proto, clean_session=not persistent)
    out = open(args.out, "w", buffering=1)
    lock = threading.Lock()
    state = {"n": 0, "last": None, "done": False, "lost": False, "subscribed": False}
    done = threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            print(f"connack failure {reason_code}", flush=True)
            return
        print(f"connected session_present={flags.session_present}", flush=True)
        if not (persistent and flags.session_present):
            client.subscribe([(t, args.qos) for t in args.topic])

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        for rc in reason_codes:
            if rc.is_failure:
                print(f"subscribe refused: {rc}", flush=True)
                return
        state["subscribed"] = True
        with open(args.ready, "w") as f:
            f.write("ready\n")

    def on_disconnect(client, userdata, flags, reason_code, properties):
        print(f"disconnected {reason_code}", flush=True)
        if not persistent:
            state["lost"] = True
            done.set()

    def on_message(client, userdata, msg):
        props = {}
        props_len = None
        content_type = None
        if msg.properties is not None:
            if hasattr(msg.properties, "UserProperty"):
                for k, v in msg.properties.UserProperty:
                    props[k] = v
            content_type = getattr(msg.properties, "ContentType", None)
            props_len = len(msg.properties.pack())
        rec = {
            "topic": msg.topic,
            "payload_hex": msg.payload.hex(),
            "qos": msg.qos,
            "retain": bool(msg.retain),
            "dup": bool(msg.dup),
            "props": props,
            "props_len": props_len,
            "content_type": content_type,
        }
        if args.envelope:
            rec.update(decode_envelope(msg.payload))
        line = json.dumps(rec)
        with lock:
            out.write(line + "\n")
            state["n"] += 1
            state["last"] = time.monotonic()
            if args.count and state["n"] >= args.count:
                done.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_disconnect = on_disconnect
    client.on_message = on_message
    client.reconnect_delay_set(min_delay=0.05, max_delay=0.5)

    kwargs = {}
    if proto == mqtt.MQTTv5:
        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum = 1000
        if persistent:
            props.SessionExpiryInterval = args.session_expiry
        kwargs["properties"] = props
        # mosquitto 2.0 does not persist a session that began with clean start, even with an
        # expiry: a persistent subscriber never asks for clean start (use a fresh client id).
        kwargs["clean_start"] = not persistent
    client.connect(args.host, args.port, keepalive=30, **kwargs)
    client.loop_start()
    try:
        while not done.wait(0.1):
            if args.idle and state["last"] is not None and time.monotonic() - state["last"] > args.idle:
                break
    finally:
        with lock:
            out.flush()
        if not state["lost"]:
            client.disconnect()
        client.loop_stop()
        print(f"received={state['n']}", flush=True)
    return 3 if state["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
