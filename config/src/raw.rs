//! The file's shape, as serde sees it: every key optional, unknown keys refused, values still
//! unchecked text and numbers. `validate` turns this into the typed `Config`.
//!
//! Integers are read as `i64` (TOML's integer type) and range-checked in validation, so an
//! out-of-range number is one of the collected errors with its path rather than a parse failure.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use crate::error::{ConfigError, ConfigErrors};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub node: Option<RawNode>,
    pub broker: Option<RawBroker>,
    pub coap: Option<RawCoap>,
    #[serde(default)]
    pub observe: Vec<RawObserve>,
    pub storage: Option<RawStorage>,
    #[serde(default)]
    pub route: Vec<RawRoute>,
    pub default_route: Option<String>,
    pub upstream: Option<RawUpstream>,
    pub sync: Option<RawSync>,
    pub discovery: Option<RawDiscovery>,
    pub log: Option<RawLog>,
    pub health: Option<RawHealth>,
    #[serde(default)]
    pub check: Vec<RawCheck>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNode {
    pub name: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub capabilities: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBroker {
    pub listeners: Option<Vec<String>>,
    /// `[[broker.listener]]` tables: the other way to list listeners, with per-listener settings.
    pub listener: Option<Vec<RawListener>>,
    pub allow_anonymous: Option<RawAnonymous>,
    pub password_file: Option<PathBuf>,
    pub acl_file: Option<PathBuf>,
    pub max_connections: Option<i64>,
    pub max_packet_size: Option<RawSize>,
    pub max_inflight: Option<i64>,
    pub max_inbound_pending: Option<i64>,
    pub max_queued_messages: Option<i64>,
    pub max_queued_bytes: Option<RawSize>,
    pub max_retained: Option<i64>,
    pub max_retained_bytes: Option<RawSize>,
    pub max_sessions: Option<i64>,
    pub session_expiry_311: Option<RawDuration>,
    pub max_session_expiry: Option<RawDuration>,
    pub max_keep_alive: Option<RawDuration>,
    pub connect_timeout: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListener {
    pub address: Option<String>,
    pub allow_anonymous: Option<RawAnonymous>,
    pub tls: Option<RawTls>,
}

/// A listener's `tls = { cert_file = .., key_file = .., .. }` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub client_ca_file: Option<PathBuf>,
    pub require_client_cert: Option<bool>,
}

/// `allow_anonymous` as written: `true`, `false` or a string (`"loopback-only"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RawAnonymous {
    Bool(bool),
    Text(String),
}

impl<'de> Deserialize<'de> for RawAnonymous {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AnonymousVisitor;
        impl Visitor<'_> for AnonymousVisitor {
            type Value = RawAnonymous;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true, false or \"loopback-only\"")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawAnonymous, E> {
                Ok(RawAnonymous::Bool(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawAnonymous, E> {
                Ok(RawAnonymous::Text(v.to_owned()))
            }
        }
        deserializer.deserialize_any(AnonymousVisitor)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCoap {
    pub listeners: Option<Vec<String>>,
    pub ingest_path: Option<String>,
    pub topic_prefix: Option<String>,
    pub max_payload: Option<RawSize>,
    pub exchange_lifetime: Option<RawDuration>,
    pub max_exchanges: Option<i64>,
    pub max_observers: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawObserve {
    pub uri: Option<String>,
    pub topic: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStorage {
    pub data_dir: Option<PathBuf>,
    pub quota: Option<RawSize>,
    pub ttl: Option<RawDuration>,
    pub when_full: Option<String>,
    pub commit_batch_records: Option<i64>,
    pub commit_interval: Option<RawDuration>,
    pub durability: Option<String>,
    pub dead_letter_max_records: Option<i64>,
    pub dead_letter_max_bytes: Option<RawSize>,
    pub refused_max_records: Option<i64>,
    pub refused_max_bytes: Option<RawSize>,
    pub qos0_inflight_bytes: Option<RawSize>,
    pub dead_letter_queue_bytes: Option<RawSize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub filter: Option<String>,
    pub target: Option<String>,
    pub priority: Option<String>,
    pub upstream_topic: Option<String>,
    pub format: Option<String>,
    pub store: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstream {
    pub url: Option<String>,
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_env: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub keep_alive: Option<RawDuration>,
    pub protocol: Option<String>,
    pub max_packet_size: Option<RawSize>,
    pub metadata: Option<String>,
    pub topic_prefix: Option<String>,
    pub command_topic: Option<bool>,
    pub clean_session: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDiscovery {
    pub announce_prefix: Option<String>,
    pub implicit: Option<bool>,
    pub implicit_coap: Option<bool>,
    pub max_devices: Option<i64>,
    pub stale_after: Option<RawDuration>,
    pub offline_after: Option<RawDuration>,
    pub interfaces: Option<Vec<String>>,
    pub mdns_browse: Option<Vec<String>>,
    pub coap_interval: Option<RawDuration>,
    pub observe_discovered: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSync {
    pub inflight_window: Option<i64>,
    pub read_batch: Option<i64>,
    pub backoff_min: Option<RawDuration>,
    pub backoff_max: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLog {
    pub level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealth {
    pub listen: Option<String>,
    pub resource_interval: Option<RawDuration>,
    pub resource_priority: Option<String>,
    pub heartbeat_interval: Option<RawDuration>,
}

/// One `[[check]]`. Every kind's keys are here; validation refuses those that do not belong to
/// the entry's `kind`, so a `url` on a tcp check is an error rather than silently ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCheck {
    pub name: Option<String>,
    pub kind: Option<String>,
    pub url: Option<String>,
    pub expected_status: Option<i64>,
    pub headers: Option<BTreeMap<String, String>>,
    pub address: Option<String>,
    pub command: Option<Vec<String>>,
    pub interval: Option<RawDuration>,
    pub timeout: Option<RawDuration>,
    pub failure_threshold: Option<i64>,
    pub recovery_threshold: Option<i64>,
}

/// A byte size as written: `"512MiB"` or a plain integer byte count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RawSize {
    Text(String),
    /// Wide enough for every integer TOML or serde hands over, so none is clamped.
    Bytes(i128),
}

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = RawSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte size such as \"512MiB\" or an integer number of bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawSize, E> {
                Ok(RawSize::Text(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawSize, E> {
                Ok(RawSize::Bytes(i128::from(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawSize, E> {
                Ok(RawSize::Bytes(i128::from(v)))
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// A duration as written: a humantime string. A bare integer is refused at parse time with a
/// message asking for a unit, because `30` could mean seconds or milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawDuration(pub String);

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = RawDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string with a unit, such as \"500ms\", \"30s\" or \"7d\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawDuration, E> {
                Ok(RawDuration(v.to_owned()))
            }
        }
        deserializer.deserialize_str(DurationVisitor)
    }
}

/// Parses TOML text into the raw shape. Syntax errors, type mismatches and unknown keys stop
/// the parse, so they come back as a single error, with the key path when serde knows it and
/// the line and column when TOML knows them.
pub(crate) fn parse(text: &str) -> Result<RawConfig, ConfigErrors> {
    let deserializer = toml::Deserializer::parse(text).map_err(|e| one(String::new(), &e, text))?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = key_path(e.path());
        one(path, e.inner(), text)
    })
}

fn one(path: String, error: &toml::de::Error, text: &str) -> ConfigErrors {
    let mut message = error.message().trim_end().to_owned();
    if let Some(span) = error.span() {
        let (line, column) = line_column(text, span.start);
        message = if path.is_empty() {
            format!("TOML error at line {line}, column {column}: {message}")
        } else {
            format!("{message} (line {line}, column {column})")
        };
    }
    ConfigErrors(vec![ConfigError { path, message }])
}

/// 1-based line and column (in characters) of byte offset `offset`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// `route[2].filter` from serde_path_to_error's segments. For a key refused by
/// `deny_unknown_fields` the path ends with that key (`upstream.urll`).
fn key_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {}
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn empty_text_is_all_defaults() {
        let raw = parse("").unwrap();
        assert!(raw.node.is_none() && raw.upstream.is_none() && raw.route.is_empty());
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let err = parse("[node]\nname = \n").unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert_eq!(err.0[0].path, "");
        assert!(err.0[0].message.contains("line 2"), "{err}");
    }

    #[test]
    fn unknown_key_names_its_table_and_line() {
        let err = parse("[upstream]\nurl = \"mqtt://h\"\nurll = 1\n").unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert_eq!(err.0[0].path, "upstream.urll");
        assert!(err.0[0].message.contains("urll"), "{err}");
        assert!(err.0[0].message.contains("line 3"), "{err}");
    }

    #[test]
    fn type_mismatch_names_its_key() {
        let err = parse("[[route]]\nfilter = \"a\"\n[[route]]\nfilter = 5\n").unwrap_err();
        assert_eq!(err.0[0].path, "route[1].filter", "{err}");
        assert!(err.0[0].message.contains("line 4"), "{err}");
    }

    #[test]
    fn bare_integer_duration_asks_for_a_unit() {
        let err = parse("[upstream]\nkeep_alive = 30\n").unwrap_err();
        assert_eq!(err.0[0].path, "upstream.keep_alive");
        assert!(err.0[0].message.contains("with a unit"), "{err}");
    }

    #[test]
    fn line_column_is_char_based() {
        assert_eq!(line_column("ab\ncdé f", 8), (2, 5));
        assert_eq!(line_column("", 10), (1, 1));
    }
}
