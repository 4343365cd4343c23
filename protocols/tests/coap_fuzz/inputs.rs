//! Inputs for the CoAP endpoint fuzzers, shared by `tests/coap_fuzz.rs` (a running server,
//! over UDP) and `src/coap/endpoint/fuzz.rs` (the endpoint's own handlers, its state checked
//! after every datagram). Only std and proptest: messages are encoded here, by hand, so they can
//! be wrong in every way the endpoint must survive (coap-lite's writer cannot produce a reserved
//! nibble or a token length of 12).
//!
//! A case is a list of [`Action`]s from a few peers: arbitrary bytes; messages with valid headers
//! and random options (deltas and lengths at their extended-encoding edges 12/13, 268/269, the
//! largest option number, a reserved nibble 15, truncated extensions), tokens of 0-8 bytes and
//! the reserved lengths 9-15; Block1 uploads (every szx including the reserved 7, block numbers
//! up to 2^20-1, blocks reordered, repeated, dropped, resized); Block2 requests; Observe
//! registrations and deregistrations with a few shared tokens; empty messages (pings, ACK and
//! RST for ids the server used and for unknown ones); datagrams sent again verbatim (confirmable
//! retransmissions); status changes (notifications) and waits (timers).
#![allow(dead_code)]

use proptest::collection::vec;
use proptest::prelude::*;

/// Raw codes (`class << 5 | detail`).
pub mod code {
    pub const EMPTY: u8 = 0x00;
    pub const GET: u8 = 0x01;
    pub const POST: u8 = 0x02;
    pub const PUT: u8 = 0x03;
    pub const DELETE: u8 = 0x04;
    pub const CONTENT: u8 = 0x45;
    pub const CREATED: u8 = 0x41;
}

/// Message types.
pub mod ty {
    pub const CON: u8 = 0;
    pub const NON: u8 = 1;
    pub const ACK: u8 = 2;
    pub const RST: u8 = 3;
}

/// Option numbers.
pub mod opt {
    pub const IF_MATCH: u16 = 1;
    pub const URI_HOST: u16 = 3;
    pub const ETAG: u16 = 4;
    pub const IF_NONE_MATCH: u16 = 5;
    pub const OBSERVE: u16 = 6;
    pub const URI_PORT: u16 = 7;
    pub const LOCATION_PATH: u16 = 8;
    pub const URI_PATH: u16 = 11;
    pub const CONTENT_FORMAT: u16 = 12;
    pub const MAX_AGE: u16 = 14;
    pub const URI_QUERY: u16 = 15;
    pub const ACCEPT: u16 = 17;
    pub const BLOCK2: u16 = 23;
    pub const BLOCK1: u16 = 27;
    pub const SIZE2: u16 = 28;
    pub const PROXY_URI: u16 = 35;
    pub const PROXY_SCHEME: u16 = 39;
    pub const SIZE1: u16 = 60;
    pub const NO_RESPONSE: u16 = 258;
}

/// The ingest resource of the fuzzed endpoints (`CoapSettings::ingest_path`).
pub const INGEST: &str = "t";
/// A topic level whose readings the fuzzers' gateway refuses.
pub const REFUSE: &str = "refuse";
/// A topic level whose readings the fuzzers' gateway answers late (after the piggy-back window).
pub const SLOW: &str = "slow";
/// Peers a case sends from (index into the driver's sockets).
pub const PEERS: u8 = 3;

/// A CoAP message, field by field; `encode` writes exactly what the fields say.
#[derive(Debug, Clone)]
pub struct Msg {
    pub version: u8,
    pub typ: u8,
    pub code: u8,
    pub mid: u16,
    /// The token length nibble as written (9-15 are reserved: a message format error).
    pub tkl: u8,
    /// The token bytes written (normally `tkl` of them).
    pub token: Vec<u8>,
    /// Options by absolute number, written in ascending order (repeats keep their order).
    pub options: Vec<(u16, Vec<u8>)>,
    /// Bytes written after the options: malformed option headers.
    pub raw_options: Vec<u8>,
    /// `Some(empty)`: a payload marker with nothing after it (a message format error).
    pub payload: Option<Vec<u8>>,
}

impl Msg {
    /// A well-formed request (or empty message) with these fields.
    pub fn new(typ: u8, code: u8, mid: u16, token: &[u8]) -> Msg {
        Msg {
            version: 1,
            typ,
            code,
            mid,
            tkl: token.len() as u8,
            token: token.to_vec(),
            options: Vec::new(),
            raw_options: Vec::new(),
            payload: None,
        }
    }

    pub fn path(mut self, segments: &[&[u8]]) -> Msg {
        for s in segments {
            self.options.push((opt::URI_PATH, s.to_vec()));
        }
        self
    }

    pub fn option(mut self, number: u16, value: Vec<u8>) -> Msg {
        self.options.push((number, value));
        self
    }

    pub fn payload(mut self, p: &[u8]) -> Msg {
        self.payload = Some(p.to_vec());
        self
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![
            ((self.version & 3) << 6) | ((self.typ & 3) << 4) | (self.tkl & 0xf),
            self.code,
        ];
        out.extend_from_slice(&self.mid.to_be_bytes());
        out.extend_from_slice(&self.token);
        let mut options = self.options.clone();
        options.sort_by_key(|(n, _)| *n);
        let mut previous = 0u16;
        for (number, value) in &options {
            encode_option(&mut out, number - previous, value);
            previous = *number;
        }
        out.extend_from_slice(&self.raw_options);
        if let Some(p) = &self.payload {
            out.push(0xff);
            out.extend_from_slice(p);
        }
        out
    }
}

/// An empty message (ACK, RST, or a CON ping) for `mid`.
pub fn empty(typ: u8, mid: u16) -> Vec<u8> {
    Msg::new(typ, code::EMPTY, mid, &[]).encode()
}

/// The nibble and extension bytes for an option delta or length (RFC 7252 section 3.1).
fn extended(v: usize) -> (u8, Vec<u8>) {
    if v < 13 {
        (v as u8, Vec::new())
    } else if v < 269 {
        (13, vec![(v - 13) as u8])
    } else {
        let ext = u16::try_from(v - 269).unwrap_or(u16::MAX);
        (14, ext.to_be_bytes().to_vec())
    }
}

/// One option: header byte, extended delta, extended length, value.
pub fn encode_option(out: &mut Vec<u8>, delta: u16, value: &[u8]) {
    let (d, dext) = extended(usize::from(delta));
    let (l, lext) = extended(value.len());
    out.push((d << 4) | l);
    out.extend_from_slice(&dext);
    out.extend_from_slice(&lext);
    out.extend_from_slice(value);
}

/// Minimal big-endian uint option value (0 is empty).
pub fn uint(v: u32) -> Vec<u8> {
    let b = v.to_be_bytes();
    let skip = b.iter().take_while(|x| **x == 0).count();
    b[skip..].to_vec()
}

/// A Block1/Block2 option value.
pub fn block(num: u32, more: bool, szx: u8) -> Vec<u8> {
    uint((num << 4) | (u32::from(more) << 3) | u32::from(szx & 7))
}

/// The block size for `szx` (the reserved 7 is treated as 6 by the generators).
pub fn block_size(szx: u8) -> usize {
    16 << szx.min(6)
}

// ---------------------------------------------------------------------------------------------
// Strategies for the parts

fn typ() -> BoxedStrategy<u8> {
    prop_oneof![
        9 => Just(ty::CON),
        7 => Just(ty::NON),
        2 => Just(ty::ACK),
        2 => Just(ty::RST),
    ]
    .boxed()
}

fn request_code() -> BoxedStrategy<u8> {
    prop_oneof![
        8 => prop_oneof![Just(code::GET), Just(code::POST), Just(code::PUT)],
        1 => prop_oneof![Just(code::DELETE), Just(0x05), Just(0x06), Just(0x07), Just(0x08), Just(0x1f)],
        // Responses, reserved classes 1, 3, 6, 7, and the empty code with options.
        1 => prop_oneof![Just(0x45), Just(0x84), Just(0x20), Just(0x7f), Just(0xc0), Just(0xff), Just(code::EMPTY)],
    ]
    .boxed()
}

/// Message ids: a small pool half the time, so ids repeat (duplicates, retransmissions).
fn mid() -> BoxedStrategy<u16> {
    prop_oneof![1 => 0u16..12, 1 => any::<u16>()].boxed()
}

/// A token from a small pool (observers are keyed by it), any 0-8 bytes, or a reserved length.
/// Returns (length nibble, bytes written).
fn token() -> BoxedStrategy<(u8, Vec<u8>)> {
    prop_oneof![
        6 => token_bytes().prop_map(|t| (t.len() as u8, t)),
        1 => (9u8..=15).prop_flat_map(|n| vec(any::<u8>(), usize::from(n)))
            .prop_map(|t| (t.len() as u8, t)),
        // The nibble and the bytes disagree: the options start early or late.
        1 => (0u8..=15, vec(any::<u8>(), 0..=15)),
    ]
    .boxed()
}

pub fn token_bytes() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        Just(vec![0x01]),
        Just(vec![0x01, 0x02]),
        Just(vec![0xaa; 8]),
        vec(any::<u8>(), 0..=8),
    ]
    .boxed()
}

fn segment(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// Uri-Path segments: the ingest resource with good and bad topics, the status and discovery
/// resources, and anything.
fn path() -> BoxedStrategy<Vec<Vec<u8>>> {
    let level = prop_oneof![
        4 => Just(segment("a")),
        2 => Just(segment("b")),
        2 => Just(segment(REFUSE)),
        1 => Just(segment(SLOW)),
        1 => prop_oneof![
            Just(segment("")),
            Just(segment("+")),
            Just(segment("#")),
            Just(segment("a\0b")),
            Just(vec![0xff, 0xfe]),
            Just(segment("a/b")),
            Just(vec![b'x'; 300]),
        ],
    ];
    prop_oneof![
        5 => vec(level, 1..=3).prop_map(|mut l| {
            l.insert(0, segment(INGEST));
            l
        }),
        1 => Just(vec![segment(INGEST)]),
        3 => Just(vec![segment("status")]),
        2 => Just(vec![segment(".well-known"), segment("core")]),
        1 => Just(Vec::new()),
        1 => vec(vec(any::<u8>(), 0..8), 0..=4),
    ]
    .boxed()
}

fn query() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        Just(segment("rt=outpost.*")),
        Just(segment("rt=outpost.status")),
        Just(segment("href=/st*")),
        Just(segment("ct=50")),
        Just(segment("obs")),
        Just(segment("*")),
        Just(segment("=*")),
        Just(segment("if=")),
        Just(vec![0xc3, 0x28]),
        vec(any::<u8>(), 0..20),
    ]
    .boxed()
}

/// Block numbers, mostly small, and at the limits of 1-, 2- and 3-byte option values.
pub fn block_num() -> BoxedStrategy<u32> {
    prop_oneof![
        6 => 0u32..4,
        1 => prop_oneof![Just(15u32), Just(16), Just(4095), Just(4096)],
        1 => prop_oneof![Just(65_535u32), Just(65_536), Just((1 << 20) - 1)],
        1 => 0u32..(1 << 20),
    ]
    .boxed()
}

fn block_value() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        6 => (block_num(), any::<bool>(), 0u8..=7).prop_map(|(n, m, s)| block(n, m, s)),
        // Non-minimal (zero-padded) but valid.
        1 => (0u32..4, any::<bool>(), 0u8..=7).prop_map(|(n, m, s)| {
            let mut v = vec![0, 0];
            v.extend(block(n, m, s));
            v.drain(..v.len().saturating_sub(3));
            v
        }),
        // 4 bytes: a uint, not a block; 5: not even a uint.
        1 => vec(any::<u8>(), 4..=5),
    ]
    .boxed()
}

fn uint_value() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        3 => any::<u32>().prop_map(uint),
        1 => Just(Vec::new()),
        1 => vec(any::<u8>(), 5..=8),
    ]
    .boxed()
}

fn content_format() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        4 => prop_oneof![Just(0u32), Just(50), Just(60), Just(110), Just(112), Just(40)]
            .prop_map(uint),
        1 => prop_oneof![Just(65_535u32), Just(65_536), Just(u32::MAX)].prop_map(uint),
        1 => vec(any::<u8>(), 5..=6),
    ]
    .boxed()
}

fn observe_value() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        4 => Just(Vec::new()),
        3 => Just(vec![1]),
        1 => Just(vec![0]),
        1 => Just(vec![2]),
        1 => Just(vec![0, 0, 0, 0]),
        1 => vec(any::<u8>(), 1..=5),
    ]
    .boxed()
}

/// Option numbers where the delta or the number itself is at an encoding edge.
fn edge_number() -> BoxedStrategy<u16> {
    prop_oneof![
        Just(1u16),
        Just(12),
        Just(13),
        Just(14),
        Just(268),
        Just(269),
        Just(270),
        Just(2048),
        Just(2049),
        Just(65_000),
        Just(65_535),
    ]
    .boxed()
}

/// Values whose length is at an encoding edge.
fn edge_value() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..=12),
        prop_oneof![
            Just(12usize),
            Just(13),
            Just(268),
            Just(269),
            Just(270),
            Just(1000)
        ]
        .prop_map(|n| vec![b'v'; n]),
    ]
    .boxed()
}

fn option() -> BoxedStrategy<(u16, Vec<u8>)> {
    prop_oneof![
        3 => (Just(opt::CONTENT_FORMAT), content_format()),
        3 => (Just(opt::OBSERVE), observe_value()),
        3 => (Just(opt::BLOCK1), block_value()),
        3 => (Just(opt::BLOCK2), block_value()),
        1 => (prop_oneof![Just(opt::SIZE1), Just(opt::SIZE2)], uint_value()),
        2 => (Just(opt::URI_QUERY), query()),
        1 => (prop_oneof![Just(opt::ACCEPT), Just(opt::MAX_AGE), Just(opt::URI_PORT)], uint_value()),
        1 => (
            prop_oneof![
                Just(opt::IF_MATCH),
                Just(opt::URI_HOST),
                Just(opt::ETAG),
                Just(opt::IF_NONE_MATCH),
                Just(opt::LOCATION_PATH),
                Just(opt::PROXY_URI),
                Just(opt::PROXY_SCHEME),
                Just(opt::NO_RESPONSE),
            ],
            vec(any::<u8>(), 0..16),
        ),
        2 => (edge_number(), edge_value()),
        1 => (any::<u16>(), vec(any::<u8>(), 0..8)),
    ]
    .boxed()
}

/// Malformed option headers (written after the well-formed options).
fn raw_options() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        12 => Just(Vec::new()),
        // Reserved nibbles: delta 15 (not a payload marker), length 15.
        1 => prop_oneof![Just(vec![0xf0]), Just(vec![0x1f]), Just(vec![0xef, 0, 0])],
        // Extensions cut short, a value longer than the rest.
        1 => prop_oneof![
            Just(vec![0xd0]),
            Just(vec![0xe0, 0x01]),
            Just(vec![0x0d]),
            Just(vec![0x0e, 0x01]),
            Just(vec![0x04, b'a']),
            Just(vec![0x0e, 0xff, 0xff, b'a']),
        ],
        // Option numbers past 65535: the largest delta, twice.
        1 => Just(vec![0xe0, 0xff, 0xff, 0xe0, 0xff, 0xff]),
        1 => Just(vec![0xe1, 0xfe, 0xf2, 0x00, 0x10]),
        1 => vec(any::<u8>(), 1..8),
    ]
    .boxed()
}

fn payload() -> BoxedStrategy<Option<Vec<u8>>> {
    prop_oneof![
        4 => Just(None),
        1 => Just(Some(Vec::new())),
        4 => vec(any::<u8>(), 1..48).prop_map(Some),
        2 => prop_oneof![
            Just(segment("21.5")),
            Just(segment(r#"{"t":21.5}"#)),
            Just(segment(r#"[{"n":"a","v":1}]"#)),
            Just(vec![0x81, 0xa2, 0x00, 0x61, 0x61, 0x02, 0x01]),
        ]
        .prop_map(Some),
        1 => (0u8..=6).prop_map(|szx| Some(vec![b'x'; block_size(szx)])),
        1 => (1000usize..1500).prop_map(|n| Some(vec![b'y'; n])),
        1 => Just(Some(vec![b'z'; 9000])),
    ]
    .boxed()
}

fn version() -> BoxedStrategy<u8> {
    prop_oneof![30 => Just(1u8), 1 => 0u8..=3].boxed()
}

/// A message with a valid or nearly valid header, random options and payload.
pub fn message() -> BoxedStrategy<Msg> {
    (
        version(),
        typ(),
        request_code(),
        mid(),
        token(),
        path(),
        vec(option(), 0..5),
        raw_options(),
        payload(),
    )
        .prop_map(
            |(version, typ, code, mid, (tkl, token), path, extra, raw_options, payload)| {
                let mut options: Vec<(u16, Vec<u8>)> =
                    path.into_iter().map(|s| (opt::URI_PATH, s)).collect();
                options.extend(extra);
                Msg {
                    version,
                    typ,
                    code,
                    mid,
                    tkl,
                    token,
                    options,
                    raw_options,
                    payload,
                }
            },
        )
        .boxed()
}

/// An empty message (code 0.00): a CON ping, an ACK or RST for an unknown id, a NON (never
/// valid), and sometimes with a token, options or payload (a format error).
pub fn empty_message() -> BoxedStrategy<Msg> {
    (
        0u8..4,
        mid(),
        prop_oneof![
            6 => Just((Vec::new(), None)),
            1 => (token_bytes(), Just(None)),
            1 => (Just(Vec::new()), Just(Some(vec![0x01]))),
        ],
        prop_oneof![4 => Just(Vec::new()), 1 => vec(option(), 1..2)],
    )
        .prop_map(|(typ, mid, (token, payload), options)| {
            let mut m = Msg::new(typ, code::EMPTY, mid, &token);
            m.options = options;
            m.payload = payload;
            m
        })
        .boxed()
}

// ---------------------------------------------------------------------------------------------
// Block1 uploads

/// What is done to an upload's blocks before they are sent.
#[derive(Debug, Clone)]
pub enum BlockOp {
    /// Send two blocks in each other's place (out of order).
    Swap(u8, u8),
    /// Send a block twice with the same message id (a retransmission).
    Retransmit(u8),
    /// Send a block twice with a new message id (a duplicate block).
    Duplicate(u8),
    /// Leave a block out.
    Drop(u8),
    /// Invert a block's "more" flag.
    FlipMore(u8),
    /// Cut a block's payload to this many bytes.
    Shorten(u8, u16),
    /// Give a block another number.
    Renumber(u8, u32),
    /// Give a block another size exponent (0-7).
    Szx(u8, u8),
}

/// A Block1 upload to the ingest resource, perturbed by `ops`.
#[derive(Debug, Clone)]
pub struct Upload {
    pub con: bool,
    pub put: bool,
    /// The topic level after the ingest path.
    pub topic: String,
    pub szx: u8,
    pub blocks: u8,
    /// Length of the last block (1..=block size).
    pub last: u16,
    /// Size1 on the first block.
    pub size1: Option<u32>,
    /// Content-Format on the first block.
    pub content_format: Option<u16>,
    pub first_mid: u16,
    pub token: Vec<u8>,
    /// The same token on every block (else the block number is appended).
    pub same_token: bool,
    pub ops: Vec<BlockOp>,
}

impl Upload {
    pub fn messages(&self) -> Vec<Msg> {
        let size = block_size(self.szx);
        let n = usize::from(self.blocks.max(1));
        let mut blocks: Vec<(Msg, u32, bool, u8)> = (0..n)
            .map(|i| {
                let more = i + 1 < n;
                let len = if more {
                    size
                } else {
                    usize::from(self.last).clamp(1, size)
                };
                let mid = self.first_mid.wrapping_add(i as u16);
                let mut token = self.token.clone();
                if !self.same_token && token.len() < 8 {
                    token.push(i as u8);
                }
                let code = if self.put { code::PUT } else { code::POST };
                let typ = if self.con { ty::CON } else { ty::NON };
                let fill = b'a' + (i % 26) as u8;
                let mut m = Msg::new(typ, code, mid, &token)
                    .path(&[INGEST.as_bytes(), self.topic.as_bytes()])
                    .payload(&vec![fill; len]);
                if i == 0 {
                    if let Some(s) = self.size1 {
                        m = m.option(opt::SIZE1, uint(s));
                    }
                    if let Some(cf) = self.content_format {
                        m = m.option(opt::CONTENT_FORMAT, uint(u32::from(cf)));
                    }
                }
                (m, i as u32, more, self.szx)
            })
            .collect();
        let mut extra: Vec<(usize, (Msg, u32, bool, u8))> = Vec::new();
        for op in &self.ops {
            let len = blocks.len();
            if len == 0 {
                break;
            }
            let at = |i: &u8| usize::from(*i) % len;
            match op {
                BlockOp::Swap(a, b) => blocks.swap(at(a), at(b)),
                BlockOp::Retransmit(i) => extra.push((at(i), blocks[at(i)].clone())),
                BlockOp::Duplicate(i) => {
                    let mut b = blocks[at(i)].clone();
                    b.0.mid = b.0.mid.wrapping_add(0x8000);
                    extra.push((at(i), b));
                }
                BlockOp::Drop(i) => {
                    blocks.remove(at(i));
                }
                BlockOp::FlipMore(i) => blocks[at(i)].2 ^= true,
                BlockOp::Shorten(i, n) => {
                    if let Some(p) = blocks[at(i)].0.payload.as_mut() {
                        p.truncate(usize::from(*n));
                    }
                }
                BlockOp::Renumber(i, num) => blocks[at(i)].1 = *num,
                BlockOp::Szx(i, szx) => blocks[at(i)].3 = *szx,
            }
        }
        for (pos, b) in extra.into_iter().rev() {
            let pos = (pos + 1).min(blocks.len());
            blocks.insert(pos, b);
        }
        blocks
            .into_iter()
            .map(|(m, num, more, szx)| m.option(opt::BLOCK1, block(num, more, szx)))
            .collect()
    }
}

fn block_op() -> BoxedStrategy<BlockOp> {
    prop_oneof![
        (any::<u8>(), any::<u8>()).prop_map(|(a, b)| BlockOp::Swap(a, b)),
        any::<u8>().prop_map(BlockOp::Retransmit),
        any::<u8>().prop_map(BlockOp::Duplicate),
        any::<u8>().prop_map(BlockOp::Drop),
        any::<u8>().prop_map(BlockOp::FlipMore),
        (any::<u8>(), 0u16..1100).prop_map(|(i, n)| BlockOp::Shorten(i, n)),
        (any::<u8>(), block_num()).prop_map(|(i, n)| BlockOp::Renumber(i, n)),
        (any::<u8>(), 0u8..=7).prop_map(|(i, s)| BlockOp::Szx(i, s)),
    ]
    .boxed()
}

pub fn upload() -> BoxedStrategy<Upload> {
    (
        (
            any::<bool>(),
            any::<bool>(),
            prop_oneof![
                3 => prop_oneof![Just("a"), Just("b"), Just(SLOW), Just(REFUSE)]
                    .prop_map(str::to_owned),
                1 => (0u8..32).prop_map(|n| format!("u{n}")),
            ],
        ),
        prop_oneof![6 => 0u8..=6, 1 => Just(7u8)],
        1u8..=10,
        1u16..=1024,
        prop_oneof![
            3 => Just(None),
            1 => prop_oneof![Just(0u32), Just(100), Just(2048), Just(1 << 20), Just(u32::MAX)]
                .prop_map(Some),
        ],
        prop_oneof![3 => Just(None), 1 => prop_oneof![Just(50u16), Just(110), Just(9999)].prop_map(Some)],
        any::<u16>(),
        (token_bytes(), any::<bool>()),
        prop_oneof![2 => Just(Vec::new()), 3 => vec(block_op(), 1..4)],
    )
        .prop_map(
            |(
                (con, put, topic),
                szx,
                blocks,
                last,
                size1,
                content_format,
                first_mid,
                (token, same_token),
                ops,
            )| Upload {
                con,
                put,
                topic,
                szx,
                blocks,
                last,
                size1,
                content_format,
                first_mid,
                token,
                same_token,
                ops,
            },
        )
    .boxed()
}

// ---------------------------------------------------------------------------------------------
// Actions

/// One step of a case. `peer` is an index below [`PEERS`].
#[derive(Debug, Clone)]
pub enum Action {
    /// A structured message.
    Send { peer: u8, msg: Msg },
    /// Arbitrary bytes (sometimes after a valid header byte).
    Raw { peer: u8, bytes: Vec<u8> },
    /// A structured message with bytes changed and the end cut off.
    Mutated {
        peer: u8,
        msg: Msg,
        flips: Vec<(usize, u8)>,
        cut: Option<usize>,
    },
    /// The datagram sent `back` datagrams ago, again from the same peer: a confirmable
    /// retransmission, or a duplicate.
    Repeat { back: usize },
    /// A Block1 upload (several datagrams).
    Upload { peer: u8, upload: Upload },
    /// The first `blocks` blocks (more to come) of `n` uploads to different topics, block 0 of
    /// each, then block 1 of each...: concurrent uploads, none finished.
    OpenUploads {
        peer: u8,
        n: u8,
        blocks: u8,
        szx: u8,
        first_mid: u16,
    },
    /// GET /status with Observe 0 (register) or 1 (deregister), maybe with Block2.
    Observe {
        peer: u8,
        con: bool,
        token: Vec<u8>,
        register: bool,
        block2: Option<Vec<u8>>,
        mid: u16,
    },
    /// An empty ACK or RST from `peer`: for the message the server sent it `nth` messages ago
    /// (if it sent that many), else for `mid`.
    Answer {
        peer: u8,
        rst: bool,
        nth: u8,
        mid: u16,
    },
    /// The status resource changes (`len` bytes of JSON): observers are notified.
    SetStatus { len: u16 },
    /// Time passes (timers: piggy-back window, retransmissions, expiry).
    Wait { ms: u32 },
}

impl Action {
    /// The datagrams this action sends, from which peer; `history` is what the case sent so
    /// far. Answer, SetStatus and Wait are the driver's.
    pub fn datagrams(&self, history: &[(u8, Vec<u8>)]) -> Vec<(u8, Vec<u8>)> {
        match self {
            Action::Send { peer, msg } => vec![(*peer, msg.encode())],
            Action::Raw { peer, bytes } => vec![(*peer, bytes.clone())],
            Action::Mutated {
                peer,
                msg,
                flips,
                cut,
            } => {
                let mut b = msg.encode();
                for (i, x) in flips {
                    let n = b.len();
                    if n > 0 {
                        b[i % n] ^= x;
                    }
                }
                if let Some(c) = cut {
                    b.truncate(*c);
                }
                vec![(*peer, b)]
            }
            Action::Repeat { back } => history
                .len()
                .checked_sub(1 + back)
                .and_then(|i| history.get(i))
                .map(|d| vec![d.clone()])
                .unwrap_or_default(),
            Action::Upload { peer, upload } => upload
                .messages()
                .iter()
                .map(|m| (*peer, m.encode()))
                .collect(),
            Action::OpenUploads {
                peer,
                n,
                blocks,
                szx,
                first_mid,
            } => {
                let mut out = Vec::new();
                let mut mid = *first_mid;
                for num in 0..u32::from(*blocks) {
                    for i in 0..*n {
                        let topic = format!("open{i}");
                        let m = Msg::new(ty::NON, code::POST, mid, &[])
                            .path(&[INGEST.as_bytes(), topic.as_bytes()])
                            .option(opt::BLOCK1, block(num, true, *szx))
                            .payload(&vec![b'o'; block_size(*szx)]);
                        mid = mid.wrapping_add(1);
                        out.push((*peer, m.encode()));
                    }
                }
                out
            }
            Action::Observe {
                peer,
                con,
                token,
                register,
                block2,
                mid,
            } => {
                let typ = if *con { ty::CON } else { ty::NON };
                let mut m = Msg::new(typ, code::GET, *mid, token)
                    .path(&[b"status"])
                    .option(opt::OBSERVE, if *register { Vec::new() } else { vec![1] });
                if let Some(b) = block2 {
                    m = m.option(opt::BLOCK2, b.clone());
                }
                vec![(*peer, m.encode())]
            }
            Action::Answer { .. } | Action::SetStatus { .. } | Action::Wait { .. } => Vec::new(),
        }
    }
}

fn peer() -> BoxedStrategy<u8> {
    (0..PEERS).boxed()
}

fn raw_bytes() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        4 => vec(any::<u8>(), 0..24),
        // A version-1 first byte, then anything.
        4 => (0u8..64, vec(any::<u8>(), 1..64)).prop_map(|(first, rest)| {
            let mut b = vec![0x40 | first];
            b.extend(rest);
            b
        }),
        1 => vec(any::<u8>(), 64..1500),
    ]
    .boxed()
}

pub fn action() -> BoxedStrategy<Action> {
    prop_oneof![
        10 => (peer(), message()).prop_map(|(peer, msg)| Action::Send { peer, msg }),
        3 => (peer(), empty_message()).prop_map(|(peer, msg)| Action::Send { peer, msg }),
        4 => (peer(), raw_bytes()).prop_map(|(peer, bytes)| Action::Raw { peer, bytes }),
        3 => (
            peer(),
            message(),
            vec((any::<usize>(), 1u8..=255), 1..4),
            prop_oneof![2 => Just(None), 1 => (0usize..40).prop_map(Some)],
        )
            .prop_map(|(peer, msg, flips, cut)| Action::Mutated {
                peer,
                msg,
                flips,
                cut
            }),
        4 => (0usize..6).prop_map(|back| Action::Repeat { back }),
        4 => (peer(), upload()).prop_map(|(peer, upload)| Action::Upload { peer, upload }),
        1 => (peer(), 1u8..24, any::<u16>())
            .prop_flat_map(|(peer, n, first_mid)| {
                (1u8..4, 0u8..=6).prop_map(move |(blocks, szx)| Action::OpenUploads {
                    peer,
                    n,
                    blocks,
                    szx,
                    first_mid,
                })
            }),
        4 => (
            peer(),
            any::<bool>(),
            token_bytes(),
            prop_oneof![3 => Just(true), 2 => Just(false)],
            prop_oneof![3 => Just(None), 1 => block_value().prop_map(Some)],
            mid(),
        )
            .prop_map(|(peer, con, token, register, block2, mid)| Action::Observe {
                peer,
                con,
                token,
                register,
                block2,
                mid
            }),
        4 => (peer(), any::<bool>(), 0u8..4, any::<u16>())
            .prop_map(|(peer, rst, nth, mid)| Action::Answer { peer, rst, nth, mid }),
        3 => prop_oneof![3 => 2u16..200, 1 => 1000u16..3000].prop_map(|len| Action::SetStatus { len }),
        3 => prop_oneof![
            3 => 0u32..500,
            2 => 1_000u32..4_000,
            1 => 10_000u32..60_000,
        ]
        .prop_map(|ms| Action::Wait { ms }),
    ]
    .boxed()
}

/// The JSON body of a status of `len` bytes (at least `{}`).
pub fn status_body(len: u16, seq: u32) -> Vec<u8> {
    let mut s = format!("{{\"seq\":{seq},\"pad\":\"");
    while s.len() + 2 < usize::from(len) {
        s.push('x');
    }
    s.push_str("\"}");
    s.into_bytes()
}
