#!/usr/bin/env python3
"""A single-connection MQTT client for the conformance scenarios (paho-mqtt 2.x).

Connects once (no reconnect), optionally with a will and a subscription, and reports every
event as one line on stdout, flushed:
    connected rc=<reason>            CONNACK (rc=Success when accepted)
    subscribed granted=<q>,<q>       SUBACK
    message <qos> <retain 0|1> <topic> <payload as utf-8>
    disconnected rc=<reason>         the connection ended (the process then exits 0)
With `--disconnect-after S` it sends DISCONNECT after S seconds (a clean disconnect).
"""
import argparse
import sys
import threading

import paho.mqtt.client as mqtt


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--protocol", choices=["3.1.1", "5"], default="3.1.1")
    ap.add_argument("--client-id", default="")
    ap.add_argument("--keepalive", type=int, default=30)
    ap.add_argument("--subscribe", action="append", default=[], help="FILTER:QOS")
    ap.add_argument("--will-topic")
    ap.add_argument("--will-payload", default="")
    ap.add_argument("--will-qos", type=int, default=1)
    ap.add_argument("--disconnect-after", type=float, default=None)
    args = ap.parse_args()

    proto = mqtt.MQTTv5 if args.protocol == "5" else mqtt.MQTTv311
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=args.client_id, protocol=proto)
    if args.will_topic:
        client.will_set(args.will_topic, args.will_payload, qos=args.will_qos)
    ended = threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties):
        print(f"connected rc={reason_code}", flush=True)
        if reason_code.is_failure:
            ended.set()
            return
        subs = []
        for s in args.subscribe:
            filt, _, q = s.rpartition(":")
            subs.append((filt, int(q)))
        if subs:
            client.subscribe(subs)

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        granted = ",".join(str(rc.value) for rc in reason_codes)
        print(f"subscribed granted={granted}", flush=True)

    def on_message(client, userdata, msg):
        text = msg.payload.decode("utf-8", errors="replace")
        print(f"message {msg.qos} {int(bool(msg.retain))} {msg.topic} {text}", flush=True)

    def on_disconnect(client, userdata, flags, reason_code, properties):
        print(f"disconnected rc={reason_code}", flush=True)
        ended.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.on_disconnect = on_disconnect
    try:
        client.connect(args.host, args.port, keepalive=args.keepalive)
    except OSError as e:
        print(f"connect failed: {e}", flush=True)
        return 2
    client.loop_start()
    if args.disconnect_after is not None:
        if not ended.wait(args.disconnect_after):
            client.disconnect()
    ended.wait()
    client.loop_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
