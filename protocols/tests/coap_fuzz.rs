//! The CoAP endpoint under fuzzed traffic, over UDP: a proptest that sends each case's
//! datagrams (see `coap_fuzz/inputs.rs`: arbitrary bytes, messages with random options at their
//! encoding edges, reserved token lengths, Block1 uploads reordered and repeated, Block2 at every
//! szx, Observe registrations, empty ACK/RST for known and unknown ids, retransmissions, status
//! changes) from three sockets on 127.0.0.1 to a running `CoapServer`, in real time, with a
//! gateway behind it that commits, refuses (`refuse`) or answers after the piggy-back window
//! (`slow`: an empty ACK, then a separate response retransmitted until given up).
//!
//! After every case:
//! (a) no endpoint task panicked: a panic hook records panics on the runtime's threads (a panic
//!     in a tokio task does not reach the test by itself), and the server's run task is alive;
//! (b) a well-formed `GET /.well-known/core` from another socket is answered (2.05 in a
//!     piggy-backed ACK) within 3 s;
//! (c) the observer count stays within `max_observers`.
//! At the end, shutdown completes, and the counters show the cases reached the deep paths.
//!
//! The endpoint's state bounds are checked step by step in `src/coap/endpoint/fuzz.rs`, which
//! drives the same handlers with the same inputs in simulated time.
//!
//! Reproducible: a fixed seed unless `PROPTEST_RNG_SEED=n`; `PROPTEST_CASES=n` for more or fewer
//! cases. A failing case is shrunk, printed, and saved in `coap_fuzz.proptest-regressions` next
//! to this file, which is replayed first on the next run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "coap_fuzz/inputs.rs"]
mod inputs;

use std::net::SocketAddr;
use std::sync::{Mutex, Once};
use std::time::Duration;

use inputs::{Action, Msg, code, ty};
use outpost_protocols::coap::{CoapHandle, CoapServer, CoapSettings};
use outpost_protocols::{Inbound, IngestRefusal};
use proptest::test_runner::{
    Config, FileFailurePersistence, RngSeed, TestCaseError, TestError, TestRunner,
};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Cases per run: a few seconds in a debug build on 2 cores.
const CASES: u32 = 512;
const SEED: u64 = 0x636f_6170_7564_7066; // "coapudpf"
const MAX_OBSERVERS: usize = 3;
/// How long the server gets to answer the probe.
const WAIT: Duration = Duration::from_secs(3);
/// The runtime's thread names: a panic on one of them is an endpoint panic.
const RT_THREADS: &str = "coap-fuzz";
/// How long the gateway takes for a `slow` reading: past the piggy-back window (1.5 s).
const SLOW_DELAY: Duration = Duration::from_millis(1600);

static PANICS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
static HOOK: Once = Once::new();

/// Records every panic with its thread's name, then runs the previous hook (which prints it).
fn install_panic_recorder() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current().name().unwrap_or("").to_owned();
            PANICS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((thread, info.to_string()));
            previous(info);
        }));
    });
}

fn endpoint_panics() -> Vec<String> {
    PANICS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(t, _)| t.starts_with(RT_THREADS))
        .map(|(t, m)| format!("[{t}] {m}"))
        .collect()
}

fn settings() -> CoapSettings {
    let mut s = CoapSettings::new(vec!["127.0.0.1:0".parse().unwrap()]);
    s.ingest_path = inputs::INGEST.to_owned();
    s.max_payload = 2048;
    s.max_exchanges = 16;
    s.max_observers = MAX_OBSERVERS;
    // Two bodies of the largest size: the byte bounds are reached too.
    s.max_buffered_bytes = 4096;
    // Short, so exchanges and uploads expire during the run.
    s.exchange_lifetime = Duration::from_secs(2);
    s
}

/// The gateway: commits, refuses `refuse` topics, answers `slow` ones late.
async fn gateway(mut rx: mpsc::Receiver<Inbound>) {
    while let Some(mut inbound) = rx.recv().await {
        let Some(reply) = inbound.reply.take() else {
            continue;
        };
        if inbound.topic.contains(inputs::REFUSE) {
            let _ = reply.send(Err(IngestRefusal::PayloadInvalid("fuzz: refused".into())));
        } else if inbound.topic.contains(inputs::SLOW) {
            tokio::spawn(async move {
                tokio::time::sleep(SLOW_DELAY).await;
                let _ = reply.send(Ok(()));
            });
        } else {
            let _ = reply.send(Ok(()));
        }
    }
}

/// A running server and its gateway.
struct Server {
    addr: SocketAddr,
    handle: CoapHandle,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Server {
    async fn start() -> Server {
        let server = CoapServer::bind(settings()).await.expect("bind");
        let addr = server.local_addrs()[0];
        let handle = server.handle();
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(gateway(rx));
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move { server.run(tx, token).await.expect("run") });
        Server {
            addr,
            handle,
            shutdown,
            task,
        }
    }
}

struct Target {
    server: Server,
    /// Servers that died (after a failed case; a new one serves the shrinking).
    restarts: u32,
    peers: Vec<UdpSocket>,
    probe: UdpSocket,
    probe_mid: u16,
    /// Message ids the server sent each peer, latest last.
    heard: Vec<Vec<u16>>,
}

impl Target {
    async fn start() -> Target {
        let mut peers = Vec::new();
        for _ in 0..inputs::PEERS {
            peers.push(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        }
        Target {
            server: Server::start().await,
            restarts: 0,
            peers,
            probe: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            probe_mid: 0,
            heard: vec![Vec::new(); usize::from(inputs::PEERS)],
        }
    }

    /// Reads, without waiting, what the server sent the fuzzing peers.
    fn drain(&mut self) {
        let mut buf = [0u8; 2048];
        for (i, s) in self.peers.iter().enumerate() {
            while let Ok(n) = s.try_recv(&mut buf) {
                if n >= 4 {
                    let list = &mut self.heard[i];
                    list.push(u16::from_be_bytes([buf[2], buf[3]]));
                    if list.len() > 16 {
                        list.remove(0);
                    }
                }
            }
        }
    }

    async fn send(&self, peer: u8, bytes: &[u8]) {
        // A full socket buffer drops the datagram, like the network would.
        let _ = self.peers[usize::from(peer)]
            .send_to(bytes, self.server.addr)
            .await;
    }

    async fn run(&mut self, actions: &[Action]) -> Result<(), String> {
        let mut history: Vec<(u8, Vec<u8>)> = Vec::new();
        for action in actions {
            self.drain();
            match action {
                Action::Answer {
                    peer,
                    rst,
                    nth,
                    mid,
                } => {
                    let list = &self.heard[usize::from(*peer)];
                    let mid = list
                        .len()
                        .checked_sub(1 + usize::from(*nth))
                        .and_then(|i| list.get(i))
                        .copied()
                        .unwrap_or(*mid);
                    let typ = if *rst { ty::RST } else { ty::ACK };
                    self.send(*peer, &inputs::empty(typ, mid)).await;
                }
                Action::SetStatus { len } => {
                    self.server
                        .handle
                        .set_status(inputs::status_body(*len, history.len() as u32));
                }
                // Real time: only a little (the piggy-back window and retransmissions run
                // across cases anyway).
                Action::Wait { ms } => {
                    tokio::time::sleep(Duration::from_millis(u64::from(*ms % 5))).await;
                }
                other => {
                    for (peer, bytes) in other.datagrams(&history) {
                        self.send(peer, &bytes).await;
                        history.push((peer, bytes));
                    }
                }
            }
        }
        Ok(())
    }

    /// A well-formed GET from the probe socket is answered.
    async fn probe(&mut self) -> Result<(), String> {
        self.probe_mid = self.probe_mid.wrapping_add(1);
        let mid = self.probe_mid;
        let get = Msg::new(ty::CON, code::GET, mid, &[0x70, 0x72])
            .path(&[b".well-known".as_slice(), b"core"])
            .encode();
        self.probe.send_to(&get, self.server.addr).await.unwrap();
        let mut buf = [0u8; 2048];
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            // Short waits, so a dead server fails the case at once (shrinking stays fast).
            let until = deadline.min(tokio::time::Instant::now() + Duration::from_millis(50));
            match tokio::time::timeout_at(until, self.probe.recv(&mut buf)).await {
                Err(_) if self.server.task.is_finished() => {
                    return Err("the server's run task ended".into());
                }
                Err(_) if until < deadline => {}
                Err(_) => {
                    return Err(format!(
                        "GET /.well-known/core not answered within {WAIT:?}"
                    ));
                }
                Ok(Err(e)) => return Err(format!("probe socket: {e}")),
                Ok(Ok(n)) if n >= 4 && u16::from_be_bytes([buf[2], buf[3]]) == mid => {
                    return if buf[..2] == [0x62, code::CONTENT] {
                        Ok(())
                    } else {
                        Err(format!("GET /.well-known/core answered {:02x?}", &buf[..n]))
                    };
                }
                Ok(Ok(_)) => {}
            }
        }
    }

    async fn check(&mut self, actions: &[Action]) -> Result<(), TestCaseError> {
        // A server that died in an earlier (failed) case is replaced, and its panics forgotten:
        // each case shrunk from a failure gets a live server.
        if self.server.task.is_finished() {
            self.server = Server::start().await;
            self.restarts += 1;
            self.heard.iter_mut().for_each(Vec::clear);
            PANICS.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
        let outcome = match self.run(actions).await {
            Ok(()) => self.probe().await,
            Err(e) => Err(e),
        };
        let fail = |what: String| TestCaseError::fail(what);
        // (a) first: a panic explains a missing answer.
        let panics = endpoint_panics();
        if !panics.is_empty() {
            return Err(fail(format!("endpoint task panicked: {panics:#?}")));
        }
        if self.server.task.is_finished() {
            return Err(fail("the server's run task ended".into()));
        }
        // (b)
        outcome.map_err(fail)?;
        // (c)
        let observers = self.server.handle.stats().observers;
        if observers > MAX_OBSERVERS as u64 {
            return Err(fail(format!(
                "{observers} observers registered (max {MAX_OBSERVERS})"
            )));
        }
        Ok(())
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CASES)
}

#[test]
fn fuzzed_datagrams_over_udp_never_stop_the_endpoint_answering() {
    install_panic_recorder();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(RT_THREADS)
        .enable_all()
        .build()
        .unwrap();
    let target = std::cell::RefCell::new(rt.block_on(Target::start()));
    let mut config = Config {
        cases: cases(),
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        max_shrink_iters: 1024,
        ..Config::default()
    };
    if config.rng_seed == RngSeed::Random {
        config.rng_seed = RngSeed::Fixed(SEED);
    }
    let seed = config.rng_seed;
    let mut runner = TestRunner::new(config);
    let strategy = proptest::collection::vec(inputs::action(), 1..24);
    let result = runner.run(&strategy, |actions| {
        let mut target = target.borrow_mut();
        rt.block_on(target.check(&actions))
    });
    let target = target.into_inner();
    let stats = target.server.handle.stats();
    eprintln!("seed {seed}: {stats:?}");
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, actions)) => panic!("{why}\nminimal case: {actions:#?}"),
        Err(TestError::Abort(why)) => panic!("aborted: {why}"),
    }
    // Shutdown still works after all that.
    assert_eq!(target.restarts, 0);
    target.server.shutdown.cancel();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), target.server.task)
            .await
            .expect("the server stops after shutdown")
            .expect("the run task does not panic");
    });
    assert!(endpoint_panics().is_empty());
    // Retransmissions and timeouts take seconds of real time: `src/coap/endpoint/fuzz.rs`
    // covers them in simulated time.
    if cases() >= 500 {
        for (what, count) in [
            ("requests", stats.requests),
            ("duplicates", stats.duplicates),
            ("bad_requests", stats.bad_requests),
            ("stored", stats.stored),
            ("refused", stats.refused),
            ("notifications", stats.notifications),
            ("overloaded", stats.overloaded),
            ("evicted", stats.evicted),
            ("block_uploads", stats.block_uploads),
        ] {
            assert!(count > 0, "no case reached {what}: {stats:?}");
        }
    }
}
