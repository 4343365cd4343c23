#!/usr/bin/env python3
"""aiocoap client for the CoAP scenario tests. Each sub-command prints JSON lines on stdout
(line-buffered) and exits 0 when the server answered with a success code, 1 otherwise
(2 when no answer came at all).

    coap_client.py request --uri URI [--method GET|POST|PUT] [--payload-file F]
                           [--content-format N] [--block1-szx SZX]
        One request (aiocoap does Block1/Block2 itself for large bodies). Prints
        {"code": "2.01", "content_format": n|null, "payload_hex": ..., "payload": text|null,
         "options": {...}}.

    coap_client.py links --uri URI
        GET a link-format resource (`/.well-known/core[?query]`) and parse it with aiocoap's
        link-format parser (aiocoap.util.linkformat). Prints {"code": ..., "content_format": n,
        "raw": text, "links": [{"href": ..., "attrs": {name: [value or null, ...]}}]}.

    coap_client.py observe --uri URI --count N [--linger S]
        Register an observation, print one line per notification (the registration response
        included) as {"observe": n, "code": ..., "content_format": n, "payload": text}, after N
        of them cancel the observation (aiocoap sends the deregistration and/or RSTs what
        still comes), print {"cancelled": true}, stay `--linger` seconds to answer late
        notifications (with RST), and exit.
"""
import argparse
import asyncio
import json
import sys

import aiocoap
from aiocoap import Message
from aiocoap.numbers.codes import Code


def code_str(code) -> str:
    return f"{int(code) >> 5}.{int(code) & 0x1f:02d}"


def describe(msg) -> dict:
    try:
        text = msg.payload.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    cf = msg.opt.content_format
    return {
        "code": code_str(msg.code),
        "content_format": None if cf is None else int(cf),
        "payload_hex": msg.payload.hex(),
        "payload": text,
        "options": {
            "max_age": msg.opt.max_age,
            "observe": msg.opt.observe,
            "size1": msg.opt.size1,
        },
    }


async def cmd_request(ctx, args) -> int:
    method = getattr(Code, args.method)
    payload = b""
    if args.payload_file:
        with open(args.payload_file, "rb") as f:
            payload = f.read()
    msg = Message(code=method, uri=args.uri, payload=payload)
    if args.content_format is not None:
        msg.opt.content_format = args.content_format
    if args.block1_szx is not None:
        msg.remote_szx = args.block1_szx  # hint only; aiocoap picks its own otherwise
    resp = await ctx.request(msg).response
    print(json.dumps(describe(resp)), flush=True)
    return 0 if resp.code.is_successful() else 1


async def cmd_links(ctx, args) -> int:
    from aiocoap.util.linkformat import parse

    resp = await ctx.request(Message(code=Code.GET, uri=args.uri)).response
    out = describe(resp)
    out["raw"] = out["payload"]
    links = []
    if resp.code.is_successful() and resp.payload:
        for link in parse(resp.payload.decode("utf-8")).links:
            attrs = {}
            for name, value in link.attr_pairs:
                attrs.setdefault(name, []).append(value)
            links.append({"href": link.href, "attrs": attrs})
    out["links"] = links
    print(json.dumps(out), flush=True)
    return 0 if resp.code.is_successful() else 1


async def cmd_observe(ctx, args) -> int:
    req = ctx.request(Message(code=Code.GET, uri=args.uri, observe=0))
    first = await req.response
    print(json.dumps(describe(first)), flush=True)
    if not first.code.is_successful():
        return 1
    if first.opt.observe is None:
        print(json.dumps({"error": "the response has no Observe option: not observed"}), flush=True)
        return 1
    got = 1
    async for notification in req.observation:
        print(json.dumps(describe(notification)), flush=True)
        got += 1
        if got >= args.count:
            break
    req.observation.cancel()
    print(json.dumps({"cancelled": True}), flush=True)
    await asyncio.sleep(args.linger)
    return 0


async def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("request")
    r.add_argument("--uri", required=True)
    r.add_argument("--method", default="GET", choices=["GET", "POST", "PUT", "DELETE"])
    r.add_argument("--payload-file")
    r.add_argument("--content-format", type=int)
    r.add_argument("--block1-szx", type=int)
    lk = sub.add_parser("links")
    lk.add_argument("--uri", required=True)
    ob = sub.add_parser("observe")
    ob.add_argument("--uri", required=True)
    ob.add_argument("--count", type=int, default=3)
    ob.add_argument("--linger", type=float, default=3.0)
    args = ap.parse_args()

    ctx = await aiocoap.Context.create_client_context()
    try:
        if args.cmd == "request":
            return await cmd_request(ctx, args)
        if args.cmd == "links":
            return await cmd_links(ctx, args)
        return await cmd_observe(ctx, args)
    except aiocoap.error.Error as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return 2
    finally:
        await ctx.shutdown()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
