//! The broker's connection path under arbitrary input (the codec alone is fuzzed in
//! `broker/codec.rs`, `arbitrary_bytes_never_panic`): a proptest that opens a TCP connection per
//! case to an in-process broker and sends, in order:
//!
//! - nothing, a valid CONNECT (3.1.1 or 5, with properties, a will, a login), or a CONNECT with
//!   random fields;
//! - well-formed packets with random contents (PUBLISH at QoS 0-2 with properties and topic
//!   aliases, the four acks for known and unknown ids, SUBSCRIBE with options, subscription ids
//!   and shared filters, UNSUBSCRIBE, PINGREQ), to build up session state;
//! - then anything: packets from valid fixed headers with random bodies and properties (also
//!   DISCONNECT and AUTH with properties, a second CONNECT, server-only and reserved types,
//!   3.1.1 layouts on MQTT 5 connections and the reverse), random remaining lengths, flipped
//!   bytes, raw bytes.
//!
//! Sometimes a twin connects first with the same CONNECT (same client id) and its own packets,
//! and stays connected while the case's connection takes its session over. After every case:
//!
//! (a) no broker task panicked: a panic hook records panics on the runtime's threads (a panic
//!     in a tokio task does not reach the test by itself), and the broker's run task is alive;
//! (c) the fuzzed connection (and the twin) is closed by the broker, or answers a PINGREQ: the
//!     last partial packet (if any) is completed with zero bytes, a PINGREQ is sent, and the
//!     broker must close, or send one PINGRESP per PINGREQ frame it was sent (so the last is
//!     ours) and close once the test half-closes; within 3 s each: never a hang;
//! (b) the fuzzed connection's slot is released once its socket is closed, and two
//!     well-behaved clients, connected throughout, still complete a QoS 1 publish and delivery.
//!
//! Two brokers take turns: one without access control, one with a mosquitto ACL (topic and
//! pattern rules), so the checks on every publish, subscribe and will run on fuzzed input too.
//! The gateway side answers every message, refusing two topic prefixes (refusal paths).
//!
//! Reproducible: a fixed seed unless `PROPTEST_RNG_SEED=n` is set; `PROPTEST_CASES=n` for more
//! or fewer cases; `FUZZ_DEBUG=1` prints every case's bytes and outcome. A failing case is
//! shrunk, printed with its bytes, and saved in `connection_fuzz.proptest-regressions` next to
//! this file, which is replayed first on the next run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use bytes::Bytes;
use common::{Raw4, Running};
use outpost_config::AclFile;
use outpost_protocols::{Auth, BrokerSettings, Inbound, IngestRefusal, IngestReply};
use proptest::prelude::*;
use proptest::test_runner::{
    Config, FileFailurePersistence, RngSeed, TestCaseError, TestError, TestRunner,
};
use rumqttc::QoS as Q;
use rumqttc::mqttbytes::v4;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Cases per run: about 3 s in a debug build on 2 cores (plus the 6 s of the hang self-test).
const CASES: u32 = 2048;
/// The seed when `PROPTEST_RNG_SEED` is not set.
const SEED: u64 = 0x6f75_7470_6f73_7446; // "outpostF"
/// `max_packet_size` of the fuzzed brokers: small, so random lengths also hit the limit.
const MAX_PACKET: usize = 2048;
/// How long the broker gets to answer or close, and the well-behaved clients to round-trip.
const WAIT: Duration = Duration::from_secs(3);
/// The name prefix of the runtime's threads: a panic on one of them is a broker panic.
const RT_THREADS: &str = "fuzz-broker";

// ---------------------------------------------------------------------------------------------
// Panic recording

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

/// Panics recorded so far on threads whose name starts with `prefix`.
fn panics_on(prefix: &str) -> Vec<String> {
    PANICS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(t, _)| t.starts_with(prefix))
        .map(|(t, m)| format!("[{t}] {m}"))
        .collect()
}

fn runtime(threads: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(threads)
        .enable_all()
        .build()
        .unwrap()
}

/// The detector itself: a task panicking on the runtime is seen, though the runtime carries on.
#[test]
fn a_panic_in_a_runtime_task_is_recorded() {
    install_panic_recorder();
    let rt = runtime("fuzz-selftest");
    let joined =
        rt.block_on(async { tokio::spawn(async { panic!("deliberate panic in a task") }).await });
    assert!(joined.is_err());
    let seen = panics_on("fuzz-selftest");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].contains("deliberate panic"), "{seen:?}");
    assert!(panics_on(RT_THREADS).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Inputs

/// An MQTT 5 property: `id`, and the value written in the id's type (an unknown id gets `a` raw).
#[derive(Debug, Clone)]
struct Prop {
    id: u8,
    num: u32,
    a: Vec<u8>,
    b: Vec<u8>,
}

#[derive(Debug, Clone)]
struct WillSpec {
    qos: u8,
    retain: bool,
    topic: Vec<u8>,
    payload: Vec<u8>,
    /// MQTT 5 will properties (written when `Some`, whatever the level).
    props: Option<Vec<Prop>>,
}

#[derive(Debug, Clone)]
struct ConnectSpec {
    name: Vec<u8>,
    level: u8,
    clean: bool,
    /// XORed into the connect flags byte (0: the flags the fields imply).
    flags_xor: u8,
    keep_alive: u16,
    /// Written when `Some`, whatever the level.
    props: Option<Vec<Prop>>,
    client_id: Vec<u8>,
    will: Option<WillSpec>,
    username: Option<Vec<u8>>,
    password: Option<Vec<u8>>,
}

/// A packet: a fixed header byte and a body built field by field (possibly nonsensical).
/// `v5`: written in the MQTT 5 layout (properties, reason codes); `None`: in the layout of the
/// connection's protocol (that of the preamble's CONNECT).
#[derive(Debug, Clone)]
enum Pkt {
    Publish {
        v5: Option<bool>,
        qos: u8,
        dup: bool,
        retain: bool,
        topic: Vec<u8>,
        pkid: u16,
        props: Vec<Prop>,
        payload: Vec<u8>,
    },
    /// PUBACK (4), PUBREC (5), PUBREL (6), PUBCOMP (7).
    Ack {
        v5: Option<bool>,
        kind: u8,
        flags_xor: u8,
        pkid: u16,
        /// MQTT 5: a reason code, then optionally properties.
        reason: Option<(u8, Option<Vec<Prop>>)>,
    },
    Subscribe {
        v5: Option<bool>,
        flags_xor: u8,
        pkid: u16,
        props: Vec<Prop>,
        filters: Vec<(Vec<u8>, u8)>,
    },
    Unsubscribe {
        v5: Option<bool>,
        flags_xor: u8,
        pkid: u16,
        props: Vec<Prop>,
        filters: Vec<Vec<u8>>,
    },
    PingReq,
    /// DISCONNECT (14) or AUTH (15): optional reason code and properties.
    ReasonOnly {
        v5: Option<bool>,
        kind: u8,
        flags_xor: u8,
        reason: Option<(u8, Option<Vec<Prop>>)>,
    },
    Connect(ConnectSpec),
    /// Any first byte (server-only packets, reserved types, wrong flags), any body.
    Other {
        first: u8,
        body: Vec<u8>,
    },
}

/// How the remaining length is written.
#[derive(Debug, Clone)]
enum Length {
    Exact,
    /// The body's length plus this (so the frame ends early, or swallows what follows).
    Off(i16),
    /// Any value (mostly over the limit; may need five bytes: malformed).
    Any(u32),
}

#[derive(Debug, Clone)]
enum Chunk {
    Packet {
        pkt: Box<Pkt>,
        length: Length,
        /// XOR the byte at this index (modulo the frame's length) with this value.
        flip: Option<(usize, u8)>,
    },
    Raw(Vec<u8>),
}

#[derive(Debug, Clone)]
enum Preamble {
    /// The fuzzed bytes are the first thing the broker reads.
    None,
    /// A valid CONNECT, so the bytes reach an established session.
    Valid(ConnectSpec),
    /// A CONNECT with random fields, maybe mangled.
    Mangled(Chunk),
}

#[derive(Debug, Clone)]
struct Case {
    /// Which broker: with the ACL, or without access control.
    acl: bool,
    preamble: Preamble,
    /// Well-formed packets with random contents (subscriptions, QoS 1/2 flows, topic aliases,
    /// acks for unknown ids...), to build up connection and session state.
    body: Vec<Chunk>,
    /// Then anything: packets with random fields, lengths and flipped bytes, raw bytes.
    tail: Vec<Chunk>,
    /// With a valid preamble: first connect another client with the same CONNECT (same client
    /// id) and these packets, and keep it open while the case's connection takes its session
    /// over; it must then be closed by the broker or still answer.
    twin: Option<Vec<Chunk>>,
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// A string or binary field: u16 length, bytes.
fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    let b = &b[..b.len().min(usize::from(u16::MAX))];
    put_u16(out, u16::try_from(b.len()).unwrap());
    out.extend_from_slice(b);
}

/// A variable byte integer (five bytes and more for values of 2^28 and above: malformed).
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let mut byte = (v % 128) as u8;
        v /= 128;
        if v > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if v == 0 {
            return;
        }
    }
}

fn put_props(out: &mut Vec<u8>, props: &[Prop]) {
    let mut p = Vec::new();
    for prop in props {
        p.push(prop.id);
        match prop.id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => p.push(prop.num as u8),
            0x13 | 0x21 | 0x22 | 0x23 => put_u16(&mut p, prop.num as u16),
            0x02 | 0x11 | 0x18 | 0x27 => put_u32(&mut p, prop.num),
            0x0B => put_varint(&mut p, u64::from(prop.num)),
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => {
                put_bytes(&mut p, &prop.a)
            }
            0x26 => {
                put_bytes(&mut p, &prop.a);
                put_bytes(&mut p, &prop.b);
            }
            _ => p.extend_from_slice(&prop.a),
        }
    }
    put_varint(out, p.len() as u64);
    out.extend_from_slice(&p);
}

impl ConnectSpec {
    fn body(&self) -> Vec<u8> {
        let mut b = Vec::new();
        put_bytes(&mut b, &self.name);
        b.push(self.level);
        let mut flags = 0u8;
        if self.username.is_some() {
            flags |= 0x80;
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        if let Some(w) = &self.will {
            flags |= 0x04 | ((w.qos & 3) << 3) | (u8::from(w.retain) << 5);
        }
        if self.clean {
            flags |= 0x02;
        }
        b.push(flags ^ self.flags_xor);
        put_u16(&mut b, self.keep_alive);
        if let Some(p) = &self.props {
            put_props(&mut b, p);
        }
        put_bytes(&mut b, &self.client_id);
        if let Some(w) = &self.will {
            if let Some(p) = &w.props {
                put_props(&mut b, p);
            }
            put_bytes(&mut b, &w.topic);
            put_bytes(&mut b, &w.payload);
        }
        if let Some(u) = &self.username {
            put_bytes(&mut b, u);
        }
        if let Some(p) = &self.password {
            put_bytes(&mut b, p);
        }
        b
    }

    fn frame(&self) -> Vec<u8> {
        Chunk::Packet {
            pkt: Box::new(Pkt::Connect(self.clone())),
            length: Length::Exact,
            flip: None,
        }
        .bytes(self.level == 5)
    }
}

fn put_reason(b: &mut Vec<u8>, reason: &Option<(u8, Option<Vec<Prop>>)>) {
    if let Some((code, props)) = reason {
        b.push(*code);
        if let Some(p) = props {
            put_props(b, p);
        }
    }
}

impl Pkt {
    /// The first byte of the fixed header, and the body; `conn_v5`: the connection's protocol.
    fn encode(&self, conn_v5: bool) -> (u8, Vec<u8>) {
        let layout = |v5: &Option<bool>| v5.unwrap_or(conn_v5);
        let mut b = Vec::new();
        let first = match self {
            Pkt::Publish {
                v5,
                qos,
                dup,
                retain,
                topic,
                pkid,
                props,
                payload,
            } => {
                put_bytes(&mut b, topic);
                if *qos > 0 {
                    put_u16(&mut b, *pkid);
                }
                if layout(v5) {
                    put_props(&mut b, props);
                }
                b.extend_from_slice(payload);
                0x30 | (u8::from(*dup) << 3) | ((qos & 3) << 1) | u8::from(*retain)
            }
            Pkt::Ack {
                v5,
                kind,
                flags_xor,
                pkid,
                reason,
            } => {
                put_u16(&mut b, *pkid);
                if layout(v5) {
                    put_reason(&mut b, reason);
                }
                let flags = if *kind == 6 { 0x02 } else { 0x00 };
                (kind << 4) | ((flags ^ flags_xor) & 0x0f)
            }
            Pkt::Subscribe {
                v5,
                flags_xor,
                pkid,
                props,
                filters,
            } => {
                put_u16(&mut b, *pkid);
                if layout(v5) {
                    put_props(&mut b, props);
                }
                for (f, options) in filters {
                    put_bytes(&mut b, f);
                    b.push(*options);
                }
                0x80 | ((0x02 ^ flags_xor) & 0x0f)
            }
            Pkt::Unsubscribe {
                v5,
                flags_xor,
                pkid,
                props,
                filters,
            } => {
                put_u16(&mut b, *pkid);
                if layout(v5) {
                    put_props(&mut b, props);
                }
                for f in filters {
                    put_bytes(&mut b, f);
                }
                0xA0 | ((0x02 ^ flags_xor) & 0x0f)
            }
            Pkt::PingReq => 0xC0,
            Pkt::ReasonOnly {
                v5,
                kind,
                flags_xor,
                reason,
            } => {
                if layout(v5) {
                    put_reason(&mut b, reason);
                }
                (kind << 4) | (flags_xor & 0x0f)
            }
            Pkt::Connect(spec) => {
                b = spec.body();
                0x10
            }
            Pkt::Other { first, body } => {
                b.clone_from(body);
                *first
            }
        };
        (first, b)
    }
}

impl Chunk {
    fn bytes(&self, conn_v5: bool) -> Vec<u8> {
        match self {
            Chunk::Raw(b) => b.clone(),
            Chunk::Packet { pkt, length, flip } => {
                let (first, body) = pkt.encode(conn_v5);
                let declared = match length {
                    Length::Exact => body.len() as u64,
                    Length::Off(d) => (body.len() as i64 + i64::from(*d)).max(0) as u64,
                    Length::Any(n) => u64::from(*n),
                };
                let mut out = vec![first];
                put_varint(&mut out, declared);
                out.extend_from_slice(&body);
                if let Some((at, xor)) = flip {
                    let at = at % out.len();
                    out[at] ^= xor;
                }
                out
            }
        }
    }
}

impl Case {
    /// The protocol the packets follow by default: the preamble's.
    fn v5(&self) -> bool {
        match &self.preamble {
            Preamble::None => false,
            Preamble::Valid(spec) => spec.level == 5,
            Preamble::Mangled(Chunk::Packet { pkt, .. }) => {
                matches!(&**pkt, Pkt::Connect(spec) if spec.level == 5)
            }
            Preamble::Mangled(Chunk::Raw(_)) => false,
        }
    }

    /// The twin's bytes: the same CONNECT, its own packets.
    fn twin_bytes(&self) -> Option<Vec<u8>> {
        let (Preamble::Valid(spec), Some(chunks)) = (&self.preamble, &self.twin) else {
            return None;
        };
        let mut out = spec.frame();
        for c in chunks {
            out.extend(c.bytes(spec.level == 5));
        }
        Some(out)
    }

    fn bytes(&self) -> Vec<u8> {
        let v5 = self.v5();
        let mut out = match &self.preamble {
            Preamble::None => Vec::new(),
            Preamble::Valid(spec) => spec.frame(),
            Preamble::Mangled(chunk) => chunk.bytes(v5),
        };
        for c in self.body.iter().chain(&self.tail) {
            out.extend(c.bytes(v5));
        }
        out
    }
}

// Strategies

const TOPICS: &[&str] = &[
    "watch/t",
    "a/b",
    "a",
    "a/#",
    "#",
    "+",
    "a/+/c",
    "+/+",
    "$share/g/a/b",
    "$share/g/#",
    "$share//a",
    "$share/g",
    "$share/g/",
    "$SYS/x",
    "",
    "/",
    "//",
    "a\0b",
    "a/#/b",
    "a+",
    "f/f0/x",
    "f/f1/#",
    "f/u1/x",
    "r/x",
    "w/x",
    "u/x",
    "refuse/x",
    "bad/x",
    "é/ü",
];

/// A string field: an interesting topic or filter, random text over MQTT's special
/// characters, or random bytes (maybe not UTF-8).
fn text() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::sample::select(TOPICS).prop_map(|s| s.as_bytes().to_vec()),
        3 => "[a-z0-9/+#$]{0,12}".prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..16),
    ]
}

fn num() -> impl Strategy<Value = u32> {
    prop_oneof![
        prop::sample::select(&[0u32, 1, 2, 16, 17, 0xFFFF, 0x1_0000, 0x0FFF_FFFF, u32::MAX][..]),
        0u32..300,
        any::<u32>(),
    ]
}

fn pkid() -> impl Strategy<Value = u16> {
    prop_oneof![
        prop::sample::select(&[0u16, 1, 2, u16::MAX][..]),
        1u16..20,
        any::<u16>(),
    ]
}

const PROP_IDS: &[u8] = &[
    0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x11, 0x12, 0x13, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1A, 0x1C,
    0x1F, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2A,
];

fn prop_with(ids: &'static [u8]) -> impl Strategy<Value = Prop> {
    (prop::sample::select(ids), num(), text(), text()).prop_map(|(id, num, a, b)| Prop {
        id,
        num,
        a,
        b,
    })
}

/// Properties of a packet whose valid ones are `ids`: mostly those, sometimes any known one,
/// rarely any byte as the id.
fn props_of(ids: &'static [u8]) -> impl Strategy<Value = Vec<Prop>> {
    let one = prop_oneof![
        12 => prop_with(ids),
        2 => prop_with(PROP_IDS),
        1 => (any::<u8>(), num(), text(), text()).prop_map(|(id, num, a, b)| Prop { id, num, a, b }),
    ];
    prop::collection::vec(one, 0..4)
}

fn props() -> impl Strategy<Value = Vec<Prop>> {
    props_of(PROP_IDS)
}

const PUBLISH_PROPS: &[u8] = &[0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x23, 0x26];
const SUBSCRIBE_PROPS: &[u8] = &[0x0B, 0x26];
const UNSUBSCRIBE_PROPS: &[u8] = &[0x26];
const ACK_PROPS: &[u8] = &[0x1F, 0x26];
const DISCONNECT_PROPS: &[u8] = &[0x11, 0x1C, 0x1F, 0x26];
const AUTH_PROPS: &[u8] = &[0x15, 0x16, 0x1F, 0x26];

/// The layout of a packet: mostly the connection's, sometimes forced either way.
fn layout() -> impl Strategy<Value = Option<bool>> {
    prop_oneof![8 => Just(None), 1 => Just(Some(true)), 1 => Just(Some(false))]
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..48)
}

/// Mostly 0 (the right flags), sometimes any low nibble.
fn flags_xor() -> impl Strategy<Value = u8> {
    prop_oneof![4 => Just(0u8), 1 => 0u8..16]
}

fn reason(ids: &'static [u8]) -> impl Strategy<Value = Option<(u8, Option<Vec<Prop>>)>> {
    prop::option::of((
        prop_oneof![Just(0u8), Just(4), Just(0x80), any::<u8>()],
        prop::option::of(props_of(ids)),
    ))
}

fn will(valid: bool) -> impl Strategy<Value = WillSpec> {
    let topic = if valid {
        prop::sample::select(&["a/b", "w/x", "f/f0/will", "r/x", "watch/will"][..])
            .prop_map(|s| s.as_bytes().to_vec())
            .boxed()
    } else {
        text().boxed()
    };
    let props = if valid {
        prop::option::of(prop::collection::vec(
            prop_with(&[0x01, 0x02, 0x03, 0x18, 0x26]),
            0..3,
        ))
        .boxed()
    } else {
        prop::option::of(props()).boxed()
    };
    let qos = if valid {
        (0u8..3).boxed()
    } else {
        (0u8..4).boxed()
    };
    (qos, any::<bool>(), topic, payload(), props).prop_map(
        |(qos, retain, topic, payload, props)| WillSpec {
            qos,
            retain,
            topic,
            payload,
            props,
        },
    )
}

/// A CONNECT the broker accepts (3.1.1 or 5, plain or with a will, login and properties).
fn valid_connect() -> impl Strategy<Value = ConnectSpec> {
    (
        any::<bool>(),
        any::<bool>(),
        prop::sample::select(&[0u16, 1, 60, u16::MAX][..]),
        prop::sample::select(&["f0", "f1", "f2", "f3", ""][..]),
        prop::option::of(will(true)),
        prop::option::of(prop::sample::select(&["u1", "u2", "f0"][..])),
        prop::option::of(Just(b"pw".to_vec())),
        prop::collection::vec(
            prop_with(&[0x11, 0x17, 0x19, 0x21, 0x22, 0x26, 0x27]).prop_map(|mut p| {
                // Receive maximum and maximum packet size 0 are protocol errors; a maximum
                // packet size of 1 leaves no room for a PINGRESP, which the probe needs.
                if p.id == 0x21 && p.num == 0 {
                    p.num = 1;
                }
                if matches!(p.id, 0x17 | 0x19) {
                    p.num %= 2;
                }
                if p.id == 0x27 && p.num < 2 {
                    p.num = 2;
                }
                p
            }),
            0..4,
        ),
    )
        .prop_map(|(v5, clean, keep_alive, id, will, user, password, props)| {
            let mut will = will;
            if let Some(w) = &mut will
                && !v5
            {
                w.props = None;
            }
            ConnectSpec {
                name: b"MQTT".to_vec(),
                level: if v5 { 5 } else { 4 },
                // An empty id needs a clean session in 3.1.1.
                clean: clean || id.is_empty(),
                flags_xor: 0,
                keep_alive,
                props: v5.then_some(props),
                client_id: id.as_bytes().to_vec(),
                will,
                username: user.map(|u| u.as_bytes().to_vec()),
                password: password.filter(|_| user.is_some()),
            }
        })
}

/// A CONNECT with random fields.
fn any_connect() -> impl Strategy<Value = ConnectSpec> {
    (
        prop_oneof![4 => Just(b"MQTT".to_vec()), 1 => Just(b"MQIsdp".to_vec()), 1 => text()],
        prop_oneof![Just(3u8), Just(4), Just(5), any::<u8>()],
        any::<bool>(),
        prop_oneof![3 => Just(0u8), 1 => any::<u8>()],
        any::<u16>(),
        prop::option::of(props()),
        text(),
        prop::option::of(will(false)),
        prop::option::of(text()),
        prop::option::of(text()),
    )
        .prop_map(
            |(
                name,
                level,
                clean,
                flags_xor,
                keep_alive,
                props,
                client_id,
                will,
                username,
                password,
            )| {
                ConnectSpec {
                    name,
                    level,
                    clean,
                    flags_xor,
                    keep_alive,
                    props,
                    client_id,
                    will,
                    username,
                    password,
                }
            },
        )
}

fn pkt() -> impl Strategy<Value = Pkt> {
    let publish = (
        layout(),
        prop_oneof![6 => 0u8..3, 1 => Just(3u8)],
        any::<bool>(),
        any::<bool>(),
        text(),
        pkid(),
        props_of(PUBLISH_PROPS),
        payload(),
    )
        .prop_map(
            |(v5, qos, dup, retain, topic, pkid, props, payload)| Pkt::Publish {
                v5,
                qos,
                dup,
                retain,
                topic,
                pkid,
                props,
                payload,
            },
        );
    let ack = (layout(), 4u8..8, flags_xor(), pkid(), reason(ACK_PROPS)).prop_map(
        |(v5, kind, flags_xor, pkid, reason)| Pkt::Ack {
            v5,
            kind,
            flags_xor,
            pkid,
            reason,
        },
    );
    let options = prop_oneof![3 => 0u8..3, 2 => 0u8..0x30, 1 => any::<u8>()];
    let subscribe = (
        layout(),
        flags_xor(),
        pkid(),
        props_of(SUBSCRIBE_PROPS),
        prop::collection::vec((text(), options), 0..4),
    )
        .prop_map(|(v5, flags_xor, pkid, props, filters)| Pkt::Subscribe {
            v5,
            flags_xor,
            pkid,
            props,
            filters,
        });
    let unsubscribe = (
        layout(),
        flags_xor(),
        pkid(),
        props_of(UNSUBSCRIBE_PROPS),
        prop::collection::vec(text(), 0..4),
    )
        .prop_map(|(v5, flags_xor, pkid, props, filters)| Pkt::Unsubscribe {
            v5,
            flags_xor,
            pkid,
            props,
            filters,
        });
    let disconnect =
        (layout(), flags_xor(), reason(DISCONNECT_PROPS)).prop_map(|(v5, flags_xor, reason)| {
            Pkt::ReasonOnly {
                v5,
                kind: 14,
                flags_xor,
                reason,
            }
        });
    let auth = (layout(), flags_xor(), reason(AUTH_PROPS)).prop_map(|(v5, flags_xor, reason)| {
        Pkt::ReasonOnly {
            v5,
            kind: 15,
            flags_xor,
            reason,
        }
    });
    let other = (
        prop_oneof![
            prop::sample::select(&[0x00u8, 0x20, 0x90, 0xB0, 0xD0, 0xC1, 0x63, 0x8F][..]),
            any::<u8>()
        ],
        payload(),
    )
        .prop_map(|(first, body)| Pkt::Other { first, body });
    prop_oneof![
        6 => publish,
        3 => ack,
        3 => subscribe,
        2 => unsubscribe,
        1 => Just(Pkt::PingReq),
        1 => disconnect,
        1 => auth,
        1 => any_connect().prop_map(Pkt::Connect),
        1 => other,
    ]
}

const TOPIC_NAMES: &[&str] = &[
    "a",
    "a/b",
    "a/b/c",
    "r/x",
    "w/x",
    "u/x",
    "f/f0/x",
    "f/f1/x",
    "f/u1/x",
    "refuse/x",
    "bad/x",
    "$SYS/x",
    "\u{e9}/\u{fc}",
    "/",
    "//",
    "watch/x",
];
const FILTERS: &[&str] = &[
    "#",
    "+",
    "a/#",
    "a/+/c",
    "+/+",
    "$share/g/a/b",
    "$share/g/#",
    "$share/h/+",
    "r/#",
    "f/f0/#",
    "f/+/x",
    "u/#",
    "$SYS/#",
    "/",
    "a",
    "w/x",
];

/// A valid topic name.
fn topic_name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::sample::select(TOPIC_NAMES).prop_map(|s| s.as_bytes().to_vec()),
        "[a-z0-9]{1,4}(/[a-z0-9]{1,4}){0,3}".prop_map(String::into_bytes),
    ]
}

/// A valid topic filter.
fn filter() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::sample::select(FILTERS).prop_map(|s| s.as_bytes().to_vec()),
        "([a-z0-9]{1,3}|[+])(/([a-z0-9]{1,3}|[+])){0,3}(/#)?".prop_map(String::into_bytes),
    ]
}

/// A property of `ids` with a value in its valid range.
fn valid_prop(ids: &'static [u8]) -> impl Strategy<Value = Prop> {
    (
        prop::sample::select(ids),
        0u32..2000,
        topic_name(),
        topic_name(),
    )
        .prop_map(|(id, num, a, b)| {
            let num = match id {
                0x01 | 0x17 | 0x19 => num % 2,
                // Topic alias: 1..=16, the maximum the broker announces.
                0x23 => 1 + num % 16,
                0x21 | 0x22 => 1 + num % 100,
                0x27 => 64 + num,
                0x0B => 1 + num,
                _ => num % 100,
            };
            Prop { id, num, a, b }
        })
}

/// A packet a client may send in an established session, with random valid contents.
fn valid_pkt() -> impl Strategy<Value = Pkt> {
    let publish = (
        0u8..3,
        any::<bool>(),
        any::<bool>(),
        prop_oneof![4 => topic_name(), 1 => Just(Vec::new())],
        1u16..12,
        prop::collection::vec(
            valid_prop(&[0x01, 0x02, 0x03, 0x08, 0x09, 0x23, 0x26]),
            0..3,
        ),
        payload(),
    )
        .prop_map(
            |(qos, dup, retain, topic, pkid, props, payload)| Pkt::Publish {
                v5: None,
                qos,
                dup: dup && qos > 0,
                retain,
                topic,
                pkid,
                props,
                payload,
            },
        );
    let ack =
        (4u8..8, 1u16..12, prop::option::of(Just(0u8))).prop_map(|(kind, pkid, code)| Pkt::Ack {
            v5: None,
            kind,
            flags_xor: 0,
            pkid,
            reason: code.map(|c| (c, None)),
        });
    let options = prop_oneof![
        0u8..3,
        (0u8..3, any::<bool>(), any::<bool>(), 0u8..3).prop_map(|(q, nl, rap, rh)| q
            | (u8::from(nl) << 2)
            | (u8::from(rap) << 3)
            | (rh << 4))
    ];
    let subscribe = (
        1u16..12,
        prop::collection::vec(valid_prop(&[0x0B, 0x26]), 0..2),
        prop::collection::vec((filter(), options), 1..4),
    )
        .prop_map(|(pkid, props, filters)| Pkt::Subscribe {
            v5: None,
            flags_xor: 0,
            pkid,
            props,
            filters,
        });
    let unsubscribe =
        (1u16..12, prop::collection::vec(filter(), 1..4)).prop_map(|(pkid, filters)| {
            Pkt::Unsubscribe {
                v5: None,
                flags_xor: 0,
                pkid,
                props: Vec::new(),
                filters,
            }
        });
    prop_oneof![
        6 => publish,
        3 => ack,
        3 => subscribe,
        1 => unsubscribe,
        1 => Just(Pkt::PingReq),
    ]
}

fn valid_chunk() -> impl Strategy<Value = Chunk> {
    valid_pkt().prop_map(|pkt| Chunk::Packet {
        pkt: Box::new(pkt),
        length: Length::Exact,
        flip: None,
    })
}

fn length() -> impl Strategy<Value = Length> {
    prop_oneof![
        16 => Just(Length::Exact),
        2 => (-8i16..8).prop_map(Length::Off),
        1 => any::<u32>().prop_map(Length::Any),
    ]
}

fn flip() -> impl Strategy<Value = Option<(usize, u8)>> {
    prop_oneof![12 => Just(None), 1 => (any::<usize>(), 1u8..=255).prop_map(Some)]
}

fn chunk() -> impl Strategy<Value = Chunk> {
    prop_oneof![
        12 => (pkt(), length(), flip()).prop_map(|(pkt, length, flip)| Chunk::Packet { pkt: Box::new(pkt), length, flip }),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Chunk::Raw),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    let preamble = prop_oneof![
        1 => Just(Preamble::None),
        6 => valid_connect().prop_map(Preamble::Valid),
        1 => (any_connect(), length(), flip()).prop_map(|(spec, length, flip)| {
            Preamble::Mangled(Chunk::Packet { pkt: Box::new(Pkt::Connect(spec)), length, flip })
        }),
    ];
    (
        any::<bool>(),
        preamble,
        prop::collection::vec(valid_chunk(), 0..8),
        prop::collection::vec(chunk(), 0..3),
        prop_oneof![3 => Just(None), 1 => prop::collection::vec(valid_chunk(), 0..6).prop_map(Some)],
    )
        .prop_map(|(acl, preamble, body, tail, twin)| Case {
            acl,
            twin: twin.filter(|_| matches!(preamble, Preamble::Valid(_))),
            preamble,
            body,
            tail,
        })
}

// ---------------------------------------------------------------------------------------------
// What the broker must do with the bytes

/// The client's byte stream read as the broker frames it (a fixed header, then the remaining
/// length's bytes): whatever the protocol, packets are delimited the same way.
#[derive(Debug, PartialEq, Eq)]
struct Framing {
    /// Zero bytes that complete the last, partial frame (empty when the stream ends between
    /// frames).
    completion: Vec<u8>,
    /// PINGREQ frames after the first frame (the first one is read as the CONNECT).
    pingreqs: usize,
    /// A frame over `max` or a remaining length longer than four bytes: the broker closes
    /// there whatever it makes of the rest.
    must_close: bool,
}

fn framing(stream: &[u8], max: usize) -> Framing {
    let mut i = 0;
    let mut frame = 0usize;
    let mut pingreqs = 0;
    loop {
        if i == stream.len() {
            return Framing {
                completion: Vec::new(),
                pingreqs,
                must_close: false,
            };
        }
        let mut remaining = 0usize;
        let mut j = i + 1;
        loop {
            let Some(&b) = stream.get(j) else {
                // The remaining length is cut short: a final 0 byte ends it (adding nothing),
                // then zeros for the body, unless the broker refuses the size by then.
                let size = j + 1 - i + remaining;
                let mut completion = vec![0u8];
                if size <= max {
                    completion.resize(1 + remaining, 0);
                }
                if frame > 0 && stream[i] >> 4 == 12 {
                    pingreqs += 1;
                }
                return Framing {
                    completion,
                    pingreqs,
                    must_close: size > max,
                };
            };
            remaining |= usize::from(b & 0x7f) << (7 * (j - i - 1));
            j += 1;
            if b & 0x80 == 0 {
                break;
            }
            if j - i - 1 == 4 {
                return Framing {
                    completion: Vec::new(),
                    pingreqs,
                    must_close: true,
                };
            }
        }
        let size = j - i + remaining;
        if size > max {
            return Framing {
                completion: Vec::new(),
                pingreqs,
                must_close: true,
            };
        }
        if frame > 0 && stream[i] >> 4 == 12 {
            pingreqs += 1;
        }
        if i + size > stream.len() {
            return Framing {
                completion: vec![0u8; i + size - stream.len()],
                pingreqs,
                must_close: false,
            };
        }
        i += size;
        frame += 1;
    }
}

#[test]
fn framing_of_the_client_stream() {
    let ping = [0xC0, 0x00];
    // The first frame is the CONNECT: a PINGREQ there is not answered.
    assert_eq!(framing(&ping, 100).pingreqs, 0);
    let f = framing(&[0x10, 0x02, 0xAA, 0xBB, 0xC0, 0x00, 0xC0, 0x00, 0x30], 100);
    assert_eq!(
        f,
        Framing {
            completion: vec![0x00],
            pingreqs: 2,
            must_close: false
        }
    );
    let f = framing(&[0x10, 0x00, 0x30, 0x85], 100);
    assert_eq!(f.completion, vec![0u8; 6]);
    let f = framing(&[0x10, 0x00, 0x30, 0x05, 1, 2], 100);
    assert_eq!(f.completion, vec![0u8; 3]);
    assert!(framing(&[0x10, 0x00, 0x30, 0xFF, 0x7F], 100).must_close);
    assert!(
        framing(
            &[0x10, 0x00, 0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
            100_000_000
        )
        .must_close
    );
    assert!(framing(&[0x10, 0x00, 0x30, 0xFF, 0xFF], 100).must_close);
}

/// What the broker sent on the fuzzed connection.
#[derive(Debug, Default)]
struct Received {
    buf: Vec<u8>,
    /// First bytes of the complete frames received.
    frames: Vec<u8>,
    closed: bool,
    /// What was awaited when a wait timed out.
    why: String,
}

impl Received {
    fn pingresps(&self) -> usize {
        self.frames.iter().filter(|&&f| f == 0xD0).count()
    }

    fn parse(&mut self) {
        loop {
            let mut remaining = 0usize;
            let mut j = 1;
            let complete = loop {
                let Some(&b) = self.buf.get(j) else {
                    break false;
                };
                remaining |= usize::from(b & 0x7f) << (7 * (j - 1));
                j += 1;
                if b & 0x80 == 0 {
                    break true;
                }
            };
            if !complete || self.buf.len() < j + remaining {
                return;
            }
            self.frames.push(self.buf[0]);
            self.buf.drain(..j + remaining);
        }
    }

    /// Reads until `done` or the connection closes (true), or `WAIT` passes (false).
    async fn read_until(&mut self, rd: &mut OwnedReadHalf, done: impl Fn(&Self) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut chunk = vec![0u8; 4096];
        loop {
            self.parse();
            if self.closed || done(self) {
                return true;
            }
            match tokio::time::timeout_at(deadline, rd.read(&mut chunk)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => self.closed = true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// How a fuzzed connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Closed by the broker before the probe was answered.
    Closed,
    /// Answered the PINGREQ probe, then closed after the test's half-close.
    Answered,
    /// Neither closed nor answered within `WAIT`, then closed after the test's half-close:
    /// alive, but silent. Legitimate only for a session whose CONNECT (fuzzed) announced an
    /// MQTT 5 maximum packet size below 2 (no PINGRESP fits); `must_close`: the stream had a
    /// frame the broker must refuse (over the size limit, or a five-byte length).
    Silent { must_close: bool },
}

/// A client connection driven by the test: what it sent, what it received.
struct FuzzConn {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    sent: Vec<u8>,
    got: Received,
    must_close: bool,
}

impl FuzzConn {
    async fn open(addr: SocketAddr) -> Result<Self, String> {
        let (rd, wr) = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?
            .into_split();
        Ok(Self {
            rd,
            wr,
            sent: Vec::new(),
            got: Received::default(),
            must_close: false,
        })
    }

    /// Sends `bytes`, the zeros that complete their last frame, and a PINGREQ; then waits
    /// until the broker has closed, or answered every PINGREQ frame sent after the first frame
    /// so far (so the last answer is to this PINGREQ). False: neither within `WAIT`.
    async fn send_and_ping(&mut self, bytes: &[u8]) -> bool {
        let before = framing(&self.sent, MAX_PACKET);
        let mut all = before.completion;
        all.extend_from_slice(bytes);
        self.sent.extend_from_slice(&all);
        let mut out = framing(&self.sent, MAX_PACKET).completion;
        out.extend_from_slice(&[0xC0, 0x00]);
        self.sent.extend_from_slice(&out);
        all.extend_from_slice(&out);
        let framed = framing(&self.sent, MAX_PACKET);
        self.must_close |= before.must_close || framed.must_close;
        // No PINGREQ after a first frame: the probe itself is the first frame (not a CONNECT).
        let expected = framed.pingreqs;
        let must_close = self.must_close;
        let write = async {
            // A failed write means the broker closed: the reader sees that.
            let _ = tokio::time::timeout(WAIT, self.wr.write_all(&all)).await;
        };
        let read = self.got.read_until(&mut self.rd, |g| {
            !must_close && expected > 0 && g.pingresps() >= expected
        });
        let ((), done) = tokio::join!(write, read);
        if !done {
            self.got.why = format!(
                "expected {}; received frames {:02x?} (+{} bytes of a partial frame); sent {} \
                 bytes, completions and PINGREQs included",
                if must_close || expected == 0 {
                    "close".to_string()
                } else {
                    format!("{expected} PINGRESP")
                },
                self.got.frames,
                self.got.buf.len(),
                self.sent.len(),
            );
        }
        done
    }

    /// Half-closes; the broker must then close. `Err` if it does not within `WAIT`.
    async fn finish(mut self) -> Result<(), String> {
        let _ = self.wr.shutdown().await;
        if self.got.read_until(&mut self.rd, |_| false).await {
            Ok(())
        } else {
            Err(format!(
                "still open {WAIT:?} after the client's FIN; received frames {:02x?}",
                self.got.frames
            ))
        }
    }

    /// The checks of (c) after `send_and_ping` returned `answered`.
    async fn outcome(self, answered: bool) -> Result<Outcome, String> {
        if answered && self.got.closed {
            return Ok(Outcome::Closed);
        }
        let must_close = self.must_close;
        let waited = self.got.why.clone();
        match (answered, self.finish().await) {
            (true, Ok(())) => Ok(Outcome::Answered),
            (false, Ok(())) => Ok(Outcome::Silent { must_close }),
            (true, Err(e)) => Err(format!("answered the PINGREQ but {e}")),
            (false, Err(e)) => Err(format!("neither closed nor answered, and {e}; {waited}")),
        }
    }
}

/// Sends `bytes` on a new connection, then the checks of (c). `Err` says how it hung.
async fn probe(addr: SocketAddr, bytes: &[u8]) -> Result<Outcome, String> {
    let mut c = FuzzConn::open(addr).await?;
    let answered = c.send_and_ping(bytes).await;
    c.outcome(answered).await
}

/// The hang check itself: a peer that accepts and then neither reads nor closes is reported.
#[tokio::test]
async fn a_peer_that_stops_reading_is_reported_as_hung() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        tokio::time::sleep(WAIT * 3).await;
        drop(socket);
    });
    let connect = ConnectSpec {
        name: b"MQTT".to_vec(),
        level: 4,
        clean: true,
        flags_xor: 0,
        keep_alive: 0,
        props: None,
        client_id: b"f0".to_vec(),
        will: None,
        username: None,
        password: None,
    };
    let result = probe(addr, &connect.frame()).await;
    assert!(
        result
            .as_ref()
            .is_err_and(|e| e.contains("neither closed nor answered")),
        "{result:?}"
    );
    hold.abort();
}

// ---------------------------------------------------------------------------------------------
// The brokers and the well-behaved clients

const ACL: &str = "\
# anonymous clients
topic readwrite watch/#
topic read r/#
topic write w/#
topic write refuse/#
topic write bad/#
topic deny a/#
user u1
topic readwrite u/#
topic read #
pattern readwrite f/%c/#
pattern write f/%u/#
";

/// The gateway side: refuses two topic prefixes, takes everything else.
fn decide(inbound: &Inbound) -> IngestReply {
    if inbound.topic.starts_with("refuse/") {
        Err(IngestRefusal::QuotaExceeded)
    } else if inbound.topic.starts_with("bad/") {
        Err(IngestRefusal::PayloadInvalid("fuzz".into()))
    } else {
        Ok(())
    }
}

struct Target {
    running: Running,
    /// Subscribed to `watch/t` at QoS 1.
    sub: Raw4,
    publ: Raw4,
    /// Connections the broker counts when no fuzzed client is connected.
    base_connections: u64,
}

impl Target {
    async fn start(acl: bool) -> Self {
        let mut s: BrokerSettings = common::settings();
        s.max_connections = 64;
        s.max_packet_size = MAX_PACKET;
        s.connect_timeout = Duration::from_millis(500);
        if acl {
            let file = AclFile::parse(std::path::Path::new("fuzz.acl"), ACL).unwrap();
            s.auth = Some(Arc::new(Auth::new(vec![true], None, Some(file))));
        }
        let (running, seen) = common::start_replying(s, decide).await;
        drop(seen);
        let mut sub = Raw4::connect(running.addr, "watch-sub").await;
        sub.subscribe("watch/t", Q::AtLeastOnce).await;
        let publ = Raw4::connect(running.addr, "watch-pub").await;
        Self {
            running,
            sub,
            publ,
            base_connections: 2,
        }
    }

    /// A QoS 1 publish by one well-behaved client, acknowledged and delivered to the other.
    async fn round_trip(&mut self, n: u32) -> Result<(), String> {
        let body = format!("round trip {n}");
        let pkid = u16::try_from(n % 65_535 + 1).unwrap();
        let mut p = v4::Publish::from_bytes("watch/t", Q::AtLeastOnce, Bytes::from(body.clone()));
        p.pkid = pkid;
        self.publ.send(v4::Packet::Publish(p)).await;
        match self.publ.recv_within(WAIT).await {
            Ok(Some(v4::Packet::PubAck(a))) if a.pkid == pkid => {}
            other => return Err(format!("publisher: expected PUBACK {pkid}, got {other:?}")),
        }
        loop {
            match self.sub.recv_within(WAIT).await {
                Ok(Some(v4::Packet::Publish(p))) => {
                    if p.qos != Q::AtMostOnce {
                        self.sub
                            .send(v4::Packet::PubAck(v4::PubAck::new(p.pkid)))
                            .await;
                    }
                    if p.payload == body.as_bytes() {
                        return Ok(());
                    }
                }
                other => return Err(format!("subscriber: expected {body:?}, got {other:?}")),
            }
        }
    }

    /// Waits until the broker counts only the well-behaved clients again.
    async fn settled(&self) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let now = self.running.handle.stats().connections_current;
            if now == self.base_connections {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "{now} connections still counted {WAIT:?} after the fuzzed client closed \
                     (expected {})",
                    self.base_connections
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

#[derive(Debug, Default)]
struct Tally {
    cases: u32,
    closed: u32,
    answered: u32,
    /// Alive but not answering (a fuzzed CONNECT's tiny maximum packet size).
    silent: u32,
    /// Twins closed by the broker (taken over), and still answering after the case.
    twins_closed: u32,
    twins_answered: u32,
}

struct Fixture {
    open: Target,
    acl: Target,
    tally: Tally,
}

impl Fixture {
    async fn run(&mut self, case: &Case) -> Result<(), TestCaseError> {
        let bytes = case.bytes();
        let n = self.tally.cases;
        self.tally.cases += 1;
        let target = if case.acl {
            &mut self.acl
        } else {
            &mut self.open
        };
        let fail = |what: String| {
            TestCaseError::fail(format!(
                "{what}\ninput: {}{}",
                hex(&bytes),
                case.twin_bytes()
                    .map(|t| format!("\ntwin (connected first): {}", hex(&t)))
                    .unwrap_or_default()
            ))
        };
        // The twin: established (answering) or refused before the case's connection starts.
        let mut twin = None;
        if let Some(t) = case.twin_bytes() {
            let mut c = FuzzConn::open(target.running.addr).await.map_err(&fail)?;
            if !c.send_and_ping(&t).await {
                return Err(fail(format!("twin hung: {}", c.got.why)));
            }
            if !c.got.closed {
                twin = Some(c);
            }
        }
        let outcome = probe(target.running.addr, &bytes).await;
        if std::env::var("FUZZ_DEBUG").is_ok() {
            eprintln!("DEBUG {:?} {}", outcome, hex(&bytes));
        }
        // (a) before anything else: a panic explains a hang.
        let panics = panics_on(RT_THREADS);
        if !panics.is_empty() {
            return Err(fail(format!("broker task panicked: {panics:#?}")));
        }
        if target.running.task.is_finished() {
            return Err(fail("the broker's run task ended".into()));
        }
        // (c)
        match outcome {
            Ok(Outcome::Closed) => self.tally.closed += 1,
            Ok(Outcome::Answered) => self.tally.answered += 1,
            // Only a fuzzed CONNECT can announce a maximum packet size too small for PINGRESP
            // (the valid ones announce at least 2).
            Ok(Outcome::Silent { must_close: false })
                if !matches!(case.preamble, Preamble::Valid(_)) =>
            {
                self.tally.silent += 1
            }
            Ok(silent @ Outcome::Silent { .. }) => {
                return Err(fail(format!(
                    "fuzzed connection neither closed nor answered PINGREQ within {WAIT:?} \
                     ({silent:?}; it closed after the client's FIN)"
                )));
            }
            Err(why) => return Err(fail(format!("fuzzed connection hung: {why}"))),
        }
        // (c) for the twin: taken over (closed), or still answering.
        if let Some(mut c) = twin {
            let answered = c.send_and_ping(&[]).await;
            match c.outcome(answered).await {
                Ok(Outcome::Closed) => self.tally.twins_closed += 1,
                Ok(Outcome::Answered) => self.tally.twins_answered += 1,
                Ok(silent) => {
                    return Err(fail(format!(
                        "twin neither closed nor answered PINGREQ within {WAIT:?} ({silent:?})"
                    )));
                }
                Err(why) => return Err(fail(format!("twin hung: {why}"))),
            }
        }
        // (b)
        target.settled().await.map_err(&fail)?;
        target
            .round_trip(n)
            .await
            .map_err(|e| fail(format!("well-behaved clients disturbed: {e}")))?;
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CASES)
}

#[test]
fn fuzzed_connections_close_or_answer_and_never_disturb_others() {
    install_panic_recorder();
    let rt = runtime(RT_THREADS);
    let fixture = RefCell::new(rt.block_on(async {
        Fixture {
            open: Target::start(false).await,
            acl: Target::start(true).await,
            tally: Tally::default(),
        }
    }));
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
    let result = runner.run(&case(), |case| {
        let mut fixture = fixture.borrow_mut();
        rt.block_on(fixture.run(&case))
    });
    let fixture = fixture.into_inner();
    let stats = [
        ("open", fixture.open.running.handle.stats()),
        ("acl", fixture.acl.running.handle.stats()),
    ];
    eprintln!("seed {seed}: {:?}", fixture.tally);
    for (name, s) in &stats {
        eprintln!(
            "{name}: connections {} refused {} malformed {} oversized {} publishes {} \
             delivered {} invalid topics {} denied {}/{} ingest refused {}",
            s.connections_total,
            s.connections_refused,
            s.malformed_packets,
            s.oversized_packets,
            s.publishes_received,
            s.publishes_delivered,
            s.invalid_topics,
            s.publishes_denied,
            s.subscriptions_denied,
            s.ingest_refused
        );
    }
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, case)) => panic!(
            "{why}\nminimal case: {case:#?}\nits bytes: {}",
            hex(&case.bytes())
        ),
        Err(TestError::Abort(why)) => panic!("aborted: {why}"),
    }
    assert!(panics_on(RT_THREADS).is_empty());
    // The inputs must reach both outcomes and the deeper paths (counted by the brokers from the
    // fuzzed connections alone: the well-behaved clients never trip these), or the test proves
    // little. Checked on runs long enough for that (the default is).
    let t = &fixture.tally;
    if t.cases >= 1000 {
        assert!(
            t.answered * 10 >= t.cases && t.closed * 10 >= t.cases && t.twins_closed > 0,
            "{t:?}"
        );
        for (name, s) in &stats {
            assert!(
                s.malformed_packets > 0
                    && s.oversized_packets > 0
                    && s.invalid_topics > 0
                    && s.ingest_refused > 0,
                "{name}: {s:?}"
            );
        }
        let acl = &stats[1].1;
        assert!(
            acl.publishes_denied > 0 && acl.subscriptions_denied > 0,
            "{acl:?}"
        );
    }
    rt.block_on(async {
        for t in [fixture.open, fixture.acl] {
            t.running.shutdown.cancel();
            let _ = tokio::time::timeout(WAIT, t.running.task).await;
        }
    });
}
