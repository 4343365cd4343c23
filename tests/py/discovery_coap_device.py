#!/usr/bin/env python3
"""An aiocoap device for the CoAP discovery tests: joins the All-CoAP-Nodes groups on the
interfaces named and answers GET /.well-known/core (multicast and unicast).

    discovery_coap_device.py --interface eth0 [--interface ...] [--port 5683]

Resources: /sensors/temp (observable: listed with `obs`), /info (rt="outpost.test.info"). Prints
`listening <port>` once bound, then runs until killed.
"""
import argparse
import asyncio
import sys

import aiocoap
import aiocoap.resource as resource


class Temp(resource.ObservableResource):
    rt = "temperature-c"

    async def render_get(self, request):
        return aiocoap.Message(payload=b"21.5", content_format=0)


class Info(resource.Resource):
    rt = "outpost.test.info"

    async def render_get(self, request):
        return aiocoap.Message(payload=b"test device", content_format=0)


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--interface", action="append", default=[])
    ap.add_argument("--port", type=int, default=5683)
    args = ap.parse_args()

    root = resource.Site()
    root.add_resource([".well-known", "core"],
                      resource.WKCResource(root.get_resources_as_linkheader))
    root.add_resource(["sensors", "temp"], Temp())
    root.add_resource(["info"], Info())
    await aiocoap.Context.create_server_context(root, bind=("::", args.port), multicast=args.interface)
    print(f"listening {args.port}", flush=True)
    await asyncio.get_running_loop().create_future()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:
        sys.exit(0)
