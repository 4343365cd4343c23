//! End-to-end scenario harness: the real `outpost` binary against a real mosquitto (the
//! "cloud" broker) and real third-party clients (paho-mqtt for Python, mosquitto_pub/_sub).
//!
//! # What it needs on the machine
//! `mosquitto`, `mosquitto_pub`, `mosquitto_sub` on `PATH` (apt `mosquitto mosquitto-clients`),
//! `nats-server` (apt; an MQTT 3.1.1-only upstream) and `python3` with `paho-mqtt` 2.x and
//! `cbor2` (pip). `scripts/install-test-deps.sh` installs them; a scenario whose peer is missing
//! fails (it never skips).
//!
//! # How the binary is found (and built)
//! A test crate cannot use `env!("CARGO_BIN_EXE_outpost")` for another package's binary, and a
//! dev-dependency on `outpost` would not build its `[[bin]]`. So [`outpost_bin`] looks for
//! `<target>/debug/outpost`, where `<target>` is `$CARGO_TARGET_DIR` if set, else
//! `CARGO_MANIFEST_DIR/../target`. If the binary is missing, or older than any file of the
//! crates it is built from (`config/`, `storage/`, `protocols/`, `gateway/`, the workspace
//! `Cargo.toml`/`Cargo.lock`), it runs `cargo build -p outpost` once per test process (a
//! `OnceLock`; concurrent test binaries are serialised by cargo's own build lock) and fails
//! every scenario with cargo's output if that build fails. `OUTPOST_BIN=/path/to/outpost`
//! skips all of this and uses that binary.
//!
//! # Rules the scenarios keep
//! - Network only on 127.0.0.1, on free ports ([`free_port`]); each scenario in its own
//!   [`TestDir`] (kept on disk when `OUTPOST_TEST_KEEP=1`, for post-mortems).
//! - Every process a scenario starts sits in a [`Proc`] guard that SIGKILLs it *by its PID*
//!   on drop, so a failing assertion leaves nothing running. Nothing is killed by name.
//! - Waits are deadlines, never measurements ([`wait_for`]): these machines are shared and noisy.
//! - Logs (outpost's stderr, mosquitto's log, client output) go to files in the test directory;
//!   the guards print their tails when dropped, which libtest shows only for a failing test.
//!
//! # Layout
//! - [`Mosquitto`]: the upstream broker; start, stop (SIGTERM), kill (SIGKILL), restart on
//!   the same port; optional persistence for scenarios that restart it under a subscriber.
//! - [`MosquittoOptions`]: a packet size limit, an ACL file, debug logging.
//! - [`GatewayConfig`] renders an outpost TOML file; [`Outpost`] runs the binary:
//!   start, restart, sigterm, sigkill, `status --json`. The uplink's protocol, packet size
//!   limit and metadata mode are left to the gateway's defaults unless a scenario sets them
//!   ([`UpstreamProtocol`], [`Metadata`]); [`UplinkVariant`] runs one delivery scenario in
//!   several uplink modes; [`UplinkReport`] reads the uplink's figures from a status.
//! - [`Publisher`] (tests/py/publisher.py), [`Subscriber`] (tests/py/subscriber.py),
//!   [`Client`] (tests/py/client.py): paho clients; [`payload`] is the publisher's payload.
//! - [`mosquitto_pub`], [`spawn_mosquitto_sub`]: the Mosquitto command-line clients.
//! - [`PahoRule`] (tests/py/paho_rules.py): one broker rule checked with paho-mqtt;
//!   [`check_paho_rule`] runs one against a gateway of its own and checks the broker counters
//!   the rule expects on `/metrics` ([`check_broker_counter_moves`]).
//! - [`check_upstream_delivery`]: the upstream contract over what a consumer received (every
//!   acked reading, topic mapping, payload unchanged, per-topic order, `seq` rules for
//!   duplicates, the seq read from user properties or the CBOR envelope: [`SeqSource`]);
//!   [`wait_for_readings`] waits for a set of readings upstream.
//! - [`publish_all_acked`] / [`run_blob_publisher`] (tests/py/blob_publisher.py): arbitrary
//!   payloads ([`blob`]), one at a time; [`publish_packet_size`] / [`Received::packet_size`]:
//!   the MQTT packet size a limit applies to; [`births`]: the gateway's birth messages;
//!   [`NatsServer`]: an upstream that refuses MQTT 5.
//! - Floods: [`FloodStage`] (gateway with the shipped defaults, cloud, consumer),
//!   [`FloodWatch`] (the gateway's RSS from [`RssSampler`], a paced QoS 1 probe's PUBACK
//!   latencies), [`PublishFlood`] / [`SessionFlood`] (tests/py/mqtt_flood.py, raw MQTT),
//!   [`state_rows`] (retained messages and sessions in the store), [`shipped_limit`] (a bound
//!   as `print-default-config` ships it), [`check_violations`] (every broken bound at once).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------------------------

/// Polls `probe` every 50 ms until it returns `Some`, or fails after `timeout` naming `what`.
/// The timeout is a deadline for a slow machine, not a performance requirement: keep it generous.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = probe() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A port that was free a moment ago on 127.0.0.1 (bound to :0, read, released).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

// ---------------------------------------------------------------------------------------------
// Directories, files, processes
// ---------------------------------------------------------------------------------------------

/// A scenario's private directory. Removed on drop unless `OUTPOST_TEST_KEEP=1`.
#[derive(Debug)]
pub struct TestDir {
    /// Owns the directory's lifetime (None once kept).
    dir: Option<tempfile::TempDir>,
    /// The path, valid for as long as the value lives (and after, when kept).
    path: PathBuf,
}

impl TestDir {
    /// A fresh directory named after the scenario.
    pub fn new(name: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("outpost-{name}-"))
            .tempdir()
            .context("creating the test directory")?;
        let path = dir.path().to_path_buf();
        Ok(Self {
            dir: Some(dir),
            path,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `self.path()/name`.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("OUTPOST_TEST_KEEP").is_some_and(|v| v == "1")
            && let Some(d) = self.dir.take()
        {
            eprintln!("keeping {}", d.keep().display());
        }
    }
}

/// The last `lines` lines of a text file (lossy), or a note that it cannot be read.
pub fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// A child process that is SIGKILLed (by its PID, via `Child::kill`) and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    /// What it is, for messages.
    name: String,
    /// The child; `None` once it has been waited for.
    child: Option<Child>,
    /// Where its output goes, for the tail printed on drop.
    log: PathBuf,
    /// How it ended, once known.
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_path_buf(),
            status: None,
        })
    }

    /// The PID (0 once reaped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The exit status if it has ended (reaping it), else `None`.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        let Some(child) = self.child.as_mut() else {
            return Ok(self.status);
        };
        if let Some(s) = child.try_wait()? {
            self.status = Some(s);
            self.child = None;
        }
        Ok(self.status)
    }

    /// Waits for it to end, failing after `timeout` (the process is left running for Drop).
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let name = self.name.clone();
        wait_for(&format!("{name} to exit"), timeout, || {
            self.try_status().ok().flatten()
        })
    }

    /// Sends `signal` (e.g. "TERM", "KILL", "STOP", "CONT") to this process's PID.
    pub fn signal(&mut self, signal: &str) -> Result<()> {
        if self.try_status()?.is_some() {
            bail!(
                "{} already exited ({:?}), cannot send SIG{signal}",
                self.name,
                self.status
            );
        }
        let pid = self.pid();
        let st = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .context("running kill")?;
        if !st.success() {
            bail!("kill -{signal} {pid} failed: {st}");
        }
        Ok(())
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.try_status()? {
            return Ok(s);
        }
        if let Some(child) = self.child.as_mut() {
            child.kill().ok();
            let s = child.wait()?;
            self.status = Some(s);
            self.child = None;
            return Ok(s);
        }
        self.status.ok_or_else(|| anyhow!("no status"))
    }

    /// The output file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Waits until something accepts TCP connections on 127.0.0.1:`port`; fails at the
    /// deadline, or as soon as this process exits, with the last `lines` lines of its log.
    pub fn wait_listening(&mut self, port: u16, timeout: Duration, lines: usize) -> Result<()> {
        let name = self.name.clone();
        let log = self.log.clone();
        wait_for(
            &format!("{name} to listen on 127.0.0.1:{port}"),
            timeout,
            || {
                if let Ok(Some(st)) = self.try_status() {
                    return Some(Err(anyhow!(
                        "{name} exited before listening ({st}):\n{}",
                        tail(&log, lines)
                    )));
                }
                port_open(port).then_some(Ok(()))
            },
        )?
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
        eprintln!(
            "----- {} ({}), last lines of {} -----\n{}",
            self.name,
            self.status
                .map_or("killed on drop".to_owned(), |s| s.to_string()),
            self.log.display(),
            tail(&self.log, 30)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The outpost binary
// ---------------------------------------------------------------------------------------------

fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from(".."), Path::to_path_buf)
}

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                workspace_dir().join(d)
            }
        }
        None => workspace_dir().join("target"),
    }
}

fn newest_mtime(path: &Path, newest: &mut Option<SystemTime>) {
    let Ok(meta) = fs::metadata(path) else { return };
    if meta.is_dir() {
        if path.file_name().is_some_and(|n| n == "target") {
            return;
        }
        if let Ok(entries) = fs::read_dir(path) {
            for e in entries.flatten() {
                newest_mtime(&e.path(), newest);
            }
        }
    } else if let Ok(m) = meta.modified()
        && newest.is_none_or(|n| m > n)
    {
        *newest = Some(m);
    }
}

fn binary_is_stale(bin: &Path) -> bool {
    let Ok(built) = fs::metadata(bin).and_then(|m| m.modified()) else {
        return true;
    };
    let ws = workspace_dir();
    let mut newest = None;
    for p in [
        "config",
        "storage",
        "protocols",
        "gateway",
        "Cargo.toml",
        "Cargo.lock",
    ] {
        newest_mtime(&ws.join(p), &mut newest);
    }
    newest.is_some_and(|n| n > built)
}

/// The `outpost` binary, built if missing or stale (see the crate docs).
pub fn outpost_bin() -> Result<PathBuf> {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("OUTPOST_BIN") {
            return Ok(PathBuf::from(p));
        }
        let bin = target_dir().join("debug").join("outpost");
        if binary_is_stale(&bin) {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let out = Command::new(cargo)
                .current_dir(workspace_dir())
                .args(["build", "-p", "outpost"])
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run cargo build -p outpost: {e}"))?;
            if !out.status.success() {
                let err = String::from_utf8_lossy(&out.stderr);
                let lines: Vec<&str> = err.lines().collect();
                return Err(format!(
                    "cargo build -p outpost failed ({}):\n{}",
                    out.status,
                    lines[lines.len().saturating_sub(60)..].join("\n")
                ));
            }
        }
        if bin.is_file() {
            Ok(bin)
        } else {
            Err(format!("{} does not exist after building", bin.display()))
        }
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// A `Command` for the outpost binary (for `check-config`, `print-default-config`, ...).
pub fn outpost_command() -> Result<Command> {
    Ok(Command::new(outpost_bin()?))
}

/// The shipped configuration, as `outpost print-default-config` prints it, parsed: what a
/// scenario reads a default bound from (`shipped_config()?["broker"]["max_sessions"]`), so
/// that it follows the default instead of repeating it.
pub fn shipped_config() -> Result<toml::Table> {
    let out = outpost_command()?
        .arg("print-default-config")
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "outpost print-default-config failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout)?
        .parse()
        .context("the default configuration is not TOML")
}

/// An integer setting of the shipped configuration at `path` (e.g. `["broker",
/// "max_sessions"]`), `None` when the shipped configuration has no such key.
pub fn shipped_limit(path: &[&str]) -> Result<Option<u64>> {
    let config = toml::Value::Table(shipped_config()?);
    let Some(v) = path.iter().try_fold(&config, |v, key| v.get(*key)) else {
        return Ok(None);
    };
    v.as_integer()
        .and_then(|n| u64::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| anyhow!("shipped {} = {v} is not a count", path.join(".")))
}

/// One `[[route]]` of a [`GatewayConfig`].
#[derive(Debug, Clone)]
pub struct Route {
    /// MQTT topic filter on local topics.
    pub filter: String,
    /// "cloud" or "local".
    pub target: String,
    /// "high", "normal" or "low".
    pub priority: String,
    /// Optional upstream topic template.
    pub upstream_topic: Option<String>,
}

impl Route {
    /// A cloud route with a priority and the default topic template.
    pub fn cloud(filter: &str, priority: &str) -> Self {
        Self {
            filter: filter.to_owned(),
            target: "cloud".to_owned(),
            priority: priority.to_owned(),
            upstream_topic: None,
        }
    }
}

/// `[upstream] protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// "auto": MQTT 5, falling back to 3.1.1 when the broker refuses 5 at CONNECT (the
    /// default when the key is absent).
    Auto,
    /// "5", pinned: no fallback.
    V5,
    /// "3.1.1", pinned.
    V311,
}

impl UpstreamProtocol {
    /// The TOML value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::V5 => "5",
            Self::V311 => "3.1.1",
        }
    }
}

/// `[upstream] metadata`: where a record's `seq`, ingest time and content type travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metadata {
    /// MQTT 5 user properties (the default on MQTT 5).
    Properties,
    /// A CBOR envelope around the payload (see [`Envelope`]); works on 3.1.1 too.
    Envelope,
    /// Nothing (the default on MQTT 3.1.1): the payload alone.
    None,
}

impl Metadata {
    /// The TOML value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Properties => "properties",
            Self::Envelope => "envelope",
            Self::None => "none",
        }
    }
}

/// The knobs scenarios turn, rendered to outpost's TOML by [`GatewayConfig::to_toml`].
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// `[node] name`; the upstream topic prefix is `outpost/<node>/`.
    pub node: String,
    /// The local MQTT listener port on 127.0.0.1.
    pub port: u16,
    /// `[storage] data_dir`.
    pub data_dir: PathBuf,
    /// `[upstream] url = mqtt://127.0.0.1:<port>`; `None` leaves `[upstream]` out.
    pub upstream_port: Option<u16>,
    /// `[upstream] protocol`; `None` (the default) writes nothing: the shipped default, "auto"
    /// (MQTT 5, falling back to 3.1.1 when the broker refuses 5 at CONNECT).
    pub protocol: Option<UpstreamProtocol>,
    /// `[upstream] max_packet_size` (a size, e.g. "100000"); `None` writes nothing (the MQTT
    /// maximum; an MQTT 5 broker's CONNACK limit applies on top).
    pub upstream_max_packet_size: Option<String>,
    /// `[upstream] metadata`; `None` writes nothing (properties on MQTT 5, none on 3.1.1).
    pub metadata: Option<Metadata>,
    /// Only `url` in `[upstream]` and no `[sync]` table: every other uplink setting is the
    /// shipped default (the README quick start, `outpost run --upstream URL`). When false (the
    /// default) the harness also writes client id, topic prefix, keep-alive and `[sync]`, with
    /// the values the default configuration has today.
    pub upstream_url_only: bool,
    /// `[storage] quota`.
    pub quota: String,
    /// `[storage] when_full`.
    pub when_full: String,
    /// `[storage] durability`.
    pub durability: String,
    /// Write no `durability`, `commit_interval` or `commit_batch_records`: the shipped defaults
    /// (durability "full", group commit closing when the queue is empty). Otherwise the
    /// harness's faster `durability`/5 ms settings.
    pub shipped_storage: bool,
    /// `[storage] ttl` (e.g. "1h"); `None`: not written (no TTL).
    pub ttl: Option<String>,
    /// Routes, in order.
    pub routes: Vec<Route>,
    /// `[health] listen = 127.0.0.1:<port>`: the HTTP status endpoint, on its own free port
    /// (its default, 127.0.0.1:9180, would collide between gateways started side by side).
    pub health_port: u16,
    /// `[health] resource_interval`, if set (the gateway stores its own resource samples as
    /// records; a scenario counting records exactly pushes them out of its time frame).
    pub resource_interval: Option<String>,
    /// `[broker] max_packet_size` (the local broker's limit, also the largest reading a sensor
    /// can publish). The harness writes "256KiB", the shipped default.
    pub broker_max_packet_size: String,
    /// Lines added to the `[broker]` table (`password_file`, `acl_file`, `allow_anonymous`, ...).
    pub broker_extra: String,
    /// `[[broker.listener]]` tables in place of `listeners = ["127.0.0.1:<port>"]`. Empty (the
    /// default): that one plain listener. [`Outpost::start`] waits for `port`, so one of the
    /// tables should be on it.
    pub listener_tables: Vec<ListenerTable>,
    /// Write no `[discovery]` table: the shipped defaults (implicit registration of senders).
    /// Otherwise (the default) the harness turns implicit registration off, unless `extra`
    /// has a `[discovery]` table of its own.
    pub shipped_discovery: bool,
    /// Appended verbatim at the end (more tables).
    pub extra: String,
}

/// One `[[broker.listener]]` table of a [`GatewayConfig`], on 127.0.0.1.
#[derive(Debug, Clone)]
pub struct ListenerTable {
    /// The port.
    pub port: u16,
    /// `allow_anonymous` for this listener; `None` leaves it to `[broker]`.
    pub allow_anonymous: Option<bool>,
    /// MQTT over TLS with these files; `None`: plain TCP.
    pub tls: Option<ListenerTls>,
}

/// A listener's `tls = { ... }` table.
#[derive(Debug, Clone)]
pub struct ListenerTls {
    /// `cert_file` (PEM).
    pub cert_file: PathBuf,
    /// `key_file` (PEM).
    pub key_file: PathBuf,
    /// `client_ca_file`: client certificates are checked against it (and name the user).
    pub client_ca_file: Option<PathBuf>,
    /// `require_client_cert`.
    pub require_client_cert: bool,
}

impl ListenerTable {
    /// The TOML table.
    fn to_toml(&self) -> String {
        let mut s = format!(
            "[[broker.listener]]\naddress = \"127.0.0.1:{}\"\n",
            self.port
        );
        if let Some(a) = self.allow_anonymous {
            let _ = writeln!(s, "allow_anonymous = {a}");
        }
        if let Some(t) = &self.tls {
            let _ = write!(
                s,
                "tls = {{ cert_file = {:?}, key_file = {:?}",
                t.cert_file.display().to_string(),
                t.key_file.display().to_string()
            );
            if let Some(ca) = &t.client_ca_file {
                let _ = write!(s, ", client_ca_file = {:?}", ca.display().to_string());
            }
            let _ = writeln!(s, ", require_client_cert = {} }}", t.require_client_cert);
        }
        s.push('\n');
        s
    }
}

impl GatewayConfig {
    /// Defaults for node `node` on a free port with its data under `dir/data`; the upstream
    /// protocol, packet size limit and metadata mode are left to the gateway's defaults.
    pub fn new(dir: &TestDir, node: &str, upstream_port: Option<u16>) -> Result<Self> {
        Ok(Self {
            node: node.to_owned(),
            port: free_port()?,
            data_dir: dir.join("data"),
            upstream_port,
            protocol: None,
            upstream_max_packet_size: None,
            metadata: None,
            upstream_url_only: false,
            quota: "1GiB".to_owned(),
            when_full: "evict-lowest-oldest".to_owned(),
            durability: "normal".to_owned(),
            shipped_storage: false,
            ttl: None,
            routes: Vec::new(),
            health_port: free_port()?,
            resource_interval: None,
            broker_max_packet_size: "256KiB".to_owned(),
            broker_extra: String::new(),
            listener_tables: Vec::new(),
            shipped_discovery: false,
            extra: String::new(),
        })
    }

    /// The TOML file.
    pub fn to_toml(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "default_route = \"cloud\"\n");
        let _ = writeln!(
            s,
            "[node]\nname = \"{}\"\nlabels = {{ site = \"test\" }}\n",
            self.node
        );
        s.push_str("[broker]\n");
        if self.listener_tables.is_empty() {
            let _ = writeln!(s, "listeners = [\"127.0.0.1:{}\"]", self.port);
        }
        let _ = writeln!(
            s,
            "max_packet_size = \"{}\"\nmax_inflight = 32\nmax_inbound_pending = 64\n{}",
            self.broker_max_packet_size, self.broker_extra
        );
        for l in &self.listener_tables {
            s.push_str(&l.to_toml());
        }
        let _ = writeln!(
            s,
            "[storage]\ndata_dir = {:?}\nquota = \"{}\"\nwhen_full = \"{}\"",
            self.data_dir.display().to_string(),
            self.quota,
            self.when_full,
        );
        if let Some(ttl) = &self.ttl {
            let _ = writeln!(s, "ttl = \"{ttl}\"");
        }
        if !self.shipped_storage {
            let _ = writeln!(
                s,
                "commit_batch_records = 512\ncommit_interval = \"5ms\"\ndurability = \"{}\"\n",
                self.durability
            );
        }
        for r in &self.routes {
            let _ = writeln!(
                s,
                "[[route]]\nfilter = \"{}\"\ntarget = \"{}\"\npriority = \"{}\"",
                r.filter, r.target, r.priority
            );
            if let Some(t) = &r.upstream_topic {
                let _ = writeln!(s, "upstream_topic = \"{t}\"");
            }
            s.push('\n');
        }
        if let Some(p) = self.upstream_port {
            let _ = writeln!(s, "[upstream]\nurl = \"mqtt://127.0.0.1:{p}\"");
            if let Some(v) = self.protocol {
                let _ = writeln!(s, "protocol = \"{}\"", v.as_str());
            }
            if let Some(m) = &self.upstream_max_packet_size {
                let _ = writeln!(s, "max_packet_size = \"{m}\"");
            }
            if let Some(m) = self.metadata {
                let _ = writeln!(s, "metadata = \"{}\"", m.as_str());
            }
            if !self.upstream_url_only {
                let _ = writeln!(
                    s,
                    "client_id = \"outpost-{}\"\ntopic_prefix = \"outpost\"\nkeep_alive = \"30s\"",
                    self.node
                );
            }
            s.push('\n');
            if !self.upstream_url_only {
                let _ = writeln!(
                    s,
                    "[sync]\ninflight_window = 100\nbackoff_min = \"100ms\"\nbackoff_max = \"1s\"\n"
                );
            }
        }
        let _ = writeln!(s, "[health]\nlisten = \"127.0.0.1:{}\"", self.health_port);
        if let Some(i) = &self.resource_interval {
            let _ = writeln!(s, "resource_interval = \"{i}\"");
        }
        s.push('\n');
        // CoAP's default listener is the fixed udp port 5683: gateways started side by side by
        // parallel tests would collide on it, so it is off unless a test configures it.
        if !self.extra.contains("[coap]") {
            s.push_str("[coap]\nlisteners = []\n\n");
        }
        // Implicit device registration appends registry changes (retained upstream records) to
        // the store; tests that count records exactly would see them, so it is off unless a test
        // configures [discovery] (the registry scenarios do).
        if !self.shipped_discovery && !self.extra.contains("[discovery]") {
            s.push_str("[discovery]\nimplicit = false\n\n");
        }
        s.push_str(&self.extra);
        s
    }
}

/// A running (or stopped) gateway: `outpost run --config <dir>/outpost.toml`.
#[derive(Debug)]
pub struct Outpost {
    /// The configuration file the gateway (and `status`) reads.
    config_path: PathBuf,
    /// The MQTT port it listens on.
    port: u16,
    /// stderr/stdout of every run, appended.
    log: PathBuf,
    /// The running process, if any.
    proc: Option<Proc>,
    /// How many times it was started (names the runs in the log).
    runs: u32,
    /// `RUST_LOG` for the gateway; `None`: the test's own, else `info`.
    log_filter: Option<String>,
    /// Extra environment of the gateway process (e.g. libfaketime's `LD_PRELOAD`).
    envs: Vec<(String, String)>,
}

impl Outpost {
    /// Writes `cfg` to `dir/outpost.toml`, starts the gateway and waits for its listener.
    pub fn start(dir: &TestDir, cfg: &GatewayConfig) -> Result<Self> {
        Self::start_raw(dir, &cfg.to_toml(), cfg.port)
    }

    /// Like [`Outpost::start`] with a hand-written TOML whose listener is 127.0.0.1:`port`.
    pub fn start_raw(dir: &TestDir, toml: &str, port: u16) -> Result<Self> {
        Self::create(dir, toml, port, None)
    }

    /// Like [`Outpost::start_raw`], logging with `RUST_LOG=<filter>` (e.g. `debug`).
    pub fn start_raw_with_log(dir: &TestDir, toml: &str, port: u16, filter: &str) -> Result<Self> {
        Self::create(dir, toml, port, Some(filter.to_owned()))
    }

    fn create(dir: &TestDir, toml: &str, port: u16, log_filter: Option<String>) -> Result<Self> {
        let config_path = dir.join("outpost.toml");
        fs::write(&config_path, toml)?;
        let mut o = Self {
            config_path,
            port,
            log: dir.join("outpost.log"),
            proc: None,
            runs: 0,
            log_filter,
            envs: Vec::new(),
        };
        o.launch()?;
        Ok(o)
    }

    /// Like [`Outpost::start`], with extra environment variables for the gateway process (kept
    /// for every restart).
    pub fn start_with_env(
        dir: &TestDir,
        cfg: &GatewayConfig,
        envs: &[(&str, String)],
    ) -> Result<Self> {
        let config_path = dir.join("outpost.toml");
        fs::write(&config_path, cfg.to_toml())?;
        let mut o = Self {
            config_path,
            port: cfg.port,
            log: dir.join("outpost.log"),
            proc: None,
            runs: 0,
            log_filter: None,
            envs: envs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        };
        o.launch()?;
        Ok(o)
    }

    fn launch(&mut self) -> Result<()> {
        if self
            .proc
            .as_mut()
            .is_some_and(|p| p.try_status().ok().flatten().is_none())
        {
            bail!("outpost is already running");
        }
        self.runs += 1;
        let mut cmd = Command::new(outpost_bin()?);
        cmd.arg("run").arg("--config").arg(&self.config_path);
        if let Some(filter) = &self.log_filter {
            cmd.env("RUST_LOG", filter);
        } else if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        fs::write(
            &self.log,
            format!(
                "{}===== outpost run #{} =====\n",
                fs::read_to_string(&self.log).unwrap_or_default(),
                self.runs
            ),
        )?;
        let mut proc = Proc::spawn(&format!("outpost run #{}", self.runs), cmd, &self.log)?;
        proc.wait_listening(self.port, Duration::from_secs(60), 40)?;
        self.proc = Some(proc);
        Ok(())
    }

    /// The local MQTT port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The configuration file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The log file (all runs).
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The running process's PID.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Starts it again (after a sigterm/sigkill) with the same configuration.
    pub fn restart(&mut self) -> Result<()> {
        self.launch()
    }

    /// SIGTERM and wait (deadline 60 s) for the exit status; the contract is exit 0.
    pub fn sigterm(&mut self) -> Result<ExitStatus> {
        let p = self
            .proc
            .as_mut()
            .ok_or_else(|| anyhow!("outpost is not running"))?;
        p.signal("TERM")?;
        let st = p.wait(Duration::from_secs(60))?;
        self.proc = None;
        Ok(st)
    }

    /// SIGKILL and reap.
    pub fn sigkill(&mut self) -> Result<()> {
        let p = self
            .proc
            .as_mut()
            .ok_or_else(|| anyhow!("outpost is not running"))?;
        p.kill()?;
        self.proc = None;
        Ok(())
    }

    /// Whether the process is still alive (an unexpected exit is reported with the log tail).
    pub fn check_alive(&mut self) -> Result<()> {
        match self.proc.as_mut() {
            None => bail!("outpost is not running"),
            Some(p) => match p.try_status()? {
                None => Ok(()),
                Some(st) => bail!(
                    "outpost exited unexpectedly ({st}):\n{}",
                    tail(&self.log, 40)
                ),
            },
        }
    }

    /// `outpost status --config <file> --json`, parsed.
    pub fn status_json(&self) -> Result<Value> {
        let out = outpost_command()?
            .arg("status")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--json")
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "outpost status failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "status output is not JSON: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Waits (deadline 30 s) for `runtime.uplink_state == "connected"`.
    pub fn wait_uplink_connected(&self) -> Result<Value> {
        self.wait_status("uplink connected", Duration::from_secs(30), |s| {
            json_str(s, &["runtime", "uplink_state"]) == Some("connected")
        })
    }

    /// Polls `status --json` until `pred` holds; on timeout the error shows the last status.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Result<Value> {
        let mut last = Value::Null;
        let r = wait_for(what, timeout, || {
            let s = self.status_json().ok()?;
            let ok = pred(&s);
            last = s.clone();
            ok.then_some(s)
        });
        r.with_context(|| format!("last status: {last:#}"))
    }
}

/// The uplink's figures in a `status --json` document, as the sync contract names them
/// (runtime fields under "runtime", the store's at the top level). A field the gateway does not
/// report is `None` (JSON null too), so an assertion failure shows what was missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkReport {
    /// runtime.uplink_state ("connected", ...).
    pub state: Option<String>,
    /// runtime.uplink_protocol: "5" or "3.1.1"; None when null (never connected) or absent.
    pub protocol: Option<String>,
    /// Whether runtime.uplink_protocol is present (null included): the field exists.
    pub protocol_reported: bool,
    /// runtime.uplink_protocol_fallback.
    pub fallback: Option<bool>,
    /// runtime.uplink_max_packet_size: the effective limit on the current connection.
    pub max_packet_size: Option<u64>,
    /// runtime.uplink_last_error.
    pub last_error: Option<String>,
    /// runtime.uplink_failing_seq.
    pub failing_seq: Option<u64>,
    /// runtime.uplink_failing_reason.
    pub failing_reason: Option<String>,
    /// runtime.reconnects: connections after the first that got a CONNACK.
    pub reconnects: Option<u64>,
    /// runtime.births_published: one per real connection.
    pub births_published: Option<u64>,
    /// runtime.sync_refused: records permanently refused by the upstream.
    pub sync_refused: Option<u64>,
    /// runtime.sync_refused_by_reason without its zero entries; None if absent.
    pub refused_by_reason: Option<BTreeMap<String, u64>>,
    /// runtime.sync_refusals_retried: transient refusals retried with back-off.
    pub refusals_retried: Option<u64>,
    /// runtime.commands_refused: cloud commands refused.
    pub commands_refused: Option<u64>,
    /// refused_records: rows in the store's refused table.
    pub refused_records: Option<u64>,
    /// refused_total: records ever moved to the refused table.
    pub refused_total: Option<u64>,
    /// buffered_records: records waiting to be synced.
    pub buffered_records: Option<u64>,
}

impl UplinkReport {
    /// Reads the figures from a `status --json` document.
    pub fn from_status(s: &Value) -> Self {
        let rt = &s["runtime"];
        let text = |v: &Value| v.as_str().map(str::to_owned);
        Self {
            state: text(&rt["uplink_state"]),
            protocol: text(&rt["uplink_protocol"]),
            protocol_reported: rt.get("uplink_protocol").is_some(),
            fallback: rt["uplink_protocol_fallback"].as_bool(),
            max_packet_size: rt["uplink_max_packet_size"].as_u64(),
            last_error: text(&rt["uplink_last_error"]),
            failing_seq: rt["uplink_failing_seq"].as_u64(),
            failing_reason: text(&rt["uplink_failing_reason"]),
            reconnects: rt["reconnects"].as_u64(),
            births_published: rt["births_published"].as_u64(),
            sync_refused: rt["sync_refused"].as_u64(),
            refused_by_reason: rt["sync_refused_by_reason"].as_object().map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                    .filter(|(_, n)| *n > 0)
                    .collect()
            }),
            refusals_retried: rt["sync_refusals_retried"].as_u64(),
            commands_refused: rt["commands_refused"].as_u64(),
            refused_records: s["refused_records"].as_u64(),
            refused_total: s["refused_total"].as_u64(),
            buffered_records: s["buffered_records"].as_u64(),
        }
    }

    /// `refused_by_reason` as expected for `n` refusals of `reason` and no other.
    pub fn only(reason: &str, n: u64) -> Option<BTreeMap<String, u64>> {
        Some(if n == 0 {
            BTreeMap::new()
        } else {
            [(reason.to_owned(), n)].into()
        })
    }
}

/// `v[path...]` as u64 (status fields), `None` if absent or not a number.
pub fn json_u64(v: &Value, path: &[&str]) -> Option<u64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_u64()
}

/// `v[path...]` as &str.
pub fn json_str<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

// ---------------------------------------------------------------------------------------------
// Mosquitto, the upstream broker
// ---------------------------------------------------------------------------------------------

/// How a [`Mosquitto`] is configured beyond the fixed part (listener, anonymous access,
/// logging, and `max_queued_messages 0` unless [`MosquittoOptions::bounded_queues`]).
#[derive(Debug, Clone, Default)]
pub struct MosquittoOptions {
    /// `persistence true` with a 1 s autosave in its directory (see [`Mosquitto::start_on`]).
    pub persistence: bool,
    /// `max_packet_size N`: mosquitto refuses larger packets (it closes the connection; over
    /// MQTT 5 it announces the limit in CONNACK and sends DISCONNECT 0x95 first).
    /// Measured with mosquitto 2.0.11: it compares the remaining length + 1 with the limit, so
    /// it takes whole packets up to 2-4 bytes (the remaining length's own bytes) over it.
    pub max_packet_size: Option<u32>,
    /// The content of an `acl_file` (`topic [read|write|readwrite|deny] FILTER` lines before any
    /// `user` line apply to anonymous clients).
    pub acl: Option<String>,
    /// `log_type debug` too (every packet in and out, e.g. "Received PUBACK from ...").
    pub log_debug: bool,
    /// Leave `max_queued_messages` at mosquitto's default (1000) instead of 0 (unbounded).
    /// Measured with mosquitto 2.0.11: with `max_queued_messages 0`, a QoS 1 publish that the
    /// ACL denies gets PUBACK 0x87 and then the connection is closed ("Bad socket read/write
    /// ... Unknown error"); with the default it gets PUBACK 0x87 and the connection stays up.
    pub bounded_queues: bool,
}

impl MosquittoOptions {
    /// Only `max_packet_size limit`.
    pub fn packet_limit(limit: u32) -> Self {
        Self {
            max_packet_size: Some(limit),
            ..Self::default()
        }
    }
}

/// A mosquitto on 127.0.0.1:`port`, configured with `allow_anonymous true`,
/// `max_queued_messages 0` (no per-client queue limit) and logging to a file.
#[derive(Debug)]
pub struct Mosquitto {
    /// Its directory (config, log, persistence file).
    dir: PathBuf,
    /// The port, kept across restarts.
    port: u16,
    /// The process while running.
    proc: Option<Proc>,
}

impl Mosquitto {
    /// Starts one on a free port, without persistence, in `dir/mosquitto`.
    pub fn start(dir: &TestDir) -> Result<Self> {
        Self::start_on(dir, free_port()?, false)
    }

    /// Starts one on `port`. With `persistence`, sessions, subscriptions and queued messages
    /// are saved to its directory every second and on [`Mosquitto::stop`] (SIGTERM), and
    /// restored on restart, so a persistent-session subscriber keeps its subscription across an
    /// outage (after a SIGKILL: if [`Mosquitto::wait_saved`] saw it saved).
    pub fn start_on(dir: &TestDir, port: u16, persistence: bool) -> Result<Self> {
        let opts = MosquittoOptions {
            persistence,
            ..MosquittoOptions::default()
        };
        Self::start_with(dir, port, &opts)
    }

    /// Starts one on `port` configured by `opts` (see [`MosquittoOptions`]).
    pub fn start_with(dir: &TestDir, port: u16, opts: &MosquittoOptions) -> Result<Self> {
        let mdir = dir.join("mosquitto");
        fs::create_dir_all(&mdir)?;
        let mut conf = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nlog_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\nconnection_messages true\n"
        );
        if !opts.bounded_queues {
            conf.push_str("max_queued_messages 0\n");
        }
        if opts.log_debug {
            conf.push_str("log_type debug\n");
        }
        if let Some(n) = opts.max_packet_size {
            let _ = writeln!(conf, "max_packet_size {n}");
        }
        if let Some(acl) = &opts.acl {
            let path = mdir.join("acl");
            fs::write(&path, acl)?;
            let _ = writeln!(conf, "acl_file {}", path.display());
        }
        if opts.persistence {
            // Started as root, mosquitto drops to user `mosquitto`, which cannot write into a
            // private temp dir: stay the user we are (ignored when not root).
            let user = Command::new("id").arg("-un").output()?;
            let user = String::from_utf8_lossy(&user.stdout).trim().to_owned();
            if !user.is_empty() {
                let _ = writeln!(conf, "user {user}");
            }
            let _ = write!(
                conf,
                "persistence true\nautosave_interval 1\npersistence_location {}/\n",
                mdir.display()
            );
        } else {
            conf.push_str("persistence false\n");
        }
        fs::write(mdir.join("mosquitto.conf"), conf)?;
        let mut m = Self {
            dir: mdir,
            port,
            proc: None,
        };
        m.launch()?;
        Ok(m)
    }

    /// Reserves a port for a mosquitto that is not running yet (see [`Mosquitto::start_on`]).
    pub fn reserve_port() -> Result<u16> {
        free_port()
    }

    fn launch(&mut self) -> Result<()> {
        let port = self.port;
        let log = self.dir.join("mosquitto.log");
        let deadline = Instant::now() + Duration::from_secs(30);
        // The port may still be held by a dying predecessor (or a TIME_WAIT socket): mosquitto
        // then exits at once, so start it again until it listens or the deadline passes.
        loop {
            let mut cmd = Command::new("mosquitto");
            cmd.arg("-c").arg(self.dir.join("mosquitto.conf"));
            let mut p = Proc::spawn("mosquitto", cmd, &log)?;
            loop {
                if port_open(port) {
                    self.proc = Some(p);
                    return Ok(());
                }
                if p.try_status()?.is_some() || Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if Instant::now() > deadline {
                bail!(
                    "mosquitto did not start listening on {port}:\n{}",
                    tail(&log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// With persistence: waits until mosquitto has saved its database twice more (it autosaves
    /// every second), so everything that existed when this was called (a subscriber's session)
    /// survives even a SIGKILL.
    pub fn wait_saved(&self) -> Result<()> {
        let saves = || {
            fs::read_to_string(self.log())
                .unwrap_or_default()
                .matches("Saving in-memory database")
                .count()
        };
        let before = saves();
        wait_for(
            "mosquitto to autosave its database",
            Duration::from_secs(30),
            || (saves() >= before + 2).then_some(()),
        )
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The log file.
    pub fn log(&self) -> PathBuf {
        self.dir.join("mosquitto.log")
    }

    /// SIGTERM (mosquitto saves its persistence file) and wait for it to exit.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.signal("TERM")?;
            p.wait(Duration::from_secs(30))?;
        }
        Ok(())
    }

    /// SIGKILL: an abrupt outage.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.kill()?;
        }
        Ok(())
    }

    /// Starts it again on the same port with the same configuration.
    pub fn restart(&mut self) -> Result<()> {
        if self.proc.is_some() {
            self.stop()?;
        }
        self.launch()
    }
}

// ---------------------------------------------------------------------------------------------
// Python (paho) clients
// ---------------------------------------------------------------------------------------------

/// `tests/py/<name>`.
pub fn py_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py").join(name)
}

/// The payload `publisher.py` sends for reading `counter` on `topic`:
/// `"<topic>|<counter>|"` padded with '.' to `size` bytes.
pub fn payload(topic: &str, counter: u64, size: usize) -> Vec<u8> {
    let mut p = format!("{topic}|{counter}|").into_bytes();
    if p.len() < size {
        p.resize(size, b'.');
    }
    p
}

/// Parses a payload made by [`payload`] back into (topic, counter).
pub fn parse_payload(p: &[u8]) -> Option<(String, u64)> {
    let text = std::str::from_utf8(p).ok()?;
    let mut it = text.splitn(3, '|');
    let topic = it.next()?.to_owned();
    let counter = it.next()?.parse().ok()?;
    Some((topic, counter))
}

/// What a [`Publisher`] sends.
#[derive(Debug, Clone)]
pub struct PublisherSpec {
    /// Broker port on 127.0.0.1.
    pub port: u16,
    /// Local topics.
    pub topics: Vec<String>,
    /// Readings per topic.
    pub count: u64,
    /// First counter.
    pub start: u64,
    /// Payload size in bytes.
    pub size: usize,
    /// Interleave topics (true) or send them one after another.
    pub interleave: bool,
    /// "3.1.1" or "5".
    pub protocol: String,
    /// Outstanding (unacked) readings allowed.
    pub window: usize,
    /// One reading per interval on a fixed schedule (a probe); `None`: as fast as the window
    /// allows.
    pub interval: Option<Duration>,
}

impl PublisherSpec {
    /// `count` readings of 100 B on each topic, interleaved, MQTT 3.1.1.
    pub fn new(port: u16, topics: &[&str], count: u64) -> Self {
        Self {
            port,
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            count,
            start: 0,
            size: 100,
            interleave: true,
            protocol: "3.1.1".to_owned(),
            window: 200,
            interval: None,
        }
    }
}

/// A running `publisher.py`.
#[derive(Debug)]
pub struct Publisher {
    /// The process.
    proc: Proc,
    /// Its acked file: one `<topic> <counter>` line per PUBACK.
    acked: PathBuf,
    /// Created by [`Publisher::stop`]: the publisher stops publishing when it exists.
    stop_file: PathBuf,
    /// One `<topic> <counter> <seconds>` line per PUBACK: publish to PUBACK.
    latencies: PathBuf,
}

/// How a `publisher.py` run ended (its last output line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublisherSummary {
    /// Readings handed to paho.
    pub published: u64,
    /// Readings PUBACKed.
    pub acked: u64,
    /// The connection was lost (closed by the broker, or a network error) before the end.
    pub lost_connection: bool,
}

impl Publisher {
    /// Starts a publisher; its files are `dir/<name>.acked` and `dir/<name>.log`.
    pub fn spawn(dir: &TestDir, name: &str, spec: &PublisherSpec) -> Result<Self> {
        let acked = dir.join(&format!("{name}.acked"));
        let stop_file = dir.join(&format!("{name}.stop"));
        let latencies = dir.join(&format!("{name}.latencies"));
        let mut cmd = Command::new("python3");
        cmd.arg(py_script("publisher.py"))
            .args(["--port", &spec.port.to_string()])
            .args(["--topics", &spec.topics.join(",")])
            .args(["--count", &spec.count.to_string()])
            .args(["--start", &spec.start.to_string()])
            .args(["--size", &spec.size.to_string()])
            .args([
                "--order",
                if spec.interleave {
                    "interleave"
                } else {
                    "sequential"
                },
            ])
            .args(["--protocol", &spec.protocol])
            .args(["--window", &spec.window.to_string()])
            .args(["--client-id", &format!("pub-{name}")])
            .arg("--acked")
            .arg(&acked)
            .arg("--stop-file")
            .arg(&stop_file)
            .arg("--latencies")
            .arg(&latencies);
        if let Some(i) = spec.interval {
            cmd.args(["--interval", &i.as_secs_f64().to_string()]);
        }
        let proc = Proc::spawn(
            &format!("publisher {name}"),
            cmd,
            &dir.join(&format!("{name}.log")),
        )?;
        Ok(Self {
            proc,
            acked,
            stop_file,
            latencies,
        })
    }

    /// Tells it to stop publishing, waits (deadline `timeout`) for it to end after the
    /// outstanding PUBACKs, and returns its summary and everything it saw acked.
    pub fn stop(&mut self, timeout: Duration) -> Result<(PublisherSummary, Vec<(String, u64)>)> {
        File::create(&self.stop_file)?;
        let st = self.proc.wait(timeout)?;
        if !st.success() {
            bail!("publisher failed ({st}):\n{}", tail(self.proc.log(), 20));
        }
        let last = log_lines(self.proc.log()).pop().unwrap_or_default();
        let field = |key: &str| {
            last.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .ok_or_else(|| anyhow!("no {key}= in the publisher's summary {last:?}"))
        };
        let summary = PublisherSummary {
            published: field("published")?.parse()?,
            acked: field("acked")?.parse()?,
            lost_connection: field("lost_connection")? == "True",
        };
        Ok((summary, self.acked()?))
    }

    /// Publish-to-PUBACK time of every reading acked so far.
    pub fn ack_latencies(&self) -> Result<Vec<Duration>> {
        let text = fs::read_to_string(&self.latencies).unwrap_or_default();
        text.lines()
            .map(|l| {
                let secs = l.rsplit(' ').next().unwrap_or_default();
                let secs: f64 = secs
                    .parse()
                    .with_context(|| format!("bad latency line {l:?}"))?;
                Ok(Duration::from_secs_f64(secs))
            })
            .collect()
    }

    /// The (topic, counter) pairs acked so far (complete lines only).
    pub fn acked(&self) -> Result<Vec<(String, u64)>> {
        read_acked(&self.acked)
    }

    /// Waits for it to finish (exit 0 required) and returns everything it saw acked.
    pub fn finish(mut self, timeout: Duration) -> Result<Vec<(String, u64)>> {
        let st = self.proc.wait(timeout)?;
        if !st.success() {
            bail!("publisher failed ({st}):\n{}", tail(self.proc.log(), 20));
        }
        self.acked()
    }

    /// Its stdout/stderr.
    pub fn log(&self) -> &Path {
        self.proc.log()
    }
}

fn read_acked(path: &Path) -> Result<Vec<(String, u64)>> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut out = Vec::new();
    for line in text.split_inclusive('\n') {
        let Some(line) = line.strip_suffix('\n') else {
            break;
        };
        let (t, c) = line
            .rsplit_once(' ')
            .ok_or_else(|| anyhow!("bad acked line {line:?}"))?;
        out.push((t.to_owned(), c.parse()?));
    }
    Ok(out)
}

/// One message a [`Subscriber`] received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Topic as delivered.
    pub topic: String,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// QoS as delivered.
    pub qos: u8,
    /// Retain flag as delivered.
    pub retain: bool,
    /// DUP flag.
    pub dup: bool,
    /// MQTT 5 user properties.
    pub props: BTreeMap<String, String>,
    /// MQTT 5: the length of the whole encoded property block as received (its own length
    /// prefix included); `None` over 3.1.1. See [`publish_packet_size`].
    pub props_len: Option<usize>,
    /// MQTT 5 Content Type property.
    pub content_type: Option<String>,
    /// With [`SubscriberSpec::envelope`]: the decoded CBOR envelope (then `payload` is the
    /// envelope's payload), or why the payload is not one.
    pub envelope: Option<std::result::Result<Envelope, String>>,
}

/// A CBOR envelope as a consumer's cbor2 decoded it (`tests/py/subscriber.py --envelope`).
/// The contract (`[upstream] metadata = "envelope"`): a map {"v": 1, "seq": uint,
/// "ingested_at": uint (Unix ms), "content_type": text (only if the route declares a format),
/// "payload": bytes (the original payload unchanged)}.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Envelope {
    /// The map's keys, in encoded order (non-text keys as Python reprs).
    pub keys: Vec<String>,
    /// Each text key's value type: "uint", "int", "bytes", "text", or a Python type name.
    pub types: BTreeMap<String, String>,
    /// "v" when an integer.
    pub v: Option<u64>,
    /// "seq" when an unsigned integer.
    pub seq: Option<u64>,
    /// "ingested_at" when an unsigned integer.
    pub ingested_at: Option<u64>,
    /// "content_type" when text.
    pub content_type: Option<String>,
}

impl Envelope {
    /// Checks the envelope against the contract, with `content_type` the format the route
    /// declares (`None`: the key must be absent); returns its seq.
    pub fn check(&self, content_type: Option<&str>) -> Result<u64> {
        let mut want: Vec<&str> = vec!["v", "seq", "ingested_at", "payload"];
        if content_type.is_some() {
            want.push("content_type");
        }
        let mut keys: Vec<&str> = self.keys.iter().map(String::as_str).collect();
        keys.sort_unstable();
        want.sort_unstable();
        if keys != want {
            bail!("envelope keys {:?}, the contract says {want:?}", self.keys);
        }
        for (k, t) in [
            ("v", "uint"),
            ("seq", "uint"),
            ("ingested_at", "uint"),
            ("payload", "bytes"),
            ("content_type", "text"),
        ] {
            if let Some(got) = self.types.get(k)
                && got != t
            {
                bail!("envelope {k:?} is a CBOR {got}, the contract says {t}");
            }
        }
        if self.v != Some(1) {
            bail!("envelope v is {:?}, not 1", self.v);
        }
        if self.content_type.as_deref() != content_type {
            bail!(
                "envelope content_type {:?}, the route declares {content_type:?}",
                self.content_type
            );
        }
        // Unix milliseconds: after 2020-01-01 and before 2100.
        let at = self.ingested_at.unwrap_or(0);
        if !(1_577_836_800_000..4_102_444_800_000).contains(&at) {
            bail!("envelope ingested_at {at} is not Unix milliseconds");
        }
        self.seq.ok_or_else(|| anyhow!("envelope without seq"))
    }
}

/// The size in bytes of an MQTT PUBLISH packet at QoS 1 (with a packet identifier) on a topic
/// of `topic_len` bytes (no topic alias) with `payload_len` bytes of payload: fixed header
/// (1 byte + the remaining length's 1-4 bytes) + topic (2 + len) + packet id (2) + over
/// MQTT 5 the property block (`props_len`: its length prefix included) + payload. This is
/// the "packet size" the MQTT 5 Maximum Packet Size limits (spec 3.1.2.11.4 / 3.2.2.3.6).
pub fn publish_packet_size(
    topic_len: usize,
    props_len: Option<usize>,
    payload_len: usize,
) -> usize {
    let remaining = 2 + topic_len + 2 + props_len.unwrap_or(0) + payload_len;
    let len_bytes = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + len_bytes + remaining
}

impl Received {
    /// The size of the PUBLISH packet that carried it (see [`publish_packet_size`]): with
    /// QoS 1 on both hops and mosquitto passing properties through unchanged, also the size
    /// of the packet the gateway sent. Not meaningful with [`SubscriberSpec::envelope`].
    pub fn packet_size(&self) -> usize {
        publish_packet_size(self.topic.len(), self.props_len, self.payload.len())
    }
}

/// What a [`Subscriber`] does.
#[derive(Debug, Clone)]
pub struct SubscriberSpec {
    /// Broker port on 127.0.0.1.
    pub port: u16,
    /// Topic filters.
    pub topics: Vec<String>,
    /// Requested QoS.
    pub qos: u8,
    /// "5" or "3.1.1".
    pub protocol: String,
    /// Client id ("" = broker assigned; set one with a persistent session).
    pub client_id: String,
    /// Persistent session with this expiry (seconds), reconnecting after broker restarts.
    pub session_expiry: Option<u32>,
    /// Decode every payload as the gateway's CBOR envelope ([`Received::envelope`]).
    pub envelope: bool,
}

impl SubscriberSpec {
    /// MQTT 5, QoS 1, clean session, on one filter.
    pub fn new(port: u16, filter: &str) -> Self {
        Self {
            port,
            topics: vec![filter.to_owned()],
            qos: 1,
            protocol: "5".to_owned(),
            client_id: String::new(),
            session_expiry: None,
            envelope: false,
        }
    }
}

/// A running `subscriber.py`, recording to `dir/<name>.jsonl`.
#[derive(Debug)]
pub struct Subscriber {
    /// The process.
    proc: Proc,
    /// JSON lines, one per message.
    out: PathBuf,
    /// Created on SUBACK.
    ready: PathBuf,
}

impl Subscriber {
    /// Starts it and waits (deadline 30 s) for its SUBACK.
    pub fn spawn(dir: &TestDir, name: &str, spec: &SubscriberSpec) -> Result<Self> {
        let out = dir.join(&format!("{name}.jsonl"));
        let ready = dir.join(&format!("{name}.ready"));
        let mut cmd = Command::new("python3");
        cmd.arg(py_script("subscriber.py"))
            .args(["--port", &spec.port.to_string()])
            .args(["--qos", &spec.qos.to_string()])
            .args(["--protocol", &spec.protocol])
            .args(["--client-id", &spec.client_id])
            .arg("--out")
            .arg(&out)
            .arg("--ready")
            .arg(&ready);
        for t in &spec.topics {
            cmd.args(["--topic", t]);
        }
        if let Some(e) = spec.session_expiry {
            cmd.args(["--session-expiry", &e.to_string()]);
        }
        if spec.envelope {
            cmd.arg("--envelope");
        }
        let mut proc = Proc::spawn(
            &format!("subscriber {name}"),
            cmd,
            &dir.join(&format!("{name}.log")),
        )?;
        let log = proc.log().to_path_buf();
        wait_for(
            &format!("subscriber {name} to be subscribed"),
            Duration::from_secs(30),
            || {
                if let Ok(Some(st)) = proc.try_status() {
                    return Some(Err(anyhow!(
                        "subscriber exited ({st}):\n{}",
                        tail(&log, 20)
                    )));
                }
                ready.exists().then_some(Ok(()))
            },
        )??;
        Ok(Self { proc, out, ready })
    }

    /// Everything received so far, in arrival order (complete lines only).
    pub fn messages(&self) -> Result<Vec<Received>> {
        let text = fs::read_to_string(&self.out).unwrap_or_default();
        let mut v = Vec::new();
        for line in text.split_inclusive('\n') {
            let Some(line) = line.strip_suffix('\n') else {
                break;
            };
            let j: Value =
                serde_json::from_str(line).with_context(|| format!("bad line {line:?}"))?;
            let hex = j["payload_hex"].as_str().unwrap_or_default();
            let payload = decode_hex(hex).ok_or_else(|| anyhow!("bad hex in {line:?}"))?;
            let props = string_map(&j["props"]);
            let envelope = if let Some(e) = j.get("envelope_error") {
                Some(Err(e.as_str().unwrap_or_default().to_owned()))
            } else {
                j.get("envelope").map(|e| Ok(parse_envelope(e)))
            };
            v.push(Received {
                topic: j["topic"].as_str().unwrap_or_default().to_owned(),
                payload,
                qos: u8::try_from(j["qos"].as_u64().unwrap_or(9)).unwrap_or(9),
                retain: j["retain"].as_bool().unwrap_or(false),
                dup: j["dup"].as_bool().unwrap_or(false),
                props,
                props_len: j["props_len"]
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok()),
                content_type: j["content_type"].as_str().map(str::to_owned),
                envelope,
            });
        }
        Ok(v)
    }

    /// Number of messages received so far.
    pub fn count(&self) -> usize {
        fs::read(&self.out).map_or(0, |b| b.iter().filter(|c| **c == b'\n').count())
    }

    /// Whether the process is still running (it exits 3 when a clean-session connection drops).
    pub fn alive(&mut self) -> bool {
        self.proc.try_status().ok().flatten().is_none()
    }

    /// Its stdout/stderr.
    pub fn log(&self) -> &Path {
        self.proc.log()
    }

    /// The ready marker (exists once subscribed).
    pub fn ready_path(&self) -> &Path {
        &self.ready
    }
}

/// An `"envelope"` object of subscriber.py's output.
fn parse_envelope(e: &Value) -> Envelope {
    Envelope {
        keys: e["keys"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|k| k.as_str().unwrap_or_default().to_owned())
                    .collect()
            })
            .unwrap_or_default(),
        types: string_map(&e["types"]),
        v: e["v"].as_u64(),
        seq: e["seq"].as_u64(),
        ingested_at: e["ingested_at"].as_u64(),
        content_type: e["content_type"].as_str().map(str::to_owned),
    }
}

/// A JSON object's string values by key (non-strings as ""); empty if `v` is not an object.
fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let b = hex.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

/// A running `client.py` (one connection, events as lines on stdout).
#[derive(Debug)]
pub struct Client {
    /// The process.
    proc: Proc,
}

impl Client {
    /// Starts `client.py --port <port> <args>`; output in `dir/<name>.log`.
    pub fn spawn(dir: &TestDir, name: &str, port: u16, args: &[&str]) -> Result<Self> {
        let mut cmd = Command::new("python3");
        cmd.arg(py_script("client.py"))
            .args(["--port", &port.to_string()])
            .args(args);
        let proc = Proc::spawn(
            &format!("client {name}"),
            cmd,
            &dir.join(&format!("{name}.log")),
        )?;
        Ok(Self { proc })
    }

    /// Output lines so far.
    pub fn lines(&self) -> Vec<String> {
        log_lines(self.proc.log())
    }

    /// Waits for an output line starting with `prefix` and returns it.
    pub fn wait_line(&self, prefix: &str, timeout: Duration) -> Result<String> {
        wait_for(
            &format!(
                "a line starting with {prefix:?} from {}",
                self.proc.log().display()
            ),
            timeout,
            || self.lines().into_iter().find(|l| l.starts_with(prefix)),
        )
        .with_context(|| format!("client output so far:\n{}", tail(self.proc.log(), 20)))
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        self.proc.try_status().ok().flatten().is_none()
    }

    /// The process (for signals and waiting).
    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

/// The lines of a (growing) log file so far; none if it cannot be read.
fn log_lines(path: &Path) -> Vec<String> {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        f.read_to_string(&mut s).ok();
    }
    s.lines().map(str::to_owned).collect()
}

// ---------------------------------------------------------------------------------------------
// Mosquitto command-line clients
// ---------------------------------------------------------------------------------------------

/// Runs `openssl <args>` in `dir` (test certificates and keys), requiring success.
pub fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running openssl")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Runs `mosquitto_pub -h 127.0.0.1 -p <port> <args>` to completion (deadline 30 s).
pub fn mosquitto_pub(port: u16, args: &[&str]) -> Result<Output> {
    let mut child = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting mosquitto_pub")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if Instant::now() > deadline {
            child.kill().ok();
            let out = child.wait_with_output()?;
            bail!(
                "mosquitto_pub {args:?} hung: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `mosquitto_pub` and requires exit 0.
pub fn mosquitto_pub_ok(port: u16, args: &[&str]) -> Result<()> {
    let out = mosquitto_pub(port, args)?;
    if !out.status.success() {
        bail!(
            "mosquitto_pub {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Starts `mosquitto_sub -h 127.0.0.1 -p <port> <args>` with output in `dir/<name>.log`.
pub fn spawn_mosquitto_sub(dir: &TestDir, name: &str, port: u16, args: &[&str]) -> Result<Proc> {
    // Line-buffered stdout (coreutils stdbuf): mosquitto_sub's `-d` lines (CONNACK, SUBACK) are
    // otherwise block-buffered into the file and a test cannot see that it is subscribed.
    let mut cmd = Command::new("stdbuf");
    cmd.args([
        "-oL",
        "mosquitto_sub",
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
    ])
    .args(args);
    Proc::spawn(
        &format!("mosquitto_sub {name}"),
        cmd,
        &dir.join(&format!("{name}.log")),
    )
}

// ---------------------------------------------------------------------------------------------
// Checking what arrived upstream
// ---------------------------------------------------------------------------------------------

/// What [`check_upstream_delivery`] found.
#[derive(Debug, Clone, Default)]
pub struct Delivery {
    /// Distinct sensor readings received upstream.
    pub distinct: usize,
    /// Copies received beyond the first (at-least-once duplicates).
    pub duplicates: usize,
    /// Readings received that the publishers never saw acked (stored, ack lost in a crash).
    pub unacked_extras: usize,
}

/// Where [`check_upstream_delivery`] finds each record's `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqSource {
    /// Nowhere (MQTT 3.1.1 without metadata): duplicates are recognised by payload only.
    Nothing,
    /// The MQTT 5 user property `seq` (decimal).
    UserProperty,
    /// The CBOR envelope's `seq` (the subscriber decoded it: [`SubscriberSpec::envelope`]);
    /// every envelope is checked against the contract ([`Envelope::check`], no content type).
    Envelope,
}

/// Checks the upstream contract over `msgs` (in arrival order) for readings published with
/// [`payload`] of `size` bytes on `topics`; messages on other topics (the gateway's own birth,
/// health, ...) are ignored. Fails, naming the first violation, unless:
/// - each reading on local topic T arrived on `outpost/<node>/T` with its payload unchanged;
/// - every `acked` reading arrived;
/// - per topic, the first copies arrive with increasing counters (order kept);
/// - with a `seq` source: every message has a `seq`, distinct readings have distinct seqs,
///   and a duplicate carries the seq of its reading's first copy; with the envelope, every
///   message is a valid envelope.
pub fn check_upstream_delivery(
    msgs: &[Received],
    node: &str,
    topics: &[String],
    size: usize,
    acked: &[(String, u64)],
    seq: SeqSource,
) -> Result<Delivery> {
    let prefix = format!("outpost/{node}/");
    let topics: std::collections::BTreeSet<&str> = topics.iter().map(String::as_str).collect();
    let mut first: BTreeMap<(String, u64), Option<u64>> = BTreeMap::new();
    let mut seq_owner: BTreeMap<u64, (String, u64)> = BTreeMap::new();
    let mut last_counter: BTreeMap<String, u64> = BTreeMap::new();
    let mut d = Delivery::default();
    for (i, m) in msgs.iter().enumerate() {
        let Some(local) = m.topic.strip_prefix(&prefix) else {
            continue;
        };
        if !topics.contains(local) {
            continue;
        }
        if seq == SeqSource::Envelope {
            match &m.envelope {
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("message #{i} on {}: not an envelope: {e}", m.topic),
                None => bail!(
                    "message #{i} on {}: the subscriber did not decode envelopes (SubscriberSpec::envelope)",
                    m.topic
                ),
            }
        }
        let (t, c) = parse_payload(&m.payload).ok_or_else(|| {
            anyhow!(
                "message #{i} on {} has a payload no sensor sent: {:?}",
                m.topic,
                String::from_utf8_lossy(&m.payload)
            )
        })?;
        if t != local {
            bail!(
                "message #{i}: reading published on {t} arrived on {}",
                m.topic
            );
        }
        if m.payload != payload(&t, c, size) {
            bail!(
                "message #{i}: payload of {t}#{c} changed: {:?}",
                String::from_utf8_lossy(&m.payload)
            );
        }
        let s = match seq {
            SeqSource::Nothing => None,
            SeqSource::UserProperty => {
                let raw = m.props.get("seq").ok_or_else(|| {
                    anyhow!("message #{i} ({t}#{c}) has no seq property: {:?}", m.props)
                })?;
                Some(
                    raw.parse::<u64>()
                        .with_context(|| format!("message #{i}: seq {raw:?} is not decimal"))?,
                )
            }
            SeqSource::Envelope => {
                let env = match &m.envelope {
                    Some(Ok(e)) => e,
                    _ => bail!("message #{i}: no envelope"),
                };
                Some(
                    env.check(None)
                        .with_context(|| format!("message #{i} ({t}#{c})"))?,
                )
            }
        };
        match first.get(&(t.clone(), c)) {
            Some(prev) => {
                if *prev != s {
                    bail!(
                        "message #{i}: duplicate of {t}#{c} has seq {s:?}, its first copy had {prev:?}"
                    );
                }
                d.duplicates += 1;
            }
            None => {
                if let Some(s) = s
                    && let Some(owner) = seq_owner.insert(s, (t.clone(), c))
                {
                    bail!(
                        "message #{i}: seq {s} carried by both {}#{} and {t}#{c}",
                        owner.0,
                        owner.1
                    );
                }
                if let Some(&last) = last_counter.get(&t)
                    && c < last
                {
                    bail!(
                        "message #{i}: order broken on {t}: reading {c} first arrived after reading {last}"
                    );
                }
                last_counter.insert(t.clone(), c);
                first.insert((t, c), s);
                d.distinct += 1;
            }
        }
    }
    let missing: Vec<&(String, u64)> = acked.iter().filter(|k| !first.contains_key(*k)).collect();
    if !missing.is_empty() {
        bail!(
            "{} acked readings never arrived upstream (of {} acked; {} distinct received); first missing: {:?}",
            missing.len(),
            acked.len(),
            d.distinct,
            &missing[..missing.len().min(10)]
        );
    }
    let acked_set: std::collections::BTreeSet<&(String, u64)> = acked.iter().collect();
    d.unacked_extras = first.keys().filter(|k| !acked_set.contains(k)).count();
    Ok(d)
}

/// Waits until `sub` has received every reading in `want` (any number of copies), checking
/// `outpost` stays alive. Returns all messages received.
pub fn wait_for_readings(
    sub: &Subscriber,
    outpost: &mut Outpost,
    want: &[(String, u64)],
    timeout: Duration,
) -> Result<Vec<Received>> {
    let want: std::collections::BTreeSet<&(String, u64)> = want.iter().collect();
    let mut missing = want.len();
    let r = wait_for("every acked reading upstream", timeout, || {
        if let Err(e) = outpost.check_alive() {
            return Some(Err(e));
        }
        // Counting lines is cheap; parse everything only once enough lines are there.
        if sub.count() < want.len() {
            return None;
        }
        let msgs = sub.messages().ok()?;
        let got: std::collections::BTreeSet<(String, u64)> = msgs
            .iter()
            .filter_map(|m| parse_payload(&m.payload))
            .collect();
        missing = want.iter().filter(|k| !got.contains(**k)).count();
        (missing == 0).then_some(Ok(msgs))
    });
    match r {
        Ok(r) => r,
        Err(e) => Err(e.context(format!(
            "{missing} of {} acked readings still missing upstream",
            want.len()
        ))),
    }
}

#[cfg(test)]
mod tests {
    //! The delivery checker must be able to fail: each broken stream below is rejected.

    use super::*;

    fn msg(topic: &str, counter: u64, seq: Option<u64>) -> Received {
        Received {
            topic: format!("outpost/gw1/{topic}"),
            payload: payload(topic, counter, 20),
            qos: 1,
            retain: false,
            dup: false,
            props: seq
                .map(|s| [("seq".to_owned(), s.to_string())].into())
                .unwrap_or_default(),
            props_len: None,
            content_type: None,
            envelope: None,
        }
    }

    /// `msg` as the envelope subscriber records it: seq in the envelope, not in properties.
    fn env_msg(topic: &str, counter: u64, seq: u64) -> Received {
        let mut m = msg(topic, counter, None);
        m.envelope = Some(Ok(envelope(seq)));
        m
    }

    fn envelope(seq: u64) -> Envelope {
        Envelope {
            keys: ["v", "seq", "ingested_at", "payload"]
                .map(str::to_owned)
                .to_vec(),
            types: [
                ("v", "uint"),
                ("seq", "uint"),
                ("ingested_at", "uint"),
                ("payload", "bytes"),
            ]
            .map(|(k, t)| (k.to_owned(), t.to_owned()))
            .into(),
            v: Some(1),
            seq: Some(seq),
            ingested_at: Some(1_800_000_000_000),
            content_type: None,
        }
    }

    fn check_with(msgs: &[Received], acked: &[(String, u64)], seq: SeqSource) -> Result<Delivery> {
        check_upstream_delivery(
            msgs,
            "gw1",
            &["a".to_owned(), "b".to_owned()],
            20,
            acked,
            seq,
        )
    }

    fn check(msgs: &[Received], acked: &[(String, u64)]) -> Result<Delivery> {
        check_with(msgs, acked, SeqSource::UserProperty)
    }

    fn acked(n: u64) -> Vec<(String, u64)> {
        (0..n).map(|c| ("a".to_owned(), c)).collect()
    }

    #[test]
    fn accepts_in_order_with_duplicates_of_the_same_seq() {
        let m = [
            msg("a", 0, Some(1)),
            msg("a", 1, Some(2)),
            msg("a", 0, Some(1)),
            msg("a", 2, Some(3)),
        ];
        let d = check(&m, &acked(3)).expect("valid stream");
        assert_eq!((d.distinct, d.duplicates), (3, 1));
    }

    #[test]
    fn rejects_a_missing_acked_reading() {
        let m = [msg("a", 0, Some(1)), msg("a", 2, Some(3))];
        assert!(check(&m, &acked(3)).is_err());
    }

    #[test]
    fn rejects_reordering() {
        let m = [msg("a", 1, Some(2)), msg("a", 0, Some(1))];
        assert!(check(&m, &acked(2)).is_err());
    }

    #[test]
    fn rejects_a_duplicate_with_a_new_seq_and_a_shared_seq() {
        let dup = [msg("a", 0, Some(1)), msg("a", 0, Some(7))];
        assert!(check(&dup, &acked(1)).is_err());
        let shared = [msg("a", 0, Some(1)), msg("b", 0, Some(1))];
        assert!(check(&shared, &acked(1)).is_err());
    }

    #[test]
    fn rejects_missing_seq_changed_payload_and_wrong_topic() {
        assert!(check(&[msg("a", 0, None)], &acked(1)).is_err());
        let mut changed = msg("a", 0, Some(1));
        changed.payload.push(b'!');
        assert!(check(&[changed], &acked(1)).is_err());
        let mut moved = msg("a", 0, Some(1));
        moved.topic = "outpost/gw1/b".to_owned();
        assert!(check(&[moved], &acked(1)).is_err());
    }

    #[test]
    fn envelope_seq_dedupes_and_must_be_there() {
        let env = SeqSource::Envelope;
        let ok = [env_msg("a", 0, 1), env_msg("a", 1, 2), env_msg("a", 0, 1)];
        let d = check_with(&ok, &acked(2), env).expect("valid envelope stream");
        assert_eq!((d.distinct, d.duplicates), (2, 1));
        // A duplicate with another seq, a user property instead of an envelope, a payload
        // that did not decode.
        let dup = [env_msg("a", 0, 1), env_msg("a", 0, 5)];
        assert!(check_with(&dup, &acked(1), env).is_err());
        assert!(check_with(&[msg("a", 0, Some(1))], &acked(1), env).is_err());
        let mut bad = env_msg("a", 0, 1);
        bad.envelope = Some(Err("not CBOR".to_owned()));
        assert!(check_with(&[bad], &acked(1), env).is_err());
    }

    #[test]
    fn envelope_contract_is_checked() {
        assert_eq!(envelope(7).check(None).ok(), Some(7));
        let mut v2 = envelope(7);
        v2.v = Some(2);
        assert!(v2.check(None).is_err());
        let mut text_payload = envelope(7);
        text_payload
            .types
            .insert("payload".to_owned(), "text".to_owned());
        assert!(text_payload.check(None).is_err());
        let mut extra = envelope(7);
        extra.keys.push("source".to_owned());
        assert!(extra.check(None).is_err());
        let mut ct = envelope(7);
        ct.keys.push("content_type".to_owned());
        ct.types
            .insert("content_type".to_owned(), "text".to_owned());
        ct.content_type = Some("application/json".to_owned());
        assert!(
            ct.check(None).is_err(),
            "content type without a route format"
        );
        assert_eq!(ct.check(Some("application/json")).ok(), Some(7));
        assert!(envelope(7).check(Some("application/json")).is_err());
        let mut seconds = envelope(7);
        seconds.ingested_at = Some(1_800_000_000);
        assert!(seconds.check(None).is_err(), "ingested_at in seconds");
    }

    #[test]
    fn publish_packet_size_counts_every_byte() {
        // 3.1.1, topic "a", 1 byte payload: 0x32 len=6 | 00 01 'a' | pkid(2) | 'x'.
        assert_eq!(publish_packet_size(1, None, 1), 8);
        // The remaining length grows a byte at 128 and 16,384.
        assert_eq!(publish_packet_size(1, None, 122), 2 + 127);
        assert_eq!(publish_packet_size(1, None, 123), 3 + 128);
        assert_eq!(publish_packet_size(1, None, 16_378), 3 + 16_383);
        assert_eq!(publish_packet_size(1, None, 16_379), 4 + 16_384);
        // MQTT 5 with an empty property block (one byte: its length, 0).
        assert_eq!(publish_packet_size(1, Some(1), 1), 9);
    }
}

// ---------------------------------------------------------------------------------------------
// CoAP: configuration, a raw message codec, libcoap's and aiocoap's clients, a device
// ---------------------------------------------------------------------------------------------
//
// The CoAP scenarios (`tests/tests/coap_*.rs`) need `coap-client-notls` (apt `libcoap3-bin`)
// and `python3` with `aiocoap` and `LinkHeader` (pip); `scripts/install-test-deps.sh` installs
// them. CoAP runs over UDP on 127.0.0.1, on ports from [`free_udp_port`].

/// A UDP port that was free a moment ago on 127.0.0.1 (bound to :0, read, released).
pub fn free_udp_port() -> Result<u16> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").context("binding udp 127.0.0.1:0")?;
    Ok(s.local_addr()?.port())
}

/// A `[coap]` table listening on udp 127.0.0.1:`port`, ingest path `t`, topic prefix
/// `sensors`, 64 KiB bodies: POST `coap://127.0.0.1:<port>/t/a/b` is a reading on `sensors/a/b`.
/// Put it in [`GatewayConfig::extra`].
pub fn coap_section(port: u16) -> String {
    format!(
        "[coap]\nlisteners = [\"127.0.0.1:{port}\"]\ningest_path = \"t\"\ntopic_prefix = \"sensors\"\nmax_payload = \"64KiB\"\n\n"
    )
}

/// A `[[route]]` to the cloud with a declared payload `format` and `store` mode ("original" or
/// "normalised"), for [`GatewayConfig::extra`] (TOML appends it to the routes rendered before).
pub fn format_route(filter: &str, format: &str, store: &str) -> String {
    format!(
        "[[route]]\nfilter = \"{filter}\"\ntarget = \"cloud\"\npriority = \"normal\"\nformat = \"{format}\"\nstore = \"{store}\"\n\n"
    )
}

/// CoAP message types (RFC 7252 section 3).
pub mod coap_type {
    /// Confirmable.
    pub const CON: u8 = 0;
    /// Non-confirmable.
    pub const NON: u8 = 1;
    /// Acknowledgement.
    pub const ACK: u8 = 2;
    /// Reset.
    pub const RST: u8 = 3;
}

/// CoAP option numbers used by the scenarios.
pub mod coap_opt {
    /// Observe (RFC 7641).
    pub const OBSERVE: u16 = 6;
    /// Uri-Path, one per segment.
    pub const URI_PATH: u16 = 11;
    /// Content-Format.
    pub const CONTENT_FORMAT: u16 = 12;
    /// Max-Age.
    pub const MAX_AGE: u16 = 14;
    /// Uri-Query.
    pub const URI_QUERY: u16 = 15;
    /// Block2.
    pub const BLOCK2: u16 = 23;
    /// Block1.
    pub const BLOCK1: u16 = 27;
    /// Size1.
    pub const SIZE1: u16 = 60;
}

/// One CoAP message, as the scenarios build and read them on a raw UDP socket (an independent
/// codec, so a test does not trust the gateway's own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoapMessage {
    /// [`coap_type`].
    pub mtype: u8,
    /// Code as class*32 + detail (POST = 2, 2.01 = 65).
    pub code: u8,
    /// Message id.
    pub mid: u16,
    /// Token (0..=8 bytes).
    pub token: Vec<u8>,
    /// Options (number, value), in any order (sorted when encoded).
    pub options: Vec<(u16, Vec<u8>)>,
    /// Payload.
    pub payload: Vec<u8>,
}

impl CoapMessage {
    /// A request `code` (1 GET, 2 POST, 3 PUT) for `path` ("t/a/b", no leading '/').
    pub fn request(mtype: u8, code: u8, mid: u16, token: &[u8], path: &str) -> Self {
        let options = path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| (coap_opt::URI_PATH, s.as_bytes().to_vec()))
            .collect();
        Self {
            mtype,
            code,
            mid,
            token: token.to_vec(),
            options,
            payload: Vec::new(),
        }
    }

    /// The empty ACK of confirmable message `mid`.
    pub fn empty_ack(mid: u16) -> Self {
        Self {
            mtype: coap_type::ACK,
            code: 0,
            mid,
            token: Vec::new(),
            options: Vec::new(),
            payload: Vec::new(),
        }
    }

    /// `code` as "c.dd" (e.g. "2.01").
    pub fn code_str(&self) -> String {
        format!("{}.{:02}", self.code >> 5, self.code & 0x1f)
    }

    /// Adds an option with an unsigned integer value (minimal length encoding).
    pub fn with_uint(mut self, number: u16, value: u32) -> Self {
        let bytes = value.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        self.options.push((number, bytes[skip..].to_vec()));
        self
    }

    /// The first value of option `number` as an unsigned integer.
    pub fn uint_option(&self, number: u16) -> Option<u32> {
        let (_, v) = self.options.iter().find(|(n, _)| *n == number)?;
        (v.len() <= 4).then(|| v.iter().fold(0u32, |acc, b| acc << 8 | u32::from(*b)))
    }

    /// The datagram.
    pub fn encode(&self) -> Vec<u8> {
        fn ext(v: usize) -> (u8, Vec<u8>) {
            if v < 13 {
                (v as u8, vec![])
            } else if v < 269 {
                (13, vec![(v - 13) as u8])
            } else {
                (14, ((v - 269) as u16).to_be_bytes().to_vec())
            }
        }
        let mut out = vec![
            0x40 | (self.mtype & 3) << 4 | (self.token.len() as u8 & 0x0f),
            self.code,
        ];
        out.extend_from_slice(&self.mid.to_be_bytes());
        out.extend_from_slice(&self.token);
        let mut opts = self.options.clone();
        opts.sort_by_key(|(n, _)| *n);
        let mut last = 0u16;
        for (n, v) in &opts {
            let (dn, dext) = ext(usize::from(n - last));
            let (ln, lext) = ext(v.len());
            out.push(dn << 4 | ln);
            out.extend(dext);
            out.extend(lext);
            out.extend_from_slice(v);
            last = *n;
        }
        if !self.payload.is_empty() {
            out.push(0xff);
            out.extend_from_slice(&self.payload);
        }
        out
    }

    /// Parses a datagram.
    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() < 4 || b[0] >> 6 != 1 {
            bail!("not a CoAP v1 message: {b:02x?}");
        }
        let tkl = usize::from(b[0] & 0x0f);
        if tkl > 8 || b.len() < 4 + tkl {
            bail!("bad token length in {b:02x?}");
        }
        let mut m = Self {
            mtype: b[0] >> 4 & 3,
            code: b[1],
            mid: u16::from_be_bytes([b[2], b[3]]),
            token: b[4..4 + tkl].to_vec(),
            options: Vec::new(),
            payload: Vec::new(),
        };
        let mut i = 4 + tkl;
        let mut number = 0u16;
        let take_ext = |nib: u8, i: &mut usize| -> Result<usize> {
            Ok(match nib {
                13 => {
                    let v = *b.get(*i).ok_or_else(|| anyhow!("truncated option"))?;
                    *i += 1;
                    usize::from(v) + 13
                }
                14 => {
                    let v = b
                        .get(*i..*i + 2)
                        .ok_or_else(|| anyhow!("truncated option"))?;
                    *i += 2;
                    usize::from(u16::from_be_bytes([v[0], v[1]])) + 269
                }
                15 => bail!("reserved option nibble"),
                n => usize::from(n),
            })
        };
        while i < b.len() {
            if b[i] == 0xff {
                m.payload = b[i + 1..].to_vec();
                break;
            }
            let head = b[i];
            i += 1;
            let delta = take_ext(head >> 4, &mut i)?;
            let len = take_ext(head & 0x0f, &mut i)?;
            number = number
                .checked_add(u16::try_from(delta)?)
                .ok_or_else(|| anyhow!("option number overflow"))?;
            let v = b
                .get(i..i + len)
                .ok_or_else(|| anyhow!("truncated option value"))?;
            m.options.push((number, v.to_vec()));
            i += len;
        }
        Ok(m)
    }
}

/// A UDP socket on 127.0.0.1 talking raw CoAP to 127.0.0.1:`port`.
#[derive(Debug)]
pub struct RawCoap {
    /// The socket (connected to the server).
    pub socket: std::net::UdpSocket,
}

impl RawCoap {
    /// A fresh socket towards udp 127.0.0.1:`port`.
    pub fn new(port: u16) -> Result<Self> {
        Self::from_addr(std::net::Ipv4Addr::LOCALHOST, port)
    }

    /// A fresh socket on `addr` (any of 127.0.0.0/8: a source host of its own) towards udp
    /// 127.0.0.1:`port`.
    pub fn from_addr(addr: std::net::Ipv4Addr, port: u16) -> Result<Self> {
        let socket = std::net::UdpSocket::bind((addr, 0))
            .with_context(|| format!("binding udp {addr}:0"))?;
        socket.connect(("127.0.0.1", port))?;
        Ok(Self { socket })
    }

    /// Sends one datagram.
    pub fn send(&self, datagram: &[u8]) -> Result<()> {
        self.socket.send(datagram)?;
        Ok(())
    }

    /// The next datagram within `timeout` (None when none came), decoded, with its raw bytes.
    pub fn recv(&self, timeout: Duration) -> Result<Option<(CoapMessage, Vec<u8>)>> {
        self.socket.set_read_timeout(Some(timeout))?;
        let mut buf = vec![0u8; 65536];
        match self.socket.recv(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                Ok(Some((CoapMessage::decode(&buf)?, buf)))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            // An ICMP port unreachable from an earlier send (nothing listening yet).
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// Waits (deadline `timeout`) until a CoAP server answers a GET /.well-known/core on udp
/// 127.0.0.1:`port`; returns the answer.
pub fn wait_coap(port: u16, timeout: Duration) -> Result<CoapMessage> {
    let raw = RawCoap::new(port)?;
    let mut mid: u16 = 0x7000;
    wait_for(
        &format!("a CoAP server on udp 127.0.0.1:{port}"),
        timeout,
        || {
            mid = mid.wrapping_add(1);
            let req = CoapMessage::request(coap_type::CON, 1, mid, b"wk", ".well-known/core");
            raw.send(&req.encode()).ok()?;
            let deadline = Instant::now() + Duration::from_millis(500);
            while Instant::now() < deadline {
                match raw.recv(Duration::from_millis(100)) {
                    Ok(Some((m, _))) if m.mid == mid => return Some(m),
                    _ => {}
                }
            }
            None
        },
    )
}

/// What `coap-client-notls -v 6` showed of one exchange.
#[derive(Debug, Clone)]
pub struct CoapCli {
    /// The response code of the last response line ("2.01"), None if no response came.
    pub code: Option<String>,
    /// That response's payload as the tool logged it (text between `:: '` and the final `'`).
    pub payload: Option<String>,
    /// Every line of its output (stdout and stderr).
    pub output: String,
}

/// Runs `coap-client-notls -v 6 <args>` (deadline `timeout`). It exits 0 even when the server
/// answers an error, so the result is read from its log lines
/// (`v:1 t:ACK c:2.01 i:... {token} [ options ] :: 'payload'`): the last line whose code is a
/// response class (2..5) is the final response (after a block-wise transfer, the last block's).
pub fn coap_client_notls(args: &[&str], timeout: Duration) -> Result<CoapCli> {
    let mut child = Command::new("coap-client-notls")
        .arg("-v")
        .arg("6")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting coap-client-notls (apt libcoap3-bin)")?;
    let deadline = Instant::now() + timeout;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            child.kill().ok();
            let out = child.wait_with_output()?;
            bail!(
                "coap-client-notls {args:?} hung:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(parse_coap_client_output(output))
}

/// See [`coap_client_notls`].
pub fn parse_coap_client_output(output: String) -> CoapCli {
    let mut code = None;
    let mut payload = None;
    for line in output.lines() {
        let Some(pos) = line.find("v:1 t:") else {
            continue;
        };
        let line = &line[pos..];
        let Some(c) = line.split_whitespace().find_map(|w| w.strip_prefix("c:")) else {
            continue;
        };
        let is_response =
            c.len() == 4 && c.as_bytes()[1] == b'.' && matches!(c.as_bytes()[0], b'2'..=b'5');
        if !is_response {
            continue;
        }
        code = Some(c.to_owned());
        payload = line.find(" :: '").map(|p| {
            line[p + 5..]
                .strip_suffix('\'')
                .unwrap_or(&line[p + 5..])
                .to_owned()
        });
    }
    CoapCli {
        code,
        payload,
        output,
    }
}

/// Runs `tests/py/coap_client.py <args>` (aiocoap) to completion (deadline `timeout`), output
/// appended to `dir/<name>.log`; returns its exit code and its JSON output lines.
pub fn coap_py(
    dir: &TestDir,
    name: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<(i32, Vec<Value>)> {
    let log = dir.join(&format!("{name}.log"));
    let mut cmd = Command::new("python3");
    cmd.arg(py_script("coap_client.py")).args(args);
    let mut proc = Proc::spawn(&format!("coap_client.py {name}"), cmd, &log)?;
    let st = proc
        .wait(timeout)
        .with_context(|| format!("coap_client.py {args:?}:\n{}", tail(&log, 30)))?;
    let text = fs::read_to_string(&log).unwrap_or_default();
    let lines = text
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    Ok((st.code().unwrap_or(-1), lines))
}

/// `outpost dead-letters --config <file> --json`, parsed.
pub fn outpost_dead_letters(config: &Path) -> Result<Value> {
    let out = outpost_command()?
        .arg("dead-letters")
        .arg("--config")
        .arg(config)
        .arg("--json")
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "outpost dead-letters failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "dead-letters output is not JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A running `tests/py/coap_device.py`: an aiocoap server with an observable JSON resource.
#[derive(Debug)]
pub struct CoapDevice {
    /// The process.
    proc: Proc,
}

impl CoapDevice {
    /// Starts it on udp 127.0.0.1:`port` serving `/<path>` (changing every `interval_ms`, each
    /// representation `{"boot": boot, "n": N}` with Max-Age `max_age` s), output in
    /// `dir/<name>.log`, and waits for it to listen.
    pub fn spawn(
        dir: &TestDir,
        name: &str,
        port: u16,
        path: &str,
        boot: u32,
        interval_ms: u64,
        max_age: u32,
    ) -> Result<Self> {
        let mut cmd = Command::new("python3");
        cmd.arg(py_script("coap_device.py"))
            .args(["--port", &port.to_string()])
            .args(["--path", path])
            .args(["--boot", &boot.to_string()])
            .args(["--interval", &format!("{}", interval_ms as f64 / 1000.0)])
            .args(["--max-age", &max_age.to_string()]);
        let mut proc = Proc::spawn(
            &format!("coap device {name} (boot {boot})"),
            cmd,
            &dir.join(&format!("{name}.log")),
        )?;
        let log = proc.log().to_path_buf();
        // A port that was just released may be taken again at once for UDP; the device exits
        // if it cannot bind, which the wait reports.
        wait_for(
            &format!("coap device {name} to listen"),
            Duration::from_secs(30),
            || {
                if let Ok(Some(st)) = proc.try_status() {
                    return Some(Err(anyhow!("device exited ({st}):\n{}", tail(&log, 20))));
                }
                fs::read_to_string(&log)
                    .ok()?
                    .contains(&format!("listening {port}"))
                    .then_some(Ok(()))
            },
        )??;
        Ok(Self { proc })
    }

    /// Lines of its output.
    pub fn lines(&self) -> Vec<String> {
        fs::read_to_string(self.proc.log())
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The last `observers <n>` it printed (0 if none yet).
    pub fn observers(&self) -> u64 {
        self.lines()
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix("observers ")?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// SIGKILL: the device dies without telling anyone.
    pub fn kill(&mut self) -> Result<()> {
        self.proc.kill()?;
        Ok(())
    }
}

#[cfg(test)]
mod coap_codec_tests {
    use super::*;

    #[test]
    fn coap_message_round_trips() -> Result<()> {
        let mut m = CoapMessage::request(coap_type::CON, 2, 0x1234, b"tk", "t/room/temp")
            .with_uint(coap_opt::CONTENT_FORMAT, 112)
            .with_uint(coap_opt::SIZE1, 6000);
        m.options.push((300, vec![7; 300]));
        m.payload = b"hello".to_vec();
        let bytes = m.encode();
        let back = CoapMessage::decode(&bytes)?;
        assert_eq!(back.uint_option(coap_opt::CONTENT_FORMAT), Some(112));
        assert_eq!(back.uint_option(coap_opt::SIZE1), Some(6000));
        assert_eq!(back.payload, b"hello");
        assert_eq!(back.token, b"tk");
        assert_eq!(
            (back.mid, back.code, back.mtype),
            (0x1234, 2, coap_type::CON)
        );
        assert_eq!(back.options.len(), 6);
        assert_eq!(back.encode(), bytes);
        Ok(())
    }

    #[test]
    fn coap_client_output_is_parsed() {
        let out = "v:1 t:CON c:POST i:276f {01} [ Uri-Path:t ] :: 'x'\n\
                   v:1 t:ACK c:4.00 i:276f {01} [ ] :: 'SenML record 0: \"v\" must be a number'\n"
            .to_owned();
        let r = parse_coap_client_output(out);
        assert_eq!(r.code.as_deref(), Some("4.00"));
        assert_eq!(
            r.payload.as_deref(),
            Some("SenML record 0: \"v\" must be a number")
        );
        let none = parse_coap_client_output("v:1 t:CON c:GET i:1 {} [ ]\n".to_owned());
        assert_eq!(none.code, None);
    }
}

/// A [`GatewayConfig`] (node `node`, upstream on `upstream_port`) whose `extra` holds a
/// [`coap_section`] on a free UDP port, and that port.
pub fn coap_gateway_config(
    dir: &TestDir,
    node: &str,
    upstream_port: Option<u16>,
) -> Result<(GatewayConfig, u16)> {
    let mut cfg = GatewayConfig::new(dir, node, upstream_port)?;
    let port = free_udp_port()?;
    cfg.extra = coap_section(port);
    Ok((cfg, port))
}

/// Starts the gateway for `cfg` and waits until its CoAP endpoint on `coap_port` answers.
pub fn start_coap_gateway(dir: &TestDir, cfg: &GatewayConfig, coap_port: u16) -> Result<Outpost> {
    let gw = Outpost::start(dir, cfg)?;
    wait_coap(coap_port, Duration::from_secs(30)).with_context(|| {
        format!(
            "the gateway's CoAP endpoint; outpost log:\n{}",
            tail(gw.log(), 30)
        )
    })?;
    Ok(gw)
}

/// The first value under key `key` anywhere in `v` (depth-first), for status fields whose
/// place in the document a scenario does not want to pin down.
pub fn find_key<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    match v {
        Value::Object(m) => m
            .get(key)
            .or_else(|| m.values().find_map(|x| find_key(x, key))),
        Value::Array(a) => a.iter().find_map(|x| find_key(x, key)),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Health: the gateway's HTTP endpoint and metrics, local peers for its checks, its own messages
// ---------------------------------------------------------------------------------------------
//
// The health scenarios (`tests/tests/health_*.rs`) read the endpoint that [`GatewayConfig`]
// puts on `health_port`, and parse `/metrics` with a real parser: `python3` with
// `prometheus-client` (pip; `scripts/install-test-deps.sh` installs it) in
// `tests/py/health_metrics.py`. The HTTP check's peer is Python's own `http.server`
// (`tests/py/health_http_server.py`).

/// One answer of the gateway's HTTP endpoint.
#[derive(Debug, Clone)]
pub struct HealthResponse {
    /// HTTP status code.
    pub status: u16,
    /// The Content-Type header, if any.
    pub content_type: Option<String>,
    /// The body (lossy UTF-8).
    pub body: String,
}

/// `GET http://127.0.0.1:<port><path>`, sent as HTTP/1.0 so the answer is close-delimited (never
/// chunked) and reading to EOF is the whole of it. Connect deadline 2 s, read deadline 10 s.
pub fn health_get(port: u16, path: &str) -> Result<HealthResponse> {
    use std::io::Write as _;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to the health endpoint {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .with_context(|| format!("reading GET {path}"))?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("GET {path}: no end of headers in {text:?}"))?;
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("GET {path}: bad status line {status_line:?}"))?;
    let content_type = lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-type")
            .then(|| v.trim().to_owned())
    });
    Ok(HealthResponse {
        status,
        content_type,
        body: body.to_owned(),
    })
}

/// `GET <path>` on the health endpoint, requiring 200 and a JSON body.
pub fn health_json(port: u16, path: &str) -> Result<Value> {
    let r = health_get(port, path)?;
    if r.status != 200 {
        bail!("GET {path}: status {} ({})", r.status, r.body);
    }
    serde_json::from_str(&r.body).with_context(|| format!("GET {path}: not JSON: {}", r.body))
}

/// Like [`wait_for`], polling every `period`, for a probe that can fail: the last error (or
/// the last value that did not satisfy, as `describe` puts it) is part of the timeout error.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    period: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        let last = match probe() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => "<condition not met>".to_owned(),
            Err(e) => format!("{e:#}"),
        };
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}; last: {last}");
        }
        std::thread::sleep(period);
    }
}

/// Polls the endpoint's `/status` (every 100 ms) until `pred` holds; the last status is in the
/// timeout error.
pub fn wait_health_status(
    port: u16,
    what: &str,
    timeout: Duration,
    mut pred: impl FnMut(&Value) -> bool,
) -> Result<Value> {
    let mut last = Value::Null;
    let r = poll(what, timeout, Duration::from_millis(100), || {
        let s = health_json(port, "/status")?;
        let ok = pred(&s);
        last = s.clone();
        Ok(ok.then_some(s))
    });
    r.with_context(|| format!("last /status: {last:#}"))
}

/// The status of check `name` in a `/status` document (`health.checks[]`).
pub fn check_status<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status
        .get("health")?
        .get("checks")?
        .as_array()?
        .iter()
        .find(|c| c.get("name").and_then(Value::as_str) == Some(name))
}

/// The state (`unknown`, `healthy`, `degraded`, `unhealthy`) of check `name` in a `/status`.
pub fn check_state<'a>(status: &'a Value, name: &str) -> Option<&'a str> {
    check_status(status, name)?.get("state")?.as_str()
}

/// One sample of a scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricSample {
    /// The sample's name (a counter's ends in `_total`).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// One metric family of a scrape, as prometheus-client's Python parser read it.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricFamily {
    /// The family name (the parser drops a counter's `_total`).
    pub name: String,
    /// `counter`, `gauge`, ...
    pub kind: String,
    /// The HELP text.
    pub help: String,
    /// Its samples.
    pub samples: Vec<MetricSample>,
}

/// One scrape of `/metrics` that parsed and passed every format check of
/// `tests/py/health_metrics.py`.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// The Content-Type header.
    pub content_type: String,
    /// The families, in exposition order.
    pub families: Vec<MetricFamily>,
    /// The raw text.
    pub text: String,
}

impl Scrape {
    /// The value of the sample named `name` whose labels are exactly `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// [`Scrape::value`], failing with the sample's name when it is absent.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        self.value(name, labels)
            .ok_or_else(|| anyhow!("no sample {name}{labels:?} in the scrape"))
    }

    /// Every sample.
    pub fn samples(&self) -> impl Iterator<Item = &MetricSample> {
        self.families.iter().flat_map(|f| f.samples.iter())
    }

    /// The family named `name` (as the parser names it: a counter without `_total`).
    pub fn family(&self, name: &str) -> Option<&MetricFamily> {
        self.families.iter().find(|f| f.name == name)
    }
}

/// Scrapes `http://127.0.0.1:<port>/metrics` with `tests/py/health_metrics.py` and fails,
/// listing the problems, unless the text parses with prometheus-client's parser, the
/// Content-Type is `text/plain; version=0.0.4`, and every family has HELP and TYPE.
pub fn scrape_metrics(port: u16) -> Result<Scrape> {
    let out = Command::new("python3")
        .arg(py_script("health_metrics.py"))
        .args(["--url", &format!("http://127.0.0.1:{port}/metrics")])
        .stdin(Stdio::null())
        .output()
        .context("running health_metrics.py")?;
    if !out.status.success() {
        bail!(
            "health_metrics.py failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let doc: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "health_metrics.py output is not JSON: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let text = doc["text"].as_str().unwrap_or_default().to_owned();
    let problems: Vec<&str> = doc["problems"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if !problems.is_empty() {
        bail!(
            "/metrics is not valid Prometheus text 0.0.4:\n  {}\n--- exposition ---\n{text}",
            problems.join("\n  ")
        );
    }
    let mut families = Vec::new();
    for f in doc["families"].as_array().into_iter().flatten() {
        let mut samples = Vec::new();
        for s in f["samples"].as_array().into_iter().flatten() {
            let raw = s["value"].as_str().unwrap_or_default();
            samples.push(MetricSample {
                name: s["name"].as_str().unwrap_or_default().to_owned(),
                labels: string_map(&s["labels"]),
                value: raw
                    .parse()
                    .with_context(|| format!("sample value {raw:?} is not a float"))?,
            });
        }
        families.push(MetricFamily {
            name: f["name"].as_str().unwrap_or_default().to_owned(),
            kind: f["type"].as_str().unwrap_or_default().to_owned(),
            help: f["help"].as_str().unwrap_or_default().to_owned(),
            samples,
        });
    }
    Ok(Scrape {
        content_type: doc["content_type"].as_str().unwrap_or_default().to_owned(),
        families,
        text,
    })
}

/// Scrapes (every 250 ms: each scrape starts a Python) until `pred` holds; the last scrape's
/// failure or the caller's description of it is in the timeout error.
pub fn wait_metrics(
    port: u16,
    what: &str,
    timeout: Duration,
    mut pred: impl FnMut(&Scrape) -> bool,
) -> Result<Scrape> {
    poll(what, timeout, Duration::from_millis(250), || {
        let s = scrape_metrics(port)?;
        if pred(&s) {
            Ok(Some(s))
        } else {
            let interesting: Vec<String> = s
                .samples()
                .filter(|m| {
                    [
                        "outpost_ingested_total",
                        "outpost_stored_total",
                        "outpost_synced_total",
                        "outpost_backlog_records",
                        "outpost_uplink_connected",
                        "outpost_sync_lag_seconds",
                        "outpost_check_state",
                    ]
                    .contains(&m.name.as_str())
                })
                .map(|m| format!("{}{:?}={}", m.name, m.labels, m.value))
                .collect();
            bail!("condition not met; {}", interesting.join(" "))
        }
    })
}

/// Python's `http.server` answering every GET with the status code in a file
/// (`tests/py/health_http_server.py`): the local service of an HTTP check.
#[derive(Debug)]
pub struct StatusHttpServer {
    /// The process.
    proc: Proc,
    /// Where the status code is written.
    status_file: PathBuf,
}

impl StatusHttpServer {
    /// Starts it on 127.0.0.1:`port` answering `status` (its file is `dir/<name>.status`, its
    /// output `dir/<name>.log`) and waits until it listens.
    pub fn spawn(dir: &TestDir, name: &str, port: u16, status: u16) -> Result<Self> {
        let status_file = dir.join(&format!("{name}.status"));
        fs::write(&status_file, status.to_string())?;
        let mut cmd = Command::new("python3");
        cmd.arg(py_script("health_http_server.py"))
            .args(["--port", &port.to_string()])
            .arg("--status-file")
            .arg(&status_file);
        let mut proc = Proc::spawn(
            &format!("http server {name}"),
            cmd,
            &dir.join(&format!("{name}.log")),
        )?;
        proc.wait_listening(port, Duration::from_secs(30), 20)?;
        Ok(Self { proc, status_file })
    }

    /// Answers `status` from the next request on.
    pub fn set_status(&self, status: u16) -> Result<()> {
        // Written whole then renamed, so a request never reads a half-written file.
        let tmp = self.status_file.with_extension("tmp");
        fs::write(&tmp, status.to_string())?;
        fs::rename(&tmp, &self.status_file)?;
        Ok(())
    }

    /// Request lines so far (`GET <path> -> <status> ua=<User-Agent>`).
    pub fn requests(&self) -> Vec<String> {
        fs::read_to_string(self.proc.log())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("GET "))
            .map(str::to_owned)
            .collect()
    }

    /// SIGKILL: the port closes.
    pub fn kill(&mut self) -> Result<()> {
        self.proc.kill()?;
        Ok(())
    }
}

/// A TCP listener on 127.0.0.1 that accepts (and at once closes) every connection in a
/// thread, until stopped: the peer of a TCP check. Stopping closes the port.
#[derive(Debug)]
pub struct TcpAcceptor {
    /// The port.
    port: u16,
    /// Tells the thread to stop (it then drops the listener).
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Connections accepted.
    accepted: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The accepting thread while listening.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TcpAcceptor {
    /// Listens on 127.0.0.1:`port` (retrying for up to 10 s while the port is still held).
    pub fn start(port: u16) -> Result<Self> {
        let mut a = Self {
            port,
            stop: std::sync::Arc::default(),
            accepted: std::sync::Arc::default(),
            thread: None,
        };
        a.listen()?;
        Ok(a)
    }

    fn listen(&mut self) -> Result<()> {
        use std::sync::atomic::Ordering;
        let port = self.port;
        let listener = poll(
            &format!("binding 127.0.0.1:{port}"),
            Duration::from_secs(10),
            Duration::from_millis(100),
            || Ok(TcpListener::bind(("127.0.0.1", port)).ok()),
        )?;
        listener.set_nonblocking(true)?;
        self.stop.store(false, Ordering::SeqCst);
        let stop = std::sync::Arc::clone(&self.stop);
        let accepted = std::sync::Arc::clone(&self.accepted);
        self.thread = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        accepted.fetch_add(1, Ordering::SeqCst);
                        drop(conn);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }));
        Ok(())
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops listening (connections are refused from now on).
    pub fn stop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().ok();
        }
    }

    /// Listens again on the same port.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.listen()
    }
}

impl Drop for TcpAcceptor {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `outpost/<node>/$gateway/<suffix>`: where the gateway's own messages arrive upstream.
pub fn gateway_topic(node: &str, suffix: &str) -> String {
    format!("outpost/{node}/$gateway/{suffix}")
}

/// The messages `sub` received on exactly `outpost/<node>/$gateway/<suffix>`, in arrival
/// order, each with its payload parsed as JSON (a payload that is not JSON is an error).
pub fn gateway_messages(
    sub: &Subscriber,
    node: &str,
    suffix: &str,
) -> Result<Vec<(Received, Value)>> {
    let topic = gateway_topic(node, suffix);
    sub.messages()?
        .into_iter()
        .filter(|m| m.topic == topic)
        .map(|m| {
            let v = serde_json::from_slice(&m.payload).with_context(|| {
                format!(
                    "payload on {topic} is not JSON: {:?}",
                    String::from_utf8_lossy(&m.payload)
                )
            })?;
            Ok((m, v))
        })
        .collect()
}

/// Subscribes a fresh client (`dir/<name>.jsonl`) to `topic` on the broker at `port` and
/// returns the first message it gets (a retained one, if the broker holds it), failing after
/// `timeout` if none comes.
pub fn first_message(
    dir: &TestDir,
    name: &str,
    port: u16,
    topic: &str,
    timeout: Duration,
) -> Result<Received> {
    let sub = Subscriber::spawn(dir, name, &SubscriberSpec::new(port, topic))?;
    wait_for(
        &format!("a message on {topic} for subscriber {name}"),
        timeout,
        || sub.messages().ok()?.into_iter().next(),
    )
}

/// `payload` parsed as JSON (Null when it is not JSON).
pub fn payload_json(payload: &[u8]) -> Value {
    serde_json::from_slice(payload).unwrap_or(Value::Null)
}

// ---------------------------------------------------------------------------------------------
// Discovery: network namespaces, the gateway inside one, python peers inside the others
// ---------------------------------------------------------------------------------------------
//
// The discovery scenarios (`tests/tests/discovery_*.rs`) multicast (mDNS, All-CoAP-Nodes), so
// they never run on the machine's real interfaces: they build their own network namespaces
// (root only; elsewhere they print `SKIP: ...` and pass). Same pattern as the protocols crate's
// `protocols/tests/discovery_netns`, without tokio:
//
// - The outer run (plain `cargo test`) builds the `outpost` binary, creates a namespace `gw`
//   and N peer namespaces, each peer joined to `gw` by a veth pair (`lan<i>` in `gw` with
//   10.77.<i>.1/24 and fd77:<i>::1/64; `eth0` in peer i with .2/::2; `lo` up everywhere; IPv6
//   DAD off), then re-executes its own test binary inside `gw` with [`NETNS_ENV`] set
//   (`ip netns exec <gw> <test binary> --exact <test> --nocapture --test-threads=1`), with a
//   deadline. It asserts the inner run passed and, whatever happened, kills every process left
//   in its namespaces (`ip netns pids`, each by PID) and deletes them (Drop).
// - The inner run sees [`NETNS_ENV`] and runs the scenario: everything the harness starts
//   (outpost, mosquitto on 127.0.0.1, paho subscribers, `outpost devices`) runs in `gw`; the
//   peers ([`NsPeer`]) are started with `ip netns exec <peer>`.
// Namespace names carry `oe2e-<pid>-<counter>`, so parallel tests do not collide.

/// Set in the inner run: `gw,peer0,peer1,...`.
pub const NETNS_ENV: &str = "OUTPOST_E2E_NETNS";

/// The namespaces of one discovery scenario.
#[derive(Debug)]
pub struct NetnsTopology {
    /// The gateway's namespace (the inner run runs here).
    pub gw: String,
    /// Peer namespaces; peer i is reached through `lan<i>`.
    pub peers: Vec<String>,
    /// Only the outer run owns (and deletes) the namespaces.
    owned: bool,
}

/// Runs `ip ARGS`; the error is its stderr.
pub fn ip_cmd(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run ip (apt iproute2)")?;
    if out.status.success() {
        Ok(())
    } else {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    }
}

/// Fails (naming the pip package) when a python module a peer needs is missing: a skip would
/// hide a missing install step in CI.
pub fn require_python_module(module: &str, pip: &str) -> Result<()> {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        bail!("python module {module} missing: pip install {pip}");
    }
    Ok(())
}

impl NetnsTopology {
    /// Our address towards peer `i` (on `lan<i>`).
    pub fn gw_addr(i: usize) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::new(10, 77, u8::try_from(i).unwrap_or(u8::MAX), 1)
    }

    /// Peer `i`'s address (on its `eth0`).
    pub fn peer_addr(i: usize) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::new(10, 77, u8::try_from(i).unwrap_or(u8::MAX), 2)
    }

    /// The gateway namespace's interface towards peer `i`.
    pub fn lan(i: usize) -> String {
        format!("lan{i}")
    }

    /// The entry point of a discovery scenario named `test` (its function name) with `peers`
    /// peer namespaces. In the inner run: the topology, and the caller runs the scenario. In
    /// the outer run: builds the binary and the namespaces, runs the inner run (failing if it
    /// fails), cleans up and returns `None`, as it does (after printing `SKIP: ...`) where
    /// namespaces cannot be created. `modules` are (python module, pip package) pairs the
    /// peers need.
    pub fn enter(
        test: &str,
        peers: usize,
        modules: &[(&str, &str)],
        deadline: Duration,
    ) -> Result<Option<Self>> {
        if let Some(v) = std::env::var_os(NETNS_ENV) {
            let v = v.to_string_lossy().into_owned();
            let mut names = v.split(',').map(str::to_owned);
            let gw = names.next().ok_or_else(|| anyhow!("empty {NETNS_ENV}"))?;
            return Ok(Some(Self {
                gw,
                peers: names.collect(),
                owned: false,
            }));
        }
        for (m, pip) in modules {
            require_python_module(m, pip)?;
        }
        let bin = outpost_bin()?;
        let Some(t) = Self::create(peers)? else {
            return Ok(None);
        };
        t.run_inner(test, &bin, deadline)?;
        Ok(None)
    }

    /// Creates the namespaces (outer run), or `None` after printing `SKIP:` when `ip netns add`
    /// is refused.
    pub fn create(peers: usize) -> Result<Option<Self>> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let base = format!("oe2e-{}-{n}", std::process::id());
        let gw = format!("{base}-gw");
        if let Err(e) = ip_cmd(&["netns", "add", &gw]) {
            return skip_unless_ci(&format!(
                "cannot create a network namespace (need root): {e:#}"
            ));
        }
        // From here on Drop deletes whatever was made, also when a step below fails.
        let mut t = Self {
            gw: gw.clone(),
            peers: Vec::new(),
            owned: true,
        };
        for i in 0..peers {
            let p = format!("{base}-p{i}");
            ip_cmd(&["netns", "add", &p])?;
            t.peers.push(p);
        }
        for ns in std::iter::once(&t.gw).chain(&t.peers) {
            for key in ["default", "all"] {
                let _ = Command::new("ip")
                    .args(["netns", "exec", ns, "sysctl", "-qw"])
                    .arg(format!("net.ipv6.conf.{key}.accept_dad=0"))
                    .stdin(Stdio::null())
                    .status();
            }
            ip_cmd(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        for (i, p) in t.peers.iter().enumerate() {
            let lan = Self::lan(i);
            ip_cmd(&[
                "-n", &t.gw, "link", "add", &lan, "type", "veth", "peer", "name", "eth0", "netns",
                p,
            ])?;
            ip_cmd(&[
                "-n",
                &t.gw,
                "addr",
                "add",
                &format!("{}/24", Self::gw_addr(i)),
                "dev",
                &lan,
            ])?;
            ip_cmd(&[
                "-n",
                p,
                "addr",
                "add",
                &format!("{}/24", Self::peer_addr(i)),
                "dev",
                "eth0",
            ])?;
            // A global IPv6 address each: aiocoap binds "::", and getaddrinfo (AI_ADDRCONFIG)
            // refuses it without one.
            let gw6 = format!("fd77:{i}::1/64");
            let peer6 = format!("fd77:{i}::2/64");
            ip_cmd(&["-n", &t.gw, "addr", "add", &gw6, "dev", &lan, "nodad"])?;
            ip_cmd(&["-n", p, "addr", "add", &peer6, "dev", "eth0", "nodad"])?;
            ip_cmd(&["-n", &t.gw, "link", "set", &lan, "up"])?;
            ip_cmd(&["-n", p, "link", "set", "eth0", "up"])?;
        }
        Ok(Some(t))
    }

    /// Runs this test binary's test `test` inside the gateway namespace (with `OUTPOST_BIN`
    /// set to `bin`), printing its output, and fails unless it passed within `deadline`.
    pub fn run_inner(&self, test: &str, bin: &Path, deadline: Duration) -> Result<()> {
        let exe = std::env::current_exe().context("test binary path")?;
        let names: Vec<&str> = std::iter::once(self.gw.as_str())
            .chain(self.peers.iter().map(String::as_str))
            .collect();
        let out_file = tempfile::NamedTempFile::new()?;
        let err_file = tempfile::NamedTempFile::new()?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.gw])
            .arg(exe)
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(NETNS_ENV, names.join(","))
            .env("OUTPOST_BIN", bin)
            .stdin(Stdio::null())
            .stdout(out_file.reopen()?)
            .stderr(err_file.reopen()?)
            .spawn()
            .context("running the inner test with ip netns exec")?;
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break Some(st);
            }
            if start.elapsed() > deadline {
                // The inner run's own guards do not run on SIGKILL: Drop kills what it left.
                child.kill().ok();
                child.wait().ok();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let stdout = fs::read_to_string(out_file.path()).unwrap_or_default();
        let stderr = fs::read_to_string(err_file.path()).unwrap_or_default();
        println!(
            "--- inner run of {test} in {} ---\n{stdout}\n{stderr}",
            self.gw
        );
        match status {
            None => bail!("inner run of {test} did not finish within {deadline:?}"),
            Some(st) if !st.success() => bail!("inner run of {test} failed ({st})"),
            Some(_) if !stdout.contains("1 passed") => bail!("inner run of {test} ran no test"),
            Some(_) => Ok(()),
        }
    }

    /// The PIDs of the processes in namespace `ns` (`ip netns pids`).
    pub fn pids(ns: &str) -> Vec<u32> {
        Command::new("ip")
            .args(["netns", "pids", ns])
            .stdin(Stdio::null())
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for NetnsTopology {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        // Anything still running in our namespaces was started by this test (the inner run's
        // gateway, broker and peers when it was killed at its deadline): kill each by PID, or
        // it would outlive the namespace it holds.
        for ns in std::iter::once(&self.gw).chain(&self.peers) {
            for pid in Self::pids(ns) {
                eprintln!("cleanup: killing pid {pid} left in {ns}");
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stdin(Stdio::null())
                    .status();
            }
        }
        for ns in std::iter::once(&self.gw).chain(&self.peers) {
            if let Err(e) = ip_cmd(&["netns", "del", ns]) {
                eprintln!("cleanup: ip netns del {ns}: {e:#}");
            }
        }
    }
}

/// A python peer (`tests/py/<script>`) in namespace `ns`: stdout and stderr to
/// `dir/<name>.log`, standard input held open (the peers stop when it closes), JSON lines read
/// back from the log. SIGKILLed by PID on drop (`ip netns exec` execs python: the PID is it).
#[derive(Debug)]
pub struct NsPeer {
    /// What it is, for messages.
    name: String,
    /// The process; `None` once reaped.
    child: Option<Child>,
    /// Its output.
    log: PathBuf,
    /// How many log lines [`NsPeer::until`] has already looked at.
    read: usize,
}

impl NsPeer {
    /// Starts `python3 -u tests/py/<script> <args>` in `ns`.
    pub fn spawn(dir: &TestDir, name: &str, ns: &str, script: &str, args: &[&str]) -> Result<Self> {
        let log = dir.join(&format!("{name}.log"));
        let out = OpenOptions::new().create(true).append(true).open(&log)?;
        let err = out.try_clone()?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-u"])
            .arg(py_script(script))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting peer {name} in {ns}"))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log,
            read: 0,
        })
    }

    /// Every JSON line it printed so far.
    pub fn events(&self) -> Vec<Value> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits for a JSON line (after those returned by earlier calls) satisfying `pred`; fails at
    /// the deadline, or when the peer exits, with its output.
    pub fn until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Result<Value> {
        let start = Instant::now();
        loop {
            let events = self.events();
            for (i, v) in events.iter().enumerate().skip(self.read) {
                if pred(v) {
                    self.read = i + 1;
                    return Ok(v.clone());
                }
            }
            self.read = events.len();
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(st) = exited {
                bail!(
                    "peer {} exited ({st}) before {what}:\n{}",
                    self.name,
                    tail(&self.log, 30)
                );
            }
            if start.elapsed() > timeout {
                bail!(
                    "timed out after {timeout:?} waiting for {what} from peer {}:\n{}",
                    self.name,
                    tail(&self.log, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// [`NsPeer::until`] looks at every line again from the first.
    pub fn read_from_start(&mut self) {
        self.read = 0;
    }

    /// [`NsPeer::until`] looks only at lines printed from now on.
    pub fn skip_seen(&mut self) {
        self.read = self.events().len();
    }

    /// The first JSON line so far satisfying `pred`, not consuming anything.
    pub fn any(&self, pred: impl FnMut(&Value) -> bool) -> Option<Value> {
        self.events().into_iter().find(pred)
    }

    /// SIGTERM (the zeroconf peer unregisters, i.e. says goodbye, on it).
    pub fn terminate(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_ref() {
            let st = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status()?;
            if !st.success() {
                bail!("kill -TERM {} failed", c.id());
            }
        }
        Ok(())
    }

    /// The log file.
    pub fn log(&self) -> &Path {
        &self.log
    }
}

impl Drop for NsPeer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
        eprintln!(
            "----- peer {}, last lines of {} -----\n{}",
            self.name,
            self.log.display(),
            tail(&self.log, 30)
        );
    }
}

/// `outpost devices --json --config <config>` (read-only on the database), parsed.
pub fn outpost_devices(config: &Path) -> Result<Vec<Value>> {
    let out = outpost_command()?
        .args(["devices", "--json", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "outpost devices failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "devices --json is not JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    v.as_array()
        .cloned()
        .ok_or_else(|| anyhow!("devices --json is not an array: {v}"))
}

// ---------------------------------------------------------------------------------------------
// Broker rules checked with paho-mqtt (tests/py/paho_rules.py)
// ---------------------------------------------------------------------------------------------

/// What a finished [`PahoRule`] reported.
#[derive(Debug, Clone)]
pub struct RuleOutcome {
    /// Its output lines (`ok ...` per check that held).
    pub lines: Vec<String>,
    /// From its `counters {json}` line: by how much `outpost_broker_<name>_total` should have
    /// moved while it ran (empty when it printed none).
    pub counters: BTreeMap<String, u64>,
}

/// A running `tests/py/paho_rules.py <rule> --port <port> <args>`: one broker rule checked
/// with paho-mqtt against a gateway; output in `dir/<rule>.log`.
#[derive(Debug)]
pub struct PahoRule {
    /// The rule (a function of paho_rules.py).
    rule: String,
    /// The process.
    proc: Proc,
}

impl PahoRule {
    /// Starts the rule against the broker on 127.0.0.1:`port`.
    pub fn spawn(dir: &TestDir, rule: &str, port: u16, args: &[String]) -> Result<Self> {
        let mut cmd = Command::new("python3");
        cmd.arg(py_script("paho_rules.py"))
            .arg(rule)
            .args(["--port", &port.to_string()])
            .args(args);
        let proc = Proc::spawn(
            &format!("paho rule {rule}"),
            cmd,
            &dir.join(&format!("{rule}.log")),
        )?;
        Ok(Self {
            rule: rule.to_owned(),
            proc,
        })
    }

    /// Waits for an output line starting with `prefix` (the rule asking the test to act);
    /// fails early, with the output, if the rule ends first.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let log = self.proc.log().to_path_buf();
        let found = wait_for(
            &format!("{prefix:?} from rule {}", self.rule),
            timeout,
            || {
                if let Some(l) = log_lines(&log).into_iter().find(|l| l.starts_with(prefix)) {
                    return Some(Ok(l));
                }
                let ended = self.proc.try_status().ok().flatten();
                ended.map(|st| Err(anyhow!("the rule ended ({st}) first")))
            },
        );
        found
            .and_then(|r| r)
            .with_context(|| format!("output:\n{}", log_lines(&log).join("\n")))
    }

    /// Waits for the rule to end and fails, with its whole output, unless it exited 0 with
    /// `PASS <rule>` as its last line.
    pub fn finish(mut self, timeout: Duration) -> Result<RuleOutcome> {
        let status = self.proc.wait(timeout);
        let lines = log_lines(self.proc.log());
        let passed = format!("PASS {}", self.rule);
        match status {
            Ok(st) if st.success() && lines.last() == Some(&passed) => {}
            Ok(st) => bail!("rule {} failed ({st}):\n{}", self.rule, lines.join("\n")),
            Err(e) => bail!("rule {}: {e}; output:\n{}", self.rule, lines.join("\n")),
        }
        let mut counters = BTreeMap::new();
        for l in &lines {
            if let Some(json) = l.strip_prefix("counters ") {
                let v: BTreeMap<String, u64> = serde_json::from_str(json)
                    .with_context(|| format!("bad counters line {l:?}"))?;
                counters.extend(v);
            }
        }
        Ok(RuleOutcome { lines, counters })
    }
}

/// Runs paho rule `rule` to the end (deadline 120 s) against the broker on `port`.
pub fn run_paho_rule(dir: &TestDir, rule: &str, port: u16, args: &[String]) -> Result<RuleOutcome> {
    PahoRule::spawn(dir, rule, port, args)?.finish(Duration::from_secs(120))
}

/// The broker counter `outpost_broker_<name>_total` in a scrape.
pub fn broker_counter(scrape: &Scrape, name: &str) -> Result<f64> {
    scrape.get(&format!("outpost_broker_{name}_total"), &[])
}

/// Checks on the gateway's `/metrics` (health port `health_port`) that every broker counter
/// named in `expected` moved by exactly its value since `before`. Counters move before the
/// acks a rule waits for, so the first scrape normally settles it; a few more are allowed
/// (deadline 10 s) for a slow machine.
pub fn check_broker_counter_moves(
    health_port: u16,
    before: &Scrape,
    expected: &BTreeMap<String, u64>,
) -> Result<()> {
    let want: BTreeMap<&str, f64> = expected
        .iter()
        .map(|(name, n)| (name.as_str(), *n as f64))
        .collect();
    let moves = |now: &Scrape| -> Result<BTreeMap<&str, f64>> {
        want.keys()
            .map(|name| {
                Ok((
                    *name,
                    broker_counter(now, name)? - broker_counter(before, name)?,
                ))
            })
            .collect()
    };
    poll(
        "the broker counters to move as the rule expects",
        Duration::from_secs(10),
        Duration::from_millis(250),
        || {
            let got = moves(&scrape_metrics(health_port)?)?;
            if got == want {
                Ok(Some(()))
            } else {
                bail!("counter moves {got:?}, expected {want:?}")
            }
        },
    )
}

/// Starts a gateway with `cfg` in `dir`, runs paho rule `rule` against its listener on
/// `cfg.port` (with `--health-port` and `args`), and checks on `/metrics` the broker counter
/// moves the rule expects. The gateway is killed when the returned guard is dropped.
pub fn check_paho_rule(
    dir: &TestDir,
    cfg: &GatewayConfig,
    rule: &str,
    args: &[String],
) -> Result<(Outpost, RuleOutcome)> {
    let mut gw = Outpost::start(dir, cfg)?;
    let before = poll(
        "the gateway's /metrics",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || Ok(Some(scrape_metrics(cfg.health_port)?)),
    )?;
    let mut all = vec!["--health-port".to_owned(), cfg.health_port.to_string()];
    all.extend_from_slice(args);
    let outcome = run_paho_rule(dir, rule, cfg.port, &all)?;
    check_broker_counter_moves(cfg.health_port, &before, &outcome.counters)?;
    gw.check_alive()?;
    Ok((gw, outcome))
}

// ---------------------------------------------------------------------------------------------
// The uplink's variants, limits and refusals: arbitrary payloads, births, an MQTT 3.1.1-only peer
// ---------------------------------------------------------------------------------------------

/// How a delivery scenario's uplink is configured: the shipped defaults, or one of the other
/// modes the same scenario is run in (each `#[test]` of a scenario calls its body with one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UplinkVariant {
    /// Names the test directory.
    pub name: &'static str,
    /// [`GatewayConfig::protocol`].
    pub protocol: Option<UpstreamProtocol>,
    /// [`GatewayConfig::metadata`].
    pub metadata: Option<Metadata>,
    /// Whether the scenario runs at full size; the extra variants run scaled down
    /// ([`UplinkVariant::count`]) to keep the suite's time on 2 cores sane.
    pub full_size: bool,
}

impl UplinkVariant {
    /// Protocol and metadata absent: "auto" (MQTT 5 against mosquitto), seq in user properties;
    /// storage at its shipped defaults too (durability "full").
    pub const SHIPPED_DEFAULTS: Self = Self {
        name: "defaults",
        protocol: None,
        metadata: None,
        full_size: true,
    };
    /// `protocol = "3.1.1"`, metadata absent (none): no seq anywhere.
    pub const MQTT311: Self = Self {
        name: "mqtt311",
        protocol: Some(UpstreamProtocol::V311),
        metadata: None,
        full_size: false,
    };
    /// `protocol = "3.1.1"`, `metadata = "envelope"`: the consumer dedupes by the envelope's seq.
    pub const MQTT311_ENVELOPE: Self = Self {
        name: "mqtt311-envelope",
        protocol: Some(UpstreamProtocol::V311),
        metadata: Some(Metadata::Envelope),
        full_size: false,
    };

    /// Sets protocol and metadata on `cfg`; the shipped-defaults variant also keeps the shipped
    /// storage settings (durability "full").
    pub fn apply(&self, cfg: &mut GatewayConfig) {
        cfg.protocol = self.protocol;
        cfg.metadata = self.metadata;
        cfg.shipped_storage = *self == Self::SHIPPED_DEFAULTS;
    }

    /// [`GatewayConfig::new`] with this variant applied.
    pub fn gateway_config(
        &self,
        dir: &TestDir,
        node: &str,
        upstream_port: Option<u16>,
    ) -> Result<GatewayConfig> {
        let mut cfg = GatewayConfig::new(dir, node, upstream_port)?;
        self.apply(&mut cfg);
        Ok(cfg)
    }

    /// Where a consumer finds the seq (against mosquitto, which speaks MQTT 5).
    pub fn seq_source(&self) -> SeqSource {
        match (self.metadata, self.protocol) {
            (Some(Metadata::Envelope), _) => SeqSource::Envelope,
            (Some(Metadata::None), _) | (None, Some(UpstreamProtocol::V311)) => SeqSource::Nothing,
            _ => SeqSource::UserProperty,
        }
    }

    /// A cloud consumer for this variant: `spec` decoding envelopes when there are some.
    pub fn subscriber(&self, mut spec: SubscriberSpec) -> SubscriberSpec {
        spec.envelope = self.seq_source() == SeqSource::Envelope;
        spec
    }

    /// `full` at full size, else `reduced`.
    pub fn count(&self, full: u64, reduced: u64) -> u64 {
        if self.full_size { full } else { reduced }
    }
}

/// `size` deterministic pseudo-random bytes for reading `tag` (xorshift64*): binary, mostly not
/// UTF-8, different for every tag, so a payload changed, truncated or swapped on the way
/// cannot compare equal.
pub fn blob(tag: u64, size: usize) -> Vec<u8> {
    let mut x = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(size);
    out
}

/// One reading as a sensor publishes it: local topic and payload bytes.
pub type RawReading = (String, Vec<u8>);

/// Runs `tests/py/blob_publisher.py` (paho, `protocol` "3.1.1" or "5") against
/// 127.0.0.1:`port`: publishes `readings` (topic, payload) at QoS 1 one at a time, in order,
/// each after the previous one's PUBACK, with the MQTT 5 `user_props` on each. Payload files go
/// to `dir/<name>-payloads/`, the output to `dir/<name>.log`. Returns whether it exited 0 and its
/// output lines (`acked <i> <reason>`, `refused <i> <reason>`, `lost <i>`, ...).
pub fn run_blob_publisher(
    dir: &TestDir,
    name: &str,
    port: u16,
    protocol: &str,
    user_props: &[(&str, &str)],
    readings: &[RawReading],
    timeout: Duration,
) -> Result<(bool, Vec<String>)> {
    let pdir = dir.join(&format!("{name}-payloads"));
    fs::create_dir_all(&pdir)?;
    let mut plan = String::new();
    for (i, (topic, body)) in readings.iter().enumerate() {
        let f = pdir.join(format!("{i}.bin"));
        fs::write(&f, body)?;
        let _ = writeln!(plan, "{topic}\t{}", f.display());
    }
    let plan_file = dir.join(&format!("{name}.plan"));
    fs::write(&plan_file, plan)?;
    let mut cmd = Command::new("python3");
    cmd.arg(py_script("blob_publisher.py"))
        .args(["--port", &port.to_string()])
        .args(["--protocol", protocol])
        .args(["--client-id", &format!("blob-{name}")])
        .arg("--plan")
        .arg(&plan_file);
    for (k, v) in user_props {
        cmd.arg("--user-property").arg(format!("{k}={v}"));
    }
    let mut proc = Proc::spawn(
        &format!("blob publisher {name}"),
        cmd,
        &dir.join(&format!("{name}.log")),
    )?;
    let st = proc.wait(timeout)?;
    Ok((st.success(), log_lines(proc.log())))
}

/// [`run_blob_publisher`] without properties, failing unless every reading was acknowledged
/// with success within `timeout`.
pub fn publish_all_acked(
    dir: &TestDir,
    name: &str,
    port: u16,
    protocol: &str,
    readings: &[RawReading],
    timeout: Duration,
) -> Result<()> {
    let (ok, lines) = run_blob_publisher(dir, name, port, protocol, &[], readings, timeout)?;
    let acked = lines.iter().filter(|l| l.starts_with("acked ")).count();
    if !ok || acked != readings.len() {
        bail!(
            "blob publisher {name}: {acked} of {} readings acked:\n{}",
            readings.len(),
            lines.join("\n")
        );
    }
    Ok(())
}

/// The gateway's birth messages among `msgs`: payload JSON with `"state": "online"` on
/// `outpost/<node>/$gateway/status` (retained or live).
pub fn births<'a>(msgs: &'a [Received], node: &str) -> Vec<&'a Received> {
    let topic = format!("outpost/{node}/$gateway/status");
    msgs.iter()
        .filter(|m| m.topic == topic)
        .filter(|m| {
            serde_json::from_slice::<Value>(&m.payload)
                .ok()
                .is_some_and(|v| v["state"] == "online")
        })
        .collect()
}

/// A NATS server (Debian's `nats-server`, apt) with its MQTT listener on 127.0.0.1: an
/// upstream that speaks MQTT 3.1.1 only. nats-server 2.9.10 answers an MQTT 5 CONNECT with a
/// 3.1.1-format CONNACK, return code 0x01 (unacceptable protocol version: bytes `20 02 00 01`),
/// and closes the connection; it logs "unacceptable protocol version of 5". Its MQTT support
/// needs JetStream (store in the test directory) and a `server_name`.
#[derive(Debug)]
pub struct NatsServer {
    /// The MQTT port.
    mqtt_port: u16,
    /// The process.
    proc: Proc,
}

impl NatsServer {
    /// Starts one in `dir/nats` on free ports and waits for its MQTT listener.
    pub fn start(dir: &TestDir) -> Result<Self> {
        let ndir = dir.join("nats");
        fs::create_dir_all(&ndir)?;
        let mqtt_port = free_port()?;
        let client_port = free_port()?;
        let conf = format!(
            "server_name: \"outpost-test\"\nlisten: \"127.0.0.1:{client_port}\"\n\
             jetstream {{\n  store_dir: {:?}\n  max_memory_store: 64MB\n  max_file_store: 256MB\n}}\n\
             mqtt {{\n  listen: \"127.0.0.1:{mqtt_port}\"\n}}\n",
            ndir.join("js").display().to_string()
        );
        let conf_path = ndir.join("nats.conf");
        fs::write(&conf_path, conf)?;
        let mut cmd = Command::new("nats-server");
        cmd.arg("-c").arg(&conf_path);
        let mut proc = Proc::spawn("nats-server", cmd, &ndir.join("nats.log"))
            .context("nats-server is an apt package (scripts/install-test-deps.sh installs it)")?;
        proc.wait_listening(mqtt_port, Duration::from_secs(30), 30)?;
        Ok(Self { mqtt_port, proc })
    }

    /// The MQTT port on 127.0.0.1.
    pub fn mqtt_port(&self) -> u16 {
        self.mqtt_port
    }

    /// Its log.
    pub fn log(&self) -> &Path {
        self.proc.log()
    }
}

/// Whether this run is CI (`CI` set to anything but empty, "0" or "false").
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// A missing prerequisite: `Ok(None)` after printing `SKIP: why` on a developer's machine, an
/// error under CI (`CI=true`), so CI never passes a test that did not run.
pub fn skip_unless_ci<T>(why: &str) -> Result<Option<T>> {
    if in_ci() {
        anyhow::bail!("{why}; CI=true, so this is a failure, not a skip");
    }
    eprintln!("SKIP: {why}");
    Ok(None)
}

// ---------------------------------------------------------------------------------------------
// Floods: the gateway's memory, a QoS 1 probe's latency, raw MQTT floods, counting state rows
// ---------------------------------------------------------------------------------------------
//
// The flood scenarios (`tests/tests/flood_*.rs`) push far more at the gateway than a sensor
// network would, and check that it stays within bounds while it does: its resident memory
// ([`RssSampler`]), the PUBACK latency of an ordinary QoS 1 sensor publishing at the same time
// ([`FloodWatch`]), and counters that account for every message.

/// A number of bytes (a process's memory, a bound on it), shown in MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ByteCount(pub u64);

impl ByteCount {
    /// `n` MiB.
    pub const fn mib(n: u64) -> Self {
        Self(n << 20)
    }
}

impl std::ops::Add for ByteCount {
    type Output = Self;
    fn add(self, other: Self) -> Self {
        Self(self.0.saturating_add(other.0))
    }
}

impl std::fmt::Display for ByteCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1} MiB", self.0 as f64 / f64::from(1u32 << 20))
    }
}

/// The resident set size (VmRSS in /proc/`pid`/status) of a running process.
pub fn rss(pid: u32) -> Result<ByteCount> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .ok_or_else(|| anyhow!("no VmRSS in {path}"))?
        .trim()
        .parse()?;
    Ok(ByteCount(kib * 1024))
}

/// How often an [`RssSampler`] reads the RSS: often enough that a short peak is seen.
const RSS_PERIOD: Duration = Duration::from_millis(50);

/// Reads a process's RSS every 50 ms on a thread of its own, until stopped.
#[derive(Debug)]
pub struct RssSampler {
    /// Tells the thread to stop.
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The samples so far, (time since the start, RSS), shared with the thread.
    samples: std::sync::Arc<std::sync::Mutex<Vec<(Duration, ByteCount)>>>,
    /// The thread; it ends on `stop` or when the process is gone.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    /// Starts sampling process `pid`.
    pub fn start(pid: u32) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let thread = {
            let stop = std::sync::Arc::clone(&stop);
            let samples = std::sync::Arc::clone(&samples);
            std::thread::spawn(move || {
                let start = Instant::now();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let Ok(now) = rss(pid) else { return };
                    if let Ok(mut s) = samples.lock() {
                        s.push((start.elapsed(), now));
                    }
                    std::thread::sleep(RSS_PERIOD);
                }
            })
        };
        Self {
            stop,
            samples,
            thread: Some(thread),
        }
    }

    /// The samples so far.
    pub fn samples(&self) -> Vec<(Duration, ByteCount)> {
        self.samples.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Stops sampling and returns every sample.
    pub fn finish(mut self) -> Vec<(Duration, ByteCount)> {
        self.halt();
        self.samples()
    }

    fn halt(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().ok();
        }
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The `q` quantile (0..=1) of `samples` by the nearest-rank method; zero when empty.
pub fn quantile(samples: &[Duration], q: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.clamp(1, sorted.len().max(1)) - 1)
        .copied()
        .unwrap_or_default()
}

/// The probe of a [`FloodWatch`]: one QoS 1 reading every 50 ms, an ordinary sensor.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(50);

/// What a flood scenario watches while its flood runs: the gateway's RSS (sampled from before
/// the flood until [`FloodWatch::finish`]) and a QoS 1 probe publisher ([`PROBE_INTERVAL`],
/// MQTT 3.1.1, 100-byte [`payload`]s) on a topic of its own.
#[derive(Debug)]
pub struct FloodWatch {
    /// The probe.
    probe: Publisher,
    /// The gateway's RSS.
    rss: RssSampler,
    /// The highest RSS before the flood (gateway started, probe running).
    baseline: ByteCount,
}

/// What a [`FloodWatch`] saw.
#[derive(Debug, Clone)]
pub struct FloodReport {
    /// The highest RSS before the flood, with the probe running: idle plus a normal load.
    pub baseline: ByteCount,
    /// The highest RSS during and after the flood, and when (since sampling started).
    pub peak: (Duration, ByteCount),
    /// The last sample.
    pub last: ByteCount,
    /// Samples taken.
    pub samples: usize,
    /// How the probe ended.
    pub probe: PublisherSummary,
    /// The probe's acked readings (they must all arrive upstream).
    pub acked: Vec<(String, u64)>,
    /// The probe's publish-to-PUBACK times.
    pub latencies: Vec<Duration>,
}

impl FloodWatch {
    /// Starts sampling `gw`'s RSS and the probe on `topic`, waits (deadline 60 s) for 40 probe
    /// acks (2 s of normal load), and takes the highest RSS so far as the baseline.
    pub fn start(dir: &TestDir, gw: &Outpost, topic: &str) -> Result<Self> {
        let pid = gw.pid().ok_or_else(|| anyhow!("outpost is not running"))?;
        let rss = RssSampler::start(pid);
        let mut spec = PublisherSpec::new(gw.port(), &[topic], 1_000_000);
        spec.interval = Some(PROBE_INTERVAL);
        let probe = Publisher::spawn(dir, "probe", &spec)?;
        wait_for("40 probe readings acked", Duration::from_secs(60), || {
            (probe.acked().map_or(0, |a| a.len()) >= 40).then_some(())
        })
        .with_context(|| format!("probe output:\n{}", tail(probe.log(), 20)))?;
        let baseline = rss
            .samples()
            .iter()
            .map(|s| s.1)
            .max()
            .ok_or_else(|| anyhow!("no RSS sample of the gateway"))?;
        eprintln!("baseline RSS (idle + probe): {baseline}");
        Ok(Self {
            probe,
            rss,
            baseline,
        })
    }

    /// Stops the probe (deadline 60 s for its outstanding acks) and the sampling.
    pub fn finish(mut self) -> Result<FloodReport> {
        let (probe, acked) = self.probe.stop(Duration::from_secs(60))?;
        let latencies = self.probe.ack_latencies()?;
        let samples = self.rss.finish();
        let peak = samples
            .iter()
            .copied()
            .max_by_key(|s| s.1)
            .unwrap_or_default();
        Ok(FloodReport {
            baseline: self.baseline,
            peak,
            last: samples.last().map(|s| s.1).unwrap_or_default(),
            samples: samples.len(),
            probe,
            acked,
            latencies,
        })
    }
}

impl FloodReport {
    /// The probe's 99th percentile publish-to-PUBACK time.
    pub fn p99(&self) -> Duration {
        quantile(&self.latencies, 0.99)
    }

    /// One line for the test's output.
    pub fn describe(&self) -> String {
        format!(
            "RSS baseline {}, peak {} at {:.1}s, last {} ({} samples); probe {} acked of {} published, p50 {:?} p99 {:?} max {:?}",
            self.baseline,
            self.peak.1,
            self.peak.0.as_secs_f64(),
            self.last,
            self.samples,
            self.probe.acked,
            self.probe.published,
            quantile(&self.latencies, 0.5),
            self.p99(),
            quantile(&self.latencies, 1.0),
        )
    }

    /// What broke the bounds: the RSS above `baseline + allowance` at any sample, the probe's
    /// p99 above `p99_limit`, or the probe not acknowledged (connection lost, readings unacked).
    pub fn violations(&self, allowance: ByteCount, p99_limit: Duration) -> Vec<String> {
        let mut v = Vec::new();
        let bound = self.baseline + allowance;
        if self.peak.1 > bound {
            v.push(format!(
                "RSS reached {} at {:.1}s, over the bound {bound} (baseline {} + {allowance})",
                self.peak.1,
                self.peak.0.as_secs_f64(),
                self.baseline
            ));
        }
        if self.latencies.is_empty() {
            v.push("the probe saw no PUBACK at all".to_owned());
        } else if self.p99() > p99_limit {
            v.push(format!(
                "the probe's PUBACK p99 was {:?} (max {:?}), over {p99_limit:?}",
                self.p99(),
                quantile(&self.latencies, 1.0)
            ));
        }
        if self.probe.lost_connection || self.probe.acked != self.probe.published {
            v.push(format!(
                "the probe was not answered: {} of {} readings acked, connection lost: {}",
                self.probe.acked, self.probe.published, self.probe.lost_connection
            ));
        }
        v
    }
}

/// Fails listing every violation (a flood scenario collects them all, so that one run shows
/// everything the gateway did wrong), or passes when there is none.
pub fn check_violations(what: &str, violations: &[String]) -> Result<()> {
    if violations.is_empty() {
        return Ok(());
    }
    bail!(
        "{what}: {} violation(s):\n  - {}",
        violations.len(),
        violations.join("\n  - ")
    )
}

/// Waits (deadline 60 s, every 500 ms) until `settled` says the gateway has accounted for a
/// flood; at the deadline the wait becomes a violation (pushed onto `violations`, with the last
/// error or state), so the scenario goes on to report everything else it finds.
pub fn settle(violations: &mut Vec<String>, what: &str, settled: impl FnMut() -> Result<bool>) {
    let mut settled = settled;
    if let Err(e) = poll(
        what,
        Duration::from_secs(60),
        Duration::from_millis(500),
        || Ok(settled()?.then_some(())),
    ) {
        violations.push(format!("{e:#}"));
    }
}

/// A counter (or gauge) every message must be accounted in, from a scrape of `/metrics`; one
/// the gateway does not expose is a violation (pushed onto `violations`) and reads as 0.
pub fn required_metric(scrape: &Scrape, name: &str, violations: &mut Vec<String>) -> u64 {
    match scrape.value(name, &[]) {
        Some(v) => v as u64,
        None => {
            violations.push(format!(
                "the gateway does not count {name} (not in /metrics)"
            ));
            0
        }
    }
}

/// Rows of the store's `state` table whose key starts with `prefix` (e.g. `mqtt/r/`: retained
/// messages, `mqtt/s/`: persistent sessions), read with Python's sqlite3 in read-only mode (a
/// second SQLite reader; safe while the gateway writes).
pub fn state_rows(db: &Path, prefix: &str) -> Result<u64> {
    let script = "import sqlite3, sys\n\
        con = sqlite3.connect('file:' + sys.argv[1] + '?mode=ro', uri=True)\n\
        p = sys.argv[2]\n\
        print(con.execute('SELECT count(*) FROM state WHERE substr(key, 1, ?) = ?', (len(p), p)).fetchone()[0])\n";
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(db)
        .arg(prefix)
        .stdin(Stdio::null())
        .output()
        .context("running python3 sqlite3")?;
    if !out.status.success() {
        bail!(
            "counting state rows in {}: {}",
            db.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// One connection of `tests/py/mqtt_flood.py publish` (raw MQTT 3.1.1, clean session).
#[derive(Debug, Clone)]
pub struct PublishFlood {
    /// Topic of message i: `{i}` is replaced by i.
    pub topic: String,
    /// Messages.
    pub count: u64,
    /// 0 (as fast as the socket takes them) or 1 (a window of 200 unacknowledged).
    pub qos: u8,
    /// Retained.
    pub retain: bool,
    /// Message i's payload: `{topic}` and `{i}` are replaced by its topic and i.
    pub payload: String,
    /// The payload is padded with '.' to this many bytes (0: not padded).
    pub size: usize,
    /// Its client id.
    pub client_id: String,
}

/// What a [`PublishFlood`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishFloodReport {
    /// PUBLISH packets written to the socket.
    pub sent: u64,
    /// PUBACKs received (QoS 1).
    pub acked: u64,
    /// The connection ended before the DISCONNECT was answered by a close.
    pub closed_early: bool,
    /// From the CONNACK to the gateway closing after the DISCONNECT.
    pub elapsed: Duration,
}

/// `--count` persistent sessions from `tests/py/mqtt_flood.py sessions`: MQTT 3.1.1, clean
/// session 0, each subscribed to one filter, disconnected, never back.
#[derive(Debug, Clone)]
pub struct SessionFlood {
    /// Clients (and sessions).
    pub count: u64,
    /// Client ids are this plus the client's index.
    pub client_prefix: String,
    /// Client i subscribes to this filter with `{i}` replaced by i (QoS 1).
    pub subscribe: String,
    /// Connections open at once (each uses a file descriptor on both sides).
    pub concurrency: usize,
}

/// What a [`SessionFlood`] got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionFloodReport {
    /// CONNACKs with return code 0.
    pub accepted: u64,
    /// CONNACKs refusing the session, by return code.
    pub refused: BTreeMap<String, u64>,
    /// SUBACKs granting the subscription.
    pub subscribed: u64,
    /// SUBACKs refusing it.
    pub subscribe_failed: u64,
    /// Connections closed (or silent) before the CONNACK or SUBACK.
    pub closed_without_answer: u64,
    /// Connections that could not be opened.
    pub connect_failed: u64,
    /// The whole flood.
    pub elapsed: Duration,
}

/// Runs `tests/py/mqtt_flood.py <args>` to the end (deadline `timeout`, exit 0 required), output
/// in `dir/<name>.log`, and returns the JSON summary on its last line.
fn run_mqtt_flood(dir: &TestDir, name: &str, args: &[String], timeout: Duration) -> Result<Value> {
    let mut cmd = Command::new("python3");
    cmd.arg(py_script("mqtt_flood.py")).args(args);
    let mut proc = Proc::spawn(
        &format!("mqtt_flood {name}"),
        cmd,
        &dir.join(&format!("{name}.log")),
    )?;
    let st = proc.wait(timeout)?;
    let last = log_lines(proc.log()).pop().unwrap_or_default();
    if !st.success() {
        bail!("mqtt_flood.py failed ({st}):\n{}", tail(proc.log(), 20));
    }
    serde_json::from_str(&last).with_context(|| format!("mqtt_flood.py summary {last:?}"))
}

fn summary_u64(v: &Value, key: &str) -> Result<u64> {
    v[key]
        .as_u64()
        .ok_or_else(|| anyhow!("no {key} in the flood summary {v}"))
}

fn summary_elapsed(v: &Value) -> Duration {
    Duration::from_secs_f64(v["elapsed_s"].as_f64().unwrap_or(0.0))
}

impl PublishFlood {
    /// Runs it against the broker on 127.0.0.1:`port`; output in `dir/<name>.log`.
    pub fn run(
        &self,
        dir: &TestDir,
        name: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<PublishFloodReport> {
        let mut args: Vec<String> = [
            "publish",
            "--port",
            &port.to_string(),
            "--topic",
            &self.topic,
            "--count",
            &self.count.to_string(),
            "--qos",
            &self.qos.to_string(),
            "--payload",
            &self.payload,
            "--size",
            &self.size.to_string(),
            "--client-id",
            &self.client_id,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        if self.retain {
            args.push("--retain".to_owned());
        }
        let v = run_mqtt_flood(dir, name, &args, timeout)?;
        Ok(PublishFloodReport {
            sent: summary_u64(&v, "sent")?,
            acked: summary_u64(&v, "acked")?,
            closed_early: v["closed_early"].as_bool().unwrap_or(true),
            elapsed: summary_elapsed(&v),
        })
    }
}

impl SessionFlood {
    /// Runs it against the broker on 127.0.0.1:`port`; output in `dir/<name>.log`.
    pub fn run(
        &self,
        dir: &TestDir,
        name: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<SessionFloodReport> {
        let args: Vec<String> = [
            "sessions",
            "--port",
            &port.to_string(),
            "--count",
            &self.count.to_string(),
            "--client-prefix",
            &self.client_prefix,
            "--subscribe",
            &self.subscribe,
            "--concurrency",
            &self.concurrency.to_string(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let v = run_mqtt_flood(dir, name, &args, timeout)?;
        Ok(SessionFloodReport {
            accepted: summary_u64(&v, "accepted")?,
            refused: v["refused"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, n)| Some((k.clone(), n.as_u64()?)))
                        .collect()
                })
                .unwrap_or_default(),
            subscribed: summary_u64(&v, "subscribed")?,
            subscribe_failed: summary_u64(&v, "subscribe_failed")?,
            closed_without_answer: summary_u64(&v, "closed_without_answer")?,
            connect_failed: summary_u64(&v, "connect_failed")?,
            elapsed: summary_elapsed(&v),
        })
    }
}

/// The node name of a [`FloodStage`]'s gateway.
pub const FLOOD_NODE: &str = "gw1";

/// The topic of a [`FloodStage`]'s probe.
pub const PROBE_TOPIC: &str = "probe/temp";

/// Where a flood scenario runs: a cloud mosquitto with a consumer on everything the gateway
/// sends, and the gateway with the shipped storage and discovery defaults (node
/// [`FLOOD_NODE`]), its uplink connected.
#[derive(Debug)]
pub struct FloodStage {
    /// The gateway (declared first: dropped, so killed, before its peers).
    pub gw: Outpost,
    /// Its configuration.
    pub cfg: GatewayConfig,
    /// The cloud consumer, subscribed to `outpost/<node>/#`.
    pub consumer: Subscriber,
    /// The cloud broker.
    pub cloud: Mosquitto,
    /// The scenario's directory (declared last: removed after everything in it stopped).
    pub dir: TestDir,
}

/// Readings that must have arrived upstream: `acked` on `topics`, [`payload`]s of `size` bytes.
#[derive(Debug, Clone)]
pub struct AckedReadings {
    /// Their local topics.
    pub topics: Vec<String>,
    /// Their payload size.
    pub size: usize,
    /// (topic, counter) of each.
    pub acked: Vec<(String, u64)>,
}

impl FloodStage {
    /// Starts the stage in a directory named after `name`; `configure` changes the gateway's
    /// configuration before it starts (extra tables, CoAP).
    pub fn start(name: &str, configure: impl FnOnce(&mut GatewayConfig)) -> Result<Self> {
        let dir = TestDir::new(name)?;
        let cloud = Mosquitto::start(&dir)?;
        let consumer = Subscriber::spawn(
            &dir,
            "cloud",
            &SubscriberSpec::new(cloud.port(), &format!("outpost/{FLOOD_NODE}/#")),
        )?;
        let mut cfg = GatewayConfig::new(&dir, FLOOD_NODE, Some(cloud.port()))?;
        cfg.shipped_storage = true;
        cfg.shipped_discovery = true;
        configure(&mut cfg);
        let gw = Outpost::start(&dir, &cfg)?;
        gw.wait_uplink_connected()?;
        Ok(Self {
            gw,
            cfg,
            consumer,
            cloud,
            dir,
        })
    }

    /// The store's database.
    pub fn db(&self) -> PathBuf {
        self.cfg.data_dir.join("outpost.db")
    }

    /// Starts watching the gateway: RSS and the probe on [`PROBE_TOPIC`].
    pub fn watch(&self) -> Result<FloodWatch> {
        FloodWatch::start(&self.dir, &self.gw, PROBE_TOPIC)
    }

    /// Waits (deadline 180 s) until the probe's acked readings (in `report`) and every set in
    /// `more` arrived upstream, and checks the upstream contract for each
    /// ([`SeqSource::UserProperty`]); returns everything received, and each set's delivery
    /// (the probe's first).
    pub fn check_delivered(
        &mut self,
        report: &FloodReport,
        more: &[AckedReadings],
    ) -> Result<(Vec<Received>, Vec<Delivery>)> {
        let probe = AckedReadings {
            topics: vec![PROBE_TOPIC.to_owned()],
            size: 100,
            acked: report.acked.clone(),
        };
        let sets: Vec<&AckedReadings> = std::iter::once(&probe).chain(more).collect();
        let all: Vec<(String, u64)> = sets.iter().flat_map(|s| s.acked.clone()).collect();
        let msgs = wait_for_readings(&self.consumer, &mut self.gw, &all, Duration::from_secs(180))?;
        let deliveries = sets
            .iter()
            .map(|s| {
                check_upstream_delivery(
                    &msgs,
                    FLOOD_NODE,
                    &s.topics,
                    s.size,
                    &s.acked,
                    SeqSource::UserProperty,
                )
            })
            .collect::<Result<_>>()?;
        Ok((msgs, deliveries))
    }
}

#[cfg(test)]
mod flood_checks {
    //! The flood scenarios' verdicts must be able to fail: each broken bound is named.
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn report(peak: ByteCount, latencies: Vec<Duration>, acked: u64) -> FloodReport {
        FloodReport {
            baseline: ByteCount::mib(20),
            peak: (Duration::from_secs(3), peak),
            last: peak,
            samples: 100,
            probe: PublisherSummary {
                published: 100,
                acked,
                lost_connection: false,
            },
            acked: Vec::new(),
            latencies,
        }
    }

    #[test]
    fn quantile_takes_the_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).rev().map(ms).collect();
        assert_eq!(quantile(&samples, 0.99), ms(99));
        assert_eq!(quantile(&samples, 0.5), ms(50));
        assert_eq!(quantile(&samples, 1.0), ms(100));
        assert_eq!(quantile(&[ms(7)], 0.99), ms(7));
        assert_eq!(quantile(&[], 0.99), Duration::ZERO);
    }

    #[test]
    fn each_broken_bound_is_a_violation() {
        let fast = vec![ms(10); 100];
        let ok = report(ByteCount::mib(52), fast.clone(), 100);
        assert!(ok.violations(ByteCount::mib(32), ms(2000)).is_empty());

        let grew = report(ByteCount::mib(52) + ByteCount(1), fast.clone(), 100);
        let v = grew.violations(ByteCount::mib(32), ms(2000));
        assert!(v.len() == 1 && v[0].starts_with("RSS reached"), "{v:?}");

        let mut slow = fast.clone();
        slow[..2].fill(ms(2500));
        let v = report(ByteCount::mib(21), slow, 100).violations(ByteCount::mib(32), ms(2000));
        assert!(v.len() == 1 && v[0].contains("p99"), "{v:?}");

        let v = report(ByteCount::mib(21), fast, 99).violations(ByteCount::mib(32), ms(2000));
        assert!(v.len() == 1 && v[0].contains("not answered"), "{v:?}");

        let v =
            report(ByteCount::mib(21), Vec::new(), 100).violations(ByteCount::mib(32), ms(2000));
        assert!(v.len() == 1 && v[0].contains("no PUBACK"), "{v:?}");
    }
}
