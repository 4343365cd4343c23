#!/usr/bin/env python3
"""A local service for the gateway's HTTP health check: Python's own http.server.

    health_http_server.py --port PORT --status-file FILE

Answers every GET with the status code written in FILE (read at each request; 200 when the
file is missing or empty) and a short body. Prints `listening <port>` once bound, then one line
per request: `GET <path> -> <status> ua=<User-Agent>`. Killing it closes the port.
"""
import argparse
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--status-file", required=True)
    args = ap.parse_args()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            try:
                with open(args.status_file) as f:
                    raw = f.read().strip()
                status = int(raw) if raw else 200
            except FileNotFoundError:
                status = 200
            body = f"status {status}\n".encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            ua = self.headers.get("User-Agent", "")
            print(f"GET {self.path} -> {status} ua={ua}", flush=True)

        def log_message(self, fmt, *a):  # the line above is the log
            pass

    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"listening {args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
