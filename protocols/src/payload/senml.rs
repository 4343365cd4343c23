//! SenML (RFC 8428) in JSON and CBOR: decoded, then resolved into self-contained records.
//!
//! Resolution follows RFC 8428 section 4.6:
//! - base fields (`bn`, `bt`, `bu`, `bv`, `bs`, `bver`) apply to their own record and every
//!   later one until replaced;
//! - name = `bn` + `n`, must be non-empty, start with a letter or digit and use only
//!   `A-Z a-z 0-9 - : . / _`;
//! - time = `bt` + `t`; a resolved time below 2^28 is relative to `now` (so a record without any
//!   time means "now");
//! - unit = `u`, else `bu`; value `v` = `bv` + `v`; sum `s` = `bs` + `s`; each must be finite
//!   (two finite floats can add up to infinity, which neither normal form can carry);
//! - exactly one of `v`, `vs`, `vb`, `vd` unless the record has a sum `s`, in which case the
//!   value may be absent;
//! - `bver` above 10 (the version this implements) is refused;
//! - labels ending in `_` are mandatory to understand: refused, since we understand none;
//!   other unknown labels are ignored. A label given twice in one record is refused.
//!
//! Numbers stay integers when they came as integers (and base + value did not overflow): a
//! counter of 2^53 + 1 must not silently become a float. `vd` is base64url (no padding) in JSON
//! and a byte string in CBOR.

use std::collections::HashSet;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use minicbor::Decoder;
use minicbor::data::Type;

use super::PayloadError;
use super::cbor::{cbor_err, end_of_item, walk};

/// The SenML version this decoder implements (RFC 8428's default).
pub const SENML_VERSION: i64 = 10;

/// Resolved times below this are relative to now (RFC 8428 section 4.5.3).
const RELATIVE_TIME_LIMIT: f64 = 268_435_456.0; // 2^28

/// A SenML number: integers are kept as integers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    /// An integer (CBOR major type 0/1, or a JSON number without fraction or exponent).
    Int(i64),
    /// A float (or an integer outside i64).
    Float(f64),
}

impl Number {
    /// The value as f64 (integers beyond 2^53 round).
    pub fn as_f64(self) -> f64 {
        match self {
            Number::Int(i) => i as f64,
            Number::Float(f) => f,
        }
    }

    /// `self + other`, staying an integer when both are and the sum fits.
    pub fn plus(self, other: Number) -> Number {
        match (self, other) {
            (Number::Int(a), Number::Int(b)) => match a.checked_add(b) {
                Some(s) => Number::Int(s),
                None => Number::Float(a as f64 + b as f64),
            },
            (a, b) => Number::Float(a.as_f64() + b.as_f64()),
        }
    }
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Number::Int(i) => write!(f, "{i}"),
            Number::Float(x) => write!(f, "{x}"),
        }
    }
}

/// The value of a resolved record.
#[derive(Debug, Clone, PartialEq)]
pub enum SenmlValue {
    /// `v` (with `bv` added).
    Number(Number),
    /// `vs`.
    String(String),
    /// `vb`.
    Bool(bool),
    /// `vd`, decoded.
    Data(Vec<u8>),
}

/// One resolved SenML record: everything needed to read it without the rest of the pack.
#[derive(Debug, Clone, PartialEq)]
pub struct SenmlRecord {
    /// `bn` + `n`.
    pub name: String,
    /// Absolute time, seconds since the Unix epoch (`bt` + `t`, relative times resolved).
    pub time: f64,
    /// `u`, else `bu`.
    pub unit: Option<String>,
    /// The value; None only when the record has a sum.
    pub value: Option<SenmlValue>,
    /// `s` (with `bs` added).
    pub sum: Option<Number>,
    /// `ut`: the maximum time before the next update, seconds.
    pub update_time: Option<Number>,
}

/// What is wrong in a SenML pack or record.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SenmlProblem {
    /// The top level is not an array of records.
    #[error("a pack must be an array of records")]
    NotAnArray,
    /// A record is not a map/object.
    #[error("a record must be a map of labels to values")]
    NotAMap,
    /// A label is neither text nor (CBOR) an integer.
    #[error("labels must be text or integers")]
    BadLabel,
    /// A label ending in `_`: must be understood, and is not.
    #[error("mandatory-to-understand label {0:?} is not supported")]
    MandatoryLabel(String),
    /// The same label twice in one record.
    #[error("label {0:?} appears twice")]
    DuplicateLabel(String),
    /// A label's value has the wrong type.
    #[error("{label:?} must be {expected}")]
    WrongType {
        /// The label (JSON form).
        label: &'static str,
        /// What it must be.
        expected: &'static str,
    },
    /// `vd` that is not base64url.
    #[error("\"vd\" is not base64url")]
    BadBase64,
    /// `bver` beyond what we implement, or not positive.
    #[error("unsupported SenML version {0} (this gateway implements up to {SENML_VERSION})")]
    UnsupportedVersion(i64),
    /// Neither `bn` nor `n` gave a name.
    #[error("missing name (neither \"bn\" nor \"n\")")]
    MissingName,
    /// The resolved name breaks RFC 8428's character rules.
    #[error(
        "invalid name {0:?} (must start with a letter or digit, then only A-Z a-z 0-9 - : . / _)"
    )]
    InvalidName(String),
    /// No value and no sum.
    #[error("missing value (one of \"v\", \"vs\", \"vb\", \"vd\", or a sum \"s\")")]
    MissingValue,
    /// More than one of `v`, `vs`, `vb`, `vd`.
    #[error("more than one value field")]
    MultipleValues,
    /// A float that is NaN or infinite (CBOR can carry them; SenML numbers cannot be them), or
    /// a base field plus its record field (`bt + t`, `bv + v`, `bs + s`) beyond f64.
    #[error("{0:?} must be a finite number")]
    NotFinite(&'static str),
}

/// SenML labels, with their JSON names and CBOR keys (RFC 8428 table 4 / section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Label {
    BaseName,
    BaseTime,
    BaseUnit,
    BaseValue,
    BaseSum,
    BaseVersion,
    Name,
    Unit,
    Value,
    StringValue,
    BoolValue,
    Sum,
    Time,
    UpdateTime,
    DataValue,
}

impl Label {
    const ALL: [Label; 15] = [
        Label::BaseName,
        Label::BaseTime,
        Label::BaseUnit,
        Label::BaseValue,
        Label::BaseSum,
        Label::BaseVersion,
        Label::Name,
        Label::Unit,
        Label::Value,
        Label::StringValue,
        Label::BoolValue,
        Label::Sum,
        Label::Time,
        Label::UpdateTime,
        Label::DataValue,
    ];

    fn json(self) -> &'static str {
        match self {
            Label::BaseName => "bn",
            Label::BaseTime => "bt",
            Label::BaseUnit => "bu",
            Label::BaseValue => "bv",
            Label::BaseSum => "bs",
            Label::BaseVersion => "bver",
            Label::Name => "n",
            Label::Unit => "u",
            Label::Value => "v",
            Label::StringValue => "vs",
            Label::BoolValue => "vb",
            Label::Sum => "s",
            Label::Time => "t",
            Label::UpdateTime => "ut",
            Label::DataValue => "vd",
        }
    }

    fn cbor(self) -> i64 {
        match self {
            Label::BaseVersion => -1,
            Label::BaseName => -2,
            Label::BaseTime => -3,
            Label::BaseUnit => -4,
            Label::BaseValue => -5,
            Label::BaseSum => -6,
            Label::Name => 0,
            Label::Unit => 1,
            Label::Value => 2,
            Label::StringValue => 3,
            Label::BoolValue => 4,
            Label::Sum => 5,
            Label::Time => 6,
            Label::UpdateTime => 7,
            Label::DataValue => 8,
        }
    }

    fn from_json(s: &str) -> Option<Label> {
        Self::ALL.into_iter().find(|l| l.json() == s)
    }

    fn from_cbor(k: i64) -> Option<Label> {
        Self::ALL.into_iter().find(|l| l.cbor() == k)
    }
}

/// A field value before type checking.
enum Raw {
    Num(Number),
    Str(String),
    Bool(bool),
    Bytes(Vec<u8>),
    /// Anything else (null, arrays, maps, tags, ...): wrong for every known label.
    Other,
}

/// One record as sent, before base fields are applied.
#[derive(Default)]
struct RawRecord {
    bn: Option<String>,
    bt: Option<Number>,
    bu: Option<String>,
    bv: Option<Number>,
    bs: Option<Number>,
    bver: Option<Number>,
    n: Option<String>,
    u: Option<String>,
    v: Option<Number>,
    vs: Option<String>,
    vb: Option<bool>,
    vd: Option<Vec<u8>>,
    s: Option<Number>,
    t: Option<Number>,
    ut: Option<Number>,
    /// Labels seen, to refuse duplicates.
    seen: HashSet<Label>,
}

impl RawRecord {
    fn set(&mut self, label: Label, raw: Raw, json: bool) -> Result<(), SenmlProblem> {
        if !self.seen.insert(label) {
            return Err(SenmlProblem::DuplicateLabel(label.json().to_owned()));
        }
        let l = label.json();
        let num = |raw: Raw| match raw {
            Raw::Num(Number::Float(f)) if !f.is_finite() => Err(SenmlProblem::NotFinite(l)),
            Raw::Num(n) => Ok(Some(n)),
            _ => Err(SenmlProblem::WrongType {
                label: l,
                expected: "a number",
            }),
        };
        let text = |raw: Raw| match raw {
            Raw::Str(s) => Ok(Some(s)),
            _ => Err(SenmlProblem::WrongType {
                label: l,
                expected: "a text string",
            }),
        };
        match label {
            Label::BaseName => self.bn = text(raw)?,
            Label::BaseTime => self.bt = num(raw)?,
            Label::BaseUnit => self.bu = text(raw)?,
            Label::BaseValue => self.bv = num(raw)?,
            Label::BaseSum => self.bs = num(raw)?,
            Label::BaseVersion => {
                self.bver = match raw {
                    Raw::Num(Number::Int(i)) => Some(Number::Int(i)),
                    _ => {
                        return Err(SenmlProblem::WrongType {
                            label: l,
                            expected: "an integer",
                        });
                    }
                }
            }
            Label::Name => self.n = text(raw)?,
            Label::Unit => self.u = text(raw)?,
            Label::Value => self.v = num(raw)?,
            Label::StringValue => self.vs = text(raw)?,
            Label::BoolValue => {
                self.vb = match raw {
                    Raw::Bool(b) => Some(b),
                    _ => {
                        return Err(SenmlProblem::WrongType {
                            label: l,
                            expected: "a boolean",
                        });
                    }
                }
            }
            Label::Sum => self.s = num(raw)?,
            Label::Time => self.t = num(raw)?,
            Label::UpdateTime => self.ut = num(raw)?,
            Label::DataValue => {
                self.vd = match (raw, json) {
                    (Raw::Str(s), true) => {
                        Some(base64url_decode(&s).ok_or(SenmlProblem::BadBase64)?)
                    }
                    (Raw::Bytes(b), false) => Some(b),
                    _ => {
                        return Err(SenmlProblem::WrongType {
                            label: l,
                            expected: if json {
                                "a base64url text string"
                            } else {
                                "a byte string"
                            },
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

/// Refuses mandatory-to-understand labels; None for other unknown labels (ignored).
fn text_label(key: &str) -> Result<Option<Label>, SenmlProblem> {
    match Label::from_json(key) {
        Some(l) => Ok(Some(l)),
        None if key.ends_with('_') => Err(SenmlProblem::MandatoryLabel(key.to_owned())),
        None => Ok(None),
    }
}

/// Decodes and resolves a SenML JSON pack.
pub fn decode_json(bytes: &[u8], now: SystemTime) -> Result<Vec<SenmlRecord>, PayloadError> {
    let pack: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| PayloadError::Json(e.to_string()))?;
    let serde_json::Value::Array(records) = pack else {
        return Err(PayloadError::SenmlPack(SenmlProblem::NotAnArray));
    };
    let mut raws = Vec::with_capacity(records.len());
    for (i, record) in records.into_iter().enumerate() {
        let at = |problem| PayloadError::SenmlRecord { record: i, problem };
        let serde_json::Value::Object(fields) = record else {
            return Err(at(SenmlProblem::NotAMap));
        };
        // serde_json keeps the last of duplicate keys; duplicates in JSON are caught by the
        // raw scan in `json_duplicate_key` below.
        let mut raw = RawRecord::default();
        for (key, value) in fields {
            let Some(label) = text_label(&key).map_err(at)? else {
                continue;
            };
            raw.set(label, json_raw(value), true).map_err(at)?;
        }
        raws.push(raw);
    }
    if let Some((record, key)) = json_duplicate_key(bytes) {
        return Err(PayloadError::SenmlRecord {
            record,
            problem: SenmlProblem::DuplicateLabel(key),
        });
    }
    resolve(raws, now)
}

fn json_raw(v: serde_json::Value) -> Raw {
    match v {
        serde_json::Value::Number(n) => Raw::Num(match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Number::Int(i),
            (None, Some(f)) => Number::Float(f),
            (None, None) => return Raw::Other,
        }),
        serde_json::Value::String(s) => Raw::Str(s),
        serde_json::Value::Bool(b) => Raw::Bool(b),
        _ => Raw::Other,
    }
}

/// serde_json's map drops duplicate keys silently; RFC 8259 leaves duplicates undefined and a
/// SenML record with two `v` is ambiguous, so find them with a second, shallow pass over the
/// records (the pack already parsed, so this only re-reads keys).
fn json_duplicate_key(bytes: &[u8]) -> Option<(usize, String)> {
    use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};

    struct Pack;
    struct Record;
    struct Found(Option<(usize, String)>);

    impl<'de> serde::de::DeserializeSeed<'de> for Record {
        type Value = Option<String>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
    }
    impl<'de> Visitor<'de> for Record {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a SenML record")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut keys = HashSet::new();
            let mut dup = None;
            while let Some(k) = map.next_key::<String>()? {
                map.next_value::<serde::de::IgnoredAny>()?;
                if !keys.insert(k.clone()) && dup.is_none() {
                    dup = Some(k);
                }
            }
            Ok(dup)
        }
    }
    impl<'de> Visitor<'de> for Pack {
        type Value = Found;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a SenML pack")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut i = 0;
            let mut found = None;
            while let Some(dup) = seq.next_element_seed(Record)? {
                if found.is_none() {
                    found = dup.map(|k| (i, k));
                }
                i += 1;
            }
            Ok(Found(found))
        }
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    de.deserialize_seq(Pack).ok().and_then(|f| f.0)
}

/// Decodes and resolves a SenML CBOR pack (integer labels per RFC 8428 section 6).
pub fn decode_cbor(bytes: &[u8], now: SystemTime) -> Result<Vec<SenmlRecord>, PayloadError> {
    let mut d = Decoder::new(bytes);
    let len = match d.datatype().map_err(cbor_err)? {
        Type::Array | Type::ArrayIndef => d.array().map_err(cbor_err)?,
        _ => return Err(PayloadError::SenmlPack(SenmlProblem::NotAnArray)),
    };
    let mut raws = Vec::new();
    let mut i = 0usize;
    loop {
        match len {
            Some(n) if i as u64 >= n => break,
            None if d.datatype().map_err(cbor_err)? == Type::Break => {
                d.set_position(d.position() + 1);
                break;
            }
            _ => {}
        }
        raws.push(cbor_record(&mut d, i)?);
        i += 1;
    }
    end_of_item(&d)?;
    resolve(raws, now)
}

fn cbor_record(d: &mut Decoder<'_>, i: usize) -> Result<RawRecord, PayloadError> {
    let at = |problem| PayloadError::SenmlRecord { record: i, problem };
    let len = match d.datatype().map_err(cbor_err)? {
        Type::Map | Type::MapIndef => d.map().map_err(cbor_err)?,
        _ => return Err(at(SenmlProblem::NotAMap)),
    };
    let mut raw = RawRecord::default();
    let mut entries = 0u64;
    loop {
        match len {
            Some(n) if entries >= n => break,
            None if d.datatype().map_err(cbor_err)? == Type::Break => {
                d.set_position(d.position() + 1);
                break;
            }
            _ => {}
        }
        entries += 1;
        let label = match d.datatype().map_err(cbor_err)? {
            Type::U8
            | Type::U16
            | Type::U32
            | Type::U64
            | Type::I8
            | Type::I16
            | Type::I32
            | Type::I64
            | Type::Int => {
                let k = i64::try_from(d.int().map_err(cbor_err)?).ok();
                k.and_then(Label::from_cbor)
            }
            Type::String | Type::StringIndef => {
                let key = cbor_text(d)?;
                // Registered labels have integer keys in CBOR; a text key is an extension.
                text_label(&key).map_err(at)?;
                None
            }
            _ => return Err(at(SenmlProblem::BadLabel)),
        };
        match label {
            Some(label) => {
                let value = cbor_raw(d)?;
                raw.set(label, value, false).map_err(at)?;
            }
            None => walk(d, 2)?,
        }
    }
    Ok(raw)
}

fn cbor_text(d: &mut Decoder<'_>) -> Result<String, PayloadError> {
    let mut s = String::new();
    for chunk in d.str_iter().map_err(cbor_err)? {
        s.push_str(chunk.map_err(cbor_err)?);
    }
    Ok(s)
}

fn cbor_raw(d: &mut Decoder<'_>) -> Result<Raw, PayloadError> {
    let raw = match d.datatype().map_err(cbor_err)? {
        Type::U8
        | Type::U16
        | Type::U32
        | Type::U64
        | Type::I8
        | Type::I16
        | Type::I32
        | Type::I64
        | Type::Int => {
            let i = d.int().map_err(cbor_err)?;
            Raw::Num(match i64::try_from(i) {
                Ok(i) => Number::Int(i),
                Err(_) => Number::Float(i128::from(i) as f64),
            })
        }
        Type::F16 => Raw::Num(Number::Float(f64::from(d.f16().map_err(cbor_err)?))),
        Type::F32 => Raw::Num(Number::Float(f64::from(d.f32().map_err(cbor_err)?))),
        Type::F64 => Raw::Num(Number::Float(d.f64().map_err(cbor_err)?)),
        Type::String | Type::StringIndef => Raw::Str(cbor_text(d)?),
        Type::Bytes | Type::BytesIndef => {
            let mut b = Vec::new();
            for chunk in d.bytes_iter().map_err(cbor_err)? {
                b.extend_from_slice(chunk.map_err(cbor_err)?);
            }
            Raw::Bytes(b)
        }
        Type::Bool => Raw::Bool(d.bool().map_err(cbor_err)?),
        _ => {
            walk(d, 2)?;
            Raw::Other
        }
    };
    Ok(raw)
}

/// Applies base fields and checks every record (RFC 8428 section 4.6).
fn resolve(raws: Vec<RawRecord>, now: SystemTime) -> Result<Vec<SenmlRecord>, PayloadError> {
    let now = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let mut bn: Option<String> = None;
    let mut bt: Option<Number> = None;
    let mut bu: Option<String> = None;
    let mut bv: Option<Number> = None;
    let mut bs: Option<Number> = None;
    let mut out = Vec::with_capacity(raws.len());
    for (i, r) in raws.into_iter().enumerate() {
        let at = |problem| PayloadError::SenmlRecord { record: i, problem };
        if let Some(Number::Int(v)) = r.bver
            && !(1..=SENML_VERSION).contains(&v)
        {
            return Err(at(SenmlProblem::UnsupportedVersion(v)));
        }
        if r.bn.is_some() {
            bn = r.bn;
        }
        if r.bt.is_some() {
            bt = r.bt;
        }
        if r.bu.is_some() {
            bu = r.bu;
        }
        if r.bv.is_some() {
            bv = r.bv;
        }
        if r.bs.is_some() {
            bs = r.bs;
        }
        let name = match (&bn, &r.n) {
            (None, None) => return Err(at(SenmlProblem::MissingName)),
            (b, n) => format!(
                "{}{}",
                b.as_deref().unwrap_or(""),
                n.as_deref().unwrap_or("")
            ),
        };
        if !valid_name(&name) {
            return Err(at(SenmlProblem::InvalidName(name)));
        }
        // Each field is finite, but base + field can overflow to an infinity, which neither
        // normal form can carry (JSON would store `null`).
        let finite = |n: Number, label| match n {
            Number::Float(f) if !f.is_finite() => Err(at(SenmlProblem::NotFinite(label))),
            n => Ok(n),
        };
        let mut time = finite(
            bt.unwrap_or(Number::Int(0))
                .plus(r.t.unwrap_or(Number::Int(0))),
            "bt + t",
        )?
        .as_f64();
        if time < RELATIVE_TIME_LIMIT {
            time += now;
        }
        let mut values = Vec::new();
        if let Some(v) = r.v {
            let v = match bv {
                Some(b) => b.plus(v),
                None => v,
            };
            values.push(SenmlValue::Number(finite(v, "bv + v")?));
        }
        if let Some(vs) = r.vs {
            values.push(SenmlValue::String(vs));
        }
        if let Some(vb) = r.vb {
            values.push(SenmlValue::Bool(vb));
        }
        if let Some(vd) = r.vd {
            values.push(SenmlValue::Data(vd));
        }
        let sum =
            r.s.map(|s| match bs {
                Some(b) => finite(b.plus(s), "bs + s"),
                None => Ok(s),
            })
            .transpose()?;
        if values.len() > 1 {
            return Err(at(SenmlProblem::MultipleValues));
        }
        let value = values.pop();
        if value.is_none() && sum.is_none() {
            return Err(at(SenmlProblem::MissingValue));
        }
        out.push(SenmlRecord {
            name,
            time,
            unit: r.u.or_else(|| bu.clone()),
            value,
            sum,
            update_time: r.ut,
        });
    }
    Ok(out)
}

/// RFC 8428 section 4.5.1.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | ':' | '.' | '/' | '_'))
}

/// base64url without padding (RFC 4648 section 5), as SenML JSON's `vd` uses; padding is
/// tolerated. None if not base64url.
fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // A single leftover character (6 bits) cannot encode a byte.
    if s.len() % 4 == 1 {
        return None;
    }
    Some(out)
}

fn base64url_encode(b: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for chunk in b.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &x)| acc | (u32::from(x) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

fn json_number(n: Number) -> serde_json::Value {
    match n {
        Number::Int(i) => serde_json::Value::from(i),
        // Resolved values are finite (non-finite input is refused).
        Number::Float(f) => serde_json::Number::from_f64(f)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
    }
}

/// Resolved records as a SenML JSON pack (each record self-contained: `n`, `t`, `u`, value,
/// `s`, `ut`; no base fields). Integers stay integers.
pub fn normalised_json(records: &[SenmlRecord]) -> Vec<u8> {
    let pack: Vec<serde_json::Value> = records
        .iter()
        .map(|r| {
            let mut m = serde_json::Map::new();
            m.insert("n".into(), r.name.clone().into());
            m.insert("t".into(), json_number(time_number(r.time)));
            if let Some(u) = &r.unit {
                m.insert("u".into(), u.clone().into());
            }
            match &r.value {
                Some(SenmlValue::Number(n)) => {
                    m.insert("v".into(), json_number(*n));
                }
                Some(SenmlValue::String(s)) => {
                    m.insert("vs".into(), s.clone().into());
                }
                Some(SenmlValue::Bool(b)) => {
                    m.insert("vb".into(), (*b).into());
                }
                Some(SenmlValue::Data(d)) => {
                    m.insert("vd".into(), base64url_encode(d).into());
                }
                None => {}
            }
            if let Some(s) = r.sum {
                m.insert("s".into(), json_number(s));
            }
            if let Some(ut) = r.update_time {
                m.insert("ut".into(), json_number(ut));
            }
            serde_json::Value::Object(m)
        })
        .collect();
    serde_json::to_vec(&pack).unwrap_or_default()
}

/// Whole-second times are written as integers (shorter, and exact).
fn time_number(t: f64) -> Number {
    if t.fract() == 0.0 && t.abs() < 9.0e15 {
        Number::Int(t as i64)
    } else {
        Number::Float(t)
    }
}

/// Resolved records as a SenML CBOR pack (integer labels), like [`normalised_json`].
pub fn normalised_cbor(records: &[SenmlRecord]) -> Vec<u8> {
    fn num<W: minicbor::encode::Write>(
        e: &mut minicbor::Encoder<W>,
        n: Number,
    ) -> Result<(), minicbor::encode::Error<W::Error>> {
        match n {
            Number::Int(i) => e.i64(i)?,
            Number::Float(f) => e.f64(f)?,
        };
        Ok(())
    }
    let mut e = minicbor::Encoder::new(Vec::new());
    let mut write = || -> Result<(), minicbor::encode::Error<core::convert::Infallible>> {
        e.array(records.len() as u64)?;
        for r in records {
            let len = 2
                + u64::from(r.unit.is_some())
                + u64::from(r.value.is_some())
                + u64::from(r.sum.is_some())
                + u64::from(r.update_time.is_some());
            e.map(len)?;
            e.i64(Label::Name.cbor())?.str(&r.name)?;
            e.i64(Label::Time.cbor())?;
            num(&mut e, time_number(r.time))?;
            if let Some(u) = &r.unit {
                e.i64(Label::Unit.cbor())?.str(u)?;
            }
            match &r.value {
                Some(SenmlValue::Number(n)) => {
                    e.i64(Label::Value.cbor())?;
                    num(&mut e, *n)?;
                }
                Some(SenmlValue::String(s)) => {
                    e.i64(Label::StringValue.cbor())?.str(s)?;
                }
                Some(SenmlValue::Bool(b)) => {
                    e.i64(Label::BoolValue.cbor())?.bool(*b)?;
                }
                Some(SenmlValue::Data(d)) => {
                    e.i64(Label::DataValue.cbor())?.bytes(d)?;
                }
                None => {}
            }
            if let Some(s) = r.sum {
                e.i64(Label::Sum.cbor())?;
                num(&mut e, s)?;
            }
            if let Some(ut) = r.update_time {
                e.i64(Label::UpdateTime.cbor())?;
                num(&mut e, ut)?;
            }
        }
        Ok(())
    };
    // Writing to a Vec cannot fail.
    let _ = write();
    e.into_writer()
}

#[cfg(test)]
mod tests;
