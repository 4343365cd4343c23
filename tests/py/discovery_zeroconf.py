#!/usr/bin/env python3
"""python-zeroconf as the mDNS peer of the discovery tests (run inside a test's network namespace).

    discovery_zeroconf.py browse TYPE [TYPE...]
    discovery_zeroconf.py register --type T --name N --port P --address A [--txt k=v ...]

browse prints one JSON object per line, flushed:
    {"event": "ready"}
    {"event": "added"|"updated", "type": T, "name": FULLNAME, "port": P,
     "addresses": ["10.0.0.1", ...], "txt": {"k": "v", ...}}
    {"event": "removed", "type": T, "name": FULLNAME}
    {"event": "resolved", ...}   (the answer to a line `resolve TYPE FULLNAME` on stdin)
(added/updated/resolved carry what zeroconf resolved, from its cache when it has the records; a
service that cannot be resolved within 3 s is printed with port null.)

register prints {"event": "registered", "name": FULLNAME} once the service is announced, and
on SIGTERM unregisters it (goodbye packets), prints {"event": "unregistered"} and exits 0.

Both run until killed (SIGTERM) or until standard input closes.
"""
import argparse
import json
import signal
import socket
import sys
import threading

from zeroconf import ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

lock = threading.Lock()


def emit(obj):
    with lock:
        print(json.dumps(obj, sort_keys=True), flush=True)


def describe(zc, type_, name, event):
    info = zc.get_service_info(type_, name, timeout=3000)
    if info is None:
        emit({"event": event, "type": type_, "name": name, "port": None, "addresses": [], "txt": {}})
        return
    txt = {}
    for k, v in (info.properties or {}).items():
        key = k.decode("utf-8", "replace")
        txt[key] = "" if v is None else v.decode("utf-8", "replace")
    emit({
        "event": event,
        "type": type_,
        "name": name,
        "port": info.port,
        "addresses": sorted(info.parsed_addresses()),
        "txt": txt,
    })


def on_change(zeroconf, service_type, name, state_change):
    if state_change is ServiceStateChange.Removed:
        emit({"event": "removed", "type": service_type, "name": name})
    else:
        event = "added" if state_change is ServiceStateChange.Added else "updated"
        # Resolving blocks: not on zeroconf's own thread.
        threading.Thread(target=describe, args=(zeroconf, service_type, name, event), daemon=True).start()


def wait_until_stopped(zc=None):
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())

    def stdin_closed():
        try:
            for line in sys.stdin:
                parts = line.split(None, 2)
                if zc is not None and len(parts) == 3 and parts[0] == "resolve":
                    describe(zc, parts[1], parts[2].strip(), "resolved")
        except Exception:
            pass
        done.set()

    threading.Thread(target=stdin_closed, daemon=True).start()
    done.wait()


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("browse")
    b.add_argument("types", nargs="+")
    r = sub.add_parser("register")
    r.add_argument("--type", required=True)
    r.add_argument("--name", required=True)
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--address", required=True)
    r.add_argument("--txt", action="append", default=[])
    args = ap.parse_args()

    zc = Zeroconf()
    if args.cmd == "browse":
        ServiceBrowser(zc, args.types, handlers=[on_change])
        emit({"event": "ready"})
        wait_until_stopped(zc)
        zc.close()
        return 0

    props = dict(kv.split("=", 1) for kv in args.txt)
    info = ServiceInfo(
        args.type,
        f"{args.name}.{args.type}",
        addresses=[socket.inet_aton(args.address)],
        port=args.port,
        properties=props,
        server="zc-peer.local.",
    )
    zc.register_service(info)
    emit({"event": "registered", "name": info.name})
    wait_until_stopped()
    zc.unregister_service(info)
    emit({"event": "unregistered"})
    zc.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
