//! Payload codecs: checks that a reading is what its content format says, and decodes SenML.
//!
//! Pure functions, no I/O, no gateway concepts: the gateway asks [`validate`] whether a payload
//! matches the format a route declared (or the CoAP Content-Format the sender gave), and decides
//! what to do with a [`PayloadError`] (refuse, dead-letter). The error texts are written for a
//! human at the sensor end: they are sent back as the CoAP 4.00 diagnostic payload, so each says
//! what was wrong and where (`record 3: missing value`).
//!
//! What each format checks:
//! - text/plain (0): UTF-8.
//! - application/json (50): one JSON value (serde_json; its recursion limit bounds nesting),
//!   nothing after it but whitespace.
//! - application/cbor (60): one well-formed CBOR item, nothing after it, nesting at most
//!   [`MAX_CBOR_DEPTH`] deep. Text strings must be UTF-8. Tags and simple values are allowed.
//! - application/senml+json (110) and application/senml+cbor (112): decoded and resolved per
//!   RFC 8428 (see [`senml`]), so the gateway can store normalised records.
//!
//! No input panics or allocates for a length it only declares, and an accepted SenML pack
//! survives both normal forms: `tests/payload_fuzz.rs` checks all of it on arbitrary and
//! structure-aware input.

mod cbor;
pub mod senml;

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

pub use senml::{Number, SenmlProblem, SenmlRecord, SenmlValue, normalised_cbor, normalised_json};

/// How deep arrays, maps and tags may nest in a CBOR payload. Deeper is refused rather than
/// walked: a few hundred bytes of `0x81 0x81 ...` must not cost a deep stack.
pub const MAX_CBOR_DEPTH: usize = 64;

/// The content formats Outpost understands, by their CoAP Content-Format number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContentFormat {
    /// `text/plain; charset=utf-8`, 0.
    TextPlain,
    /// `application/json`, 50.
    Json,
    /// `application/cbor`, 60.
    Cbor,
    /// `application/senml+json`, 110.
    SenmlJson,
    /// `application/senml+cbor`, 112.
    SenmlCbor,
}

impl ContentFormat {
    /// Every format, in Content-Format number order.
    pub const ALL: [ContentFormat; 5] = [
        ContentFormat::TextPlain,
        ContentFormat::Json,
        ContentFormat::Cbor,
        ContentFormat::SenmlJson,
        ContentFormat::SenmlCbor,
    ];

    /// The format for a CoAP Content-Format number, if it is one we understand.
    pub fn from_coap(number: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_coap() == number)
    }

    /// The CoAP Content-Format number.
    pub fn as_coap(self) -> u16 {
        match self {
            ContentFormat::TextPlain => 0,
            ContentFormat::Json => 50,
            ContentFormat::Cbor => 60,
            ContentFormat::SenmlJson => 110,
            ContentFormat::SenmlCbor => 112,
        }
    }

    /// The name used in configuration: `text`, `json`, `cbor`, `senml+json`, `senml+cbor`.
    pub fn name(self) -> &'static str {
        match self {
            ContentFormat::TextPlain => "text",
            ContentFormat::Json => "json",
            ContentFormat::Cbor => "cbor",
            ContentFormat::SenmlJson => "senml+json",
            ContentFormat::SenmlCbor => "senml+cbor",
        }
    }

    /// The media type (for MQTT 5 content type, HTTP).
    pub fn media_type(self) -> &'static str {
        match self {
            ContentFormat::TextPlain => "text/plain; charset=utf-8",
            ContentFormat::Json => "application/json",
            ContentFormat::Cbor => "application/cbor",
            ContentFormat::SenmlJson => "application/senml+json",
            ContentFormat::SenmlCbor => "application/senml+cbor",
        }
    }

    /// True for the two SenML formats.
    pub fn is_senml(self) -> bool {
        matches!(self, ContentFormat::SenmlJson | ContentFormat::SenmlCbor)
    }
}

impl fmt::Display for ContentFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A content format name that is not one of [`ContentFormat::name`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown content format {0:?} (expected text, json, cbor, senml+json or senml+cbor)")]
pub struct UnknownFormat(pub String);

impl FromStr for ContentFormat {
    type Err = UnknownFormat;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| UnknownFormat(s.to_owned()))
    }
}

/// What [`validate`] found in a payload that is valid.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// Valid UTF-8 text.
    Text,
    /// One valid JSON value.
    Json,
    /// One well-formed CBOR item.
    Cbor,
    /// A SenML pack, resolved: every record has its full name, absolute time, unit and value.
    Senml(Vec<SenmlRecord>),
}

/// Why a payload is not valid for its content format. The message is the CoAP 4.00 diagnostic.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PayloadError {
    /// text/plain that is not UTF-8.
    #[error("text is not UTF-8 (invalid byte at offset {offset})")]
    NotUtf8 {
        /// Offset of the first invalid byte.
        offset: usize,
    },
    /// JSON that does not parse; serde_json's message names line and column.
    #[error("invalid JSON: {0}")]
    Json(String),
    /// CBOR that is not well-formed; minicbor's message names the position.
    #[error("invalid CBOR: {0}")]
    Cbor(String),
    /// Bytes after the one CBOR item.
    #[error("invalid CBOR: {extra} trailing byte(s) after the item at offset {offset}")]
    TrailingBytes {
        /// Where the extra bytes start.
        offset: usize,
        /// How many.
        extra: usize,
    },
    /// CBOR nested deeper than [`MAX_CBOR_DEPTH`].
    #[error("invalid CBOR: nested deeper than {max} at offset {offset}")]
    TooDeep {
        /// The limit.
        max: usize,
        /// Where the limit was crossed.
        offset: usize,
    },
    /// The SenML pack as a whole is wrong (not an array, ...).
    #[error("SenML: {0}")]
    SenmlPack(SenmlProblem),
    /// One SenML record is wrong; `record` counts from 0.
    #[error("SenML record {record}: {problem}")]
    SenmlRecord {
        /// Index of the record in the pack.
        record: usize,
        /// What is wrong with it.
        problem: SenmlProblem,
    },
}

/// Checks `bytes` against `format`. `now` resolves SenML relative times (RFC 8428: a resolved
/// time below 2^28 is relative to now); other formats ignore it.
pub fn validate(
    format: ContentFormat,
    bytes: &[u8],
    now: SystemTime,
) -> Result<Decoded, PayloadError> {
    match format {
        ContentFormat::TextPlain => {
            std::str::from_utf8(bytes)
                .map(|_| Decoded::Text)
                .map_err(|e| PayloadError::NotUtf8 {
                    offset: e.valid_up_to(),
                })
        }
        ContentFormat::Json => serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
            .map(|_| Decoded::Json)
            .map_err(|e| PayloadError::Json(e.to_string())),
        ContentFormat::Cbor => cbor::check_one_item(bytes).map(|()| Decoded::Cbor),
        ContentFormat::SenmlJson => senml::decode_json(bytes, now).map(Decoded::Senml),
        ContentFormat::SenmlCbor => senml::decode_cbor(bytes, now).map(Decoded::Senml),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn content_format_numbers_and_names_round_trip() {
        for f in ContentFormat::ALL {
            assert_eq!(ContentFormat::from_coap(f.as_coap()), Some(f));
            assert_eq!(f.name().parse::<ContentFormat>(), Ok(f));
        }
        assert_eq!(ContentFormat::from_coap(40), None);
        assert!("xml".parse::<ContentFormat>().is_err());
    }

    #[test]
    fn text_must_be_utf8() {
        let now = SystemTime::now();
        assert_eq!(
            validate(ContentFormat::TextPlain, "21.5 °C".as_bytes(), now),
            Ok(Decoded::Text)
        );
        let err = validate(ContentFormat::TextPlain, b"ab\xffcd", now).unwrap_err();
        assert_eq!(err, PayloadError::NotUtf8 { offset: 2 });
        assert!(err.to_string().contains("offset 2"));
    }

    #[test]
    fn json_must_parse_with_nothing_after_it() {
        let now = SystemTime::now();
        assert_eq!(
            validate(ContentFormat::Json, br#" {"t": 21.5} "#, now),
            Ok(Decoded::Json)
        );
        assert!(validate(ContentFormat::Json, br#"{"t": 21.5} x"#, now).is_err());
        assert!(validate(ContentFormat::Json, b"", now).is_err());
        let deep = "[".repeat(10_000);
        let err = validate(ContentFormat::Json, deep.as_bytes(), now).unwrap_err();
        assert!(matches!(err, PayloadError::Json(_)), "{err}");
    }

    #[test]
    fn cbor_must_be_one_well_formed_item() {
        let now = SystemTime::now();
        // {"t": 21.5} with a half float.
        let ok = [0xa1, 0x61, 0x74, 0xf9, 0x4d, 0x60];
        assert_eq!(validate(ContentFormat::Cbor, &ok, now), Ok(Decoded::Cbor));
        let mut trailing = ok.to_vec();
        trailing.push(0x00);
        assert_eq!(
            validate(ContentFormat::Cbor, &trailing, now),
            Err(PayloadError::TrailingBytes {
                offset: 6,
                extra: 1
            })
        );
        assert!(validate(ContentFormat::Cbor, &[], now).is_err());
        // Truncated map, invalid UTF-8 text, stray break, reserved additional info.
        for bad in [
            &[0xa1, 0x61, 0x74][..],
            &[0x62, 0xff, 0xfe][..],
            &[0xff][..],
            &[0x1c][..],
            &[0x9f, 0x01][..],
        ] {
            assert!(validate(ContentFormat::Cbor, bad, now).is_err(), "{bad:x?}");
        }
        // Indefinite-length containers and strings, tags.
        let indef = [
            0x9f, 0x01, 0xbf, 0x61, 0x61, 0x02, 0xff, 0x7f, 0x61, 0x62, 0xff, 0xff,
        ];
        assert_eq!(
            validate(ContentFormat::Cbor, &indef, now),
            Ok(Decoded::Cbor)
        );
        let tagged = [0xc1, 0x1a, 0x5e, 0x0b, 0xe1, 0x00];
        assert_eq!(
            validate(ContentFormat::Cbor, &tagged, now),
            Ok(Decoded::Cbor)
        );
    }

    #[test]
    fn cbor_nesting_is_bounded() {
        let now = SystemTime::now();
        let mut ok = vec![0x81; MAX_CBOR_DEPTH];
        ok.push(0x00);
        assert_eq!(validate(ContentFormat::Cbor, &ok, now), Ok(Decoded::Cbor));
        let mut deep = vec![0x81; 100_000];
        deep.push(0x00);
        assert!(matches!(
            validate(ContentFormat::Cbor, &deep, now),
            Err(PayloadError::TooDeep { .. })
        ));
        // Tags nest too.
        let tags = vec![0xc1; 100_000];
        assert!(matches!(
            validate(ContentFormat::Cbor, &tags, now),
            Err(PayloadError::TooDeep { .. })
        ));
    }
}
