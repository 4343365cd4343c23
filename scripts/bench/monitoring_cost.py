#!/usr/bin/env python3
"""Cost of gateway health monitoring (issue 6, "Measure"): gateways side by side in the same run,
  - monitoring off (resource_interval = "off", heartbeat every 1h: a heartbeat cannot be turned off),
  - the defaults (resource sampling every 30s, heartbeat every 60s),
  - a sampling-heavy variant (both every 1s),
  - a second "off" gateway as a control (the spread between identical gateways),
with the same upstream mosquitto and the same light load on each (one QoS 1 reading of 100 B
every 100 ms from one client, sent to all gateways in the same loop). Reports each gateway's CPU
(utime+stime from /proc) over the window as seconds and as a share of one core, the difference
against "off", its RSS now, mean RSS over the window (sampled every 5 s) and peak RSS (VmHWM),
and the records the gateway stored for itself (appended_total - ingested: resource samples).

The gateways run concurrently, so whatever else loads the machine loads them all alike; compare
the rows with each other, not with another run.

Usage: python3 scripts/bench/monitoring_cost.py [--seconds 120] [--bin target/bench-fast/outpost]
                                                [--json target/monitoring-cost.json]
"""
import argparse
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

CLK = os.sysconf("SC_CLK_TCK")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def mem_kib(pid):
    """{"VmRSS": KiB, "VmHWM": KiB}."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0])
    return out


def wait_port(port, proc, deadline=20):
    end = time.time() + deadline
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"process {proc.args[0]} exited ({proc.returncode}) before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} never opened")


def find(name):
    p = shutil.which(name)
    if p:
        return p
    for d in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    raise SystemExit(f"{name} not found (bash scripts/install-test-deps.sh installs it)")


# ---- a minimal MQTT 3.1.1 QoS 1 publisher (one connection per gateway, no library needed)


def remaining_length(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


class Publisher:
    def __init__(self, port, client_id):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cid = client_id.encode()
        var = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack(">H", len(cid)) + cid
        self.s.sendall(b"\x10" + remaining_length(len(var)) + var)
        ack = self._read(4)
        if ack[0] != 0x20 or ack[3] != 0:
            raise SystemExit(f"CONNACK refused on {port}: {ack.hex()}")
        self.pid = 0
        self.sent = self.acked = 0

    def _read(self, n):
        b = b""
        while len(b) < n:
            c = self.s.recv(n - len(b))
            if not c:
                raise SystemExit("gateway closed the load connection")
            b += c
        return b

    def publish(self, topic, payload):
        self.pid = self.pid % 65535 + 1
        t = topic.encode()
        var = struct.pack(">H", len(t)) + t + struct.pack(">H", self.pid) + payload
        self.s.sendall(b"\x32" + remaining_length(len(var)) + var)
        self.sent += 1

    def drain_acks(self, timeout):
        """Reads PUBACKs until all sent ones are acked or `timeout` passes."""
        end = time.monotonic() + timeout
        while self.acked < self.sent:
            left = end - time.monotonic()
            if left <= 0:
                return
            self.s.settimeout(left)
            try:
                hdr = self._read(2)
            except (socket.timeout, TimeoutError):
                return
            self._read(hdr[1])
            if hdr[0] >> 4 == 4:
                self.acked += 1

    def close(self):
        try:
            self.s.sendall(b"\xe0\x00")
            self.s.close()
        except OSError:
            pass


def status(http_port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/status", timeout=5) as r:
            return json.load(r)
    except (OSError, ValueError):
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=120)
    default_bin = os.path.join(ROOT, "target/bench-fast/outpost")
    if not os.path.exists(default_bin):
        default_bin = os.path.join(ROOT, "target/debug/outpost")
    ap.add_argument("--bin", default=default_bin)
    ap.add_argument("--json", default=os.path.join(ROOT, "target/monitoring-cost.json"))
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    binary = os.path.abspath(args.bin)
    parent = os.path.join(ROOT, "target/bench-tmp")
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="outpost-moncost-", dir=parent)
    procs = []
    pubs = []

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    try:
        up = free_port()
        conf = os.path.join(tmp, "mosquitto.conf")
        with open(conf, "w") as f:
            f.write(f"listener {up} 127.0.0.1\nallow_anonymous true\nlog_dest none\npersistence false\n")
        m = subprocess.Popen([find("mosquitto"), "-c", conf], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(m)
        wait_port(up, m)
        variants = [
            ("off", 'resource_interval = "off"\nheartbeat_interval = "1h"\n'),
            ("default (30s samples, 60s heartbeat)", ""),
            ("1s samples, 1s heartbeat", 'resource_interval = "1s"\nheartbeat_interval = "1s"\n'),
            # A second "off" gateway: how far two identical gateways differ in the same run, the
            # noise floor the other rows have to be read against.
            ("off again (control: noise floor)", 'resource_interval = "off"\nheartbeat_interval = "1h"\n'),
        ]
        gws = []
        for i, (name, health) in enumerate(variants):
            mqtt, http = free_port(), free_port()
            d = os.path.join(tmp, f"gw{i}")
            os.makedirs(d)
            cfg = os.path.join(d, "outpost.toml")
            with open(cfg, "w") as f:
                f.write(
                    f'[node]\nname = "mon{i}"\n[broker]\nlisteners = ["127.0.0.1:{mqtt}"]\n'
                    f'[coap]\nlisteners = []\n[storage]\ndata_dir = "{d}/data"\n'
                    f'[upstream]\nurl = "mqtt://127.0.0.1:{up}"\n'
                    f'[health]\nlisten = "127.0.0.1:{http}"\n{health}'
                )
            p = subprocess.Popen([binary, "run", "--config", cfg], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "log"), "w"))
            procs.append(p)
            wait_port(mqtt, p)
            gws.append({"name": name, "proc": p, "mqtt": mqtt, "http": http})
        time.sleep(2)
        for g in gws:
            g["pub"] = Publisher(g["mqtt"], f"load-{g['mqtt']}")
            pubs.append(g["pub"])
            st = status(g["http"]) or {}
            g["start"] = {"cpu": cpu_seconds(g["proc"].pid),
                          "appended": (st.get("store") or {}).get("appended_total", 0),
                          "ingested": (st.get("runtime") or {}).get("ingested", 0)}
            g["rss_samples"] = []
        t0 = time.monotonic()
        # The same light load on each: one QoS 1 reading of 100 B every 100 ms.
        payload = b"r" * 100
        n = 0
        next_sample = t0
        while True:
            now = time.monotonic()
            if now - t0 >= args.seconds:
                break
            for g in gws:
                g["pub"].publish("load/t", payload)
            for g in gws:
                g["pub"].drain_acks(0.05)
            if now >= next_sample:
                for g in gws:
                    g["rss_samples"].append(mem_kib(g["proc"].pid)["VmRSS"])
                next_sample += 5
            n += 1
            time.sleep(max(0.0, t0 + n * 0.1 - time.monotonic()))
        elapsed = time.monotonic() - t0
        for g in gws:
            g["cpu"] = cpu_seconds(g["proc"].pid) - g["start"]["cpu"]
            g["mem"] = mem_kib(g["proc"].pid)
            g["pub"].drain_acks(2)
        time.sleep(1.2)  # the runtime snapshot behind /status is refreshed every second
        rows = []
        base = gws[0]
        for g in gws:
            st = status(g["http"]) or {}
            appended = (st.get("store") or {}).get("appended_total", 0) - g["start"]["appended"]
            ingested = (st.get("runtime") or {}).get("ingested", 0) - g["start"]["ingested"]
            rss_mean = sum(g["rss_samples"]) / len(g["rss_samples"]) if g["rss_samples"] else None
            rows.append({
                "variant": g["name"], "cpu_s": g["cpu"], "cpu_pct": 100 * g["cpu"] / elapsed,
                "cpu_pct_vs_off": 100 * (g["cpu"] - base["cpu"]) / elapsed,
                "rss_mib": g["mem"]["VmRSS"] / 1024, "rss_mean_mib": rss_mean and rss_mean / 1024,
                "peak_mib": g["mem"]["VmHWM"] / 1024,
                "rss_mib_vs_off": (g["mem"]["VmRSS"] - base["mem"]["VmRSS"]) / 1024,
                "readings_sent": g["pub"].sent, "readings_acked": g["pub"].acked,
                "own_records": appended - ingested,
            })
        print(f"monitoring cost over {elapsed:.0f} s, binary {binary}, gateways side by side (same run, "
              f"same load: one QoS 1 reading of 100 B every 100 ms each); load average now "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print()
        print("| variant | CPU s | CPU % of one core | vs off | RSS at end | mean RSS | peak RSS | RSS vs off "
              "| readings acked / sent | own records stored |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['variant']} | {r['cpu_s']:.2f} | {r['cpu_pct']:.2f}% | {r['cpu_pct_vs_off']:+.2f} pts | "
                  f"{r['rss_mib']:.1f} MiB | {r['rss_mean_mib'] or 0:.1f} MiB | {r['peak_mib']:.1f} MiB | "
                  f"{r['rss_mib_vs_off']:+.1f} MiB | {r['readings_acked']} / {r['readings_sent']} | "
                  f"{r['own_records']} |")
        with open(args.json, "w") as f:
            json.dump({"seconds": elapsed, "binary": binary, "rows": rows,
                       "loadavg_end": os.getloadavg()}, f, indent=1)
        print(f"\nraw figures: {args.json}")
        bad = [r for r in rows if r["readings_acked"] != r["readings_sent"]]
        if bad:
            print("WARNING: not every reading was acknowledged: " + ", ".join(r["variant"] for r in bad))
            return 1
        return 0
    finally:
        for pb in pubs:
            pb.close()
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
