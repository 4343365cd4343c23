//! Network namespaces for the discovery tests: mDNS and multicast never touch the machine's
//! real interfaces.
//!
//! # The re-exec pattern
//!
//! A test function runs twice. The outer run (normal `cargo test`) builds a topology: a
//! gateway namespace `gw` and N peer namespaces, each peer joined to `gw` by a veth pair
//! (`lan<i>` in `gw`, 10.77.<i>.1/24 and fd77:<i>::1/64; `eth0` in peer i, .2 of both; `lo` up everywhere;
//! IPv6 DAD off so link-local addresses are usable at once). It then re-executes its own test
//! binary inside `gw`:
//!
//! ```text
//! ip netns exec <gw> <this test binary> --exact <test name> --nocapture --test-threads=1
//! ```
//!
//! with [`ENV`] set to the namespace names. The inner run sees [`ENV`], skips the setup and
//! runs the scenario: our code runs in `gw`; the peers (python-zeroconf, aiocoap) are started
//! with `ip netns exec <peer i>`. The outer run asserts the inner one succeeded and, success or
//! not, deletes every namespace it made (`Drop`, which also runs while a failing test unwinds;
//! deleting a namespace deletes its veth ends). Names carry the pid and a counter, so parallel
//! tests and parallel `cargo test` runs do not collide.
//!
//! Where `ip netns add` is not permitted (no root, no CAP_SYS_ADMIN), the test prints
//! `SKIP: ...` and passes.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

/// Set in the inner run: `gw,peer0,peer1,...`.
pub const ENV: &str = "OUTPOST_TEST_NETNS";

/// The namespaces of one test.
#[derive(Debug)]
pub struct Topology {
    /// The gateway's namespace (the inner test runs here).
    pub gw: String,
    /// Peer namespaces; peer i is reached through `lan<i>`.
    pub peers: Vec<String>,
    /// Only the outer run owns (and deletes) the namespaces.
    owned: bool,
}

impl Topology {
    /// Our address towards peer `i`.
    pub fn gw_addr(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, i as u8, 1)
    }

    /// Peer `i`'s address.
    pub fn peer_addr(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, i as u8, 2)
    }

    /// Our interface towards peer `i`.
    pub fn lan(i: usize) -> String {
        format!("lan{i}")
    }

    /// In the inner run: the topology the outer run made.
    pub fn inner() -> Option<Topology> {
        let v = std::env::var(ENV).ok()?;
        let mut names = v.split(',').map(str::to_owned);
        let gw = names.next()?;
        Some(Topology {
            gw,
            peers: names.collect(),
            owned: false,
        })
    }

    /// In the outer run: builds the namespaces, or None (after printing why) when this machine
    /// does not allow it.
    pub fn create(peers: usize) -> Option<Topology> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = format!("odisc-{}-{n}", std::process::id());
        let gw = format!("{base}-gw");
        if let Err(e) = ip(&["netns", "add", &gw]) {
            // Under CI a missing prerequisite fails the run instead of passing silently.
            assert!(
                !in_ci(),
                "cannot create a network namespace (need root) and CI=true: {e}"
            );
            eprintln!("SKIP: cannot create a network namespace (need root): {e}");
            return None;
        }
        let mut t = Topology {
            gw: gw.clone(),
            peers: Vec::new(),
            owned: true,
        };
        for i in 0..peers {
            let p = format!("{base}-p{i}");
            ip(&["netns", "add", &p]).expect("second namespace");
            t.peers.push(p);
        }
        for ns in std::iter::once(&t.gw).chain(&t.peers) {
            for key in ["default", "all"] {
                let _ = Command::new("ip")
                    .args(["netns", "exec", ns, "sysctl", "-qw"])
                    .arg(format!("net.ipv6.conf.{key}.accept_dad=0"))
                    .status();
            }
            ip(&["-n", ns, "link", "set", "lo", "up"]).expect("lo up");
        }
        for (i, p) in t.peers.iter().enumerate() {
            let lan = Self::lan(i);
            ip(&[
                "-n", &t.gw, "link", "add", &lan, "type", "veth", "peer", "name", "eth0", "netns",
                p,
            ])
            .expect("veth pair");
            let gw_cidr = format!("{}/24", Self::gw_addr(i));
            let peer_cidr = format!("{}/24", Self::peer_addr(i));
            ip(&["-n", &t.gw, "addr", "add", &gw_cidr, "dev", &lan]).expect("gw addr");
            ip(&["-n", p, "addr", "add", &peer_cidr, "dev", "eth0"]).expect("peer addr");
            // A ULA address each: getaddrinfo (AI_ADDRCONFIG) refuses "::" without one, and
            // aiocoap binds there.
            let gw6 = format!("fd77:{i}::1/64");
            let peer6 = format!("fd77:{i}::2/64");
            ip(&["-n", &t.gw, "addr", "add", &gw6, "dev", &lan, "nodad"]).expect("gw addr6");
            ip(&["-n", p, "addr", "add", &peer6, "dev", "eth0", "nodad"]).expect("peer addr6");
            ip(&["-n", &t.gw, "link", "set", &lan, "up"]).expect("lan up");
            ip(&["-n", p, "link", "set", "eth0", "up"]).expect("eth0 up");
        }
        Some(t)
    }

    /// Runs `test` (this binary's test of that name) inside the gateway namespace and asserts
    /// that it passed.
    pub fn run_inner(&self, test: &str) {
        let exe = std::env::current_exe().expect("test binary path");
        let names: Vec<&str> = std::iter::once(self.gw.as_str())
            .chain(self.peers.iter().map(String::as_str))
            .collect();
        let out = Command::new("ip")
            .args(["netns", "exec", &self.gw])
            .arg(exe)
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(ENV, names.join(","))
            .stdin(Stdio::null())
            .output()
            .expect("run the inner test");
        println!("--- inner run of {test} ---");
        println!("{}", String::from_utf8_lossy(&out.stdout));
        println!("{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "inner run of {test} failed");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "inner run of {test} ran no test"
        );
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        for ns in std::iter::once(&self.gw).chain(&self.peers) {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("cleanup: ip netns del {ns}: {e}");
            }
        }
    }
}

/// Runs `ip ARGS`; the error is its stderr.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The directory of the python peers.
pub fn py(script: &str) -> String {
    format!("{}/../tests/py/{script}", env!("CARGO_MANIFEST_DIR"))
}

/// Fails (with the pip line) when a python peer is missing: a skip would hide a missing
/// install step in CI.
pub fn require_python(module: &str, pip: &str) {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "python module {module} missing: pip install {pip}");
}

/// A python peer in namespace `ns`, its stdout read line by line; killed when dropped.
pub struct Peer {
    pub child: Child,
    pub lines: Lines<BufReader<ChildStdout>>,
}

impl Peer {
    pub fn spawn(ns: &str, script: &str, args: &[&str]) -> Peer {
        let mut child = tokio::process::Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-u", &py(script)])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn python peer");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Peer { child, lines }
    }

    /// The next line within `within`, or None (timeout or end).
    pub async fn line(&mut self, within: Duration) -> Option<String> {
        match tokio::time::timeout(within, self.lines.next_line()).await {
            Ok(Ok(Some(l))) => Some(l),
            _ => None,
        }
    }

    /// Lines until one satisfies `pred` (returned), or None at the deadline.
    pub async fn until(
        &mut self,
        within: Duration,
        mut pred: impl FnMut(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let line = self.line(left).await?;
            println!("peer: {line}");
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if pred(&v) {
                return Some(v);
            }
        }
    }

    /// Writes one line to the peer's stdin.
    pub async fn say(&mut self, line: &str) {
        use tokio::io::AsyncWriteExt;
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write to peer");
        stdin.flush().await.expect("flush to peer");
    }

    /// SIGTERM (the peers say goodbye on it); `ip netns exec` execs python, so the pid is it.
    pub fn terminate(&self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
}

/// Whether this run is CI (`CI` set to anything but empty, "0" or "false"): a test that would
/// skip for a missing prerequisite fails there instead.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}
