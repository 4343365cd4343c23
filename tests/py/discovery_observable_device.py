#!/usr/bin/env python3
"""A CoAP device for the end-to-end discovery scenario (aiocoap server, run inside a test's
network namespace): it joins the All-CoAP-Nodes groups (224.0.1.187, ff02::fd) on the interfaces
named, answers GET /.well-known/core (multicast and unicast) and offers an observable resource
whose value changes every `--interval` seconds.

    discovery_observable_device.py --interface eth0 [--interface ...] [--port 5683]
                                   [--path sensors/temp] [--interval 0.3]

Resources: /<path> (observable, so listed with `obs`; rt="temperature-c"; application/json
`{"n": N}`, N counting the changes since start; Max-Age 2 s) and /info (rt="outpost.test.info").

Prints one JSON object per line, flushed, so a test can follow it:
    {"event": "listening", "port": P}
    {"event": "wkc", "from": "ADDR", "multicast": true|false}   (each /.well-known/core request)
    {"event": "observers", "count": C}                          (when the observer count changes)
Runs until killed (SIGTERM or SIGKILL) or until standard input closes.
"""
import argparse
import asyncio
import json
import signal
import sys

import aiocoap
import aiocoap.resource as resource


def emit(obj):
    print(json.dumps(obj, sort_keys=True), flush=True)


class Reading(resource.ObservableResource):
    rt = "temperature-c"

    def __init__(self):
        super().__init__()
        self.n = 0

    def update_observation_count(self, count):
        emit({"event": "observers", "count": count})

    async def render_get(self, request):
        body = json.dumps({"n": self.n}, separators=(",", ":")).encode()
        return aiocoap.Message(payload=body, content_format=50, max_age=2)


class Info(resource.Resource):
    rt = "outpost.test.info"

    async def render_get(self, request):
        return aiocoap.Message(payload=b"test device", content_format=0)


class LoggedWkc(resource.WKCResource):
    async def render_get(self, request):
        remote = request.remote
        emit({
            "event": "wkc",
            "from": str(getattr(remote, "hostinfo", remote)),
            "multicast": bool(getattr(remote, "is_multicast_locally", False)),
        })
        return await super().render_get(request)


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--interface", action="append", default=[])
    ap.add_argument("--port", type=int, default=5683)
    ap.add_argument("--path", default="sensors/temp")
    ap.add_argument("--interval", type=float, default=0.3)
    args = ap.parse_args()

    reading = Reading()
    root = resource.Site()
    root.add_resource([".well-known", "core"], LoggedWkc(root.get_resources_as_linkheader))
    root.add_resource(args.path.split("/"), reading)
    root.add_resource(["info"], Info())
    ctx = await aiocoap.Context.create_server_context(
        root, bind=("::", args.port), multicast=args.interface)
    emit({"event": "listening", "port": args.port})

    loop = asyncio.get_running_loop()
    stop = loop.create_future()

    def done(*_):
        if not stop.done():
            stop.set_result(None)

    loop.add_signal_handler(signal.SIGTERM, done)
    loop.add_signal_handler(signal.SIGINT, done)
    # Standard input closing (the test that started us is gone) stops us too.
    loop.add_reader(sys.stdin.fileno(), lambda: sys.stdin.readline() or done())

    while not stop.done():
        await asyncio.wait([stop], timeout=args.interval)
        if stop.done():
            break
        reading.n += 1
        reading.updated_state()
    await ctx.shutdown()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:
        sys.exit(0)
