//! The endpoint under fuzzed traffic, driven through the handlers its UDP loop calls
//! (`on_datagram`, `on_done`, `on_timers`, `notify_all`), with its state checked after every
//! step. The over-the-wire run of the whole server is `tests/coap_fuzz.rs`; both draw their
//! datagrams from `tests/coap_fuzz/inputs.rs` (what a case contains is described there).
//!
//! The endpoint sends from a real socket on 127.0.0.1 to real peer sockets, so what it answers
//! is read back: the ids of its confirmable messages are what `Answer` steps ACK or RST. Time is
//! the endpoint's `now`, which the driver moves: a `Wait` runs every timer due on the way
//! (piggy-back window, retransmissions, housekeeping) without sleeping. The gateway is the
//! driver too: it commits readings at once, refuses those under `refuse`, holds those under
//! `slow` (answered when the `slow` delay has passed, or by a `Release` step), and can stall (the
//! ingest channel fills, hand-overs wait).
//!
//! After every step:
//! - everything the endpoint sent is a well-formed CoAP message;
//! - exchanges awaiting the gateway are exactly the hand-overs in flight, at most
//!   `max_exchanges`; the duplicate cache holds at most one more than `max_exchanges` (an answer
//!   is remembered even when every remembered exchange is still waiting for the gateway), and
//!   its expiry order lists each entry once;
//! - Block1 reassemblies: at most `max_exchanges`, none larger than `max_payload`, together
//!   at most `max_buffered_bytes` (and the count kept of them exact); hand-overs in flight: at
//!   most `max_buffered_bytes` of payload;
//! - observers: at most `max_observers`, the shared counter equal to the registry; each
//!   unacknowledged confirmable notification is tracked for retransmission and vice versa;
//! - recent non-confirmable notifications: at most 256.
//!
//! After every case: once the gateway is healthy again, every hand-over is answered; a
//! `GET /.well-known/core` and a `POST` of a reading are answered (2.05, 2.01) as piggy-backed
//! ACKs; and after 5 minutes with no traffic, nothing is left but observers: no exchange,
//! upload, outgoing message or timer besides housekeeping.
//!
//! Reproducible: a fixed seed unless `PROPTEST_RNG_SEED=n`; `PROPTEST_CASES=n` for more or fewer
//! cases. A failing case is shrunk and saved in `fuzz.proptest-regressions` next to this file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::collections::{BTreeSet, VecDeque};
use std::net::{SocketAddr, UdpSocket as StdSocket};
use std::sync::atomic::AtomicU32;

use proptest::prelude::*;
use proptest::test_runner::{
    Config, FileFailurePersistence, RngSeed, TestCaseError, TestError, TestRunner,
};

use super::*;
use crate::coap::{CoapHandle, CoapSettings, CoapStats, Counters};

#[path = "../../../tests/coap_fuzz/inputs.rs"]
mod inputs;

use inputs::{Action, ty};

/// Cases per run.
const CASES: u32 = 1024;
const SEED: u64 = 0x636f_6170_6675_7a7a; // "coapfuzz"
const MAX_EXCHANGES: usize = 12;
const MAX_OBSERVERS: usize = 3;
const MAX_PAYLOAD: usize = 2048;
/// Two bodies of the largest size: uploads and hand-overs reach it.
const MAX_BUFFERED: usize = 4096;
const LIFETIME: Duration = Duration::from_secs(20);
/// How long the gateway takes for a `slow` reading (more than the piggy-back window).
const SLOW_DELAY: Duration = Duration::from_millis(1800);
/// Real time a peer waits for a datagram the endpoint has already sent (loopback).
const RECV_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
enum Step {
    Net(Action),
    /// The gateway answers its `n` oldest held readings: 0 commit, 1 invalid payload, 2 quota,
    /// 3 the reply is dropped (never answered).
    Release {
        n: u8,
        how: u8,
    },
    /// The gateway stops (true) or resumes taking readings from the channel.
    Stall(bool),
    /// `n` readings from one peer in a row, each with a new message id: past `max_exchanges`
    /// (the duplicate cache evicts) and, when they are `slow` or the gateway stalls, past the
    /// hand-overs allowed in flight (5.03): by count, or with `len`-byte readings by bytes.
    Flood {
        peer: u8,
        n: u8,
        con: bool,
        slow: bool,
        len: u16,
        first_mid: u16,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        24 => inputs::action().prop_map(Step::Net),
        2 => (1u8..4, 0u8..4).prop_map(|(n, how)| Step::Release { n, how }),
        1 => any::<bool>().prop_map(Step::Stall),
        1 => (
            0..inputs::PEERS,
            4u8..24,
            any::<bool>(),
            any::<bool>(),
            prop_oneof![Just(1u16), 1000u16..=2048],
            any::<u16>()
        )
            .prop_map(|(peer, n, con, slow, len, first_mid)| Step::Flood {
                peer,
                n,
                con,
                slow,
                len,
                first_mid
            }),
    ]
}

fn case() -> impl Strategy<Value = Vec<Step>> {
    proptest::collection::vec(step(), 1..40)
}

fn settings() -> CoapSettings {
    CoapSettings {
        listeners: Vec::new(),
        ingest_path: inputs::INGEST.to_owned(),
        topic_prefix: "sensors".to_owned(),
        max_payload: MAX_PAYLOAD,
        exchange_lifetime: LIFETIME,
        max_exchanges: MAX_EXCHANGES,
        max_observers: MAX_OBSERVERS,
        max_buffered_bytes: MAX_BUFFERED,
    }
}

/// A datagram the endpoint sent: code, message id.
#[derive(Debug, Clone, Copy)]
struct Heard {
    code: u8,
    mid: u16,
}

fn heard(b: &[u8]) -> Option<Heard> {
    (b.len() >= 4).then(|| Heard {
        code: b[1],
        mid: u16::from_be_bytes([b[2], b[3]]),
    })
}

struct Harness {
    ep: Endpoint,
    handle: CoapHandle,
    ingest_rx: mpsc::Receiver<Inbound>,
    peers: Vec<StdSocket>,
    addrs: Vec<SocketAddr>,
    /// Readings the gateway has taken and not answered, with when it took them.
    held: VecDeque<(Instant, Inbound)>,
    stalled: bool,
    /// What the case sent, from which peer (for `Repeat`).
    history: Vec<(u8, Vec<u8>)>,
    /// What the endpoint sent each peer, latest last.
    heard: Vec<Vec<Heard>>,
    /// Response codes the fuzzing peers received.
    codes: BTreeSet<u8>,
    /// The most observers registered at once.
    most_observers: usize,
    /// The first datagram the endpoint sent that is not a well-formed CoAP message.
    malformed: Option<Vec<u8>>,
}

impl Harness {
    async fn new() -> Harness {
        let (status, _) = watch::channel(Status {
            seq: 0,
            body: Bytes::from_static(b"{}"),
        });
        let shared = Arc::new(Shared {
            settings: settings(),
            counters: Counters::default(),
            status,
            next_seq: AtomicU32::new(1),
        });
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        // Small, so a stalled gateway soon leaves hand-overs waiting for channel space.
        let (tx, ingest_rx) = mpsc::channel(4);
        let ep = Endpoint::new(socket, shared.clone(), tx, CancellationToken::new());
        // The fuzzing peers never wait; the probe peer (the last) does.
        let peers: Vec<StdSocket> = (0..=inputs::PEERS)
            .map(|i| {
                let s = StdSocket::bind("127.0.0.1:0").unwrap();
                s.set_nonblocking(i < inputs::PEERS).unwrap();
                s.set_read_timeout(Some(RECV_WAIT)).unwrap();
                s
            })
            .collect();
        let addrs = peers.iter().map(|s| s.local_addr().unwrap()).collect();
        Harness {
            ep,
            handle: CoapHandle { shared },
            ingest_rx,
            peers,
            addrs,
            held: VecDeque::new(),
            stalled: false,
            history: Vec::new(),
            heard: vec![Vec::new(); usize::from(inputs::PEERS) + 1],
            codes: BTreeSet::new(),
            most_observers: 0,
            malformed: None,
        }
    }

    /// The probe peer: used only by the end-of-case checks.
    fn probe(&self) -> usize {
        usize::from(inputs::PEERS)
    }

    /// Reads, without waiting, what the endpoint sent the fuzzing peers.
    fn drain_peers(&mut self) {
        let mut buf = [0u8; 2048];
        for (i, s) in self
            .peers
            .iter()
            .enumerate()
            .take(usize::from(inputs::PEERS))
        {
            while let Ok(n) = s.recv(&mut buf) {
                if Packet::from_bytes(&buf[..n]).is_err() && self.malformed.is_none() {
                    self.malformed = Some(buf[..n].to_vec());
                }
                if let Some(h) = heard(&buf[..n]) {
                    self.codes.insert(h.code);
                    let list = &mut self.heard[i];
                    list.push(h);
                    if list.len() > 16 {
                        list.remove(0);
                    }
                }
            }
        }
    }

    /// The gateway's answer to a reading it takes now.
    fn take(&mut self, mut inbound: Inbound) {
        let reply = if inbound.topic.contains(inputs::REFUSE) {
            Err(IngestRefusal::PayloadInvalid("fuzz: refused".into()))
        } else if inbound.topic.contains(inputs::SLOW) {
            self.held.push_back((self.ep.now, inbound));
            return;
        } else {
            Ok(())
        };
        if let Some(tx) = inbound.reply.take() {
            let _ = tx.send(reply);
        }
    }

    fn release(&mut self, how: u8) {
        let Some((_, mut inbound)) = self.held.pop_front() else {
            return;
        };
        let reply = match how {
            0 => Ok(()),
            1 => Err(IngestRefusal::PayloadInvalid("fuzz: invalid".into())),
            2 => Err(IngestRefusal::QuotaExceeded),
            _ => return,
        };
        if let Some(tx) = inbound.reply.take() {
            let _ = tx.send(reply);
        }
    }

    /// Lets hand-over tasks run, plays the gateway, and hands their results to the endpoint.
    async fn settle(&mut self) {
        for _ in 0..3 {
            tokio::task::yield_now().await;
            if !self.stalled {
                while let Ok(inbound) = self.ingest_rx.try_recv() {
                    self.take(inbound);
                }
            }
            while let Ok(d) = self.ep.done_rx.try_recv() {
                self.ep.on_done(d).await;
            }
        }
        self.drain_peers();
    }

    async fn datagram(&mut self, peer: usize, bytes: &[u8]) {
        self.ep.on_datagram(bytes, self.addrs[peer]).await;
        self.settle().await;
    }

    /// Moves time on by `d`, running every timer that falls due on the way, in order.
    async fn wait(&mut self, d: Duration) -> Result<(), String> {
        let target = self.ep.now + d;
        loop {
            let due_slow = self
                .held
                .front()
                .map(|(at, _)| *at + SLOW_DELAY)
                .filter(|t| *t <= target);
            let due_timer = self
                .ep
                .timers
                .peek()
                .map(|Reverse((at, _))| *at)
                .filter(|t| *t <= target);
            let next = match (due_slow, due_timer) {
                (None, None) => break,
                (a, b) => a.into_iter().chain(b).min().unwrap_or(target),
            };
            self.ep.now = self.ep.now.max(next);
            if due_slow == Some(next) {
                self.release(0);
            } else {
                self.ep.on_timers().await;
            }
            self.settle().await;
            self.check()?;
        }
        self.ep.now = target;
        Ok(())
    }

    async fn step(&mut self, step: &Step) -> Result<(), String> {
        match step {
            Step::Release { n, how } => {
                for _ in 0..*n {
                    self.release(*how);
                }
                self.settle().await;
            }
            Step::Stall(on) => {
                self.stalled = *on;
                self.settle().await;
            }
            Step::Flood {
                peer,
                n,
                con,
                slow,
                len,
                first_mid,
            } => {
                let typ = if *con { ty::CON } else { ty::NON };
                let level: &[u8] = if *slow { b"slow" } else { b"a" };
                for i in 0..u16::from(*n) {
                    let m =
                        inputs::Msg::new(typ, inputs::code::POST, first_mid.wrapping_add(i), &[])
                            .path(&[b"t", level])
                            .payload(&vec![b'1'; usize::from(*len)]);
                    let bytes = m.encode();
                    self.datagram(usize::from(*peer), &bytes).await;
                    self.history.push((*peer, bytes));
                    self.check()?;
                }
            }
            Step::Net(Action::Answer {
                peer,
                rst,
                nth,
                mid,
            }) => {
                let p = usize::from(*peer);
                let list = &self.heard[p];
                let mid = list
                    .len()
                    .checked_sub(1 + usize::from(*nth))
                    .and_then(|i| list.get(i))
                    .map_or(*mid, |h| h.mid);
                let typ = if *rst { ty::RST } else { ty::ACK };
                self.datagram(p, &inputs::empty(typ, mid)).await;
            }
            Step::Net(Action::SetStatus { len }) => {
                let seq = self.handle.shared.next_seq.load(Ordering::Relaxed);
                self.handle.set_status(inputs::status_body(*len, seq));
                self.ep.notify_all().await;
                self.settle().await;
            }
            Step::Net(Action::Wait { ms }) => {
                self.wait(Duration::from_millis(u64::from(*ms))).await?;
            }
            Step::Net(action) => {
                for (peer, bytes) in action.datagrams(&self.history) {
                    self.datagram(usize::from(peer), &bytes).await;
                    self.history.push((peer, bytes));
                    self.check()?;
                }
            }
        }
        self.most_observers = self.most_observers.max(self.ep.observers.len());
        self.check()
    }

    /// The state bounds (see the module comment).
    fn check(&self) -> Result<(), String> {
        if let Some(b) = &self.malformed {
            return Err(format!("the endpoint sent a malformed message: {b:02x?}"));
        }
        let ep = &self.ep;
        let pending = ep
            .exchanges
            .values()
            .filter(|e| matches!(e.state, ExState::Pending { .. }))
            .count();
        if ep.in_flight > MAX_EXCHANGES || pending != ep.in_flight {
            return Err(format!(
                "{} hand-overs in flight, {pending} exchanges pending (max {MAX_EXCHANGES})",
                ep.in_flight
            ));
        }
        if ep.exchanges.len() > MAX_EXCHANGES + 1 || ep.order.len() != ep.exchanges.len() {
            return Err(format!(
                "{} exchanges remembered, {} in the expiry order (max {MAX_EXCHANGES})",
                ep.exchanges.len(),
                ep.order.len()
            ));
        }
        let biggest = ep.uploads.map.values().map(|u| u.data.len()).max();
        let held: usize = ep.uploads.map.values().map(|u| u.data.len()).sum();
        if ep.uploads.len() > MAX_EXCHANGES
            || biggest.unwrap_or(0) > MAX_PAYLOAD
            || held != ep.uploads.bytes
            || held > MAX_BUFFERED
        {
            return Err(format!(
                "{} uploads in progress holding {held} bytes ({} counted), the largest {biggest:?}",
                ep.uploads.len(),
                ep.uploads.bytes
            ));
        }
        if ep.in_flight_bytes > MAX_BUFFERED {
            return Err(format!(
                "{} bytes in hand-overs in flight (max {MAX_BUFFERED})",
                ep.in_flight_bytes
            ));
        }
        let counted = ep.shared.counters.observers.load(Ordering::Relaxed);
        if ep.observers.len() > MAX_OBSERVERS || counted != ep.observers.len() as u64 {
            return Err(format!(
                "{} observers, {counted} counted (max {MAX_OBSERVERS})",
                ep.observers.len()
            ));
        }
        for (key, o) in &ep.observers {
            if let Some(mid) = o.outstanding
                && ep
                    .outgoing
                    .get(&mid)
                    .is_none_or(|out| out.observer.as_ref() != Some(key))
            {
                return Err(format!(
                    "observer {key:?} waits for an ACK to {mid}, which is not retransmitted"
                ));
            }
        }
        for (mid, out) in &ep.outgoing {
            if let Some(key) = &out.observer
                && ep.observers.get(key).and_then(|o| o.outstanding) != Some(*mid)
            {
                return Err(format!(
                    "notification {mid} is retransmitted for {key:?}, which does not wait for it"
                ));
            }
        }
        if ep.recent_non.len() > 256 || ep.recent_non_order.len() > 256 {
            return Err(format!(
                "{} recent notifications remembered, {} in order",
                ep.recent_non.len(),
                ep.recent_non_order.len()
            ));
        }
        Ok(())
    }

    /// Sends `msg` from the probe peer; the endpoint's answer to it.
    async fn call(&mut self, msg: inputs::Msg) -> Result<Vec<u8>, String> {
        let p = self.probe();
        self.datagram(p, &msg.encode()).await;
        let mut buf = [0u8; 2048];
        loop {
            match self.peers[p].recv(&mut buf) {
                Ok(n) => {
                    if heard(&buf[..n]).is_some_and(|h| h.mid == msg.mid) {
                        return Ok(buf[..n].to_vec());
                    }
                }
                Err(e) => return Err(format!("no answer to {msg:?}: {e}")),
            }
        }
    }

    /// The end-of-case checks (see the module comment).
    async fn finish(&mut self, n: u32) -> Result<(), String> {
        self.stalled = false;
        while !self.held.is_empty() {
            self.release(0);
        }
        for _ in 0..20 {
            if self.ep.in_flight == 0 {
                break;
            }
            self.settle().await;
            while !self.held.is_empty() {
                self.release(0);
            }
        }
        if self.ep.in_flight != 0 || self.ep.in_flight_bytes != 0 {
            return Err(format!(
                "{} hand-overs ({} bytes) still unanswered by a healthy gateway",
                self.ep.in_flight, self.ep.in_flight_bytes
            ));
        }
        let mid = 0xf000 | (n as u16 & 0x0fff);
        let token = [0xfe, 0xed];
        let get = inputs::Msg::new(ty::CON, inputs::code::GET, mid, &token)
            .path(&[b".well-known", b"core"]);
        let r = self.call(get).await?;
        if r.get(..2) != Some(&[0x62, inputs::code::CONTENT][..])
            || !r.windows(9).any(|w| w == b"</status>")
        {
            return Err(format!("GET /.well-known/core answered {r:02x?}"));
        }
        let post = inputs::Msg::new(ty::CON, inputs::code::POST, mid.wrapping_add(1), &token)
            .path(&[b"t", b"probe"])
            .payload(b"21.5");
        let r = self.call(post).await?;
        if r.get(..2) != Some(&[0x62, inputs::code::CREATED][..]) {
            return Err(format!("POST of a reading answered {r:02x?}"));
        }
        self.wait(Duration::from_secs(300)).await?;
        let ep = &self.ep;
        if !ep.exchanges.is_empty()
            || !ep.order.is_empty()
            || ep.uploads.len() != 0
            || !ep.outgoing.is_empty()
            || ep.timers.len() != 1
        {
            return Err(format!(
                "5 minutes after the last message: {} exchanges, {} in order, {} uploads, {} \
                 outgoing, {} timers",
                ep.exchanges.len(),
                ep.order.len(),
                ep.uploads.len(),
                ep.outgoing.len(),
                ep.timers.len()
            ));
        }
        Ok(())
    }
}

fn add(total: &mut CoapStats, s: &CoapStats) {
    total.requests += s.requests;
    total.duplicates += s.duplicates;
    total.bad_requests += s.bad_requests;
    total.stored += s.stored;
    total.refused += s.refused;
    total.overloaded += s.overloaded;
    total.notifications += s.notifications;
    total.observers_lost += s.observers_lost;
    total.retransmissions += s.retransmissions;
    total.timeouts += s.timeouts;
    total.evicted += s.evicted;
    total.block_uploads += s.block_uploads;
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CASES)
}

#[test]
fn fuzzed_datagrams_never_panic_and_the_endpoint_stays_bounded_and_answering() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut config = Config {
        cases: cases(),
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        max_shrink_iters: 4096,
        ..Config::default()
    };
    if config.rng_seed == RngSeed::Random {
        config.rng_seed = RngSeed::Fixed(SEED);
    }
    let total = RefCell::new((CoapStats::default(), BTreeSet::new(), 0u32));
    let mut runner = TestRunner::new(config);
    let result = runner.run(&case(), |steps| {
        rt.block_on(Box::pin(async {
            let mut h = Harness::new().await;
            let n = {
                let mut t = total.borrow_mut();
                t.2 += 1;
                t.2
            };
            for (i, s) in steps.iter().enumerate() {
                h.step(s)
                    .await
                    .map_err(|e| TestCaseError::fail(format!("after step {i}: {e}")))?;
            }
            h.finish(n)
                .await
                .map_err(|e| TestCaseError::fail(format!("at the end: {e}")))?;
            let mut t = total.borrow_mut();
            add(&mut t.0, &h.handle.stats());
            t.0.observers = t.0.observers.max(h.most_observers as u64);
            t.1.extend(h.codes.iter().copied());
            Ok(())
        }))
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, steps)) => panic!("{why}\nminimal case: {steps:#?}"),
        Err(TestError::Abort(why)) => panic!("aborted: {why}"),
    }
    let (stats, codes, n) = total.into_inner();
    let codes: Vec<String> = codes.iter().map(|c| code::fmt(*c)).collect();
    eprintln!("{n} cases: {stats:?}\nresponse codes: {codes:?}");
    // The cases must reach the deep paths, or the test proves little (checked on runs long
    // enough for that; the default is).
    if n >= 500 {
        for (what, count) in [
            ("requests", stats.requests),
            ("duplicates", stats.duplicates),
            ("bad_requests", stats.bad_requests),
            ("stored", stats.stored),
            ("refused", stats.refused),
            ("overloaded", stats.overloaded),
            ("notifications", stats.notifications),
            ("observers_lost", stats.observers_lost),
            ("retransmissions", stats.retransmissions),
            ("timeouts", stats.timeouts),
            ("evicted", stats.evicted),
            ("block_uploads", stats.block_uploads),
        ] {
            assert!(count > 0, "no case reached {what}: {stats:?}");
        }
        assert_eq!(stats.observers, MAX_OBSERVERS as u64, "{stats:?}");
        for c in [
            "2.31", "4.00", "4.02", "4.04", "4.05", "4.08", "4.13", "5.03", "5.05",
        ] {
            assert!(codes.iter().any(|x| x == c), "no {c} answered: {codes:?}");
        }
    }
}
