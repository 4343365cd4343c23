#!/usr/bin/env python3
"""Cost of gateway health monitoring: two gateways side by side in the same run, one with
monitoring at the default interval (resource sampling every 30s, heartbeat every 60s, plus a
sampling-heavy variant at 1s), one with monitoring off (resource_interval = "off"); same upstream,
same idle load (a reading every 100 ms each). Reports CPU share (utime+stime from /proc) and RSS.

Usage: python3 scripts/bench/monitoring_cost.py [--seconds 120] [--bin target/bench-fast/outpost]
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

CLK = os.sysconf("SC_CLK_TCK")


def free_port(kind=socket.SOCK_STREAM):
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def rss_kib(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0])
    return out


def wait_port(port, deadline=20):
    end = time.time() + deadline
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} never opened")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=120)
    default_bin = "target/bench-fast/outpost" if os.path.exists("target/bench-fast/outpost") else "target/debug/outpost"
    ap.add_argument("--bin", default=default_bin)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="outpost-moncost-")
    procs = []
    try:
        up = free_port()
        conf = os.path.join(tmp, "mosq.conf")
        with open(conf, "w") as f:
            f.write(f"listener {up} 127.0.0.1\nallow_anonymous true\nlog_dest none\npersistence false\n")
        procs.append(subprocess.Popen(["mosquitto", "-c", conf], stderr=subprocess.DEVNULL))
        wait_port(up)
        variants = [
            ("off", 'resource_interval = "off"\nheartbeat_interval = "1h"\n'),
            ("default (30s samples, 60s heartbeat)", ""),
            ("1s samples, 1s heartbeat", 'resource_interval = "1s"\nheartbeat_interval = "1s"\n'),
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
            p = subprocess.Popen([args.bin, "run", "--config", cfg], stderr=open(os.path.join(d, "log"), "w"))
            procs.append(p)
            wait_port(mqtt)
            gws.append((name, p, mqtt))
        time.sleep(2)
        start = {p.pid: cpu_seconds(p.pid) for _, p, _ in gws}
        t0 = time.time()
        # The same light load on each: one QoS 1 reading every 100 ms.
        pubs = []
        for _, _, port in gws:
            pubs.append(subprocess.Popen(
                ["sh", "-c", f"for i in $(seq 1 {args.seconds * 10}); do mosquitto_pub -p {port} -q 1 -t load/t -m x; sleep 0.1; done"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(args.seconds)
        for p in pubs:
            p.kill()
        elapsed = time.time() - t0
        print(f"monitoring cost over {elapsed:.0f} s, binary {args.bin}, same run, same load")
        print(f"{'variant':40} {'CPU s':>8} {'CPU %':>7} {'RSS MiB':>8} {'peak MiB':>9}")
        base = None
        for name, p, _ in gws:
            cpu = cpu_seconds(p.pid) - start[p.pid]
            mem = rss_kib(p.pid)
            if base is None:
                base = (cpu, mem["VmRSS:"])
            print(f"{name:40} {cpu:8.2f} {100 * cpu / elapsed:6.2f}% {mem['VmRSS:'] / 1024:8.1f} {mem['VmHWM:'] / 1024:9.1f}"
                  f"   (x{cpu / base[0] if base[0] else float('nan'):.2f} CPU, x{mem['VmRSS:'] / base[1]:.2f} RSS vs off)")
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()


if __name__ == "__main__":
    sys.exit(main())
