#!/usr/bin/env python3
"""Broker benchmarks (BENCHMARKS.md sections 9 and 10), each against mosquitto in the same run:

  9   ingest with authentication + ACL on vs off, and over TLS vs plain TCP: the same load
      (scripts/bench/mqtt_load.py: 10 publishers x N QoS 1 x 100 B, in-flight 100, each
      publisher logged in where the broker asks for it) against Outpost and mosquitto with the
      same three settings, interleaved in every round; mqttwrk on the plain and TLS listeners
      as a cross-check of the load generator (it cannot log in).
  10  memory per idle connection: 10,000 clients connected and idle (keep-alive 3600 s),
      broker VmRSS before, at 1,000, at 10,000 and after they leave; clean and persistent
      sessions; Outpost and mosquitto alternating.

Run through scripts/bench.sh (`BENCH_ONLY=broker bash scripts/bench.sh`), which builds the
binary and finds the tools, or directly:

  python3 scripts/bench/broker.py --outpost target/bench-fast/outpost --mosquitto /usr/sbin/mosquitto \
      --mqttwrk PATH --tmpdir target/bench-tmp --results target/bench-broker.json [--quick]

Everything listens on free 127.0.0.1 ports; the certificates (a throwaway CA and a server
certificate for IP 127.0.0.1 and DNS localhost, made with openssl), the password file
(mosquitto_passwd) and the ACL are written into a fresh temporary directory; only processes
started here are stopped, by PID (bench.py's bookkeeping).
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench as B  # noqa: E402  (helpers: spawn/stop by PID, cleanup on exit and signals)

LOAD = os.path.join(HERE, "mqtt_load.py")
PASSWORD = "bench-secret"


def log(msg):
    print(f"[broker {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({r.returncode}): {r.stderr[-500:]}")
    return r


class Env:
    def __init__(self, a):
        self.a = a
        self.tmp = tempfile.mkdtemp(prefix="outpost-bench-broker-", dir=a.tmpdir)
        # mosquitto started as root drops to its own user before it reads the certificates,
        # the password file and the ACL: everything here must be readable by it (throwaway).
        os.chmod(self.tmp, 0o755)
        self.n = 0

    def dir(self, name):
        self.n += 1
        d = os.path.join(self.tmp, f"{self.n:02d}-{name}")
        os.makedirs(d)
        os.chmod(d, 0o755)
        return d


# ---------------------------------------------------------------- credentials and certificates


def make_tls(env):
    d = env.dir("tls")
    ca_key, ca = os.path.join(d, "ca.key"), os.path.join(d, "ca.crt")
    key, csr, crt = (os.path.join(d, f) for f in ("server.key", "server.csr", "server.crt"))
    ext = os.path.join(d, "ext.cnf")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run(["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2",
         "-subj", "/CN=outpost-bench-ca"])
    run(["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"])
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n")
    run(["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", crt, "-days", "2", "-extfile", ext])
    for f in (key, crt, ca):
        os.chmod(f, 0o644)
    return {"ca": ca, "cert": crt, "key": key}


def make_auth(env, users):
    """mosquitto_passwd's default hash (PBKDF2-SHA512, 2.0.x) for every publisher, and an ACL
    that lets each client write only its own topics (pattern rules), with a user section per
    publisher as a real file would have."""
    d = env.dir("auth")
    passwd, acl = os.path.join(d, "passwd"), os.path.join(d, "acl")
    for i, u in enumerate(users):
        run([env.a.mosquitto_passwd, *(["-c"] if i == 0 else []), "-b", passwd, u, PASSWORD])
    lines = ["# each client: its own topics only",
             "pattern readwrite bench/%u/#",
             "pattern read cmd/%c/#", ""]
    for u in users:
        lines += [f"user {u}", f"topic read status/{u}/#", ""]
    with open(acl, "w") as f:
        f.write("\n".join(lines))
    for f in (passwd, acl):
        os.chmod(f, 0o644)
    return {"passwd": passwd, "acl": acl}


# ---------------------------------------------------------------- the brokers


def start_outpost(env, name, setting, sec, max_connections=None):
    d = env.dir(name)
    port = B.free_port()
    data = os.path.join(d, "data")
    os.makedirs(data)
    broker = []
    if max_connections:
        broker.append(f"max_connections = {max_connections}")
    if setting == "auth":
        broker += [f'password_file = "{sec["auth"]["passwd"]}"',
                   f'acl_file = "{sec["auth"]["acl"]}"',
                   "allow_anonymous = false"]
    listener = [f'address = "127.0.0.1:{port}"']
    if setting == "tls":
        t = sec["tls"]
        listener.append(f'tls = {{ cert_file = "{t["cert"]}", key_file = "{t["key"]}" }}')
    cfg = "\n".join([
        "[node]", 'name = "bench"',
        "[broker]", *broker,
        "[[broker.listener]]", *listener,
        "[coap]", "listeners = []",
        "[storage]", f'data_dir = "{data}"', 'quota = "4GiB"', 'durability = "full"',
        "[health]", f'listen = "127.0.0.1:{B.free_port()}"', ""])
    path = os.path.join(d, "outpost.toml")
    with open(path, "w") as f:
        f.write(cfg)
    logf = os.path.join(d, "outpost.log")
    p = B.spawn([env.a.outpost, "run", "--config", path], logf)
    B.wait_port(port, proc=p)
    p.port, p.logf = port, logf
    return p


def start_mosquitto(env, name, setting, sec, nodelay=True, max_connections=None):
    d = env.dir(name)
    port = B.free_port()
    lines = [f"listener {port} 127.0.0.1", "persistence false", "log_dest stderr"]
    if nodelay:
        # Outpost sets TCP_NODELAY on every accepted socket; mosquitto does only when asked.
        lines.append("set_tcp_nodelay true")
    if max_connections:
        lines.append("max_connections -1")
    if setting == "auth":
        lines += ["allow_anonymous false", f"password_file {sec['auth']['passwd']}",
                  f"acl_file {sec['auth']['acl']}"]
    else:
        lines.append("allow_anonymous true")
    if setting == "tls":
        t = sec["tls"]
        lines += [f"cafile {t['ca']}", f"certfile {t['cert']}", f"keyfile {t['key']}"]
    conf = os.path.join(d, "mosquitto.conf")
    with open(conf, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(conf, 0o644)
    logf = os.path.join(d, "mosquitto.log")
    p = B.spawn([env.a.mosquitto, "-c", conf], logf)
    B.wait_port(port, proc=p)
    p.port, p.logf = port, logf
    return p


# ---------------------------------------------------------------- 9: ingest, auth and TLS


def load_py(env, port, setting, sec, publishers, count, logname, each=False):
    cmd = [sys.executable, LOAD, "publish", "--port", str(port), "--publishers", str(publishers),
           "--count", str(count), "--size", "100", "--inflight", "100", "--workers", "2"]
    if each:
        cmd.append("--write-each")
    if setting == "auth":
        cmd += ["--user-prefix", "pub-", "--password", PASSWORD]
    if setting == "tls":
        cmd += ["--tls-ca", sec["tls"]["ca"]]
    c0 = B.children_cpu_s()
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    wall = time.monotonic() - t0
    with open(os.path.join(env.tmp, logname + ".log"), "a") as f:
        f.write(" ".join(cmd) + "\n" + r.stdout + r.stderr + "\n")
    try:
        res = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        res = {"acked": 0, "throughput": None, "errors": [r.stderr[-300:]]}
    res.pop("per_publisher", None)
    res["client_cpu_s"] = B.children_cpu_s() - c0
    res["process_wall_s"] = wall
    expected = publishers * count
    if r.returncode != 0 or res.get("acked") != expected or res.get("errors"):
        res["error"] = f"rc={r.returncode} acked {res.get('acked')}/{expected}: {res.get('errors')}"[:400]
        log("  ! " + res["error"])
    return res


def load_mqttwrk(env, port, setting, sec, publishers, count, logname):
    # mqttwrk 0.2.0 (rustls through rumqttc 0.20) refuses a server name that is an IP address:
    # over TLS it connects to "localhost" (127.0.0.1 here; the certificate names both).
    host = "localhost" if setting == "tls" else "127.0.0.1"
    cmd = [env.a.mqttwrk, "bench", "-S", host, "-P", str(port), "-p", str(publishers),
           "-n", str(count), "--publish-qos", "1", "-m", "100"]
    if setting == "tls":
        cmd += ["-R", sec["tls"]["ca"]]
    c0 = B.children_cpu_s()
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    wall = time.monotonic() - t0
    with open(os.path.join(env.tmp, logname + ".log"), "a") as f:
        f.write(" ".join(cmd) + "\n" + r.stdout + r.stderr + "\n")
    m = B.PUB_RE.search(r.stdout)
    res = {"acked": int(m.group(1)) if m else 0, "throughput": float(m.group(2)) if m else None,
           "client_cpu_s": B.children_cpu_s() - c0, "process_wall_s": wall}
    res["wall_rate"] = res["acked"] / wall if wall > 0 else None
    if r.returncode != 0 or res["acked"] != publishers * count:
        res["error"] = f"mqttwrk rc={r.returncode} acked {res['acked']}: {(r.stderr or r.stdout)[-300:]}"
        log("  ! " + res["error"])
    return res


SYSTEMS = [
    # key, label, broker, setting, generator (py: mqtt_load.py; py-each: --write-each),
    # mosquitto with set_tcp_nodelay
    ("outpost-plain", "Outpost, plain", "outpost", "plain", "py", True),
    ("mosquitto-plain", "mosquitto, plain", "mosquitto", "plain", "py", True),
    ("outpost-auth", "Outpost, password file + ACL", "outpost", "auth", "py", True),
    ("mosquitto-auth", "mosquitto, password file + ACL", "mosquitto", "auth", "py", True),
    ("outpost-tls", "Outpost, TLS", "outpost", "tls", "py", True),
    ("mosquitto-tls", "mosquitto, TLS", "mosquitto", "tls", "py", True),
    ("mosquitto-tls-nagle", "mosquitto, TLS, its default socket (Nagle on)", "mosquitto", "tls", "py", False),
    ("outpost-plain-each", "Outpost, plain, one write per PUBLISH", "outpost", "plain", "py-each", True),
    ("mosquitto-plain-each", "mosquitto, plain, one write per PUBLISH", "mosquitto", "plain", "py-each", True),
    ("outpost-tls-each", "Outpost, TLS, one record per PUBLISH", "outpost", "tls", "py-each", True),
    ("mosquitto-tls-each", "mosquitto, TLS, one record per PUBLISH", "mosquitto", "tls", "py-each", True),
    ("outpost-plain-mqttwrk", "Outpost, plain (mqttwrk)", "outpost", "plain", "mqttwrk", True),
    ("mosquitto-plain-mqttwrk", "mosquitto, plain (mqttwrk)", "mosquitto", "plain", "mqttwrk", True),
    ("outpost-tls-mqttwrk", "Outpost, TLS (mqttwrk)", "outpost", "tls", "mqttwrk", True),
    ("mosquitto-tls-mqttwrk", "mosquitto, TLS (mqttwrk)", "mosquitto", "tls", "mqttwrk", True),
]


def bench_security(env, sec, R):
    a = env.a
    pubs, per = 10, a.count // 10
    runs = {s[0]: [] for s in SYSTEMS}
    log(f"9. ingest with auth/ACL and TLS: {pubs} publishers x {per} QoS 1 x 100 B, {a.reps} rounds")
    for rep in range(a.reps):
        # Every system once per round; the order reverses every other round against drift.
        order = SYSTEMS if rep % 2 == 0 else list(reversed(SYSTEMS))
        for key, label, broker, setting, gen, nodelay in order:
            if broker == "outpost":
                p = start_outpost(env, key, setting, sec)
            else:
                p = start_mosquitto(env, key, setting, sec, nodelay=nodelay)
            time.sleep(0.5)
            sc0 = B.cpu_s(p.pid)
            if gen == "mqttwrk":
                res = load_mqttwrk(env, p.port, setting, sec, pubs, per, f"sec-{key}")
            else:
                res = load_py(env, p.port, setting, sec, pubs, per, f"sec-{key}", gen == "py-each")
            res["server_cpu_s"] = B.delta(sc0, B.cpu_s(p.pid))
            res["peak_rss"] = B.proc_status(p.pid).get("VmHWM")
            B.stop(p)
            res["round"] = rep + 1
            runs[key].append(res)
            log(f"  round {rep + 1} {label:<48} {res.get('throughput') or 0:>9.0f} msg/s, "
                f"wall {res.get('wall_rate') or 0:>9.0f} msg/s, server CPU "
                f"{(res['server_cpu_s'] or 0) / max(res.get('acked') or 1, 1) * 1e6:.1f} us/msg")
    out = {}
    for key, label, broker, setting, gen, nodelay in SYSTEMS:
        rs = runs[key]
        ok = [r for r in rs if not r.get("error")]
        out[key] = {
            "label": label, "broker": broker, "setting": setting, "generator": gen,
            "runs": rs,
            "throughput_median": B.median([r["throughput"] for r in ok]),
            "wall_rate_median": B.median([r.get("wall_rate") for r in ok]),
            "server_cpu_us_per_msg_median": B.median([r["server_cpu_s"] / r["acked"] * 1e6 for r in ok
                                                      if r.get("server_cpu_s") is not None and r["acked"]]),
            "client_cpu_us_per_msg_median": B.median([r["client_cpu_s"] / r["acked"] * 1e6 for r in ok
                                                      if r["acked"]]),
            "peak_rss_max": max([r.get("peak_rss") or 0 for r in rs] or [0]),
            "errors": [r["error"] for r in rs if r.get("error")],
        }
    R["security"] = {"publishers": pubs, "per_publisher": per, "payload": 100, "systems": out}


# ---------------------------------------------------------------- 10: idle connections


def spawn_piped(cmd, logfile):
    """Like bench.spawn (stopped by PID on exit), with pipes to talk to the process."""
    errf = open(logfile, "ab")
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errf)
    p.bench_cmd = cmd
    B.STARTED.append(p)
    return p


def rss(pid):
    return B.proc_status(pid).get("VmRSS")


def idle_run(env, broker, persistent, n, sec):
    key = f"{broker}-{'persistent' if persistent else 'clean'}"
    if broker == "outpost":
        p = start_outpost(env, "idle-" + key, "plain", sec, max_connections=n + 1000)
    else:
        p = start_mosquitto(env, "idle-" + key, "plain", sec, max_connections=n + 1000)
    time.sleep(1.0)
    res = {"rss_before": rss(p.pid)}
    steps = [s for s in (1000, n) if s <= n]
    cmd = [sys.executable, LOAD, "idle", "--port", str(p.port), "--connections", str(n),
           "--steps", ",".join(map(str, steps)), "--keep-alive", "3600",
           "--client-prefix", f"idle-{key}-"]
    if persistent:
        cmd.append("--persistent")
    c = spawn_piped(cmd, os.path.join(env.tmp, f"idle-{key}.log"))
    try:
        for step in steps:
            line = c.stdout.readline()
            if not line:
                raise RuntimeError(f"connector exited early ({c.wait()})")
            st = json.loads(line)
            time.sleep(2.0)  # let the broker settle (allocator, lazily grown buffers)
            res[f"at_{step}"] = {"connected": st["connected"], "failures": st["failures"],
                                 "first_failures": st["first_failures"],
                                 "connect_s": st["seconds"], "client_rss": st["client_rss"],
                                 "rss": rss(p.pid)}
            c.stdin.write(b"\n")
            c.stdin.flush()
        line = c.stdout.readline()
        res["closed"] = json.loads(line).get("closed") if line else None
        c.wait(60)
    finally:
        B.stop(c)
    time.sleep(2.0)
    st = B.proc_status(p.pid)
    res["rss_after_close"] = st.get("VmRSS")
    res["hwm"] = st.get("VmHWM")
    res["cpu_s"] = B.cpu_s(p.pid)
    B.stop(p)
    top = res[f"at_{n}"]
    res["bytes_per_conn"] = ((top["rss"] - res["rss_before"]) / top["connected"]
                             if top["connected"] else None)
    if 1000 in steps and n > 1000 and top["connected"] > res["at_1000"]["connected"]:
        res["bytes_per_conn_marginal"] = ((top["rss"] - res["at_1000"]["rss"]) /
                                          (top["connected"] - res["at_1000"]["connected"]))
    return key, res


def bench_idle(env, sec, R):
    a = env.a
    n = a.idle
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 2000
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            raise RuntimeError(f"open files limit {soft}/{hard} is below {want}: raise `ulimit -n`")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    log(f"10. idle connections: {n} clients, keep-alive 3600 s, clean and persistent, "
        f"{a.idle_reps} round(s); open files limit {resource.getrlimit(resource.RLIMIT_NOFILE)}")
    runs = {}
    for rep in range(a.idle_reps):
        for persistent in (False, True):
            order = ["outpost", "mosquitto"] if rep % 2 == 0 else ["mosquitto", "outpost"]
            for broker in order:
                key, res = idle_run(env, broker, persistent, n, sec)
                res["round"] = rep + 1
                runs.setdefault(key, []).append(res)
                top = res[f"at_{n}"]
                log(f"  round {rep + 1} {key:<22} {top['connected']} connected in "
                    f"{top['connect_s']:.1f} s, RSS {B.mb(res['rss_before']):.1f} -> "
                    f"{B.mb(top['rss']):.1f} MB = {res['bytes_per_conn'] or 0:.0f} B/connection; "
                    f"after they left {B.mb(res['rss_after_close']):.1f} MB")
    R["idle"] = {"connections": n, "runs": runs}


# ---------------------------------------------------------------- report


def fmt(x, spec="{:.0f}"):
    return "-" if x is None else spec.format(x)


def ratio(x, y):
    return None if not x or not y else x / y


def report(R):
    out = []
    sec = R.get("security")
    if sec:
        s = sec["systems"]
        out.append(f"### 9. Ingest with authentication + ACL, and over TLS: {sec['publishers']} x "
                   f"{sec['per_publisher']} QoS 1 x 100 B, median of {len(next(iter(s.values()))['runs'])}")
        out.append("")
        out.append("| system | msg/s | msg/s (wall) | vs same broker plain | Outpost / mosquitto | "
                   "server CPU / msg | client CPU / msg | peak RSS |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for key, v in s.items():
            plain_key = f"{v['broker']}-plain" + {"mqttwrk": "-mqttwrk", "py-each": "-each"}.get(v["generator"], "")
            peer_key = key.replace("outpost", "mosquitto") if v["broker"] == "outpost" else None
            vs_plain = ratio(v["throughput_median"], s.get(plain_key, {}).get("throughput_median"))
            vs_peer = (ratio(v["throughput_median"], s[peer_key]["throughput_median"])
                       if peer_key in s else None)
            out.append(f"| {v['label']} | {fmt(v['throughput_median'])} | {fmt(v['wall_rate_median'])} | "
                       f"{fmt(vs_plain, '{:.2f}x')} | {fmt(vs_peer, '{:.2f}x')} | "
                       f"{fmt(v['server_cpu_us_per_msg_median'], '{:.1f} us')} | "
                       f"{fmt(v['client_cpu_us_per_msg_median'], '{:.1f} us')} | "
                       f"{fmt(B.mb(v['peak_rss_max']), '{:.1f} MB')} |")
        out.append("")
        for key, v in s.items():
            rs = ", ".join(fmt(r.get("throughput")) + ("!" if r.get("error") else "") for r in v["runs"])
            out.append(f"- {v['label']}: runs {rs} msg/s" +
                       (f"; errors: {v['errors']}" if v["errors"] else ""))
        out.append("")
    idle = R.get("idle")
    if idle:
        n = idle["connections"]
        out.append(f"### 10. Memory per idle connection: {n} clients, keep-alive 3600 s (VmRSS)")
        out.append("")
        out.append("| broker, session | round | connected | connect time | RSS before | RSS at 1,000 | "
                   f"RSS at {n:,} | per connection | marginal (1,000 -> {n:,}) | RSS after they left | "
                   "connector RSS |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for key, rs in idle["runs"].items():
            for r in rs:
                top = r[f"at_{n}"]
                k1 = r.get("at_1000", {})
                out.append(f"| {key} | {r['round']} | {top['connected']} | {top['connect_s']:.1f} s | "
                           f"{fmt(B.mb(r['rss_before']), '{:.1f} MB')} | "
                           f"{fmt(B.mb(k1.get('rss')), '{:.1f} MB')} | "
                           f"{fmt(B.mb(top['rss']), '{:.1f} MB')} | "
                           f"{fmt(r['bytes_per_conn'], '{:,.0f} B')} | "
                           f"{fmt(r.get('bytes_per_conn_marginal'), '{:,.0f} B')} | "
                           f"{fmt(B.mb(r['rss_after_close']), '{:.1f} MB')} | "
                           f"{fmt(B.mb(top['client_rss']), '{:.0f} MB')} |")
        out.append("")
        for sess in ("clean", "persistent"):
            o = B.median([r["bytes_per_conn"] for r in idle["runs"].get(f"outpost-{sess}", [])])
            m = B.median([r["bytes_per_conn"] for r in idle["runs"].get(f"mosquitto-{sess}", [])])
            out.append(f"- {sess} sessions: Outpost {fmt(o, '{:,.0f}')} B, mosquitto {fmt(m, '{:,.0f}')} B "
                       f"per idle connection (median): Outpost / mosquitto {fmt(ratio(o, m), '{:.2f}x')}")
        out.append("")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--outpost", required=True)
    ap.add_argument("--mosquitto", required=True)
    ap.add_argument("--mosquitto-passwd", default=shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd")
    ap.add_argument("--mqttwrk", required=True)
    ap.add_argument("--tmpdir", required=True)
    ap.add_argument("--results", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--only", default="security,idle")
    a = ap.parse_args()
    a.reps = max(1, int(os.environ.get("BENCH_REPS", "3")))
    a.count = 50_000 if a.quick else 100_000
    a.idle = int(os.environ.get("BENCH_IDLE_CONNECTIONS", "2000" if a.quick else "10000"))
    a.idle_reps = 1 if a.quick else 2
    os.makedirs(a.tmpdir, exist_ok=True)
    env = Env(a)
    if not a.keep:
        B.REMOVE_ON_SIGNAL.append(env.tmp)
    log(f"temporary directory {env.tmp}")
    R = {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "quick": a.quick,
         "machine": {"nproc": os.cpu_count(), "loadavg_at_start": os.getloadavg()}}
    sec = {"tls": make_tls(env), "auth": make_auth(env, [f"pub-{i:05d}" for i in range(10)])}
    only = set(a.only.split(","))
    t0 = time.monotonic()
    failed = None
    try:
        if "security" in only:
            bench_security(env, sec, R)
        if "idle" in only:
            bench_idle(env, sec, R)
    except Exception as e:  # report what we have, then fail
        failed = e
        log(f"FAILED: {e!r}")
    R["duration_s"] = time.monotonic() - t0
    R["machine"]["loadavg_at_end"] = os.getloadavg()
    text = report(R)
    R["table_markdown"] = text
    with open(a.results, "w") as f:
        json.dump(R, f, indent=1, default=str)
    print()
    print(f"Machine: {R['machine']}")
    print()
    print(text)
    print(f"Total {R['duration_s']:.0f} s. Full results: {a.results}")
    B.cleanup()
    if not a.keep:
        shutil.rmtree(env.tmp, ignore_errors=True)
    else:
        print(f"Kept {env.tmp}")
    if failed is not None:
        sys.exit(1)


if __name__ == "__main__":
    main()
