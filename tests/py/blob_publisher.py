#!/usr/bin/env python3
"""QoS 1 publisher of arbitrary payloads, one at a time, for the scenario tests (paho-mqtt 2.x).

`--plan FILE` lists the readings in order, one per line: `<topic>\t<payload file>`. Each payload
is read from its file and published at QoS 1; the next one is published only after the PUBACK of
the previous one, so the broker accepts them in plan order whatever their topics and sizes.

For each reading one line on stdout, flushed:
    acked <index> <reason>         PUBACK with a success reason (always "Success" over 3.1.1)
    refused <index> <reason>       MQTT 5 PUBACK with a failure reason code
    timeout <index>                no PUBACK within --ack-timeout seconds (the publisher stops)
    lost <index>                   the connection dropped before the PUBACK (it stops)
then `done acked=<n> refused=<m>`. Exit 0 when every reading got a PUBACK (whatever its reason),
1 otherwise, 2 when it could not connect.
"""
import argparse
import sys
import threading
import time

import paho.mqtt.client as mqtt

from mqtt_connect import connect_and_wait


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--protocol", choices=["3.1.1", "5"], default="3.1.1")
    ap.add_argument("--client-id", default="")
    ap.add_argument("--ack-timeout", type=float, default=60.0)
    ap.add_argument("--connect-timeout", type=float, default=30.0)
    ap.add_argument("--user-property", action="append", default=[], metavar="NAME=VALUE",
                    help="MQTT 5 user property on every publish")
    args = ap.parse_args()

    plan = []
    with open(args.plan) as f:
        for line in f:
            line = line.rstrip("\n")
            if line:
                topic, path = line.split("\t", 1)
                plan.append((topic, path))

    proto = mqtt.MQTTv5 if args.protocol == "5" else mqtt.MQTTv311
    props = None
    if args.user_property:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [tuple(p.split("=", 1)) for p in args.user_property]
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=args.client_id, protocol=proto)
    cond = threading.Condition()
    state = {"connected": False, "lost": False, "connack": None, "acks": {}}

    def on_publish(client, userdata, mid, reason_code, properties):
        with cond:
            state["acks"][mid] = reason_code
            cond.notify_all()

    client.on_publish = on_publish
    if not connect_and_wait(client, args.host, args.port, cond, state, args.connect_timeout):
        return 2

    acked = refused = 0
    ok = True
    for i, (topic, path) in enumerate(plan):
        with open(path, "rb") as f:
            payload = f.read()
        info = client.publish(topic, payload, qos=1, properties=props)
        deadline = time.monotonic() + args.ack_timeout
        with cond:
            while info.mid not in state["acks"] and not state["lost"]:
                if time.monotonic() > deadline:
                    break
                cond.wait(0.1)
            rc = state["acks"].pop(info.mid, None)
            lost = state["lost"]
        if rc is None:
            print(f"{'lost' if lost else 'timeout'} {i}", flush=True)
            ok = False
            break
        if rc is not None and getattr(rc, "is_failure", False):
            print(f"refused {i} {rc}", flush=True)
            refused += 1
        else:
            print(f"acked {i} {rc}", flush=True)
            acked += 1

    if not state["lost"]:
        client.disconnect()
    client.loop_stop()
    print(f"done acked={acked} refused={refused}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
