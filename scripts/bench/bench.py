#!/usr/bin/env python3
"""Outpost benchmark driver. Run through scripts/bench.sh, which builds the binary and finds
the tools; this file starts every server and client itself, on free loopback ports and in
temporary directories, and stops exactly the processes it started (by PID).

Sections (see BENCHMARKS.md for what each one means):
  1  durable ingest rate (mqttwrk, QoS 1) vs bare mosquitto, persistence off and on
  2  drain rate of a backlog into mosquitto vs a plain mqttwrk publisher into that mosquitto
  3  sensor-to-cloud latency at 1,000 msg/s vs publisher->mosquitto->subscriber and a bridge
  4  RSS idle and peak (from 1 and 2)
  5  open time with the backlog vs an empty store
  6  disk bytes written per payload byte during ingest (from 1)
  7  CoAP ingest of 100 B SenML CBOR (coap_load.py) vs MQTT ingest (mqttwrk), same gateway
     configuration, same run; SenML decode MB/s (scripts/bench/senml-decode) vs serde_json
"""

import argparse
import atexit
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- process bookkeeping

STARTED = []  # every Popen this script created; cleanup stops the live ones by PID
REMOVE_ON_SIGNAL = []  # the temporary directory, unless --keep


def spawn(cmd, logfile=None, stdout=None, **kw):
    errf = open(logfile, "ab") if logfile else subprocess.DEVNULL
    out = stdout if stdout is not None else errf
    p = subprocess.Popen(cmd, stdout=out, stderr=errf, stdin=subprocess.DEVNULL, **kw)
    p.bench_cmd = cmd
    STARTED.append(p)
    return p


def stop(p, sig=signal.SIGTERM, timeout=20):
    """Stops one process we started; returns seconds it took to exit."""
    if p is None or p.poll() is not None:
        return 0.0
    t0 = time.monotonic()
    try:
        os.kill(p.pid, sig)
    except ProcessLookupError:
        return 0.0
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        log(f"pid {p.pid} ({os.path.basename(p.bench_cmd[0])}) did not exit in {timeout}s: SIGKILL")
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    return time.monotonic() - t0


def cleanup():
    for p in reversed(STARTED):
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass


atexit.register(cleanup)


def on_signal(signum, _frame):
    cleanup()
    for d in REMOVE_ON_SIGNAL:
        shutil.rmtree(d, ignore_errors=True)
    sys.exit(128 + signum)


signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)

# ---------------------------------------------------------------- small helpers


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def reserve_port():
    """A port that stays free (bound, not listening: connections are refused) until the socket
    is closed, so nothing else on a shared machine takes the 'down' upstream's port meanwhile."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1], s


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_port(port, timeout=15, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port):
            return True
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.bench_cmd[0]} exited ({proc.returncode}) before listening on {port}")
        time.sleep(0.005)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


CONNECT_311 = bytes([0x10, 13, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 30, 0, 1]) + b"o"


def try_connack(port):
    """TCP connect + MQTT 3.1.1 CONNECT; True once a CONNACK (accepted) comes back."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.settimeout(2)
            s.sendall(CONNECT_311)
            data = b""
            while len(data) < 4:
                chunk = s.recv(4 - len(data))
                if not chunk:
                    return False
                data += chunk
            try:
                s.sendall(bytes([0xE0, 0]))  # DISCONNECT
            except OSError:
                pass
            return data[0] == 0x20 and data[3] == 0
    except OSError:
        return False


def proc_status(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def proc_write_bytes(pid):
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid):
    """User + system CPU seconds of a live process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def children_cpu_s():
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def delta(a, b):
    return None if a is None or b is None else b - a


def dir_bytes(path):
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def mb(x):
    return None if x is None else x / 1e6


# ---------------------------------------------------------------- the systems under test


class Env:
    def __init__(self, a):
        self.a = a
        self.tmp = tempfile.mkdtemp(prefix="outpost-bench-", dir=a.tmpdir)
        self.n = 0
        self.gateway_logs = []

    def dir(self, name):
        self.n += 1
        d = os.path.join(self.tmp, f"{self.n:02d}-{name}")
        os.makedirs(d)
        return d


def start_mosquitto(env, name, persistence=False, upstream=False, bridge_to=None):
    d = env.dir(name)
    port = free_port()
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "log_dest stderr"]
    if persistence:
        # "persistence on, defaults": only the switch and where to put the file.
        lines += ["persistence true", f"persistence_location {d}/"]
    else:
        lines += ["persistence false"]
    if upstream:
        # The cloud broker as the tests run it: never drop what a subscriber has not read.
        lines += ["max_queued_messages 0"]
    if bridge_to is not None:
        lines += ["connection cloud", f"address 127.0.0.1:{bridge_to}",
                  'topic sensors/# out 1 "" outpost/bench/']
    conf = os.path.join(d, "mosquitto.conf")
    with open(conf, "w") as f:
        f.write("\n".join(lines) + "\n")
    logf = os.path.join(d, "mosquitto.log")
    p = spawn([env.a.mosquitto, "-c", conf], logf)
    wait_port(port, proc=p)
    p.port, p.dir, p.logf = port, d, logf
    return p


def free_udp_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def outpost_config(env, name, durability="full", upstream_port=None, data_dir=None, port=None,
                   commit_interval=None, coap_port=None, routes=""):
    """Group-commit settings are the configuration defaults (commit_batch_records 512,
    commit_interval 0ms since the change in docs/ARCHITECTURE.md) unless BENCH_COMMIT_INTERVAL
    or `commit_interval` says otherwise. The health endpoint gets its own free port (the default
    127.0.0.1:9180 could be another gateway's on a shared machine, and `outpost status` asks
    whatever answers there); CoAP is off unless `coap_port` is given (the default would bind
    0.0.0.0:5683)."""
    d = env.dir(name)
    port = port or free_port()
    data_dir = data_dir or os.path.join(d, "data")
    os.makedirs(data_dir, exist_ok=True)
    ci = commit_interval or env.a.commit_interval
    coap = f'"127.0.0.1:{coap_port}"' if coap_port else ""
    cfg = f"""[node]
name = "bench"
[broker]
listeners = ["127.0.0.1:{port}"]
[coap]
listeners = [{coap}]
[storage]
data_dir = "{data_dir}"
quota = "4GiB"
durability = "{durability}"
""" + (f'commit_interval = "{ci}"\n' if ci else "") + f"""[sync]
inflight_window = 100
[health]
listen = "127.0.0.1:{free_port()}"
"""
    if upstream_port is not None:
        cfg += f"""[upstream]
url = "mqtt://127.0.0.1:{upstream_port}"
protocol = "5"
"""
    cfg += routes
    path = os.path.join(d, "outpost.toml")
    with open(path, "w") as f:
        f.write(cfg)
    return {"path": path, "port": port, "data_dir": data_dir, "dir": d, "coap_port": coap_port}


def start_outpost(env, cfg, wait=True):
    logf = os.path.join(cfg["dir"], "outpost.log")
    if logf not in env.gateway_logs:
        env.gateway_logs.append(logf)
    p = spawn([env.a.outpost, "run", "--config", cfg["path"]], logf)
    p.port, p.logf, p.cfg = cfg["port"], logf, cfg
    if wait:
        wait_port(cfg["port"], proc=p)
    return p


def outpost_status(env, cfg):
    r = subprocess.run([env.a.outpost, "status", "--config", cfg["path"], "--json"],
                       capture_output=True, timeout=30)
    if r.returncode != 0:
        return None
    try:
        return json.loads(r.stdout)
    except ValueError:
        return None


def wait_status(env, cfg, pred, timeout=30, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = outpost_status(env, cfg)
        if st is not None and pred(st):
            return st
        time.sleep(interval)
    return None


PUB_RE = re.compile(r"PubStats\s*\{\s*outgoing_publish:\s*(\d+),\s*throughput:\s*([0-9.]+)", re.S)


def mqttwrk(env, port, publishers, count, inflight=None, logname="mqttwrk"):
    cmd = [env.a.mqttwrk, "bench", "-S", "127.0.0.1", "-P", str(port), "-p", str(publishers),
           "-n", str(count), "--publish-qos", "1", "-m", "100"]
    if inflight:
        cmd += ["-i", str(inflight)]
    c0 = children_cpu_s()
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    wall = time.monotonic() - t0
    client_cpu = children_cpu_s() - c0
    with open(os.path.join(env.tmp, logname + ".log"), "a") as f:
        f.write(" ".join(cmd) + "\n" + r.stdout + r.stderr + "\n")
    m = PUB_RE.search(r.stdout)
    expected = publishers * count
    res = {"expected": expected, "wall_s": wall, "rc": r.returncode, "client_cpu_s": client_cpu,
           "acked": int(m.group(1)) if m else 0,
           "throughput": float(m.group(2)) if m else None}
    res["wall_rate"] = res["acked"] / wall if wall > 0 else None
    if r.returncode != 0 or res["acked"] != expected:
        res["error"] = f"mqttwrk rc={r.returncode} acked {res['acked']}/{expected}: {(r.stderr or r.stdout)[-300:]}"
        log("  ! " + res["error"])
    return res


# ---------------------------------------------------------------- 1, 4, 6: ingest


def bench_ingest(env, R):
    a = env.a
    pubs, per = 10, a.ingest_count // 10
    payload_bytes = pubs * per * 100
    systems = [
        ("mosquitto-persist-off", "mosquitto, persistence off"),
        ("mosquitto-persist-on", "mosquitto, persistence on (defaults)"),
        ("outpost-full", "Outpost, durability full"),
        ("outpost-normal", "Outpost, durability normal"),
    ]
    if a.compare_interval:
        systems.append(("outpost-full-old", f"Outpost, durability full, commit_interval {a.compare_interval} (old default)"))
    runs = {k: [] for k, _ in systems}
    log(f"1. ingest: {pubs} publishers x {per} QoS1 x 100 B, {a.reps} rounds (systems interleaved)")
    for rep in range(a.reps):
        for key, label in systems:
            if key.startswith("mosquitto"):
                p = start_mosquitto(env, key, persistence=key.endswith("on"))
                cfg = None
            else:
                cfg = outpost_config(env, key, durability=key.split("-")[1],
                                     commit_interval=a.compare_interval if key.endswith("-old") else None)
                p = start_outpost(env, cfg)
            time.sleep(1.0)
            idle = proc_status(p.pid).get("VmRSS")
            wb0 = proc_write_bytes(p.pid)
            sc0 = cpu_s(p.pid)
            res = mqttwrk(env, p.port, pubs, per, logname=f"ingest-{key}")
            res["server_cpu_s"] = delta(sc0, cpu_s(p.pid))
            time.sleep(0.5)
            st = proc_status(p.pid)
            wb1 = proc_write_bytes(p.pid)
            res.update(idle_rss=idle, peak_rss=st.get("VmHWM"),
                       write_bytes=None if wb0 is None or wb1 is None else wb1 - wb0)
            if cfg is not None:
                s = wait_status(env, cfg, lambda s: s.get("runtime") is not None and
                                s["runtime"]["pid"] == p.pid and
                                s["runtime"]["ingested"] >= res["acked"], timeout=5)
                if s is not None:
                    res["stored"] = s["store"]["appended_total"]
                    res["buffered"] = s["buffered_records"]
                    res["commits"] = s["store"]["commits_total"]
                    if res["stored"] < res["acked"]:
                        log(f"  ! {label}: mqttwrk got {res['acked']} PUBACKs but the store has {res['stored']}")
                res["db_bytes_running"] = dir_bytes(cfg["data_dir"])
            else:
                res["db_bytes_running"] = dir_bytes(p.dir) - os.path.getsize(p.logf)
            res["stop_s"] = stop(p)
            if cfg is not None:
                res["db_bytes_stopped"] = dir_bytes(cfg["data_dir"])
            if res.get("write_bytes") is not None:
                res["write_amp"] = res["write_bytes"] / payload_bytes
            runs[key].append(res)
            log(f"  round {rep + 1} {label:<38} {res['throughput'] or 0:>9.0f} msg/s (mqttwrk), "
                f"{res['wall_rate'] or 0:>9.0f} msg/s (wall), peak RSS {mb(res['peak_rss']) or 0:.1f} MB"
                + (f", wrote {res['write_amp']:.2f} B/payload B" if res.get("write_amp") is not None else ""))
    out = {}
    for key, label in systems:
        rs = runs[key]
        out[key] = {
            "label": label,
            "runs": rs,
            "throughput_median": median([r["throughput"] for r in rs if not r.get("error")]),
            "wall_rate_median": median([r["wall_rate"] for r in rs if not r.get("error")]),
            "idle_rss_median": median([r["idle_rss"] for r in rs]),
            "peak_rss_max": max([r["peak_rss"] or 0 for r in rs]),
            "write_amp_median": median([r.get("write_amp") for r in rs]),
            "server_cpu_us_per_msg_median": median([r["server_cpu_s"] / r["acked"] * 1e6 for r in rs
                                                    if r.get("server_cpu_s") is not None and r["acked"]]),
            "client_cpu_us_per_msg_median": median([r["client_cpu_s"] / r["acked"] * 1e6 for r in rs
                                                    if r.get("client_cpu_s") is not None and r["acked"]]),
            "db_bytes_running_median": median([r.get("db_bytes_running") for r in rs]),
            "db_bytes_stopped_median": median([r.get("db_bytes_stopped") for r in rs]),
            "errors": [r["error"] for r in rs if r.get("error")],
        }
    R["ingest"] = {"publishers": pubs, "per_publisher": per, "payload": 100, "systems": out}


def bench_ingest_single(env, R):
    """One publisher (mqttwrk's in-flight window of 100): the case where group commit has the
    fewest writes to group. Not in the brief's list; shows what one busy sensor gets."""
    a = env.a
    n = 20_000
    systems = [("mosquitto-persist-on", "mosquitto, persistence on (defaults)"),
               ("outpost-full", "Outpost, durability full")]
    if a.compare_interval:
        systems.append(("outpost-full-old", f"Outpost, durability full, commit_interval {a.compare_interval} (old default)"))
    runs = {k: [] for k, _ in systems}
    log(f"1b. ingest, one publisher: 1 x {n} QoS1 x 100 B, {a.reps} rounds")
    for rep in range(a.reps):
        for key, label in systems:
            if key.startswith("mosquitto"):
                p, cfg = start_mosquitto(env, key + "-1pub", persistence=True), None
            else:
                cfg = outpost_config(env, key + "-1pub", durability="full",
                                     commit_interval=a.compare_interval if key.endswith("-old") else None)
                p = start_outpost(env, cfg)
            time.sleep(0.5)
            res = mqttwrk(env, p.port, 1, n, logname=f"ingest1-{key}")
            if cfg is not None:
                st = wait_status(env, cfg, lambda s: s.get("runtime") is not None and
                                 s["runtime"]["pid"] == p.pid and s["runtime"]["ingested"] >= res["acked"],
                                 timeout=5)
                if st is not None and st["store"]["commits_total"]:
                    res["records_per_commit"] = st["store"]["appended_total"] / st["store"]["commits_total"]
            stop(p)
            runs[key].append(res)
            log(f"  round {rep + 1} {label:<38} {res['throughput'] or 0:>9.0f} msg/s"
                + (f", {res['records_per_commit']:.0f} records per commit" if res.get("records_per_commit") else ""))
    R["ingest_single"] = {"count": n, "systems": {
        key: {"label": label, "runs": runs[key],
              "throughput_median": median([r["throughput"] for r in runs[key] if not r.get("error")]),
              "records_per_commit_median": median([r.get("records_per_commit") for r in runs[key]])}
        for key, label in systems}}


# ---------------------------------------------------------------- 5: open time


def measure_open(env, cfg, expect_buffered):
    t0 = time.monotonic()
    p = start_outpost(env, cfg, wait=False)
    t_tcp = t_connack = None
    deadline = t0 + 120
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"outpost exited ({p.returncode}) while opening; see {p.logf}")
        if t_tcp is None and port_open(cfg["port"]):
            t_tcp = time.monotonic() - t0
        if t_tcp is not None and try_connack(cfg["port"]):
            t_connack = time.monotonic() - t0
            break
        time.sleep(0.002)
    st = wait_status(env, cfg, lambda s: s.get("runtime") is not None and s["runtime"]["pid"] == p.pid,
                     timeout=60, interval=0.01)
    t_status = time.monotonic() - t0 if st is not None else None
    res = {"tcp_s": t_tcp, "connack_s": t_connack, "status_s": t_status,
           "buffered": st["buffered_records"] if st else None}
    if st is not None and st["buffered_records"] != expect_buffered:
        log(f"  ! after open the store reports {st['buffered_records']} buffered, expected {expect_buffered}")
    return p, res


def open_series(env, cfg, expect, n):
    rs = []
    for _ in range(n):
        p, r = measure_open(env, cfg, expect)
        r["stop_s"] = stop(p)
        rs.append(r)
        log(f"  open ({expect} records): TCP {r['tcp_s'] or 0:.3f} s, CONNACK {r['connack_s'] or 0:.3f} s, "
            f"status {r['status_s'] or 0:.3f} s; stop {r['stop_s']:.2f} s")
    return {"runs": rs,
            "tcp_median": median([r["tcp_s"] for r in rs]),
            "connack_median": median([r["connack_s"] for r in rs]),
            "status_median": median([r["status_s"] for r in rs]),
            "stop_median": median([r["stop_s"] for r in rs])}


# ---------------------------------------------------------------- 2, 5: backlog, open, drain


class SubCounter:
    """mosquitto_sub on the upstream, QoS 1, one line per message, counted here."""

    def __init__(self, env, port, topic, expect):
        r, w = os.pipe()
        logf = os.path.join(env.tmp, "mosquitto_sub.log")
        self.p = spawn([env.a.mosquitto_sub, "-h", "127.0.0.1", "-p", str(port), "-t", topic,
                        "-q", "1", "-F", "x", "-i", f"bench-sub-{port}"], logf, stdout=w)
        os.close(w)
        self.fd = r
        self.count = 0
        self.first = None
        self.last = None
        self.times = {}  # count milestones -> monotonic time
        self.marks = [expect]
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while True:
            try:
                b = os.read(self.fd, 1 << 16)
            except OSError:
                return
            if not b:
                return
            if self.first is None:
                self.first = time.monotonic()
            self.count += b.count(b"\n")
            self.last = time.monotonic()
            for m in list(self.marks):
                if self.count >= m and m not in self.times:
                    self.times[m] = self.last

    def wait_count(self, n, timeout):
        if n not in self.marks:
            self.marks.append(n)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.count < n:
            time.sleep(0.01)
        return self.times.get(n) if self.count >= n else None

    def close(self):
        stop(self.p)
        self.t.join(2)
        try:
            os.close(self.fd)
        except OSError:
            pass


def bench_backlog(env, R):
    a = env.a
    N = a.backlog
    out = {"records": N}
    R["backlog"] = out
    up_port, up_reservation = reserve_port()  # refused until the drain starts
    cfg = outpost_config(env, "backlog", durability="full", upstream_port=up_port)

    # Fill while the upstream is down.
    log(f"2. backlog: filling Outpost with {N} x 100 B (10 mqttwrk publishers) while the upstream is down")
    p = start_outpost(env, cfg)
    time.sleep(0.5)
    fill = mqttwrk(env, cfg["port"], 10, N // 10, logname="fill")
    time.sleep(0.5)
    fill["peak_rss"] = proc_status(p.pid).get("VmHWM")
    st = wait_status(env, cfg, lambda s: s.get("runtime") is not None and s["runtime"]["pid"] == p.pid
                     and s["runtime"]["ingested"] >= fill["acked"], timeout=10)
    fill["buffered"] = st["buffered_records"] if st else None
    fill["stop_s"] = stop(p)
    fill["db_bytes"] = dir_bytes(cfg["data_dir"])
    out["fill"] = fill
    log(f"  filled: {fill['throughput'] or 0:.0f} msg/s (mqttwrk), buffered {fill['buffered']}, "
        f"peak RSS {mb(fill['peak_rss']) or 0:.1f} MB, db {mb(fill['db_bytes']) or 0:.0f} MB, stop {fill['stop_s']:.2f} s")
    expect = fill["buffered"] if fill["buffered"] is not None else N

    # 5. Open time: empty store vs the backlog (upstream still down in both).
    log("5. open time (warm page cache), empty store then backlog")
    ecfg = outpost_config(env, "empty", durability="full", upstream_port=up_port)
    out["open_empty"] = open_series(env, ecfg, 0, a.reps)
    out["open_backlog"] = open_series(env, cfg, expect, a.reps)

    # Drain: the gateway is up with the backlog, then the upstream comes back.
    log(f"2. drain: start the upstream mosquitto on :{up_port} with a subscriber, poll status every 0.2 s")
    p = start_outpost(env, cfg)
    wait_status(env, cfg, lambda s: s.get("runtime") is not None and s["runtime"]["pid"] == p.pid, timeout=30)
    # An outage of a few seconds, so the reconnect backoff has reached its cap (sync.backoff_max,
    # 1 s): the time to the first message upstream then includes a realistic reconnect delay.
    time.sleep(3.0)
    # Start the upstream ourselves on the port Outpost is retrying.
    d = env.dir("upstream-drain")
    conf = os.path.join(d, "mosquitto.conf")
    with open(conf, "w") as f:
        f.write(f"listener {up_port} 127.0.0.1\nallow_anonymous true\nlog_dest stderr\n"
                "persistence false\nmax_queued_messages 0\n")
    s = outpost_status(env, cfg)
    if s and (s.get("runtime") or {}).get("uplink_state") == "connected":
        raise RuntimeError(f"Outpost reports an upstream connection on :{up_port} before the upstream started")
    oc0 = cpu_s(p.pid)
    up_reservation.close()
    t0 = time.monotonic()
    up = spawn([a.mosquitto, "-c", conf], os.path.join(d, "mosquitto.log"))
    wait_port(up_port, proc=up)
    # The subscriber counts mqttwrk's readings only; `expect` (buffered_records) also holds the
    # gateway's own records (one `$gateway/devices/<client id>` registry record per new client,
    # resource samples), which the drain sends too.
    readings = fill["acked"] or N
    out["own_records"] = expect - readings
    sub = SubCounter(env, up_port, "outpost/bench/hello/#", readings)  # mqttwrk's topics, not birth/health
    drained_at = None
    cpu_at_drain = {}
    samples = []
    deadline = t0 + a.drain_timeout
    while time.monotonic() < deadline:
        s = outpost_status(env, cfg)
        now = time.monotonic() - t0
        if s is not None:
            samples.append((round(now, 2), s["buffered_records"]))
            if s["buffered_records"] == 0:
                drained_at = now
                cpu_at_drain = {"outpost": delta(oc0, cpu_s(p.pid)), "upstream_mosquitto": cpu_s(up.pid),
                                "subscriber": cpu_s(sub.p.pid)}
                break
        if p.poll() is not None:
            log(f"  ! outpost exited ({p.returncode}) during the drain")
            break
        time.sleep(0.2)
    got_all = sub.wait_count(readings, 30)
    time.sleep(1.5)  # the runtime counters in `outpost status` are a snapshot written every second
    st = outpost_status(env, cfg)
    drain = {
        "drained_s": drained_at,
        "rate": expect / drained_at if drained_at else None,
        "first_message_s": (sub.first - t0) if sub.first else None,
        "subscriber_received": sub.count,
        "subscriber_all_s": (got_all - t0) if got_all else None,
        "peak_rss": proc_status(p.pid).get("VmHWM"),
        "upstream_peak_rss": proc_status(up.pid).get("VmHWM"),
        "samples": samples,
        "cpu_s": cpu_at_drain,
    }
    if drained_at and drain["first_message_s"] is not None and drained_at > drain["first_message_s"]:
        drain["rate_after_first_message"] = expect / (drained_at - drain["first_message_s"])
    # Steady-state rate: between 90% and 10% of the backlog left (interpolated status samples).
    def crossing(level):
        prev = None
        for t, b in samples:
            if b <= level:
                if prev is None or prev[1] == b:
                    return t
                t0_, b0_ = prev
                return t0_ + (t - t0_) * (b0_ - level) / (b0_ - b)
            prev = (t, b)
        return None
    t90, t10 = crossing(0.9 * expect), crossing(0.1 * expect)
    if t90 is not None and t10 is not None and t10 > t90:
        drain["rate_steady_90_10"] = 0.8 * expect / (t10 - t90)
    if st and st.get("runtime"):
        rt = st["runtime"]
        drain.update(sync_published=rt["sync_published"], sync_acked=rt["sync_acked"],
                     reconnects=rt["reconnects"], acked_total=st["store"]["acked_total"],
                     buffered_after=st["buffered_records"])
    drain["stop_s"] = stop(p)
    drain["db_bytes_after"] = dir_bytes(cfg["data_dir"])
    sub.close()
    stop(up)
    out["drain"] = drain
    log(f"  drained {expect} in {drained_at or float('nan'):.2f} s = {drain['rate'] or 0:.0f} rec/s "
        f"(first message upstream after {drain['first_message_s'] or float('nan'):.2f} s); "
        f"subscriber got {sub.count}; peak RSS {mb(drain['peak_rss']) or 0:.1f} MB")

    # The peer: a plain mqttwrk publisher pushing the same count into the same kind of mosquitto.
    out["peer"] = {}
    for label, pubs, inflight in (("1 publisher, inflight 100", 1, 100),
                                  ("1 publisher, inflight 20", 1, 20)):
        up = start_mosquitto(env, "upstream-peer", upstream=True)
        sub = SubCounter(env, up.port, "hello/#", N)
        time.sleep(0.3)
        t0 = time.monotonic()
        r = mqttwrk(env, up.port, pubs, N // pubs, inflight=inflight, logname="peer")
        r["cpu_s"] = {"mqttwrk": r["client_cpu_s"], "upstream_mosquitto": cpu_s(up.pid),
                      "subscriber": cpu_s(sub.p.pid)}
        got_all = sub.wait_count(N, 60)
        r["subscriber_received"] = sub.count
        r["subscriber_all_s"] = (got_all - t0) if got_all else None
        r["upstream_peak_rss"] = proc_status(up.pid).get("VmHWM")
        sub.close()
        stop(up)
        out["peer"][label] = r
        log(f"  peer mqttwrk {label} -> mosquitto: {r['throughput'] or 0:.0f} msg/s (mqttwrk), "
            f"{r['wall_rate'] or 0:.0f} msg/s (wall); subscriber got {r['subscriber_received']}")


# ---------------------------------------------------------------- 3: latency


def latency_run(env, label, pub_port, sub_port, nodelay=True):
    a = env.a
    d = env.dir("latency")
    nd = ["--nodelay"] if nodelay else []
    subout, pubout, expf = (os.path.join(d, x) for x in ("sub.json", "pub.json", "expect"))
    sub = spawn([sys.executable, os.path.join(HERE, "lat.py"), "sub", "--port", str(sub_port),
                 "--out", subout, "--expect-file", expf] + nd, os.path.join(d, "sub.log"),
                stdout=subprocess.PIPE)
    line = sub.stdout.readline()
    if b"ready" not in line:
        raise RuntimeError(f"latency subscriber did not start; see {d}/sub.log")
    pub = spawn([sys.executable, os.path.join(HERE, "lat.py"), "pub", "--port", str(pub_port),
                 "--rate", str(a.lat_rate), "--duration", str(a.lat_duration), "--out", pubout] + nd,
                os.path.join(d, "pub.log"))
    pub.wait(a.lat_duration + 120)
    with open(pubout) as f:
        pr = json.load(f)
    with open(expf, "w") as f:
        f.write(str(pr["sent"]))
    sub.wait(60)
    with open(subout) as f:
        sr = json.load(f)
    res = {"label": label, "pub": pr, "sub": sr, "nodelay": nodelay}
    L, A = sr["latency"], pr["puback"]
    log(f"  {label:<44} end-to-end p50 {L['p50_ms']} ms p99 {L['p99_ms']} ms "
        f"(received {sr['received']}/{pr['sent']}); PUBACK p50 {A['p50_ms']} p99 {A['p99_ms']} ms")
    return res


def bench_latency(env, R):
    a = env.a
    log(f"3. latency: paho QoS 1 at {a.lat_rate} msg/s for {a.lat_duration} s, subscriber on the upstream mosquitto, "
        "TCP_NODELAY unless said otherwise")
    out = {}
    # Floor: publisher -> mosquitto -> subscriber.
    up = start_mosquitto(env, "lat-direct", upstream=True)
    out["direct"] = latency_run(env, "publisher -> mosquitto -> subscriber", up.port, up.port)
    stop(up)
    # Outpost (durability full) in front of the upstream mosquitto.
    up = start_mosquitto(env, "lat-upstream", upstream=True)
    cfg = outpost_config(env, "lat-outpost", durability="full", upstream_port=up.port)
    p = start_outpost(env, cfg)
    if wait_status(env, cfg, lambda s: (s.get("runtime") or {}).get("uplink_state") == "connected",
                   timeout=30) is None:
        log("  ! Outpost did not report uplink_state=connected within 30 s")
    out["outpost"] = latency_run(env, "publisher -> Outpost (full) -> mosquitto", p.port, up.port)
    # The same with paho's default socket (Nagle on), as most sensor clients run.
    out["outpost_nagle"] = latency_run(env, "same, paho default socket (Nagle on)", p.port, up.port,
                                       nodelay=False)
    out["outpost"]["peak_rss"] = proc_status(p.pid).get("VmHWM")
    stop(p)
    stop(up)
    if a.compare_interval:
        up = start_mosquitto(env, "lat-upstream-old", upstream=True)
        cfg = outpost_config(env, "lat-outpost-old", durability="full", upstream_port=up.port,
                             commit_interval=a.compare_interval)
        p = start_outpost(env, cfg)
        if wait_status(env, cfg, lambda s: (s.get("runtime") or {}).get("uplink_state") == "connected",
                       timeout=30) is None:
            log("  ! Outpost did not report uplink_state=connected within 30 s")
        out["outpost_old"] = latency_run(
            env, f"publisher -> Outpost (full, commit_interval {a.compare_interval}) -> mosquitto", p.port, up.port)
        stop(p)
        stop(up)
    # A mosquitto bridge (persistence on, defaults) in front of the upstream mosquitto.
    if not a.no_bridge:
        up = start_mosquitto(env, "lat-bridge-upstream", upstream=True)
        br = start_mosquitto(env, "lat-bridge", persistence=True, bridge_to=up.port)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with open(up.logf, errors="replace") as f:
                if re.search(r"New (client|bridge) connected .* as \S*cloud", f.read()):
                    break
            time.sleep(0.05)
        else:
            log("  ! the bridge did not connect within 15 s")
        out["bridge"] = latency_run(env, "publisher -> mosquitto bridge -> mosquitto", br.port, up.port)
        stop(br)
        stop(up)
    R["latency"] = out



# ---------------------------------------------------------------- 7: CoAP ingest, SenML decode


def udp_drops(port):
    """Datagrams the kernel dropped at the 127.0.0.1:port UDP socket because its receive buffer
    was full (the `drops` column of /proc/net/udp)."""
    want = f"0100007F:{port:04X}"
    try:
        with open("/proc/net/udp") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[1] == want:
                    return int(cols[-1])
    except (OSError, IndexError, ValueError):
        pass
    return None


SENML_ROUTE = '[[route]]\nfilter = "sensors/#"\nformat = "senml+cbor"\n'


def bench_coap(env, R):
    """CoAP ingest of 100 B SenML CBOR packs (coap_load.py: raw UDP, CON POST /t/bench/<i>,
    Content-Format 112) vs MQTT ingest (mqttwrk, 100 B, QoS 1) with the same number of clients
    and the same window, against the same gateway configuration, interleaved in each round."""
    a = env.a
    clients = 8
    big, small = a.coap_count, max(1, a.coap_count // 5)
    variants = []
    for window, count in ((1, small), (16, big), (64, big)):
        variants.append((f"coap-{window}", "coap", window, count))
        variants.append((f"mqtt-{window}", "mqtt", window, count))
    runs = {k: [] for k, *_ in variants}
    log(f"7. CoAP vs MQTT ingest: {clients} clients, windows 1/16/64, 100 B, {a.reps} rounds (interleaved)")
    for rep in range(a.reps):
        for key, proto, window, count in variants:
            cport = free_udp_port()
            cfg = outpost_config(env, key, durability="full", coap_port=cport, routes=SENML_ROUTE)
            p = start_outpost(env, cfg)
            time.sleep(1.0)
            sc0 = cpu_s(p.pid)
            if proto == "coap":
                c0 = children_cpu_s()
                t0 = time.monotonic()
                r = subprocess.run([sys.executable, os.path.join(HERE, "coap_load.py"), "--port", str(cport),
                                    "--clients", str(clients), "--inflight", str(window),
                                    "--count", str(count), "--procs", "2"],
                                   capture_output=True, text=True, timeout=1800)
                wall = time.monotonic() - t0
                with open(os.path.join(env.tmp, "coap_load.log"), "a") as f:
                    f.write(r.stdout + r.stderr + "\n")
                try:
                    res = json.loads(r.stdout)
                except ValueError:
                    res = {"error": f"coap_load rc={r.returncode}: {(r.stderr or r.stdout)[-300:]}", "created": 0}
                res["client_cpu_s"] = children_cpu_s() - c0
                res["wall_s"] = wall
                res["acked"] = res.get("created", 0)
                res["throughput"] = res.get("rate")
                res["rcvbuf_drops"] = udp_drops(cport)
                if res["acked"] != clients * count and "error" not in res:
                    res["error"] = f"{res['acked']} of {clients * count} answered 2.01: {res.get('codes')}"
            else:
                res = mqttwrk(env, cfg["port"], clients, count, inflight=window, logname=f"coap-mqtt-{window}")
            res["server_cpu_s"] = delta(sc0, cpu_s(p.pid))
            st = wait_status(env, cfg, lambda s: s.get("runtime") is not None and
                             s["runtime"]["pid"] == p.pid and s["runtime"]["ingested"] >= res["acked"], timeout=5)
            if st is not None:
                res["stored"] = st["store"]["appended_total"]
                res["dead_letters"] = st["store"]["dead_lettered_total"]
                res["records_per_commit"] = (st["store"]["appended_total"] / st["store"]["commits_total"]
                                             if st["store"]["commits_total"] else None)
                if res["stored"] < res["acked"] or res["dead_letters"]:
                    res.setdefault("error", f"acked {res['acked']}, stored {res['stored']}, "
                                            f"dead letters {res['dead_letters']}")
            res["peak_rss"] = proc_status(p.pid).get("VmHWM")
            stop(p)
            if res.get("error"):
                log(f"  ! {key}: {res['error']}")
            runs[key].append(res)
            extra = ""
            if proto == "coap":
                extra = (f", retransmissions {res.get('retransmissions')}, gateway socket drops "
                         f"{res.get('rcvbuf_drops')}, p50/p99 {fmt((res.get('latency_ms') or {}).get('p50'), '{:.1f}')}/"
                         f"{fmt((res.get('latency_ms') or {}).get('p99'), '{:.1f}')} ms")
            log(f"  round {rep + 1} {key:<8} {clients} x {count} window {window:<3} "
                f"{res.get('throughput') or 0:>8.0f} msg/s, {fmt(res.get('records_per_commit'), '{:.0f}')} rec/commit{extra}")
    out = {}
    for key, proto, window, count in variants:
        rs = runs[key]
        ok = [r for r in rs if not r.get("error") or r.get("acked")]
        out[key] = {
            "proto": proto, "window": window, "clients": clients, "count": count, "runs": rs,
            "throughput_median": median([r.get("throughput") for r in ok]),
            "server_cpu_us_per_msg_median": median([r["server_cpu_s"] / r["acked"] * 1e6 for r in rs
                                                    if r.get("server_cpu_s") is not None and r.get("acked")]),
            "client_cpu_us_per_msg_median": median([r["client_cpu_s"] / r["acked"] * 1e6 for r in rs
                                                    if r.get("client_cpu_s") is not None and r.get("acked")]),
            "records_per_commit_median": median([r.get("records_per_commit") for r in rs]),
            "retransmissions": [r.get("retransmissions") for r in rs] if proto == "coap" else None,
            "rcvbuf_drops": [r.get("rcvbuf_drops") for r in rs] if proto == "coap" else None,
            "latency_p50_ms_median": median([(r.get("latency_ms") or {}).get("p50") for r in rs]),
            "latency_p99_ms_median": median([(r.get("latency_ms") or {}).get("p99") for r in rs]),
            "peak_rss_max": max([r.get("peak_rss") or 0 for r in rs]),
            "errors": [r["error"] for r in rs if r.get("error")],
        }
    R["coap"] = {"clients": clients, "payload": 100, "variants": out,
                 "payload_hex": next((r.get("payload_hex") for r in runs["coap-16"] if r.get("payload_hex")), None)}

    if a.senml_bench:
        secs, reps = ("0.3", "3") if a.quick else ("0.5", "5")
        log(f"7b. SenML decode throughput ({a.senml_bench}, {reps} x {secs} s per case)")
        r = subprocess.run([a.senml_bench, "--json", "--seconds", secs, "--reps", reps],
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"senml-decode bench failed: {r.stderr[-500:]}")
        R["senml_decode"] = json.loads(r.stdout)
        for c in R["senml_decode"]["cases"]:
            log(f"  {c['pack']:<5} {c['bytes']:>6} B {c['what']:<52} {c['mb_per_s_median']:>8.1f} MB/s "
                f"{c['records_per_s_median']:>10.0f} rec/s")


# ---------------------------------------------------------------- report


def fmt(x, spec="{:.0f}", none="-"):
    return none if x is None else spec.format(x)


def ratio(a, b):
    return None if not a or not b else a / b


def report(env, R):
    ing = R.get("ingest", {}).get("systems", {})
    bl = R.get("backlog", {})
    lat = R.get("latency", {})
    lines = []
    P = lines.append
    m = R.get("machine", {})
    if m:
        P(f"Machine: {m.get('nproc')} CPUs, load average at start {m.get('loadavg_at_start')}, at end "
          f"{m.get('loadavg_at_end')}; fsync of a 4 KiB append in the benchmark directory: median "
          f"{m.get('fsync_median_ms')} ms, p90 {m.get('fsync_p90_ms')} ms.")
        P("")
    if ing:
        mo, mp = ing["mosquitto-persist-off"], ing["mosquitto-persist-on"]
        P(f"### 1/4/6. Ingest: {R['ingest']['publishers']} x {R['ingest']['per_publisher']} QoS 1 x 100 B "
          f"(mqttwrk), median of {env.a.reps}")
        P("")
        P("| system | msg/s (mqttwrk) | msg/s (wall) | vs mosquitto off | vs mosquitto on | idle RSS | "
          "peak RSS | disk written / payload | store on disk | server CPU / msg | mqttwrk CPU / msg |")
        P("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for key in ing:
            s = ing[key]
            db = s["db_bytes_running_median"] if key.startswith("outpost") else None
            P(f"| {s['label']} | {fmt(s['throughput_median'])} | {fmt(s['wall_rate_median'])} | "
              f"{fmt(ratio(s['throughput_median'], mo['throughput_median']), '{:.2f}x')} | "
              f"{fmt(ratio(s['throughput_median'], mp['throughput_median']), '{:.2f}x')} | "
              f"{fmt(mb(s['idle_rss_median']), '{:.1f} MB')} | {fmt(mb(s['peak_rss_max']), '{:.1f} MB')} | "
              f"{fmt(s['write_amp_median'], '{:.2f}')} | {fmt(mb(db), '{:.1f} MB')} | "
              f"{fmt(s['server_cpu_us_per_msg_median'], '{:.1f} us')} | {fmt(s['client_cpu_us_per_msg_median'], '{:.1f} us')} |")
        P("")
        for key, s in ing.items():
            runs = ", ".join(fmt(r["throughput"]) for r in s["runs"])
            P(f"- {s['label']}: runs {runs} msg/s" + (f"; ERRORS: {s['errors']}" if s["errors"] else ""))
        P("")
    one = R.get("ingest_single")
    if one:
        m = one["systems"]["mosquitto-persist-on"]
        P(f"### 1b. Ingest, one publisher: 1 x {one['count']:,} QoS 1 x 100 B (mqttwrk, in-flight 100), median of {env.a.reps}")
        P("")
        P("| system | msg/s | ratio | records per commit |")
        P("|---|---:|---:|---:|")
        P(f"| {m['label']} | {fmt(m['throughput_median'])} | 1.00x | - |")
        for key in ("outpost-full", "outpost-full-old"):
            if key not in one["systems"]:
                continue
            o = one["systems"][key]
            P(f"| {o['label']} | {fmt(o['throughput_median'])} | "
              f"{fmt(ratio(o['throughput_median'], m['throughput_median']), '{:.2f}x')} | "
              f"{fmt(o['records_per_commit_median'], '{:.0f}')} |")
        P("")
    if bl:
        N = bl["records"]
        dr, fill = bl.get("drain", {}), bl.get("fill", {})
        P(f"### 2. Backlog of {N:,} x 100 B")
        P("")
        P("| measure | value |")
        P("|---|---:|")
        P(f"| fill rate (10 mqttwrk publishers, upstream down, durability full) | {fmt(fill.get('throughput'))} msg/s |")
        P(f"| store on disk with the backlog (after clean stop) | {fmt(mb(fill.get('db_bytes')), '{:.0f} MB')} |")
        P(f"| Outpost drain: upstream start -> buffered_records == 0 | {fmt(dr.get('drained_s'), '{:.2f} s')} = "
          f"{fmt(dr.get('rate'))} rec/s |")
        P(f"| of which: upstream start -> first message at the subscriber | {fmt(dr.get('first_message_s'), '{:.2f} s')} |")
        P(f"| drain rate after the first message | {fmt(dr.get('rate_after_first_message'))} rec/s |")
        P(f"| drain rate while 90% -> 10% of the backlog is left | {fmt(dr.get('rate_steady_90_10'))} rec/s |")
        P(f"| of the backlog: the gateway's own records (`$gateway/devices/<client>` registry entries, resource samples), not readings | {bl.get('own_records')} |")
        P(f"| subscriber received (QoS 1) / all of them by | {dr.get('subscriber_received')} / "
          f"{fmt(dr.get('subscriber_all_s'), '{:.2f} s')} |")
        for label, r in bl.get("peer", {}).items():
            P(f"| peer: mqttwrk {label} -> same mosquitto config | {fmt(r.get('throughput'))} msg/s "
              f"(wall {fmt(r.get('wall_rate'))}) |")
        peer = bl.get("peer", {}).get("1 publisher, inflight 100", {})
        peer20 = bl.get("peer", {}).get("1 publisher, inflight 20", {})
        P(f"| ratio Outpost drain / peer (inflight 100) | {fmt(ratio(dr.get('rate'), peer.get('throughput')), '{:.2f}x')} |")
        P(f"| ratio Outpost drain / peer (inflight 20) | {fmt(ratio(dr.get('rate'), peer20.get('throughput')), '{:.2f}x')} |")
        P(f"| Outpost peak RSS: fill / drain | {fmt(mb(fill.get('peak_rss')), '{:.1f}')} / "
          f"{fmt(mb(dr.get('peak_rss')), '{:.1f}')} MB |")
        P(f"| upstream mosquitto peak RSS during the drain | {fmt(mb(dr.get('upstream_peak_rss')), '{:.1f} MB')} |")
        P(f"| sync published / acked / reconnects | {dr.get('sync_published')} / {dr.get('sync_acked')} / "
          f"{dr.get('reconnects')} |")
        c = dr.get("cpu_s") or {}
        P(f"| CPU during the drain (core-seconds): Outpost / upstream mosquitto / subscriber | "
          f"{fmt(c.get('outpost'), '{:.1f}')} / {fmt(c.get('upstream_mosquitto'), '{:.1f}')} / "
          f"{fmt(c.get('subscriber'), '{:.1f}')} |")
        for label, r in bl.get("peer", {}).items():
            c = r.get("cpu_s") or {}
            P(f"| CPU during the peer push ({label}): mqttwrk / mosquitto / subscriber | "
              f"{fmt(c.get('mqttwrk'), '{:.1f}')} / {fmt(c.get('upstream_mosquitto'), '{:.1f}')} / "
              f"{fmt(c.get('subscriber'), '{:.1f}')} (in {fmt(r.get('wall_s'), '{:.1f}')} s) |")
        P("")
        oe, ob = bl.get("open_empty", {}), bl.get("open_backlog", {})
        P(f"### 5. Open time (process start -> ...), median of {env.a.reps}, warm page cache")
        P("")
        P("| store | TCP accept | MQTT CONNACK | `outpost status` shows runtime | SIGTERM -> exit |")
        P("|---|---:|---:|---:|---:|")
        for label, o in (("empty", oe), (f"{N:,} records", ob)):
            P(f"| {label} | {fmt(o.get('tcp_median'), '{:.3f} s')} | {fmt(o.get('connack_median'), '{:.3f} s')} | "
              f"{fmt(o.get('status_median'), '{:.3f} s')} | {fmt(o.get('stop_median'), '{:.2f} s')} |")
        P("")
    if lat:
        P(f"### 3. Latency, paho QoS 1 at {env.a.lat_rate} msg/s for {env.a.lat_duration} s, 100 B")
        P("")
        P(f"Clients with TCP_NODELAY unless the row says otherwise; Outpost with commit_interval "
          f"{env.a.commit_interval or 'default (0ms)'} unless the row says otherwise.")
        P("")
        P("| path | end-to-end p50 | p99 | p99.9 | max | received / sent | sensor PUBACK p50 | p99 |")
        P("|---|---:|---:|---:|---:|---:|---:|---:|")
        for key in ("direct", "outpost", "outpost_nagle", "outpost_old", "bridge"):
            if key not in lat:
                continue
            r = lat[key]
            L, A = r["sub"]["latency"], r["pub"]["puback"]
            P(f"| {r['label']} | {fmt(L['p50_ms'], '{:.2f} ms')} | {fmt(L['p99_ms'], '{:.2f} ms')} | "
              f"{fmt(L['p999_ms'], '{:.2f} ms')} | {fmt(L['max_ms'], '{:.1f} ms')} | "
              f"{r['sub']['received']} / {r['pub']['sent']} | {fmt(A['p50_ms'], '{:.2f} ms')} | "
              f"{fmt(A['p99_ms'], '{:.2f} ms')} |")
        P("")
    co = R.get("coap", {}).get("variants")
    if co:
        P(f"### 7. CoAP ingest vs MQTT ingest: {R['coap']['clients']} clients, 100 B, durability full, "
          f"median of {env.a.reps}")
        P("")
        P("CoAP: coap_load.py, CON POST /t/bench/<i>, SenML CBOR (Content-Format 112), route "
          "`sensors/#` format senml+cbor (decoded before the 2.01). MQTT: mqttwrk QoS 1, 100 B, not "
          "decoded (its topics match no route). Same gateway configuration, fresh gateway per run.")
        P("")
        P("| window per client | CoAP msg/s (2.01) | MQTT msg/s (PUBACK) | CoAP / MQTT | CoAP rec/commit | "
          "MQTT rec/commit | CoAP server CPU / msg | MQTT server CPU / msg | CoAP client CPU / msg | "
          "mqttwrk CPU / msg | CoAP retransmissions (per round) | gateway UDP socket drops (per round) | "
          "CoAP p50 / p99 |")
        P("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|")
        for w in (1, 16, 64):
            c, m = co.get(f"coap-{w}"), co.get(f"mqtt-{w}")
            if not c or not m:
                continue
            P(f"| {w} ({c['clients']} x {c['count']:,}) | {fmt(c['throughput_median'])} | {fmt(m['throughput_median'])} | "
              f"{fmt(ratio(c['throughput_median'], m['throughput_median']), '{:.2f}x')} | "
              f"{fmt(c['records_per_commit_median'], '{:.0f}')} | {fmt(m['records_per_commit_median'], '{:.0f}')} | "
              f"{fmt(c['server_cpu_us_per_msg_median'], '{:.1f} us')} | {fmt(m['server_cpu_us_per_msg_median'], '{:.1f} us')} | "
              f"{fmt(c['client_cpu_us_per_msg_median'], '{:.1f} us')} | {fmt(m['client_cpu_us_per_msg_median'], '{:.1f} us')} | "
              f"{', '.join(str(x) for x in c['retransmissions'])} | {', '.join(str(x) for x in c['rcvbuf_drops'])} | "
              f"{fmt(c['latency_p50_ms_median'], '{:.1f}')} / {fmt(c['latency_p99_ms_median'], '{:.1f}')} ms |")
        P("")
        for key, v in co.items():
            P(f"- {key}: runs {', '.join(fmt(r.get('throughput')) for r in v['runs'])} msg/s"
              + (f"; ERRORS: {v['errors']}" if v["errors"] else ""))
        P("")
    sd = R.get("senml_decode")
    if sd:
        P(f"### 7b. SenML decode throughput (scripts/bench/senml-decode), median of {sd['reps']} x {sd['seconds']} s, one core")
        P("")
        P("| pack | decoder | input bytes | MB/s | records/s |")
        P("|---|---|---:|---:|---:|")
        for c in sd["cases"]:
            P(f"| {c['pack']} ({c['records']} rec) | {c['what']} | {c['bytes']:,} | "
              f"{c['mb_per_s_median']:.1f} | {c['records_per_s_median']:,.0f} |")
        P("")
    # Summary against the targets.
    if not (ing or bl or lat):
        return "\n".join(lines)
    P("### Summary against the targets (reported, not asserted)")
    P("")
    P("| figure | Outpost | peer | ratio | target |")
    P("|---|---:|---:|---:|---|")
    if ing:
        of, on = ing["outpost-full"], ing["outpost-normal"]
        for o in (of, on):
            for m in (mo, mp):
                r = ratio(o["throughput_median"], m["throughput_median"])
                P(f"| ingest, {o['label']} vs {m['label']} | {fmt(o['throughput_median'])} msg/s | "
                  f"{fmt(m['throughput_median'])} msg/s | {fmt(r, '{:.2f}x')} | >= 1.5x: "
                  f"{'met' if r and r >= 1.5 else 'NOT met'} |")
        peak = max(of["peak_rss_max"], on["peak_rss_max"], (bl.get("fill") or {}).get("peak_rss") or 0,
                   (bl.get("drain") or {}).get("peak_rss") or 0)
        P(f"| peak RSS under load (ingest, fill, drain) | {fmt(mb(peak), '{:.1f} MB')} | "
          f"{fmt(mb(mp['peak_rss_max']), '{:.1f} MB')} (mosquitto ingest) | | <= 80 MB: "
          f"{'met' if peak and peak <= 80e6 else 'NOT met'} |")
        if one:
            m1, o1 = one["systems"]["mosquitto-persist-on"], one["systems"]["outpost-full"]
            r = ratio(o1["throughput_median"], m1["throughput_median"])
            P(f"| ingest, one publisher, Outpost full vs mosquitto persistence on | {fmt(o1['throughput_median'])} msg/s | "
              f"{fmt(m1['throughput_median'])} msg/s | {fmt(r, '{:.2f}x')} | >= 1.5x: {'met' if r and r >= 1.5 else 'NOT met'} |")
        P(f"| disk written per payload byte (durability full / normal) | "
          f"{fmt(of['write_amp_median'], '{:.2f}')} / {fmt(on['write_amp_median'], '{:.2f}')} | | | |")
    if bl:
        dr = bl.get("drain", {})
        peer = bl.get("peer", {}).get("1 publisher, inflight 100", {})
        P(f"| drain {bl['records']:,} backlog into mosquitto | {fmt(dr.get('rate'))} rec/s | "
          f"{fmt(peer.get('throughput'))} msg/s (mqttwrk push) | "
          f"{fmt(ratio(dr.get('rate'), peer.get('throughput')), '{:.2f}x')} | upstream's speed |")
        ob, oe = bl.get("open_backlog", {}), bl.get("open_empty", {})
        P(f"| open time to CONNACK, {bl['records']:,} backlog | {fmt(ob.get('connack_median'), '{:.3f} s')} | "
          f"{fmt(oe.get('connack_median'), '{:.3f} s')} (empty store) | "
          f"{fmt(ratio(ob.get('connack_median'), oe.get('connack_median')), '{:.2f}x')} | <= 1 s: "
          f"{'met' if ob.get('connack_median') is not None and ob['connack_median'] <= 1 else 'NOT met'} |")
    if lat and "outpost" in lat and "direct" in lat:
        o, d = lat["outpost"]["sub"]["latency"], lat["direct"]["sub"]["latency"]
        P(f"| latency p50 / p99 at {env.a.lat_rate} msg/s | {fmt(o['p50_ms'], '{:.2f}')} / "
          f"{fmt(o['p99_ms'], '{:.2f}')} ms | {fmt(d['p50_ms'], '{:.2f}')} / {fmt(d['p99_ms'], '{:.2f}')} ms "
          f"(direct) | +{fmt((o['p50_ms'] or 0) - (d['p50_ms'] or 0), '{:.2f}')} ms p50 | |")
    return "\n".join(lines)


def scan_logs(env):
    """WARN/ERROR/panic lines of every gateway log, grouped by message (timestamps, ports and
    numbers masked), with a count and one example each."""
    groups = {}
    for path in env.gateway_logs:
        try:
            with open(path, errors="replace") as f:
                for line in f:
                    if not re.search(r"\b(WARN|ERROR)\b|panicked", line):
                        continue
                    line = line.rstrip()
                    key = re.sub(r"^\S+\s+", "", line)  # timestamp
                    key = re.sub(r"\d+", "N", key)
                    g = groups.setdefault(key, {"count": 0, "example": f"{os.path.relpath(path, env.tmp)}: {line}"})
                    g["count"] += 1
        except OSError:
            pass
    out = []
    for key, g in sorted(groups.items(), key=lambda kv: -kv[1]["count"]):
        expected = "Connection refused" in key and "upstream connection failed" in key
        out.append({"count": g["count"], "expected_upstream_down": expected, "example": g["example"]})
    return out


def fsync_probe(d, n=100):
    """Median and p90 of fsync after a 4 KiB append in the benchmark's directory: the floor
    under every durability=full commit."""
    path = os.path.join(d, "fsync.probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    ts = []
    try:
        for _ in range(n):
            os.write(fd, b"x" * 4096)
            t = time.perf_counter()
            os.fsync(fd)
            ts.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        os.remove(path)
    ts.sort()
    return {"fsync_median_ms": round(ts[n // 2] * 1e3, 2), "fsync_p90_ms": round(ts[int(n * 0.9)] * 1e3, 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--outpost", required=True)
    ap.add_argument("--mqttwrk", required=True)
    ap.add_argument("--mosquitto", required=True)
    ap.add_argument("--mosquitto-sub", required=True)
    ap.add_argument("--tmpdir", required=True)
    ap.add_argument("--results", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--only", default="ingest,backlog,latency,coap")
    ap.add_argument("--senml-bench", help="the scripts/bench/senml-decode binary (section coap)")
    ap.add_argument("--commit-interval", default=os.environ.get("BENCH_COMMIT_INTERVAL") or None,
                    help="storage.commit_interval for Outpost (default: the configuration default)")
    ap.add_argument("--compare-interval", default=os.environ.get("BENCH_COMPARE_INTERVAL", "5ms"),
                    help="also run Outpost with this commit_interval in sections 1, 1b, 3 ('' for none)")
    ap.add_argument("--no-bridge", action="store_true")
    a = ap.parse_args()
    a.reps = max(1, int(os.environ.get("BENCH_REPS", "3")))
    a.ingest_count = 100_000
    a.backlog = 100_000 if a.quick else 1_000_000
    a.lat_rate = 1000
    a.lat_duration = 5 if a.quick else 20
    a.drain_timeout = 600
    a.coap_count = 6_250 if a.quick else 12_500
    env = Env(a)
    if not a.keep:
        REMOVE_ON_SIGNAL.append(env.tmp)
    log(f"temporary directory {env.tmp}")
    R = {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "quick": a.quick,
         "commit_interval": a.commit_interval or "default", "compare_interval": a.compare_interval,
         "machine": {"nproc": os.cpu_count(), "loadavg_at_start": os.getloadavg(), **fsync_probe(env.tmp)}}
    log(f"machine: {R['machine']}")
    only = set(a.only.split(","))
    t0 = time.monotonic()
    failed = None
    try:
        if "ingest" in only:
            bench_ingest(env, R)
            bench_ingest_single(env, R)
        if "backlog" in only:
            bench_backlog(env, R)
        if "latency" in only:
            bench_latency(env, R)
        if "coap" in only:
            bench_coap(env, R)
    except Exception as e:  # report what we have, then fail
        failed = e
        log(f"FAILED: {e!r}")
    R["duration_s"] = time.monotonic() - t0
    R["machine"]["loadavg_at_end"] = os.getloadavg()
    R["gateway_log_warnings"] = scan_logs(env)
    text = report(env, R)
    R["table_markdown"] = text
    with open(a.results, "w") as f:
        json.dump(R, f, indent=1, default=str)
    print()
    print(text)
    print()
    if R["gateway_log_warnings"]:
        print("Gateway log WARN/ERROR lines, grouped (count, example):")
        for g in R["gateway_log_warnings"][:40]:
            tag = " (expected: upstream down on purpose)" if g["expected_upstream_down"] else ""
            print(f"  {g['count']:>5}x{tag} {g['example'][:400]}")
    else:
        print("Gateway logs: no WARN/ERROR lines.")
    print(f"\nTotal {R['duration_s']:.0f} s. Full results: {a.results}")
    cleanup()
    if not a.keep:
        shutil.rmtree(env.tmp, ignore_errors=True)
    else:
        print(f"Kept {env.tmp}")
    if failed is not None:
        sys.exit(1)


if __name__ == "__main__":
    main()
