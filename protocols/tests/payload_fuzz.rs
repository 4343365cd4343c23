//! The payload decoders (`payload::validate` for text, JSON, CBOR, SenML JSON and SenML CBOR)
//! under arbitrary and structure-aware input. Whatever a sensor sends, each returns Ok or Err:
//! no panic, no allocation sized by a length the input only declares, and every pack it accepts
//! is one the gateway can store: finite numbers, valid names, and normalised forms (JSON and
//! CBOR) that decode back to the same records.
//!
//! Inputs:
//! - arbitrary bytes, for every format;
//! - CBOR items built field by field: every major type, arguments in minimal and non-minimal
//!   widths, definite, indefinite and false ("declared") lengths up to 2^64-1, chunked strings,
//!   invalid UTF-8, tags, simple values, half/single/double floats with NaN, infinities,
//!   subnormals and -0, big integers, stray breaks and reserved initial bytes; nesting up to
//!   thousands deep;
//! - SenML CBOR packs: records with every label (integer keys -6..8, also written non-minimally),
//!   unknown integer keys, text keys (registered names, mandatory `_` labels), keys of other
//!   types, duplicates, values of the right and wrong types, base fields carried across records;
//! - SenML JSON packs with the same model: numbers at the edges of i64/u64/f64 (and past them),
//!   escaped keys (`"\u0076"` is a duplicate `v`), base64url `vd`, and the JSON text around them
//!   cut or extended;
//! - JSON texts: nesting far past serde_json's recursion limit, long numbers, escapes, lone
//!   surrogates.
//!
//! Declared lengths: all the properties run in this one test, on one thread, and the process's
//! peak virtual memory (`VmPeak`, Linux) may grow by less than `PEAK_GROWTH` over each. A
//! decoder that reserved memory for a declared length of 2^31 or more (the generators declare
//! such lengths in 20-byte inputs) would map gigabytes (or abort the process).
//!
//! Reproducible: a fixed seed unless `PROPTEST_RNG_SEED=n`; `PROPTEST_CASES=n` scales every
//! property's cases (the default is 1024 per property). A failing case is shrunk and printed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::float_cmp)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outpost_protocols::payload::{
    ContentFormat, Decoded, Number, SenmlRecord, SenmlValue, normalised_cbor, normalised_json,
    senml, validate,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};

const SEED: u64 = 0x7061_796c_6f61_6466; // "payloadf"
/// How much the peak virtual memory may grow over all the properties.
const PEAK_GROWTH: u64 = 256 * 1024 * 1024;
/// Resolved times below this are relative (RFC 8428): they do not survive normalisation as-is.
const RELATIVE_TIME_LIMIT: f64 = 268_435_456.0;

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

// ---------------------------------------------------------------------------------------------
// CBOR, field by field

/// How an argument (value or length) is written: minimally, or in 1, 2, 4 or 8 bytes whatever
/// its size (values that do not fit are truncated: the header then says something else).
#[derive(Debug, Clone, Copy)]
enum Arg {
    Minimal,
    Wide(u8),
}

/// How a string's or container's length is written.
#[derive(Debug, Clone, Copy)]
enum Len {
    Exact(Arg),
    /// Indefinite (strings: in chunks of up to 3 bytes).
    Indefinite,
    /// A length unrelated to the content that follows.
    Declared(u64),
}

#[derive(Debug, Clone)]
enum Item {
    Uint(u64, Arg),
    /// -1 - n.
    Nint(u64, Arg),
    Bytes(Vec<u8>, Len),
    /// Raw bytes: valid UTF-8 mostly, not always.
    Text(Vec<u8>, Len),
    Array(Vec<Item>, Len),
    Map(Vec<(Item, Item)>, Len),
    Tag(u64, Box<Item>),
    /// Simple value 0-255 (0-23 in the initial byte, 24-255 after 0xf8, where <32 is invalid).
    Simple(u8),
    Half(u16),
    Single(u32),
    Double(u64),
    /// Anything at all: stray breaks, reserved initial bytes, truncated heads.
    Raw(Vec<u8>),
}

fn head(out: &mut Vec<u8>, major: u8, v: u64, arg: Arg) {
    let m = major << 5;
    let width = match arg {
        Arg::Minimal if v < 24 => {
            out.push(m | v as u8);
            return;
        }
        Arg::Minimal if v <= 0xff => 0,
        Arg::Minimal if v <= 0xffff => 1,
        Arg::Minimal if v <= 0xffff_ffff => 2,
        Arg::Minimal => 3,
        Arg::Wide(w) => w.min(3),
    };
    out.push(m | (24 + width));
    let bytes = v.to_be_bytes();
    out.extend_from_slice(&bytes[8 - (1 << width)..]);
}

fn string(out: &mut Vec<u8>, major: u8, s: &[u8], len: Len) {
    match len {
        Len::Exact(arg) => {
            head(out, major, s.len() as u64, arg);
            out.extend_from_slice(s);
        }
        Len::Indefinite => {
            out.push((major << 5) | 31);
            for chunk in s.chunks(3) {
                head(out, major, chunk.len() as u64, Arg::Minimal);
                out.extend_from_slice(chunk);
            }
            out.push(0xff);
        }
        Len::Declared(n) => {
            head(out, major, n, Arg::Minimal);
            out.extend_from_slice(s);
        }
    }
}

impl Item {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Item::Uint(v, a) => head(out, 0, *v, *a),
            Item::Nint(v, a) => head(out, 1, *v, *a),
            Item::Bytes(b, len) => string(out, 2, b, *len),
            Item::Text(t, len) => string(out, 3, t, *len),
            Item::Array(items, len) => {
                match len {
                    Len::Exact(a) => head(out, 4, items.len() as u64, *a),
                    Len::Indefinite => out.push(0x9f),
                    Len::Declared(n) => head(out, 4, *n, Arg::Minimal),
                }
                for i in items {
                    i.encode(out);
                }
                if matches!(len, Len::Indefinite) {
                    out.push(0xff);
                }
            }
            Item::Map(entries, len) => {
                match len {
                    Len::Exact(a) => head(out, 5, entries.len() as u64, *a),
                    Len::Indefinite => out.push(0xbf),
                    Len::Declared(n) => head(out, 5, *n, Arg::Minimal),
                }
                for (k, v) in entries {
                    k.encode(out);
                    v.encode(out);
                }
                if matches!(len, Len::Indefinite) {
                    out.push(0xff);
                }
            }
            Item::Tag(t, inner) => {
                head(out, 6, *t, Arg::Minimal);
                inner.encode(out);
            }
            Item::Simple(v) if *v < 24 => out.push(0xe0 | v),
            Item::Simple(v) => out.extend_from_slice(&[0xf8, *v]),
            Item::Half(b) => {
                out.push(0xf9);
                out.extend_from_slice(&b.to_be_bytes());
            }
            Item::Single(b) => {
                out.push(0xfa);
                out.extend_from_slice(&b.to_be_bytes());
            }
            Item::Double(b) => {
                out.push(0xfb);
                out.extend_from_slice(&b.to_be_bytes());
            }
            Item::Raw(b) => out.extend_from_slice(b),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    fn int(i: i64) -> Item {
        if i >= 0 {
            Item::Uint(i as u64, Arg::Minimal)
        } else {
            Item::Nint(!(i as u64), Arg::Minimal)
        }
    }

    fn text(s: &str) -> Item {
        Item::Text(s.as_bytes().to_vec(), Len::Exact(Arg::Minimal))
    }
}

fn arg() -> BoxedStrategy<Arg> {
    prop_oneof![6 => Just(Arg::Minimal), 1 => (0u8..4).prop_map(Arg::Wide)].boxed()
}

/// Lengths past anything a 20-byte input holds, and small lies.
fn declared() -> BoxedStrategy<u64> {
    prop_oneof![
        Just(u64::MAX),
        Just(1u64 << 63),
        Just(1u64 << 32),
        Just(u64::from(u32::MAX)),
        Just(1u64 << 31),
        0u64..8,
    ]
    .boxed()
}

fn len() -> BoxedStrategy<Len> {
    prop_oneof![
        6 => arg().prop_map(Len::Exact),
        2 => Just(Len::Indefinite),
        1 => declared().prop_map(Len::Declared),
    ]
    .boxed()
}

/// Half-float bits: specials (NaN, infinities, -0, subnormals, the largest) and anything.
fn half() -> BoxedStrategy<u16> {
    prop_oneof![
        Just(0x7e00u16),
        Just(0x7c00),
        Just(0xfc00),
        Just(0x8000),
        Just(0x0001),
        Just(0x7bff),
        Just(0x7c01),
        any::<u16>(),
    ]
    .boxed()
}

fn single() -> BoxedStrategy<u32> {
    prop_oneof![
        Just(f32::NAN.to_bits()),
        Just(f32::INFINITY.to_bits()),
        Just(f32::NEG_INFINITY.to_bits()),
        Just(f32::MAX.to_bits()),
        Just(1u32),
        any::<u32>(),
    ]
    .boxed()
}

fn double() -> BoxedStrategy<u64> {
    prop_oneof![
        Just(f64::NAN.to_bits()),
        Just(f64::INFINITY.to_bits()),
        Just(f64::NEG_INFINITY.to_bits()),
        Just(f64::MAX.to_bits()),
        Just(f64::MIN.to_bits()),
        Just(1e308f64.to_bits()),
        Just((-0.0f64).to_bits()),
        Just(1u64),
        any::<f64>().prop_map(f64::to_bits),
    ]
    .boxed()
}

fn text_bytes() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        6 => "[a-z0-9:._/-]{0,12}".prop_map(String::into_bytes),
        1 => any::<String>().prop_map(String::into_bytes),
        1 => vec(any::<u8>(), 0..12),
    ]
    .boxed()
}

fn leaf() -> BoxedStrategy<Item> {
    prop_oneof![
        (any::<u64>(), arg()).prop_map(|(v, a)| Item::Uint(v, a)),
        (
            prop_oneof![0u64..30, Just(u64::MAX), Just(i64::MAX as u64)],
            arg()
        )
            .prop_map(|(v, a)| Item::Nint(v, a)),
        (vec(any::<u8>(), 0..12), len()).prop_map(|(b, l)| Item::Bytes(b, l)),
        (text_bytes(), len()).prop_map(|(t, l)| Item::Text(t, l)),
        any::<u8>().prop_map(Item::Simple),
        half().prop_map(Item::Half),
        single().prop_map(Item::Single),
        double().prop_map(Item::Double),
        prop_oneof![
            Just(vec![0xff]),
            Just(vec![0x1c]),
            Just(vec![0x3d]),
            Just(vec![0x5e]),
            Just(vec![0x7f, 0x41, 0x00, 0xff]),
            Just(vec![0x5f, 0x5f, 0xff, 0xff]),
            Just(vec![0x1b, 0x01]),
            Just(vec![0xf8, 0x10]),
            Just(vec![0xfb, 0x00]),
            vec(any::<u8>(), 1..4),
        ]
        .prop_map(Item::Raw),
    ]
    .boxed()
}

fn tag_number() -> BoxedStrategy<u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(2),
        Just(3),
        Just(55_799),
        any::<u64>()
    ]
    .boxed()
}

fn item() -> BoxedStrategy<Item> {
    leaf()
        .prop_recursive(6, 48, 6, |inner| {
            prop_oneof![
                (vec(inner.clone(), 0..6), len()).prop_map(|(i, l)| Item::Array(i, l)),
                (vec((inner.clone(), inner.clone()), 0..4), len())
                    .prop_map(|(e, l)| Item::Map(e, l)),
                (tag_number(), inner).prop_map(|(t, i)| Item::Tag(t, Box::new(i))),
            ]
        })
        .boxed()
}

/// Nesting of `depth` levels of one kind (arrays, indefinite arrays, maps, tags, a mix), closed
/// properly or not.
fn deep_cbor() -> BoxedStrategy<Vec<u8>> {
    (1usize..5000, 0u8..5, any::<bool>(), vec(any::<u8>(), 0..3))
        .prop_map(|(depth, kind, close, tail)| {
            let mut out = Vec::new();
            for i in 0..depth {
                match (kind, i % 4) {
                    (0, _) | (4, 0) => out.push(0x81),
                    (1, _) | (4, 1) => out.push(0x9f),
                    (2, _) | (4, 2) => out.extend_from_slice(&[0xa1, 0x00]),
                    _ => out.extend_from_slice(&[0xd8, 0x20]),
                }
            }
            out.push(0x00);
            if close {
                for i in 0..depth {
                    if matches!((kind, i % 4), (1, _) | (4, 1)) {
                        out.push(0xff);
                    }
                }
            }
            out.extend(tail);
            out
        })
        .boxed()
}

// ---------------------------------------------------------------------------------------------
// SenML

/// SenML labels: JSON name, CBOR key, and the type their value must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Num,
    Int,
    Text,
    Name,
    Bool,
    Data,
}

const LABELS: [(&str, i64, Kind); 15] = [
    ("bver", -1, Kind::Int),
    ("bn", -2, Kind::Name),
    ("bt", -3, Kind::Num),
    ("bu", -4, Kind::Text),
    ("bv", -5, Kind::Num),
    ("bs", -6, Kind::Num),
    ("n", 0, Kind::Name),
    ("u", 1, Kind::Text),
    ("v", 2, Kind::Num),
    ("vs", 3, Kind::Text),
    ("vb", 4, Kind::Bool),
    ("s", 5, Kind::Num),
    ("t", 6, Kind::Num),
    ("ut", 7, Kind::Num),
    ("vd", 8, Kind::Data),
];

/// A SenML value in a form both encodings can write (JSON cannot write NaN or infinities: it
/// writes a number out of range, which serde_json refuses).
#[derive(Debug, Clone)]
enum Val {
    Int(i64),
    /// An integer outside i64: u64 above i64::MAX, or -2^64..-2^63-1 (CBOR), as decimal (JSON).
    Big {
        negative: bool,
        magnitude: u64,
    },
    Float(f64),
    /// A CBOR half float (bits); JSON writes it as the f64 it is.
    Half(u16),
    Text(String),
    Bytes(Vec<u8>),
    Bool(bool),
    Null,
    Array,
    Object,
    /// CBOR only: a tagged value (JSON writes the value).
    Tagged(u64, Box<Val>),
}

fn name() -> BoxedStrategy<String> {
    prop_oneof![
        6 => prop_oneof![
            Just("dev1"),
            Just("urn:dev:ow:10e2073a01080063:"),
            Just("temp"),
            Just("a"),
            Just("x/y_z-1.2"),
        ]
        .prop_map(str::to_owned),
        1 => prop_oneof![Just(""), Just("-bad"), Just("a b"), Just("ü"), Just("_x")]
            .prop_map(str::to_owned),
        1 => Just("n".repeat(300)),
        1 => any::<String>(),
    ]
    .boxed()
}

fn number() -> BoxedStrategy<Val> {
    prop_oneof![
        4 => (-1000i64..1000).prop_map(Val::Int),
        2 => prop_oneof![Just(i64::MAX), Just(i64::MIN), Just(1_700_000_000), Just(1 << 53)]
            .prop_map(Val::Int),
        1 => (any::<bool>(), prop_oneof![Just(u64::MAX), Just(1u64 << 63), any::<u64>()])
            .prop_map(|(negative, magnitude)| Val::Big { negative, magnitude }),
        2 => prop_oneof![
            -1.0e12f64..1.0e12,
            Just(1.7e9),
            Just(f64::MIN_POSITIVE),
            Just(-0.0),
            Just(5e-324),
        ]
        .prop_map(Val::Float),
        2 => prop_oneof![Just(1e308), Just(-1e308), Just(f64::MAX), Just(f64::MIN)]
            .prop_map(Val::Float),
        1 => prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(f64::NEG_INFINITY)]
            .prop_map(Val::Float),
        1 => half().prop_map(Val::Half),
    ]
    .boxed()
}

fn value(kind: Kind) -> BoxedStrategy<Val> {
    let right = match kind {
        Kind::Num => number(),
        Kind::Int => prop_oneof![
            3 => (1i64..=10).prop_map(Val::Int),
            1 => prop_oneof![Just(0i64), Just(11), Just(-1), Just(i64::MIN)].prop_map(Val::Int),
        ]
        .boxed(),
        Kind::Name => name().prop_map(Val::Text).boxed(),
        Kind::Text => prop_oneof![Just("Cel"), Just("%RH"), Just(""), Just("A")]
            .prop_map(|s| Val::Text(s.to_owned()))
            .boxed(),
        Kind::Bool => any::<bool>().prop_map(Val::Bool).boxed(),
        Kind::Data => prop_oneof![
            3 => vec(any::<u8>(), 0..12).prop_map(Val::Bytes),
            // For JSON: base64url text, valid or not.
            1 => prop_oneof![Just("AAEC"), Just("-_8"), Just("A"), Just("AA=="), Just("a+b/")]
                .prop_map(|s| Val::Text(s.to_owned())),
        ]
        .boxed(),
    };
    let wrong = prop_oneof![
        number(),
        name().prop_map(Val::Text),
        any::<bool>().prop_map(Val::Bool),
        vec(any::<u8>(), 0..4).prop_map(Val::Bytes),
        Just(Val::Null),
        Just(Val::Array),
        Just(Val::Object),
        (prop_oneof![Just(1u64), Just(2), Just(4)], number())
            .prop_map(|(t, v)| Val::Tagged(t, Box::new(v))),
    ];
    prop_oneof![6 => right, 1 => wrong].boxed()
}

/// A record's key: a label (as its CBOR key or JSON name), or something else.
#[derive(Debug, Clone)]
enum Key {
    /// Index into LABELS; `wide`: the CBOR key written non-minimally; `escaped`: the JSON name
    /// written with \u escapes; `text`: in CBOR, the JSON name as a text key (an extension).
    Label {
        index: usize,
        wide: bool,
        escaped: bool,
        text: bool,
    },
    Unknown(i64),
    /// A text key not registered: ignored, or refused if it ends in `_`.
    Other(String),
    /// CBOR only: a key that is neither text nor integer.
    Bad(u8),
}

fn key() -> BoxedStrategy<Key> {
    prop_oneof![
        12 => (0..LABELS.len(), prop::bool::weighted(0.1), prop::bool::weighted(0.1), prop::bool::weighted(0.05))
            .prop_map(|(index, wide, escaped, text)| Key::Label { index, wide, escaped, text }),
        1 => prop_oneof![Just(9i64), Just(-7), Just(24), Just(1000), Just(i64::MIN), Just(i64::MAX)]
            .prop_map(Key::Unknown),
        1 => prop_oneof![Just("foo"), Just("foo_"), Just(""), Just("_"), Just("bver_")]
            .prop_map(|s| Key::Other(s.to_owned())),
        1 => (0u8..4).prop_map(Key::Bad),
    ]
    .boxed()
}

/// A field: key and value; a label's value is mostly of its type.
fn field() -> BoxedStrategy<(Key, Val)> {
    key()
        .prop_flat_map(|k| {
            let v = match &k {
                Key::Label { index, .. } => value(LABELS[*index].2),
                _ => number(),
            };
            (Just(k), v)
        })
        .boxed()
}

/// A record: mostly a name and a value (so packs often resolve), often a base field with its
/// record field (`bt`+`t`, `bv`+`v`, `bs`+`s`: their sums), then random fields, sometimes a
/// field twice.
fn record() -> BoxedStrategy<Vec<(Key, Val)>> {
    let label = |index: usize| Key::Label {
        index,
        wide: false,
        escaped: false,
        text: false,
    };
    (
        prop::bool::weighted(0.7),
        name(),
        number(),
        prop::option::weighted(0.4, (0usize..3, number(), number())),
        vec(field(), 0..5),
        prop::bool::weighted(0.1),
    )
        .prop_map(move |(base, n, v, pair, mut fields, twice)| {
            if base {
                fields.insert(0, (label(6), Val::Text(n)));
                fields.insert(1, (label(8), v));
            }
            // (base label, record label): bt/t, bv/v, bs/s.
            if let Some((which, b, x)) = pair {
                let (bl, l) = [(2, 12), (4, 8), (5, 11)][which];
                fields.push((label(bl), b));
                if !(base && l == 8) {
                    fields.push((label(l), x));
                }
            }
            if twice && let Some(f) = fields.first().cloned() {
                fields.push(f);
            }
            fields
        })
        .boxed()
}

#[derive(Debug, Clone)]
struct Pack {
    records: Vec<Vec<(Key, Val)>>,
    /// CBOR: how the pack's and records' lengths are written.
    pack_len: Len,
    record_len: Len,
    /// A record that is not a map (CBOR: this item; JSON: a number), inserted here.
    not_a_record: Option<(usize, Item)>,
}

fn pack() -> BoxedStrategy<Pack> {
    (
        vec(record(), 0..6),
        prop_oneof![8 => Just(Len::Exact(Arg::Minimal)), 2 => len()],
        prop_oneof![8 => Just(Len::Exact(Arg::Minimal)), 2 => len()],
        prop_oneof![8 => Just(None), 1 => (0usize..6, leaf()).prop_map(Some)],
    )
        .prop_map(|(records, pack_len, record_len, not_a_record)| Pack {
            records,
            pack_len,
            record_len,
            not_a_record,
        })
        .boxed()
}

fn cbor_val(v: &Val) -> Item {
    match v {
        Val::Int(i) => Item::int(*i),
        Val::Big {
            negative: false,
            magnitude,
        } => Item::Uint(*magnitude, Arg::Minimal),
        Val::Big {
            negative: true,
            magnitude,
        } => Item::Nint(*magnitude, Arg::Minimal),
        Val::Float(f) => Item::Double(f.to_bits()),
        Val::Half(b) => Item::Half(*b),
        Val::Text(s) => Item::text(s),
        Val::Bytes(b) => Item::Bytes(b.clone(), Len::Exact(Arg::Minimal)),
        Val::Bool(b) => Item::Simple(if *b { 21 } else { 20 }),
        Val::Null => Item::Simple(22),
        Val::Array => Item::Array(vec![Item::int(1)], Len::Exact(Arg::Minimal)),
        Val::Object => Item::Map(Vec::new(), Len::Indefinite),
        Val::Tagged(t, v) => Item::Tag(*t, Box::new(cbor_val(v))),
    }
}

fn cbor_key(k: &Key) -> Item {
    match k {
        Key::Label {
            index, wide, text, ..
        } => {
            let (name, key, _) = LABELS[*index];
            if *text {
                Item::text(name)
            } else if *wide && key >= 0 {
                Item::Uint(key as u64, Arg::Wide(1))
            } else if *wide {
                Item::Nint(!(key as u64), Arg::Wide(2))
            } else {
                Item::int(key)
            }
        }
        Key::Unknown(i) => Item::int(*i),
        Key::Other(s) => Item::text(s),
        Key::Bad(0) => Item::Half(0x3c00),
        Key::Bad(1) => Item::Bytes(vec![0x02], Len::Exact(Arg::Minimal)),
        Key::Bad(2) => Item::Array(Vec::new(), Len::Exact(Arg::Minimal)),
        Key::Bad(_) => Item::Simple(21),
    }
}

impl Pack {
    fn cbor(&self) -> Vec<u8> {
        let mut records: Vec<Item> = self
            .records
            .iter()
            .map(|r| {
                Item::Map(
                    r.iter().map(|(k, v)| (cbor_key(k), cbor_val(v))).collect(),
                    self.record_len,
                )
            })
            .collect();
        if let Some((at, item)) = &self.not_a_record {
            records.insert((*at).min(records.len()), item.clone());
        }
        Item::Array(records, self.pack_len).bytes()
    }

    fn json(&self) -> String {
        let mut records: Vec<String> = self
            .records
            .iter()
            .map(|r| {
                let fields: Vec<String> = r
                    .iter()
                    .map(|(k, v)| format!("{}:{}", json_key(k), json_val(v)))
                    .collect();
                format!("{{{}}}", fields.join(","))
            })
            .collect();
        if let Some((at, _)) = &self.not_a_record {
            records.insert((*at).min(records.len()), "42".to_owned());
        }
        format!("[{}]", records.join(","))
    }
}

fn json_key(k: &Key) -> String {
    match k {
        Key::Label { index, escaped, .. } => {
            let name = LABELS[*index].0;
            if *escaped {
                let escaped: String = name
                    .chars()
                    .map(|c| format!("\\u{:04x}", c as u32))
                    .collect();
                format!("\"{escaped}\"")
            } else {
                format!("\"{name}\"")
            }
        }
        Key::Unknown(i) => format!("\"{i}\""),
        Key::Other(s) => serde_json::to_string(s).unwrap(),
        Key::Bad(_) => "\"\"".to_owned(),
    }
}

fn json_val(v: &Val) -> String {
    match v {
        Val::Int(i) => i.to_string(),
        Val::Big {
            negative,
            magnitude,
        } => {
            if *negative {
                // -1 - magnitude, written out (past i64::MIN when magnitude >= 2^63).
                format!("-{}", u128::from(*magnitude) + 1)
            } else {
                magnitude.to_string()
            }
        }
        Val::Float(f) if f.is_nan() => "NaN".to_owned(),
        Val::Float(f) if f.is_infinite() => if *f > 0.0 { "1e999" } else { "-1e999" }.to_owned(),
        Val::Float(f) => format!("{f:e}"),
        Val::Half(b) => json_val(&Val::Float(half_to_f64(*b))),
        Val::Text(s) => serde_json::to_string(s).unwrap(),
        Val::Bytes(b) => serde_json::to_string(&String::from_utf8_lossy(b)).unwrap(),
        Val::Bool(b) => b.to_string(),
        Val::Null => "null".to_owned(),
        Val::Array => "[1]".to_owned(),
        Val::Object => "{}".to_owned(),
        Val::Tagged(_, v) => json_val(v),
    }
}

fn half_to_f64(bits: u16) -> f64 {
    let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((bits >> 10) & 0x1f);
    let frac = f64::from(bits & 0x3ff);
    sign * match exp {
        0 => frac * 2f64.powi(-24),
        31 if frac == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        e => (1.0 + frac / 1024.0) * 2f64.powi(e - 15),
    }
}

/// JSON text around a pack: cut short, extended, or as is.
#[derive(Debug, Clone)]
enum Frame {
    AsIs,
    Cut(usize),
    Append(String),
}

fn frame() -> BoxedStrategy<Frame> {
    prop_oneof![
        8 => Just(Frame::AsIs),
        1 => any::<usize>().prop_map(Frame::Cut),
        1 => prop_oneof![Just(" "), Just("x"), Just("]"), Just(",{}"), Just("\u{0}")]
            .prop_map(|s| Frame::Append(s.to_owned())),
    ]
    .boxed()
}

fn framed(text: String, f: &Frame) -> Vec<u8> {
    let mut b = text.into_bytes();
    match f {
        Frame::AsIs => {}
        Frame::Cut(n) => b.truncate(n % (b.len() + 1)),
        Frame::Append(s) => b.extend_from_slice(s.as_bytes()),
    }
    b
}

// ---------------------------------------------------------------------------------------------
// JSON

fn json_text() -> BoxedStrategy<String> {
    let leaf = prop_oneof![
        Just("null".to_owned()),
        Just("true".to_owned()),
        any::<i64>().prop_map(|i| i.to_string()),
        any::<f64>().prop_map(|f| format!("{f:e}")),
        prop_oneof![
            Just("1e999"),
            Just("-0"),
            Just("123456789012345678901234567890"),
            Just("1.7976931348623157e308"),
            Just("4.9e-324"),
            Just("01"),
            Just("1."),
            Just("\"\\ud800\""),
            Just("\"\\udc00\\ud800\""),
            Just("\"\\u0000\""),
            Just("\"\\x\""),
            Just("\"\u{7f}\""),
        ]
        .prop_map(str::to_owned),
        any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
    ];
    leaf.prop_recursive(8, 64, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(|v| format!("[{}]", v.join(","))),
            vec((prop_oneof![Just("a"), Just("b"), Just("")], inner), 0..5).prop_map(|v| {
                let fields: Vec<String> = v.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                format!("{{{}}}", fields.join(","))
            }),
        ]
    })
    .boxed()
}

fn deep_json() -> BoxedStrategy<Vec<u8>> {
    (1usize..20_000, 0u8..3, any::<bool>())
        .prop_map(|(depth, kind, close)| {
            let (open, shut) = match kind {
                0 => ("[", "]"),
                1 => ("{\"a\":", "}"),
                _ => ("[{\"v\":", "}]"),
            };
            let mut s = open.repeat(depth);
            s.push('1');
            if close {
                s.push_str(&shut.repeat(depth));
            }
            s.into_bytes()
        })
        .boxed()
}

// ---------------------------------------------------------------------------------------------
// Properties

/// What an accepted SenML pack must be: storable as it is normalised.
fn check_records(records: &[SenmlRecord]) -> Result<(), TestCaseError> {
    let finite = |n: Option<Number>| n.is_none_or(|n| n.as_f64().is_finite());
    for r in records {
        prop_assert!(!r.name.is_empty(), "empty name in {r:?}");
        prop_assert!(r.time.is_finite(), "time not finite in {r:?}");
        prop_assert!(finite(r.sum) && finite(r.update_time), "not finite: {r:?}");
        if let Some(SenmlValue::Number(n)) = &r.value {
            prop_assert!(n.as_f64().is_finite(), "value not finite in {r:?}");
        }
        prop_assert!(
            r.value.is_some() || r.sum.is_some(),
            "no value nor sum: {r:?}"
        );
    }
    // Absolute times survive normalisation; relative ones would be resolved again. CBOR is
    // exact; JSON is read back by serde_json, whose default float parsing may be 1 ulp off
    // (it is not correctly rounded without its `float_roundtrip` feature).
    if records.iter().all(|r| r.time >= RELATIVE_TIME_LIMIT) {
        let json = normalised_json(records);
        let again = senml::decode_json(&json, now())
            .map_err(|e| TestCaseError::fail(format!("normalised JSON refused: {e}")))?;
        prop_assert!(
            same_records(&again, records),
            "normalised JSON {} decodes to {again:?}, not {records:?}",
            String::from_utf8_lossy(&json)
        );
        let cbor = normalised_cbor(records);
        let again = senml::decode_cbor(&cbor, now())
            .map_err(|e| TestCaseError::fail(format!("normalised CBOR refused: {e}")))?;
        prop_assert_eq!(&again, &records.to_vec());
    }
    Ok(())
}

/// Equal, but for floats at most 1 ulp apart.
fn same_records(a: &[SenmlRecord], b: &[SenmlRecord]) -> bool {
    fn close(x: f64, y: f64) -> bool {
        x == y || (x - y).abs() <= f64::EPSILON * x.abs().max(y.abs()) || {
            // Subnormals: neighbours in bits.
            x.to_bits().abs_diff(y.to_bits()) <= 1
        }
    }
    fn num(x: Option<Number>, y: Option<Number>) -> bool {
        match (x, y) {
            (Some(Number::Int(i)), Some(Number::Int(j))) => i == j,
            (Some(Number::Float(f)), Some(Number::Float(g))) => close(f, g),
            (None, None) => true,
            _ => false,
        }
    }
    let value = |x: &Option<SenmlValue>, y: &Option<SenmlValue>| match (x, y) {
        (Some(SenmlValue::Number(m)), Some(SenmlValue::Number(n))) => num(Some(*m), Some(*n)),
        (x, y) => x == y,
    };
    a.len() == b.len()
        && a.iter().zip(b).all(|(r, s)| {
            r.name == s.name
                && close(r.time, s.time)
                && r.unit == s.unit
                && value(&r.value, &s.value)
                && num(r.sum, s.sum)
                && num(r.update_time, s.update_time)
        })
}

fn check_all_formats(bytes: &[u8]) -> Result<(), TestCaseError> {
    for f in ContentFormat::ALL {
        if let Ok(Decoded::Senml(records)) = validate(f, bytes, now()) {
            check_records(&records)?;
        }
    }
    Ok(())
}

fn vm_peak() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmPeak:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

struct Runs {
    seed: RngSeed,
    scale: f64,
    ran: Vec<(&'static str, u32)>,
}

impl Runs {
    fn new() -> Runs {
        let mut seed = Config::default().rng_seed;
        if seed == RngSeed::Random {
            seed = RngSeed::Fixed(SEED);
        }
        let scale = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(1.0, |n| n / 1024.0);
        Runs {
            seed,
            scale,
            ran: Vec::new(),
        }
    }

    fn run<S: Strategy>(
        &mut self,
        name: &'static str,
        cases: u32,
        strategy: S,
        test: impl Fn(S::Value) -> Result<(), TestCaseError>,
    ) where
        S::Value: std::fmt::Debug,
    {
        let cases = ((f64::from(cases) * self.scale) as u32).max(1);
        let config = Config {
            cases,
            rng_seed: self.seed,
            failure_persistence: None,
            max_shrink_iters: 4096,
            ..Config::default()
        };
        let mut runner = TestRunner::new(config);
        let before = vm_peak();
        let result = runner.run(&strategy, test);
        if let (Some(before), Some(after)) = (before, vm_peak()) {
            let grown = after.saturating_sub(before);
            assert!(
                grown < PEAK_GROWTH,
                "{name}: peak virtual memory grew by {grown} bytes: something allocated for a \
                 length the input only declares"
            );
        }
        match result {
            Ok(()) => self.ran.push((name, cases)),
            Err(TestError::Fail(why, input)) => {
                panic!("{name}: {why}\nminimal input: {input:#?}")
            }
            Err(TestError::Abort(why)) => panic!("{name}: aborted: {why}"),
        }
    }
}

#[test]
fn every_decoder_returns_ok_or_err_and_allocates_only_what_the_input_holds() {
    // The thread's allocator arena exists before the baseline.
    let warm: Vec<Vec<u8>> = (0..64).map(|i| vec![0u8; i * 1024]).collect();
    drop(warm);
    let before = vm_peak();
    let mut runs = Runs::new();

    runs.run("arbitrary bytes", 2048, vec(any::<u8>(), 0..256), |b| {
        check_all_formats(&b)
    });
    runs.run("CBOR items", 2048, item(), |i| {
        let b = i.bytes();
        check_all_formats(&b)
    });
    runs.run(
        "CBOR items, mutated",
        1024,
        (item(), vec((any::<usize>(), any::<u8>()), 1..4)),
        |(i, flips)| {
            let mut b = i.bytes();
            for (at, x) in flips {
                let n = b.len();
                b[at % n] ^= x;
            }
            check_all_formats(&b)
        },
    );
    runs.run("deep CBOR", 256, deep_cbor(), |b| {
        for f in [ContentFormat::Cbor, ContentFormat::SenmlCbor] {
            if let Ok(Decoded::Senml(r)) = validate(f, &b, now()) {
                check_records(&r)?;
            }
        }
        Ok(())
    });
    runs.run("SenML CBOR packs", 2048, pack(), |p| {
        let b = p.cbor();
        check_all_formats(&b)
    });
    runs.run("SenML JSON packs", 2048, (pack(), frame()), |(p, f)| {
        let b = framed(p.json(), &f);
        check_all_formats(&b)
    });
    runs.run("JSON texts", 1024, (json_text(), frame()), |(t, f)| {
        let b = framed(t, &f);
        check_all_formats(&b)
    });
    runs.run("deep JSON", 128, deep_json(), |b| {
        for f in [ContentFormat::Json, ContentFormat::SenmlJson] {
            if let Ok(Decoded::Senml(r)) = validate(f, &b, now()) {
                check_records(&r)?;
            }
        }
        Ok(())
    });

    eprintln!("seed {:?}: {:?}", runs.seed, runs.ran);
    if let (Some(before), Some(after)) = (before, vm_peak()) {
        eprintln!(
            "peak virtual memory grew by {} KiB over all the properties",
            after.saturating_sub(before) / 1024
        );
    }
}

/// The structured SenML generators produce packs that resolve often enough to exercise the
/// checks on accepted packs (and the refusals too).
#[test]
fn senml_generators_reach_accepted_and_refused_packs() {
    let mut runner = TestRunner::new(Config {
        rng_seed: RngSeed::Fixed(SEED),
        ..Config::default()
    });
    let (mut ok, mut err) = ([0u32; 2], [0u32; 2]);
    for _ in 0..512 {
        let p = pack().new_tree(&mut runner).unwrap().current();
        for (i, r) in [
            senml::decode_cbor(&p.cbor(), now()),
            senml::decode_json(p.json().as_bytes(), now()),
        ]
        .into_iter()
        .enumerate()
        {
            match r {
                Ok(_) => ok[i] += 1,
                Err(_) => err[i] += 1,
            }
        }
    }
    eprintln!(
        "CBOR ok/err {}/{}, JSON ok/err {}/{}",
        ok[0], err[0], ok[1], err[1]
    );
    for i in 0..2 {
        assert!(ok[i] >= 50 && err[i] >= 50, "ok {ok:?} err {err:?}");
    }
}
