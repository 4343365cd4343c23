//! Health checks of the services around the gateway: `[[check]]` entries run on their interval,
//! each result folded into a per-check state that the status, the metrics and the upstream
//! change messages read.
//!
//! # States
//!
//! ```text
//!            success                       failure_threshold failures in a row
//! Unknown ----------> Healthy   Degraded ------------------------------------> Unhealthy
//!    |                   |  ^       ^  |                                          |
//!    | failure           |  |       |  | recovery_threshold successes in a row    |
//!    +-------------------+--|-------+  +------------------------------------------+--> Healthy
//!         (failure_threshold = 1: straight to Unhealthy)
//! ```
//!
//! - A check is `Unknown` until its first run finishes.
//! - A success from `Unknown` or `Healthy` is `Healthy`. A failure from either is `Degraded`, or
//!   `Unhealthy` once `failure_threshold` failures are consecutive (at once when it is 1).
//! - From `Degraded` or `Unhealthy`, `recovery_threshold` consecutive successes are `Healthy`;
//!   fewer leave the state as it is. A failure resets the success count and vice versa.
//!
//! The state machine ([`CheckMachine`]) is pure: it takes run outcomes and wall-clock
//! milliseconds and does no I/O, so its tests need no clock.
//!
//! # Runs
//!
//! One task per check (spawned on the caller's [`TaskTracker`], stopped by its
//! [`CancellationToken`]). The first run starts at once, the next `interval` after the previous
//! start (a late run delays the schedule rather than bursting). Config validation guarantees
//! `timeout < interval`, so runs of one check never overlap.
//!
//! - `http`: a fresh connection per run (no pool: a check proves a new client can get through),
//!   `GET` with the configured headers (marked sensitive, never logged); the run succeeds when
//!   the status equals `expected_status`. Up to [`MAX_OUTPUT_BYTES`] of the body are kept as the
//!   output; the body does not decide the result.
//! - `tcp`: a connect, resolved at every run; the connection is closed at once.
//! - `command`: the program run without a shell, stdin null, stdout and stderr captured (in the
//!   order the chunks arrive; the first [`MAX_OUTPUT_BYTES`] kept, the rest read and dropped, so
//!   a chatty program never blocks on a full pipe); exit code 0 succeeds. At the timeout the
//!   child is killed (SIGKILL; its own children are not, they merely lose their pipe). A program
//!   that cannot be started is a failed run with the reason.
//!
//! # Changes
//!
//! Each state change is logged (`info` towards healthy, `warn` away from it, with the reason) and
//! sent on the `changes` channel. The channel is bounded: when its receiver lags, the check's
//! task waits to hand the change over (delaying its next run) rather than drop a change; a
//! receiver that has gone away is ignored. [`Checks::snapshot`] always has the latest status.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::{HOST, HeaderName, HeaderValue, USER_AGENT};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use outpost_config::{CheckConfig, CheckKind, HostPort, HttpUrl, Secret};
use serde::{Serialize, Serializer};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Longest output (command stdout+stderr, HTTP body) kept per run, in bytes. Enough for an error
/// line or a small health JSON; bounded because it lives in the status and upstream messages.
pub const MAX_OUTPUT_BYTES: usize = 512;

/// How long a command's output is still read after it exited: a background child that inherited
/// the pipe must not hold the run open until the timeout.
const OUTPUT_GRACE: Duration = Duration::from_millis(100);

/// How long a killed command is waited for; past it, tokio reaps it in the background.
const KILL_WAIT: Duration = Duration::from_millis(500);

/// Sent as `User-Agent`, so a checked service can tell our probes from real clients.
const USER_AGENT_VALUE: &str = concat!("outpost/", env!("CARGO_PKG_VERSION"), " health-check");

// ---------------------------------------------------------------------------------------------
// State machine

/// Where a check stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckState {
    /// Not run yet.
    Unknown,
    /// The last run succeeded (and, coming back, enough in a row did).
    Healthy,
    /// Failing, but fewer than `failure_threshold` times in a row; or recovering.
    Degraded,
    /// `failure_threshold` or more failures in a row, not yet recovered.
    Unhealthy,
}

impl CheckState {
    /// Every state, in order of severity (for one-hot metrics).
    pub const ALL: [CheckState; 4] = [
        CheckState::Unknown,
        CheckState::Healthy,
        CheckState::Degraded,
        CheckState::Unhealthy,
    ];

    /// The state as written in the status and metrics: `unknown`, `healthy`, `degraded`,
    /// `unhealthy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Healthy => "healthy",
            Self::Degraded => "degraded",
            Self::Unhealthy => "unhealthy",
        }
    }
}

impl std::fmt::Display for CheckState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one run found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    /// Whether the run succeeded.
    pub ok: bool,
    /// How long it took.
    pub duration: Duration,
    /// Why it failed; `None` when it succeeded.
    pub error: Option<String>,
    /// What it printed or returned, truncated to [`MAX_OUTPUT_BYTES`].
    pub output: Option<String>,
}

/// A check's current status: its state, counters and the last run's details.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckStatus {
    /// The configured name.
    pub name: String,
    /// `http`, `tcp` or `command`.
    pub kind: &'static str,
    /// The current state.
    pub state: CheckState,
    /// Failures in a row, up to now (0 after a success).
    pub consecutive_failures: u32,
    /// Successes in a row, up to now (0 after a failure).
    pub consecutive_successes: u32,
    /// Runs finished since start.
    pub runs_total: u64,
    /// Failed runs since start.
    pub failures_total: u64,
    /// Duration of the last run; `None` before the first. In JSON: `last_duration_ms`, a float.
    #[serde(rename = "last_duration_ms", serialize_with = "duration_ms")]
    pub last_duration: Option<Duration>,
    /// Why the last run failed; `None` if it succeeded (or none ran yet).
    pub last_error: Option<String>,
    /// The last run's output (command stdout+stderr, HTTP body), at most [`MAX_OUTPUT_BYTES`].
    pub last_output: Option<String>,
    /// Wall-clock time of the last state change (or of the start), Unix milliseconds.
    pub last_change_ms: u64,
}

fn duration_ms<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&(d.as_secs_f64() * 1000.0)),
        None => s.serialize_none(),
    }
}

/// A state change, with the status right after it.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckChange {
    /// The check's name.
    pub name: String,
    /// The state before the run.
    pub from: CheckState,
    /// The state after it.
    pub to: CheckState,
    /// The status after the run (its `last_error` says why a check left `Healthy`).
    pub status: CheckStatus,
}

/// The pure state machine of one check: outcomes in, status and changes out.
#[derive(Debug, Clone)]
pub struct CheckMachine {
    /// Consecutive failures that make the check unhealthy (>= 1, validated by config).
    failure_threshold: u32,
    /// Consecutive successes that bring it back to healthy (>= 1).
    recovery_threshold: u32,
    /// Everything reported about the check.
    status: CheckStatus,
}

impl CheckMachine {
    /// A check in state `Unknown`, as of `now_ms`. Thresholds below 1 are taken as 1.
    pub fn new(
        name: impl Into<String>,
        kind: &'static str,
        failure_threshold: u32,
        recovery_threshold: u32,
        now_ms: u64,
    ) -> Self {
        Self {
            failure_threshold: failure_threshold.max(1),
            recovery_threshold: recovery_threshold.max(1),
            status: CheckStatus {
                name: name.into(),
                kind,
                state: CheckState::Unknown,
                consecutive_failures: 0,
                consecutive_successes: 0,
                runs_total: 0,
                failures_total: 0,
                last_duration: None,
                last_error: None,
                last_output: None,
                last_change_ms: now_ms,
            },
        }
    }

    /// The machine for a configured check.
    pub fn for_config(config: &CheckConfig, now_ms: u64) -> Self {
        Self::new(
            config.name.as_str(),
            config.kind.as_str(),
            config.failure_threshold,
            config.recovery_threshold,
            now_ms,
        )
    }

    /// The current status.
    pub fn status(&self) -> &CheckStatus {
        &self.status
    }

    /// Folds in one run's outcome, finished at `now_ms`. Returns the change, if the state moved.
    pub fn record(&mut self, outcome: RunOutcome, now_ms: u64) -> Option<CheckChange> {
        let s = &mut self.status;
        s.runs_total += 1;
        if outcome.ok {
            s.consecutive_successes = s.consecutive_successes.saturating_add(1);
            s.consecutive_failures = 0;
        } else {
            s.failures_total += 1;
            s.consecutive_failures = s.consecutive_failures.saturating_add(1);
            s.consecutive_successes = 0;
        }
        s.last_duration = Some(outcome.duration);
        s.last_error = if outcome.ok { None } else { outcome.error };
        s.last_output = outcome.output;
        let from = s.state;
        let to = next_state(
            from,
            outcome.ok,
            s.consecutive_failures,
            s.consecutive_successes,
            self.failure_threshold,
            self.recovery_threshold,
        );
        if from == to {
            return None;
        }
        s.state = to;
        s.last_change_ms = now_ms;
        Some(CheckChange {
            name: s.name.clone(),
            from,
            to,
            status: s.clone(),
        })
    }
}

/// The transition rule, given the counters already updated for this run.
fn next_state(
    state: CheckState,
    ok: bool,
    consecutive_failures: u32,
    consecutive_successes: u32,
    failure_threshold: u32,
    recovery_threshold: u32,
) -> CheckState {
    use CheckState::*;
    if ok {
        match state {
            Unknown | Healthy => Healthy,
            Degraded | Unhealthy if consecutive_successes >= recovery_threshold => Healthy,
            Degraded | Unhealthy => state,
        }
    } else if consecutive_failures >= failure_threshold {
        Unhealthy
    } else {
        match state {
            Unknown | Healthy | Degraded => Degraded,
            // Unreachable with consistent counters (Unhealthy implies the threshold was reached
            // and a failure never lowers the count), kept total rather than panicking.
            Unhealthy => Unhealthy,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Runner

/// The running checks: a shared snapshot of their statuses, in config order. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Checks {
    /// One status per configured check, updated by its task after every run. A std mutex: held
    /// only to copy a status in or the list out, never across an await.
    statuses: Arc<Mutex<Vec<CheckStatus>>>,
}

impl Checks {
    /// Spawns one task per check on `tracker`; they stop when `shutdown` is cancelled (a run in
    /// progress is abandoned, a command killed). State changes go to `changes` (see the module
    /// doc for what happens when it is full or closed). With no checks, nothing is spawned and
    /// the snapshot is empty.
    pub fn spawn(
        configs: Vec<CheckConfig>,
        changes: mpsc::Sender<CheckChange>,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Checks {
        let now = now_ms();
        let machines: Vec<CheckMachine> = configs
            .iter()
            .map(|c| CheckMachine::for_config(c, now))
            .collect();
        let checks = Checks {
            statuses: Arc::new(Mutex::new(
                machines.iter().map(|m| m.status().clone()).collect(),
            )),
        };
        for (index, (config, machine)) in configs.into_iter().zip(machines).enumerate() {
            tracker.spawn(run_check(
                config,
                machine,
                index,
                checks.clone(),
                changes.clone(),
                shutdown.clone(),
            ));
        }
        checks
    }

    /// The statuses of every check, in config order.
    pub fn snapshot(&self) -> Vec<CheckStatus> {
        self.statuses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn store(&self, index: usize, status: &CheckStatus) {
        let mut statuses = self.statuses.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = statuses.get_mut(index) {
            slot.clone_from(status);
        }
    }
}

async fn run_check(
    config: CheckConfig,
    mut machine: CheckMachine,
    index: usize,
    checks: Checks,
    changes: mpsc::Sender<CheckChange>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut receiver_gone = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return,
            outcome = run_once(&config.kind, config.timeout) => outcome,
        };
        if !outcome.ok {
            tracing::debug!(
                check = %config.name,
                error = outcome.error.as_deref().unwrap_or(""),
                "health check run failed"
            );
        }
        let change = machine.record(outcome, now_ms());
        checks.store(index, machine.status());
        let Some(change) = change else { continue };
        log_change(&change);
        if receiver_gone {
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            sent = changes.send(change) => if sent.is_err() {
                tracing::debug!(check = %config.name, "check change receiver is gone");
                receiver_gone = true;
            },
        }
    }
}

fn log_change(change: &CheckChange) {
    let s = &change.status;
    let error = s.last_error.as_deref().unwrap_or("");
    match change.to {
        CheckState::Healthy | CheckState::Unknown => tracing::info!(
            check = %change.name,
            kind = s.kind,
            from = %change.from,
            to = %change.to,
            "health check is {}",
            change.to
        ),
        CheckState::Degraded | CheckState::Unhealthy => tracing::warn!(
            check = %change.name,
            kind = s.kind,
            from = %change.from,
            to = %change.to,
            consecutive_failures = s.consecutive_failures,
            error,
            "health check is {}",
            change.to
        ),
    }
}

/// Runs a check once, within `timeout`. Never panics and never takes (much) longer than
/// `timeout`: every await below is bounded by the same deadline.
pub async fn run_once(kind: &CheckKind, timeout: Duration) -> RunOutcome {
    let start = Instant::now();
    let deadline = start + timeout;
    let probe = match kind {
        CheckKind::Http {
            url,
            expected_status,
            headers,
        } => http_probe(url, *expected_status, headers, deadline, timeout).await,
        CheckKind::Tcp { address } => tcp_probe(address, deadline, timeout).await,
        CheckKind::Command { argv } => command_probe(argv, deadline, timeout).await,
    };
    RunOutcome {
        ok: probe.error.is_none(),
        duration: start.elapsed(),
        error: probe.error,
        output: probe.output,
    }
}

/// A probe's result before timing is added: `error` `None` is success.
struct Probe {
    error: Option<String>,
    output: Option<String>,
}

fn timed_out(timeout: Duration, while_: &str) -> String {
    format!(
        "timed out after {} {while_}",
        humantime::format_duration(timeout)
    )
}

async fn tcp_probe(address: &HostPort, deadline: Instant, limit: Duration) -> Probe {
    match timeout_at(
        deadline,
        TcpStream::connect((address.host.as_str(), address.port)),
    )
    .await
    {
        Err(_) => Probe {
            error: Some(timed_out(limit, &format!("connecting to {address}"))),
            output: None,
        },
        Ok(Err(e)) => Probe {
            error: Some(format!("connect to {address}: {e}")),
            output: None,
        },
        Ok(Ok(stream)) => Probe {
            error: None,
            output: stream.peer_addr().ok().map(|a| format!("connected to {a}")),
        },
    }
}

async fn http_probe(
    url: &HttpUrl,
    expected_status: u16,
    headers: &BTreeMap<String, Secret>,
    deadline: Instant,
    limit: Duration,
) -> Probe {
    match http_get(url, headers, deadline, limit).await {
        Err(error) => Probe {
            error: Some(error),
            output: None,
        },
        Ok((status, body)) => Probe {
            error: (status != expected_status)
                .then(|| format!("status {status}, expected {expected_status}")),
            output: body.into_text(),
        },
    }
}

/// `GET url` on a fresh connection: the status and the first [`MAX_OUTPUT_BYTES`] of the body
/// (read until the deadline at most; a slow body does not fail a run whose status is known).
async fn http_get(
    url: &HttpUrl,
    headers: &BTreeMap<String, Secret>,
    deadline: Instant,
    limit: Duration,
) -> Result<(u16, Capture), String> {
    let stream = timeout_at(deadline, TcpStream::connect((url.host.as_str(), url.port)))
        .await
        .map_err(|_| timed_out(limit, &format!("connecting to {}", url.authority())))?
        .map_err(|e| format!("connect to {}: {e}", url.authority()))?;
    let request = build_request(url, headers)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|e| format!("http: {}", chain(&e)))?;
    let exchange = async {
        let response = timeout_at(deadline, sender.send_request(request))
            .await
            .map_err(|_| timed_out(limit, "waiting for the response"))?
            .map_err(|e| format!("http: {}", chain(&e)))?;
        let status = response.status().as_u16();
        let mut body = response.into_body();
        let mut capture = Capture::default();
        while !capture.is_full() {
            match timeout_at(deadline, body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        capture.push(data);
                    }
                }
                // End of body, a broken body or the deadline: the status is what counts.
                Ok(None) | Ok(Some(Err(_))) | Err(_) => break,
            }
        }
        Ok((status, capture))
    };
    // The connection future does the I/O; it is driven here (not spawned) so that it is dropped,
    // and the socket closed, when the run ends.
    tokio::pin!(connection, exchange);
    let mut connection_error = None;
    loop {
        tokio::select! {
            result = &mut exchange => {
                return result.map_err(|e: String| match connection_error.take() {
                    Some(c) => format!("{e} ({c})"),
                    None => e,
                });
            }
            done = &mut connection, if connection_error.is_none() => {
                connection_error = Some(match done {
                    Ok(()) => String::from("connection closed"),
                    Err(e) => chain(&e),
                });
            }
        }
    }
}

fn build_request(
    url: &HttpUrl,
    headers: &BTreeMap<String, Secret>,
) -> Result<Request<Empty<Bytes>>, String> {
    let mut request = Request::builder()
        .method(Method::GET)
        .uri(url.path_and_query.as_str())
        .header(HOST, url.authority())
        .header(USER_AGENT, USER_AGENT_VALUE)
        .body(Empty::new())
        .map_err(|e| format!("invalid request for {url}: {e}"))?;
    for (name, value) in headers {
        // Config validation admits only names and values that parse; these errors are a
        // safety net, and never show the value.
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("invalid header name {name:?}"))?;
        let mut value = HeaderValue::from_str(value.expose())
            .map_err(|_| format!("invalid value for header {name}"))?;
        value.set_sensitive(true);
        // Insert, not append: a configured Host replaces ours.
        request.headers_mut().insert(name, value);
    }
    Ok(request)
}

/// An error and its sources, `a: b: c` (hyper's own messages are terse).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}

async fn command_probe(argv: &[String], deadline: Instant, limit: Duration) -> Probe {
    let Some((program, args)) = argv.split_first() else {
        // Refused by config validation; a safety net.
        return Probe {
            error: Some(String::from("empty command")),
            output: None,
        };
    };
    let mut child = match tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            return Probe {
                error: Some(format!("cannot start {program:?}: {e}")),
                output: None,
            };
        }
    };
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut capture = Capture::default();
    let (mut out_buf, mut err_buf) = ([0u8; 1024], [0u8; 1024]);
    let mut exit = None;
    let mut read_until = deadline;
    while exit.is_none() || stdout.is_some() || stderr.is_some() {
        tokio::select! {
            read = read_some(&mut stdout, &mut out_buf), if stdout.is_some() => match read {
                Some(n) => capture.push(&out_buf[..n]),
                None => stdout = None,
            },
            read = read_some(&mut stderr, &mut err_buf), if stderr.is_some() => match read {
                Some(n) => capture.push(&err_buf[..n]),
                None => stderr = None,
            },
            status = child.wait(), if exit.is_none() => {
                exit = Some(status);
                read_until = deadline.min(Instant::now() + OUTPUT_GRACE);
            }
            _ = tokio::time::sleep_until(read_until) => break,
        }
    }
    let error = match exit {
        None => {
            // Killed here rather than only on drop, so it is gone before the next run.
            let _ = child.start_kill();
            let _ = timeout(KILL_WAIT, child.wait()).await;
            Some(format!(
                "{}; killed",
                timed_out(limit, "waiting for the command")
            ))
        }
        Some(Err(e)) => Some(format!("waiting for {program:?}: {e}")),
        Some(Ok(status)) if status.success() => None,
        Some(Ok(status)) => Some(describe_exit(status)),
    };
    Probe {
        error,
        output: capture.into_text(),
    }
}

/// Reads one chunk; `None` at end of stream or on error (either way, nothing more to read).
async fn read_some<R: AsyncRead + Unpin>(reader: &mut Option<R>, buf: &mut [u8]) -> Option<usize> {
    match reader.as_mut()?.read(buf).await {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(n),
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit code {code}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return format!("killed by signal {signal}");
        }
    }
    format!("failed: {status}")
}

/// The first [`MAX_OUTPUT_BYTES`] of a stream; the rest is counted and dropped.
#[derive(Debug, Default)]
struct Capture {
    /// At most `MAX_OUTPUT_BYTES`.
    kept: Vec<u8>,
    /// Whether anything was dropped.
    truncated: bool,
}

impl Capture {
    fn push(&mut self, data: &[u8]) {
        let room = MAX_OUTPUT_BYTES - self.kept.len();
        if data.len() > room {
            self.truncated = true;
        }
        self.kept.extend_from_slice(&data[..data.len().min(room)]);
    }

    fn is_full(&self) -> bool {
        self.kept.len() >= MAX_OUTPUT_BYTES
    }

    /// UTF-8 (lossy), trailing whitespace trimmed, at most [`MAX_OUTPUT_BYTES`] bytes, ending in
    /// `…` when cut. `None` when empty.
    fn into_text(self) -> Option<String> {
        let mut text = String::from_utf8_lossy(&self.kept).into_owned();
        // Replacement characters can make the text longer than the bytes it came from.
        if self.truncated || text.len() > MAX_OUTPUT_BYTES {
            let mut cut = text.len().min(MAX_OUTPUT_BYTES - '…'.len_utf8());
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push('…');
        } else {
            text.truncate(text.trim_end().len());
        }
        (!text.is_empty()).then_some(text)
    }
}

/// Wall-clock Unix milliseconds.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU16, Ordering};

    use outpost_config::CheckName;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use CheckState::*;

    fn ok() -> RunOutcome {
        RunOutcome {
            ok: true,
            duration: Duration::from_millis(1),
            error: None,
            output: None,
        }
    }

    fn fail() -> RunOutcome {
        RunOutcome {
            ok: false,
            duration: Duration::from_millis(1),
            error: Some("boom".into()),
            output: Some("out".into()),
        }
    }

    /// Feeds `runs` (true = success) and returns the state after each.
    fn states(failure_threshold: u32, recovery_threshold: u32, runs: &[bool]) -> Vec<CheckState> {
        let mut m = CheckMachine::new("c", "tcp", failure_threshold, recovery_threshold, 0);
        runs.iter()
            .map(|&r| {
                m.record(if r { ok() } else { fail() }, 1);
                m.status().state
            })
            .collect()
    }

    #[test]
    fn unknown_until_the_first_run_then_healthy_on_success() {
        let m = CheckMachine::new("c", "tcp", 3, 1, 42);
        assert_eq!(m.status().state, Unknown);
        assert_eq!(m.status().last_change_ms, 42);
        assert_eq!(states(3, 1, &[true, true]), [Healthy, Healthy]);
    }

    #[test]
    fn failures_degrade_then_reach_unhealthy_at_the_threshold() {
        assert_eq!(
            states(3, 1, &[true, false, false, false, false]),
            [Healthy, Degraded, Degraded, Unhealthy, Unhealthy]
        );
        // From Unknown too.
        assert_eq!(states(2, 1, &[false, false]), [Degraded, Unhealthy]);
    }

    #[test]
    fn threshold_one_goes_straight_to_unhealthy() {
        assert_eq!(states(1, 1, &[false]), [Unhealthy]);
        assert_eq!(
            states(1, 1, &[true, false, true]),
            [Healthy, Unhealthy, Healthy]
        );
    }

    #[test]
    fn a_success_between_failures_resets_the_count() {
        assert_eq!(
            states(3, 1, &[false, false, true, false, false, false]),
            [Degraded, Degraded, Healthy, Degraded, Degraded, Unhealthy]
        );
    }

    #[test]
    fn recovery_needs_consecutive_successes() {
        assert_eq!(
            states(2, 3, &[false, false, true, true, false, true, true, true]),
            [
                Degraded, Unhealthy, Unhealthy, Unhealthy, Unhealthy, Unhealthy, Unhealthy, Healthy
            ]
        );
        // Degraded recovers the same way, and a failure while recovering counts towards unhealthy.
        assert_eq!(
            states(3, 2, &[true, false, true, true]),
            [Healthy, Degraded, Degraded, Healthy]
        );
        assert_eq!(
            states(2, 2, &[false, true, false, false]),
            [Degraded, Degraded, Degraded, Unhealthy]
        );
    }

    #[test]
    fn counters_and_changes() {
        let mut m = CheckMachine::new("plc", "http", 2, 1, 0);
        let c = m.record(ok(), 10).unwrap();
        assert_eq!((c.name.as_str(), c.from, c.to), ("plc", Unknown, Healthy));
        assert_eq!(c.status.last_change_ms, 10);
        assert_eq!(m.record(ok(), 20), None);
        let c = m.record(fail(), 30).unwrap();
        assert_eq!((c.from, c.to), (Healthy, Degraded));
        assert_eq!(c.status.last_error.as_deref(), Some("boom"));
        assert_eq!(c.status.last_output.as_deref(), Some("out"));
        let c = m.record(fail(), 40).unwrap();
        assert_eq!((c.from, c.to), (Degraded, Unhealthy));
        let s = m.status();
        assert_eq!(
            (
                s.runs_total,
                s.failures_total,
                s.consecutive_failures,
                s.consecutive_successes
            ),
            (4, 2, 2, 0)
        );
        assert_eq!(s.last_change_ms, 40);
        m.record(ok(), 50).unwrap();
        let s = m.status();
        assert_eq!((s.consecutive_failures, s.consecutive_successes), (0, 1));
        assert_eq!((s.last_error.clone(), s.state), (None, Healthy));
    }

    #[test]
    fn status_serialises_in_kebab_case_with_ms() {
        let mut m = CheckMachine::new("plc", "http", 1, 1, 0);
        m.record(fail(), 5);
        let json = serde_json::to_value(m.status()).unwrap();
        assert_eq!(json["state"], "unhealthy");
        assert_eq!(json["kind"], "http");
        assert_eq!(json["last_duration_ms"], 1.0);
        assert_eq!(serde_json::to_value(Unknown).unwrap(), "unknown");
        assert_eq!(Degraded.as_str(), "degraded");
    }

    #[test]
    fn output_is_truncated_at_a_char_boundary() {
        let mut c = Capture::default();
        c.push("é".repeat(400).as_bytes());
        assert!(c.is_full());
        let text = c.into_text().unwrap();
        assert!(text.len() <= MAX_OUTPUT_BYTES, "{}", text.len());
        assert!(text.ends_with('…'));
        let mut c = Capture::default();
        c.push(b"fine\n");
        assert_eq!(c.into_text().as_deref(), Some("fine"));
        assert_eq!(Capture::default().into_text(), None);
        let mut c = Capture::default();
        c.push(&[0xff, b'a']);
        assert_eq!(c.into_text().as_deref(), Some("\u{fffd}a"));
    }

    // -----------------------------------------------------------------------------------------
    // Real runs

    /// A tiny HTTP/1.1 server: answers every request with the current status and body `hi`, and
    /// keeps the last request head it saw. Test scaffolding, not a parser anyone relies on.
    struct TestServer {
        addr: std::net::SocketAddr,
        status: Arc<AtomicU16>,
        last_request: Arc<Mutex<String>>,
    }

    async fn http_server(status: u16) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(AtomicU16::new(status));
        let last_request = Arc::new(Mutex::new(String::new()));
        let (s, r) = (status.clone(), last_request.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let (s, r) = (s.clone(), r.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    *r.lock().unwrap() = String::from_utf8_lossy(&head).into_owned();
                    let code = s.load(Ordering::SeqCst);
                    let response = format!(
                        "HTTP/1.1 {code} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
                    );
                    let _ = sock.write_all(response.as_bytes()).await;
                });
            }
        });
        TestServer {
            addr,
            status,
            last_request,
        }
    }

    fn http_kind(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)]) -> CheckKind {
        CheckKind::Http {
            url: HttpUrl::parse(&format!("http://{addr}{path}")).unwrap(),
            expected_status: 200,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), Secret::new(*v)))
                .collect(),
        }
    }

    fn command(argv: &[&str]) -> CheckKind {
        CheckKind::Command {
            argv: argv.iter().map(|s| s.to_string()).collect(),
        }
    }

    const T: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn http_status_decides_and_headers_are_sent() {
        let server = http_server(200).await;
        let kind = http_kind(server.addr, "/health?x=1", &[("X-Token", "s3cret")]);
        let run = run_once(&kind, T).await;
        assert!(run.ok, "{run:?}");
        assert_eq!(run.output.as_deref(), Some("hi"));
        let head = server.last_request.lock().unwrap().clone();
        assert!(head.starts_with("GET /health?x=1 HTTP/1.1\r\n"), "{head}");
        assert!(
            head.to_ascii_lowercase().contains("x-token: s3cret"),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("host: {}", server.addr)),
            "{head}"
        );

        server.status.store(503, Ordering::SeqCst);
        let run = run_once(&kind, T).await;
        assert!(!run.ok);
        assert_eq!(run.error.as_deref(), Some("status 503, expected 200"));
        assert_eq!(run.output.as_deref(), Some("hi"));
    }

    #[tokio::test]
    async fn http_to_a_closed_port_or_a_silent_server_fails() {
        let closed = closed_port().await;
        let run = run_once(&http_kind(closed, "/", &[]), T).await;
        assert!(!run.ok);
        assert!(
            run.error.as_deref().unwrap().contains("connect to"),
            "{run:?}"
        );

        // Accepts, never answers: the timeout decides.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let run = run_once(&http_kind(addr, "/", &[]), Duration::from_millis(200)).await;
        assert!(!run.ok);
        assert!(
            run.error
                .as_deref()
                .unwrap()
                .contains("timed out after 200ms"),
            "{run:?}"
        );
        assert!(run.duration < Duration::from_secs(2), "{run:?}");
        drop(silent);
    }

    /// A port nothing listens on: bound, then released.
    async fn closed_port() -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    }

    #[tokio::test]
    async fn tcp_connects_to_a_listening_port_and_fails_on_a_closed_one() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap();
        let tcp = |a: std::net::SocketAddr| CheckKind::Tcp {
            address: HostPort::parse(&a.to_string()).unwrap(),
        };
        let run = run_once(&tcp(open), T).await;
        assert!(run.ok, "{run:?}");
        assert_eq!(run.output, Some(format!("connected to {open}")));

        let run = run_once(&tcp(closed_port().await), T).await;
        assert!(!run.ok);
        let error = run.error.unwrap();
        assert!(error.contains("refused"), "{error}");
    }

    #[tokio::test]
    async fn commands_succeed_on_exit_zero_and_keep_their_output() {
        assert!(run_once(&command(&["true"]), T).await.ok);

        let run = run_once(&command(&["false"]), T).await;
        assert_eq!(run.error.as_deref(), Some("exit code 1"));

        let run = run_once(&command(&["sh", "-c", "echo out; echo err >&2; exit 3"]), T).await;
        assert!(!run.ok);
        assert_eq!(run.error.as_deref(), Some("exit code 3"));
        let output = run.output.unwrap();
        assert!(output.contains("out") && output.contains("err"), "{output}");

        let run = run_once(&command(&["/nonexistent/outpost-check"]), T).await;
        assert!(!run.ok);
        assert!(
            run.error
                .as_deref()
                .unwrap()
                .starts_with("cannot start \"/nonexistent/outpost-check\""),
            "{run:?}"
        );
    }

    #[tokio::test]
    async fn a_command_past_its_timeout_is_killed_and_fails() {
        let run = run_once(
            &command(&["sh", "-c", "echo started; exec sleep 30"]),
            Duration::from_millis(300),
        )
        .await;
        assert!(!run.ok);
        assert!(
            run.error
                .as_deref()
                .unwrap()
                .contains("timed out after 300ms"),
            "{run:?}"
        );
        assert_eq!(run.output.as_deref(), Some("started"));
        assert!(run.duration < Duration::from_secs(3), "{run:?}");
    }

    #[tokio::test]
    async fn a_background_child_holding_the_pipe_does_not_hold_the_run() {
        let run = run_once(&command(&["sh", "-c", "sleep 30 & echo done"]), T).await;
        assert!(run.ok, "{run:?}");
        assert_eq!(run.output.as_deref(), Some("done"));
        assert!(run.duration < Duration::from_secs(2), "{run:?}");
    }

    #[tokio::test]
    async fn long_output_is_truncated_and_fully_drained() {
        // 1 MB through the pipe: more than the pipe buffer, so the child would block if the
        // rest were not read.
        let run = run_once(
            &command(&["sh", "-c", "head -c 1000000 /dev/zero | tr '\\0' x; exit 4"]),
            T,
        )
        .await;
        assert_eq!(run.error.as_deref(), Some("exit code 4"), "{run:?}");
        let output = run.output.unwrap();
        assert!(output.len() <= MAX_OUTPUT_BYTES);
        assert!(
            output.starts_with("xxxx") && output.ends_with('…'),
            "{output}"
        );
    }

    fn config(name: &str, kind: CheckKind, failure_threshold: u32) -> CheckConfig {
        CheckConfig {
            name: CheckName::new(name).unwrap(),
            kind,
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(80),
            failure_threshold,
            recovery_threshold: 1,
        }
    }

    /// The change stream, readable per check: changes of other checks are kept for later.
    struct Changes {
        rx: mpsc::Receiver<CheckChange>,
        pending: Vec<CheckChange>,
    }

    impl Changes {
        /// The next change of `name`.
        async fn next(&mut self, name: &str) -> (CheckState, CheckState) {
            if let Some(i) = self.pending.iter().position(|c| c.name == name) {
                let c = self.pending.remove(i);
                return (c.from, c.to);
            }
            loop {
                let change = timeout(Duration::from_secs(10), self.rx.recv())
                    .await
                    .unwrap_or_else(|_| panic!("a change of {name} within 10s"))
                    .expect("channel open");
                if change.name == name {
                    return (change.from, change.to);
                }
                self.pending.push(change);
            }
        }
    }

    #[tokio::test]
    async fn checks_change_state_after_the_threshold_and_back() {
        let server = http_server(200).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp_addr = listener.local_addr().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("ok");
        std::fs::write(&flag, "").unwrap();
        let configs = vec![
            config("web", http_kind(server.addr, "/", &[]), 2),
            config(
                "port",
                CheckKind::Tcp {
                    address: HostPort::parse(&tcp_addr.to_string()).unwrap(),
                },
                2,
            ),
            config("file", command(&["test", "-f", flag.to_str().unwrap()]), 1),
        ];
        let (tx, rx) = mpsc::channel(64);
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let checks = Checks::spawn(configs, tx, shutdown.clone(), &tracker);
        assert_eq!(checks.snapshot().len(), 3);
        let mut changes = Changes {
            rx,
            pending: Vec::new(),
        };

        for name in ["web", "port", "file"] {
            assert_eq!(changes.next(name).await, (Unknown, Healthy), "{name}");
        }

        // Break all three.
        server.status.store(500, Ordering::SeqCst);
        drop(listener);
        std::fs::remove_file(&flag).unwrap();
        assert_eq!(changes.next("web").await, (Healthy, Degraded));
        assert_eq!(changes.next("web").await, (Degraded, Unhealthy));
        assert_eq!(changes.next("port").await, (Healthy, Degraded));
        assert_eq!(changes.next("port").await, (Degraded, Unhealthy));
        assert_eq!(changes.next("file").await, (Healthy, Unhealthy));
        let snapshot = checks.snapshot();
        let web = snapshot.iter().find(|s| s.name == "web").unwrap();
        assert_eq!(web.state, Unhealthy);
        assert!(web.failures_total >= 2 && web.runs_total >= 3, "{web:?}");
        assert_eq!(web.last_error.as_deref(), Some("status 500, expected 200"));

        // Repair them: back to healthy after one success each.
        server.status.store(200, Ordering::SeqCst);
        let _listener = TcpListener::bind(tcp_addr).await.unwrap();
        std::fs::write(&flag, "").unwrap();
        assert_eq!(changes.next("web").await, (Unhealthy, Healthy));
        assert_eq!(changes.next("port").await, (Unhealthy, Healthy));
        assert_eq!(changes.next("file").await, (Unhealthy, Healthy));

        shutdown.cancel();
        tracker.close();
        timeout(Duration::from_secs(5), tracker.wait())
            .await
            .expect("check tasks stop on shutdown");
    }

    #[tokio::test]
    async fn no_checks_spawn_nothing() {
        let (tx, _rx) = mpsc::channel(1);
        let tracker = TaskTracker::new();
        let checks = Checks::spawn(Vec::new(), tx, CancellationToken::new(), &tracker);
        assert!(checks.snapshot().is_empty());
        assert!(tracker.is_empty());
    }
}
