#!/usr/bin/env python3
"""A paho-mqtt (2.x) client with a persistent session, for the session-persistence scenarios.

Connects once with a session that outlives the connection (MQTT 3.1.1: clean session 0;
MQTT 5: clean start 0 and a session expiry interval), optionally subscribes, waits for
`--expect` messages (or `--timeout`), then DISCONNECTs, keeping the session. Lines on stdout:
    connected rc=<reason> session_present=<0|1>
    subscribed granted=<code>,<code>
    message <qos> <retain 0|1> <topic> <payload as utf-8> subids=<id,id|->
    done received=<n>
Exit status 0 when the connection was accepted and every expected message arrived, 1 otherwise.
"""
import argparse
import sys
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--protocol", choices=["3.1.1", "5"], default="5")
    ap.add_argument("--client-id", required=True)
    ap.add_argument("--session-expiry", type=int, default=3600, help="MQTT 5 only, seconds")
    ap.add_argument("--subscribe", action="append", default=[], help="FILTER:QOS")
    ap.add_argument("--subscription-id", type=int, default=None, help="MQTT 5 only")
    ap.add_argument("--expect", type=int, default=0, help="messages to wait for")
    ap.add_argument("--timeout", type=float, default=30.0)
    args = ap.parse_args()

    v5 = args.protocol == "5"
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=args.client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else False,
    )
    connected = threading.Event()
    subscribed = threading.Event()
    all_in = threading.Event()
    received = []
    ok = {"connect": False}

    def on_connect(client, userdata, flags, reason_code, properties):
        print(f"connected rc={reason_code} session_present={int(flags.session_present)}", flush=True)
        ok["connect"] = not reason_code.is_failure
        connected.set()

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        granted = ",".join(str(rc.value) for rc in reason_codes)
        print(f"subscribed granted={granted}", flush=True)
        subscribed.set()

    def on_message(client, userdata, msg):
        ids = getattr(msg.properties, "SubscriptionIdentifier", None) if msg.properties else None
        subids = ",".join(str(i) for i in ids) if ids else "-"
        text = msg.payload.decode("utf-8", errors="replace")
        print(f"message {msg.qos} {int(bool(msg.retain))} {msg.topic} {text} subids={subids}", flush=True)
        received.append(msg)
        if args.expect and len(received) >= args.expect:
            all_in.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message

    if v5:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = args.session_expiry
        client.connect("127.0.0.1", args.port, keepalive=30, clean_start=False, properties=props)
    else:
        client.connect("127.0.0.1", args.port, keepalive=30)
    client.loop_start()
    try:
        if not connected.wait(args.timeout) or not ok["connect"]:
            print("done received=0", flush=True)
            return 1
        if args.subscribe:
            subs = []
            for s in args.subscribe:
                filt, _, q = s.rpartition(":")
                subs.append((filt, int(q)))
            sub_props = None
            if v5 and args.subscription_id is not None:
                sub_props = Properties(PacketTypes.SUBSCRIBE)
                sub_props.SubscriptionIdentifier = args.subscription_id
            client.subscribe(subs, properties=sub_props)
            if not subscribed.wait(args.timeout):
                print("done received=0", flush=True)
                return 1
        if args.expect:
            all_in.wait(args.timeout)
        print(f"done received={len(received)}", flush=True)
        return 0 if len(received) >= args.expect else 1
    finally:
        # DISCONNECT without properties: an MQTT 5 session keeps the CONNECT's expiry.
        client.disconnect()
        client.loop_stop()


if __name__ == "__main__":
    sys.exit(main())
