#!/usr/bin/env python3
"""A CoAP sensor for the scenario tests (aiocoap server): one observable resource that changes
every `--interval` seconds.

    coap_device.py --port P [--path temp] [--interval 0.2] [--boot B] [--max-age S]

GET /<path> returns application/json `{"boot": B, "n": N}`, where N counts the changes since
this process started and B tells one run of the device from the next (a test restarts it with
another `--boot`). Every change notifies the observers; each representation carries Max-Age
`--max-age`, so an observer that stops hearing from the device knows the observation lapsed.

Prints `listening <port>` once the socket is bound, `observers <n>` whenever the number of
observers changes and `value <n>` for every change, line-buffered, so a test can follow it.
Runs until killed.
"""
import argparse
import asyncio
import json
import sys

import aiocoap
import aiocoap.resource as resource


class Reading(resource.ObservableResource):
    def __init__(self, boot: int, max_age: int):
        super().__init__()
        self.boot = boot
        self.n = 0
        self.max_age = max_age

    def update_observation_count(self, count):
        print(f"observers {count}", flush=True)

    def body(self) -> bytes:
        return json.dumps({"boot": self.boot, "n": self.n}, separators=(",", ":")).encode()

    async def render_get(self, request):
        return aiocoap.Message(
            payload=self.body(),
            content_format=50,
            max_age=self.max_age,
        )


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="temp")
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--boot", type=int, default=1)
    ap.add_argument("--max-age", type=int, default=2)
    args = ap.parse_args()

    reading = Reading(args.boot, args.max_age)
    root = resource.Site()
    root.add_resource([".well-known", "core"],
                      resource.WKCResource(root.get_resources_as_linkheader))
    root.add_resource(args.path.split("/"), reading)
    # UDP only: the test picked a free UDP port; aiocoap would also listen on TCP (and fail
    # if that port number happens to be taken over TCP).
    await aiocoap.Context.create_server_context(
        root, bind=(args.host, args.port), transports=["udp6"]
    )
    print(f"listening {args.port}", flush=True)
    while True:
        await asyncio.sleep(args.interval)
        reading.n += 1
        print(f"value {reading.n}", flush=True)
        reading.updated_state()


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:
        sys.exit(0)
