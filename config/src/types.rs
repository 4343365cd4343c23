//! Validated newtypes and enums that appear in [`crate::Config`].
//!
//! Every newtype here can only be built through its validating constructor (`new` / `FromStr`),
//! so a value that exists is a value that passed the rules.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// Longest UTF-8 string MQTT can carry in a length-prefixed field (topics, client ids).
pub const MQTT_MAX_STRING_BYTES: usize = 65_535;

/// The most bytes MQTT's "Remaining Length" can encode: the protocol's limit on a packet, the
/// largest `broker.max_packet_size` and `upstream.max_packet_size`, and the latter's default.
pub const MQTT_MAX_PACKET_SIZE: u64 = 268_435_455;

// ---------------------------------------------------------------------------------------------
// NodeName

/// The gateway's name: 1 to 64 characters of `[A-Za-z0-9_-]`.
///
/// It becomes a topic level upstream (`<prefix>/<node>/...`) and part of the default client id,
/// which is why the alphabet excludes `/`, `+`, `#` and anything needing escaping.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeName(String);

/// Why a string is not a [`NodeName`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NodeNameError {
    /// The name is the empty string.
    #[error("node name must not be empty")]
    Empty,
    /// The name has more than [`NodeName::MAX_LEN`] characters.
    #[error("node name is {0} characters; at most 64 allowed")]
    TooLong(usize),
    /// The name contains a character outside `[A-Za-z0-9_-]`.
    #[error("node name contains {0:?}; only A-Z, a-z, 0-9, '_' and '-' are allowed")]
    InvalidChar(char),
}

impl NodeName {
    /// Longest accepted name, in characters (all accepted characters are one byte).
    pub const MAX_LEN: usize = 64;

    /// Validates `name`.
    pub fn new(name: impl Into<String>) -> Result<Self, NodeNameError> {
        let name = name.into();
        match identifier_problem(&name, Self::MAX_LEN) {
            None => Ok(Self(name)),
            Some(IdentifierProblem::Empty) => Err(NodeNameError::Empty),
            Some(IdentifierProblem::InvalidChar(c)) => Err(NodeNameError::InvalidChar(c)),
            Some(IdentifierProblem::TooLong(n)) => Err(NodeNameError::TooLong(n)),
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The built-in default, `outpost`. Valid by inspection; a unit test re-checks it.
    pub(crate) fn default_name() -> Self {
        Self(String::from("outpost"))
    }
}

impl FromStr for NodeName {
    type Err = NodeNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for NodeName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

// ---------------------------------------------------------------------------------------------
// TopicFilter

/// An MQTT topic filter, validated by the MQTT 3.1.1/5 rules: non-empty, at most 65535 bytes,
/// no NUL, `#` only as a whole last level, `+` only as a whole level.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicFilter(String);

/// Why a string is not a [`TopicFilter`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TopicFilterError {
    /// The filter is the empty string.
    #[error("topic filter must not be empty")]
    Empty,
    /// The filter is longer than MQTT can encode.
    #[error("topic filter is {0} bytes; at most 65535 allowed")]
    TooLong(usize),
    /// The filter contains U+0000, which MQTT forbids in strings.
    #[error("topic filter must not contain NUL")]
    Nul,
    /// `#` appears in a level that is not the last.
    #[error("\"#\" must be the last level")]
    MultiLevelNotLast,
    /// `#` shares a level with other characters (`a/b#`).
    #[error("\"#\" must be a whole level, as in \"a/#\"")]
    MultiLevelNotAlone,
    /// `+` shares a level with other characters (`a/b+/c`).
    #[error("\"+\" must be a whole level, as in \"a/+/c\"")]
    SingleLevelNotAlone,
}

impl TopicFilter {
    /// Validates `filter`.
    pub fn new(filter: impl Into<String>) -> Result<Self, TopicFilterError> {
        let filter = filter.into();
        if filter.is_empty() {
            return Err(TopicFilterError::Empty);
        }
        if filter.len() > MQTT_MAX_STRING_BYTES {
            return Err(TopicFilterError::TooLong(filter.len()));
        }
        if filter.contains('\0') {
            return Err(TopicFilterError::Nul);
        }
        let levels: Vec<&str> = filter.split('/').collect();
        let last = levels.len() - 1;
        for (i, level) in levels.iter().enumerate() {
            if level.contains('#') {
                if *level != "#" {
                    return Err(TopicFilterError::MultiLevelNotAlone);
                }
                if i != last {
                    return Err(TopicFilterError::MultiLevelNotLast);
                }
            }
            if level.contains('+') && *level != "+" {
                return Err(TopicFilterError::SingleLevelNotAlone);
            }
        }
        Ok(Self(filter))
    }

    /// The filter as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the topic name `topic` matches this filter, by the MQTT rules: `+` matches exactly
    /// one level, `#` the parent level and any number below it, and a filter starting with a
    /// wildcard does not match topics starting with `$`.
    pub fn matches(&self, topic: &str) -> bool {
        if topic.starts_with('$') && (self.0.starts_with('+') || self.0.starts_with('#')) {
            return false;
        }
        let mut filter_levels = self.0.split('/');
        let mut topic_levels = topic.split('/');
        loop {
            match (filter_levels.next(), topic_levels.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(f), Some(t)) if f == t => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

impl FromStr for TopicFilter {
    type Err = TopicFilterError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// ---------------------------------------------------------------------------------------------
// TopicTemplate

/// How a local topic is renamed on its way upstream, e.g. `"{prefix}/{node}/{topic}"`.
///
/// Placeholders: `{prefix}` (upstream `topic_prefix`), `{node}` (node name), `{topic}` (the whole
/// local topic), `{level1}`..`{level9}` (the local topic's n-th level; empty if it has fewer
/// levels). Literal text may not contain `+`, `#`, NUL or unbalanced braces. The template is
/// parsed once here, so [`TopicTemplate::render`] cannot fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    source: String,
    parts: Vec<TemplatePart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplatePart {
    Literal(String),
    Prefix,
    Node,
    Topic,
    /// Zero-based level index (`{level1}` is 0).
    Level(usize),
}

/// Why a string is not a [`TopicTemplate`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TopicTemplateError {
    /// The template is the empty string.
    #[error("topic template must not be empty")]
    Empty,
    /// Longer than MQTT can encode even before substitution.
    #[error("topic template is {0} bytes; at most 65535 allowed")]
    TooLong(usize),
    /// A `{` without its `}`, or a `}` without its `{`.
    #[error("unbalanced braces in topic template")]
    UnbalancedBraces,
    /// `{name}` where `name` is not a known placeholder.
    #[error(
        "unknown placeholder {{{0}}}; expected {{prefix}}, {{node}}, {{topic}} or {{level1}}..{{level9}}"
    )]
    UnknownPlaceholder(String),
    /// Literal text holds a character an MQTT topic name may not contain.
    #[error(
        "topic template must not contain {0:?}: upstream topic names cannot hold wildcards or NUL"
    )]
    ForbiddenChar(char),
}

impl TopicTemplate {
    /// Parses and validates `template`.
    pub fn new(template: impl Into<String>) -> Result<Self, TopicTemplateError> {
        let source = template.into();
        if source.is_empty() {
            return Err(TopicTemplateError::Empty);
        }
        if source.len() > MQTT_MAX_STRING_BYTES {
            return Err(TopicTemplateError::TooLong(source.len()));
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = source.chars();
        while let Some(c) = chars.next() {
            match c {
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some('{') | None => return Err(TopicTemplateError::UnbalancedBraces),
                            Some(c) => name.push(c),
                        }
                    }
                    if !literal.is_empty() {
                        parts.push(TemplatePart::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Self::placeholder(&name)?);
                }
                '}' => return Err(TopicTemplateError::UnbalancedBraces),
                '+' | '#' | '\0' => return Err(TopicTemplateError::ForbiddenChar(c)),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(TemplatePart::Literal(literal));
        }
        Ok(Self { source, parts })
    }

    fn placeholder(name: &str) -> Result<TemplatePart, TopicTemplateError> {
        match name {
            "prefix" => Ok(TemplatePart::Prefix),
            "node" => Ok(TemplatePart::Node),
            "topic" => Ok(TemplatePart::Topic),
            _ => match name
                .strip_prefix("level")
                .and_then(|n| n.parse::<u8>().ok())
            {
                // Only the single-digit spellings: "level01" would parse to 1 but is not documented.
                Some(n @ 1..=9) if name.len() == "level1".len() => {
                    Ok(TemplatePart::Level(usize::from(n - 1)))
                }
                _ => Err(TopicTemplateError::UnknownPlaceholder(name.to_owned())),
            },
        }
    }

    /// The built-in default, `{prefix}/{node}/{topic}`.
    pub(crate) fn default_upstream() -> Self {
        Self {
            source: String::from("{prefix}/{node}/{topic}"),
            parts: vec![
                TemplatePart::Prefix,
                TemplatePart::Literal(String::from("/")),
                TemplatePart::Node,
                TemplatePart::Literal(String::from("/")),
                TemplatePart::Topic,
            ],
        }
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Substitutes the placeholders. `topic` is the local topic name the message arrived on.
    pub fn render(&self, prefix: &str, node: &str, topic: &str) -> String {
        let mut out = String::with_capacity(self.source.len() + topic.len() + prefix.len());
        for part in &self.parts {
            match part {
                TemplatePart::Literal(text) => out.push_str(text),
                TemplatePart::Prefix => out.push_str(prefix),
                TemplatePart::Node => out.push_str(node),
                TemplatePart::Topic => out.push_str(topic),
                TemplatePart::Level(n) => out.push_str(topic.split('/').nth(*n).unwrap_or("")),
            }
        }
        out
    }
}

impl FromStr for TopicTemplate {
    type Err = TopicTemplateError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for TopicTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

// ---------------------------------------------------------------------------------------------
// UpstreamUrl

/// Where the cloud broker is: `mqtt://host[:port]` (port 1883 by default) or
/// `mqtts://host[:port]` (TLS, port 8883 by default). IPv6 hosts are written in brackets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamUrl {
    /// `mqtts`: connect with TLS.
    pub tls: bool,
    /// Host name or IP address, without brackets for IPv6.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

/// Why a string is not an [`UpstreamUrl`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UpstreamUrlError {
    /// No `scheme://` at the start.
    #[error("invalid url {0:?}; expected mqtt://host[:port] or mqtts://host[:port]")]
    NotAUrl(String),
    /// A scheme other than `mqtt` or `mqtts`.
    #[error("unsupported scheme {0:?}; expected mqtt or mqtts")]
    UnsupportedScheme(String),
    /// Nothing between `://` and the port.
    #[error("url has no host")]
    MissingHost,
    /// `user:password@` in the url.
    #[error("credentials do not belong in the url; use username and password_env")]
    Credentials,
    /// A path, query or fragment after the authority.
    #[error("url must not have a path, query or fragment: {0:?}")]
    TrailingPart(String),
    /// The host holds characters no host name can.
    #[error("invalid host {0:?}")]
    InvalidHost(String),
    /// The port is not a number in 1..=65535.
    #[error("invalid port {0:?}; expected 1-65535")]
    InvalidPort(String),
}

impl UpstreamUrl {
    /// Default port of `mqtt://`.
    pub const MQTT_PORT: u16 = 1883;
    /// Default port of `mqtts://`.
    pub const MQTTS_PORT: u16 = 8883;

    /// Parses `url`.
    pub fn parse(url: &str) -> Result<Self, UpstreamUrlError> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| UpstreamUrlError::NotAUrl(url.to_owned()))?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "mqtt" => false,
            "mqtts" => true,
            _ => return Err(UpstreamUrlError::UnsupportedScheme(scheme.to_owned())),
        };
        // A single trailing slash ("mqtt://host/") is harmless; anything after it is not.
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if let Some(i) = authority.find(['/', '?', '#']) {
            return Err(UpstreamUrlError::TrailingPart(authority[i..].to_owned()));
        }
        if authority.contains('@') {
            return Err(UpstreamUrlError::Credentials);
        }
        let default_port = if tls {
            Self::MQTTS_PORT
        } else {
            Self::MQTT_PORT
        };
        let (host, port) = crate::check::host_port(authority, Some(default_port)).map_err(|e| {
            use crate::check::AuthorityError as A;
            match e {
                A::MissingHost => UpstreamUrlError::MissingHost,
                A::InvalidHost(h) => UpstreamUrlError::InvalidHost(h),
                // Unreachable with a default port; reported as a bad port rather than assumed.
                A::InvalidPort(p) | A::MissingPort(p) => UpstreamUrlError::InvalidPort(p),
            }
        })?;
        Ok(Self { tls, host, port })
    }
}

impl FromStr for UpstreamUrl {
    type Err = UpstreamUrlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// The canonical url, always with its port: `mqtts://broker.example.com:8883`.
impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Secret

/// A credential. `Debug` and `Display` print `***`, so a logged or printed `Config` never shows
/// it; [`Secret::expose`] is the one way to read it, easy to grep for.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The credential itself. Call only where it is handed to the peer.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

// ---------------------------------------------------------------------------------------------
// AllowAnonymous

/// Which broker listeners admit clients that connect without a username (`allow_anonymous`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AllowAnonymous {
    /// `true`: every listener.
    Always,
    /// `false`: none; every client logs in with a user of `broker.password_file`.
    Never,
    /// `"loopback-only"`: listeners on a loopback address (127.0.0.0/8, ::1) only, so nothing
    /// on the network reaches the broker without credentials.
    LoopbackOnly,
}

impl AllowAnonymous {
    /// The spellings accepted in the config file.
    pub const NAMES: &'static [&'static str] = &["true", "false", "loopback-only"];

    /// Whether a listener bound to `address` admits anonymous clients under this policy.
    pub fn allows(self, address: std::net::SocketAddr) -> bool {
        match self {
            Self::Always => true,
            Self::Never => false,
            Self::LoopbackOnly => address.ip().to_canonical().is_loopback(),
        }
    }

    /// The config-file spelling (`true`, `false`, `"loopback-only"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "true",
            Self::Never => "false",
            Self::LoopbackOnly => "loopback-only",
        }
    }
}

impl fmt::Display for AllowAnonymous {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------------------------------------
// Enums

/// Generates a config enum with its TOML spelling, `as_str`, `Display` and a parser that
/// reports the accepted spellings.
macro_rules! config_enum {
    (
        $(#[$meta:meta])*
        $name:ident { $( $(#[$vmeta:meta])* $variant:ident => $text:literal ),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every spelling accepted in the config file, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            /// The spelling used in the config file.
            pub fn as_str(self) -> &'static str {
                match self { $( Self::$variant => $text, )+ }
            }

            /// Parses the config-file spelling; the error lists the accepted ones.
            pub(crate) fn parse(text: &str) -> Result<Self, String> {
                match text {
                    $( $text => Ok(Self::$variant), )+
                    other => Err(format!(
                        "unknown value {other:?}; expected {}",
                        crate::types::one_of(Self::NAMES)
                    )),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

/// `"a", "b" or "c"`.
pub(crate) fn one_of(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    match quoted.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

config_enum! {
    /// What the store does when its byte quota is reached.
    #[derive(Default)]
    WhenFull {
        /// Delete the lowest-priority, oldest records (counted) to make room: ingest never stops,
        /// the oldest low-value data is lost first.
        #[default]
        EvictLowestOldest => "evict-lowest-oldest",
        /// Refuse new records: nothing stored is lost, but publishers are refused (QoS 1/2 get no ack).
        RejectNew => "reject-new",
    }
}

config_enum! {
    /// How hard a commit presses data to disk.
    #[derive(Default)]
    Durability {
        /// fsync on every commit (SQLite `synchronous=FULL`): an acked record survives power loss.
        #[default]
        Full => "full",
        /// SQLite `synchronous=NORMAL` in WAL mode: survives a crash of the process, may lose the
        /// last commits on power loss. Faster on slow flash.
        Normal => "normal",
    }
}

config_enum! {
    /// Delivery class of a route; high-priority records go upstream first and are evicted last.
    #[derive(Default)]
    Priority {
        /// Alarms and other readings that must not wait behind a backlog.
        High => "high",
        /// Ordinary telemetry.
        #[default]
        Normal => "normal",
        /// Bulk data: sent last, evicted first.
        Low => "low",
    }
}

config_enum! {
    /// Where a routed message goes.
    #[derive(Default)]
    RouteTarget {
        /// Stored and forwarded upstream.
        #[default]
        Cloud => "cloud",
        /// Kept on the local broker only; never stored for upstream.
        Local => "local",
    }
}

/// An MQTT protocol version: the one a connection to the upstream broker speaks. What is
/// configured is an [`UpstreamProtocol`], which may leave the choice to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MqttVersion {
    /// MQTT 3.1.1: no properties.
    V311,
    /// MQTT 5.
    V5,
}

impl MqttVersion {
    /// The version as people write it: `3.1.1` or `5`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V311 => "3.1.1",
            Self::V5 => "5",
        }
    }
}

impl fmt::Display for MqttVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

config_enum! {
    /// Which MQTT version the gateway speaks to the upstream broker (`upstream.protocol`).
    #[derive(Default)]
    UpstreamProtocol {
        /// Connect with MQTT 5; when the broker refuses MQTT 5 at CONNECT, with MQTT 3.1.1.
        #[default]
        Auto => "auto",
        /// MQTT 5 only.
        V5 => "5",
        /// MQTT 3.1.1 only.
        V311 => "3.1.1",
    }
}

impl UpstreamProtocol {
    /// The version of the first CONNECT: MQTT 5 unless 3.1.1 is pinned.
    pub fn first(self) -> MqttVersion {
        match self {
            Self::Auto | Self::V5 => MqttVersion::V5,
            Self::V311 => MqttVersion::V311,
        }
    }

    /// The version to try when the broker refuses [`UpstreamProtocol::first`] at CONNECT:
    /// MQTT 3.1.1 for `auto`, none when a version is pinned.
    pub fn fallback(self) -> Option<MqttVersion> {
        match self {
            Self::Auto => Some(MqttVersion::V311),
            Self::V5 | Self::V311 => None,
        }
    }

    /// Whether a connection made under this setting may speak `version`.
    pub fn allows(self, version: MqttVersion) -> bool {
        self.first() == version || self.fallback() == Some(version)
    }
}

config_enum! {
    /// How a record's metadata (`seq`, ingest time, content type) travels upstream
    /// (`upstream.metadata`).
    MetadataMode {
        /// In MQTT 5 user properties; the payload is the bytes the sensor sent. MQTT 5 only.
        Properties => "properties",
        /// The payload becomes a CBOR map: `{"v": 1, "seq": uint, "ingested_at": uint (Unix
        /// ms), "content_type": text (only when the route declares a format), "payload": bytes
        /// (the original bytes, unchanged)}`. Any protocol version.
        Envelope => "envelope",
        /// No metadata: the payload is the bytes the sensor sent.
        None => "none",
    }
}

impl MetadataMode {
    /// What an `upstream.metadata` left out means on a connection speaking `version`:
    /// [`MetadataMode::Properties`] on MQTT 5, [`MetadataMode::None`] on 3.1.1.
    pub fn default_for(version: MqttVersion) -> Self {
        match version {
            MqttVersion::V5 => Self::Properties,
            MqttVersion::V311 => Self::None,
        }
    }
}

config_enum! {
    /// The payload format a route expects (`format`). Declaring one makes the gateway decode each
    /// payload on ingest; one that does not decode becomes a dead letter instead of a record.
    PayloadFormat {
        /// UTF-8 text.
        Text => "text",
        /// A JSON document.
        Json => "json",
        /// A CBOR data item.
        Cbor => "cbor",
        /// SenML in JSON (RFC 8428, `application/senml+json`).
        SenmlJson => "senml+json",
        /// SenML in CBOR (RFC 8428, `application/senml+cbor`).
        SenmlCbor => "senml+cbor",
    }
}

impl PayloadFormat {
    /// Whether the format is SenML, the only kind [`StoreMode::Normalised`] applies to.
    pub fn is_senml(self) -> bool {
        matches!(self, Self::SenmlJson | Self::SenmlCbor)
    }
}

config_enum! {
    /// What a route stores of a decoded payload (`store`).
    #[derive(Default)]
    StoreMode {
        /// The payload bytes exactly as received.
        #[default]
        Original => "original",
        /// The payload normalised (SenML records resolved: base values applied, names and times
        /// made absolute). Only for routes whose `format` is SenML.
        Normalised => "normalised",
    }
}

/// What is wrong with a name made of `[A-Za-z0-9_-]` (node names, check names), if anything.
pub(crate) enum IdentifierProblem {
    Empty,
    InvalidChar(char),
    TooLong(usize),
}

pub(crate) fn identifier_problem(name: &str, max_len: usize) -> Option<IdentifierProblem> {
    if name.is_empty() {
        return Some(IdentifierProblem::Empty);
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Some(IdentifierProblem::InvalidChar(c));
    }
    (name.len() > max_len).then_some(IdentifierProblem::TooLong(name.len()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn node_name_rules() {
        assert_eq!(NodeName::default_name(), NodeName::new("outpost").unwrap());
        assert!(NodeName::new("gw-01_A").is_ok());
        assert!(NodeName::new("a".repeat(64)).is_ok());
        assert_eq!(NodeName::new(""), Err(NodeNameError::Empty));
        assert_eq!(
            NodeName::new("a".repeat(65)),
            Err(NodeNameError::TooLong(65))
        );
        assert_eq!(NodeName::new("a/b"), Err(NodeNameError::InvalidChar('/')));
        assert_eq!(NodeName::new("ü"), Err(NodeNameError::InvalidChar('ü')));
    }

    #[test]
    fn topic_filter_rules() {
        for ok in [
            "#",
            "+",
            "a/#",
            "+/+/c",
            "a//b",
            "/",
            "sensors/+/temp",
            "$SYS/#",
        ] {
            assert!(TopicFilter::new(ok).is_ok(), "{ok}");
        }
        use TopicFilterError::*;
        for (bad, err) in [
            ("", Empty),
            ("a/#/b", MultiLevelNotLast),
            ("#/a", MultiLevelNotLast),
            ("a/b#", MultiLevelNotAlone),
            ("a#", MultiLevelNotAlone),
            ("a/b+/c", SingleLevelNotAlone),
            ("++", SingleLevelNotAlone),
            ("a\0b", Nul),
        ] {
            assert_eq!(TopicFilter::new(bad), Err(err), "{bad:?}");
        }
        assert_eq!(
            TopicFilter::new("a".repeat(65_536)),
            Err(TopicFilterError::TooLong(65_536))
        );
        assert!(TopicFilter::new("a".repeat(65_535)).is_ok());
    }

    #[test]
    fn topic_filter_matching() {
        let m = |f: &str, t: &str| TopicFilter::new(f).unwrap().matches(t);
        assert!(m("a/#", "a"));
        assert!(m("a/#", "a/b/c"));
        assert!(m("a/+/c", "a/b/c"));
        assert!(!m("a/+/c", "a/b/d"));
        assert!(!m("a/+", "a/b/c"));
        assert!(m("+/+", "/x"));
        assert!(m("#", "anything/at/all"));
        assert!(!m("#", "$SYS/uptime"));
        assert!(!m("+/uptime", "$SYS/uptime"));
        assert!(m("$SYS/#", "$SYS/uptime"));
        assert!(!m("a/b", "a/b/c"));
    }

    #[test]
    fn template_renders_every_placeholder() {
        let t = TopicTemplate::new("{prefix}/{node}/{level2}/x/{level9}/{topic}").unwrap();
        assert_eq!(t.render("p", "gw", "a/b/c"), "p/gw/b/x//a/b/c");
        assert_eq!(
            TopicTemplate::default_upstream(),
            TopicTemplate::new("{prefix}/{node}/{topic}").unwrap()
        );
        assert_eq!(
            TopicTemplate::default_upstream().render("outpost", "gw", "s/t"),
            "outpost/gw/s/t"
        );
        assert_eq!(
            TopicTemplate::new("fixed").unwrap().render("p", "n", "t"),
            "fixed"
        );
    }

    #[test]
    fn template_rules() {
        use TopicTemplateError::*;
        for (bad, err) in [
            ("", Empty),
            ("{prefix", UnbalancedBraces),
            ("prefix}", UnbalancedBraces),
            ("{{topic}}", UnbalancedBraces),
            ("{level0}", UnknownPlaceholder("level0".into())),
            ("{level10}", UnknownPlaceholder("level10".into())),
            ("{level01}", UnknownPlaceholder("level01".into())),
            ("{host}", UnknownPlaceholder("host".into())),
            ("a/+/{topic}", ForbiddenChar('+')),
            ("a/#", ForbiddenChar('#')),
        ] {
            assert_eq!(TopicTemplate::new(bad), Err(err), "{bad:?}");
        }
    }

    #[test]
    fn url_parsing() {
        let u = |s: &str| UpstreamUrl::parse(s);
        assert_eq!(
            u("mqtt://broker").unwrap(),
            UpstreamUrl {
                tls: false,
                host: "broker".into(),
                port: 1883
            }
        );
        assert_eq!(
            u("mqtts://broker.example.com").unwrap(),
            UpstreamUrl {
                tls: true,
                host: "broker.example.com".into(),
                port: 8883
            }
        );
        assert_eq!(u("mqtt://10.0.0.1:1884/").unwrap().port, 1884);
        let v6 = u("mqtts://[::1]:9000").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 9000));
        assert_eq!(v6.to_string(), "mqtts://[::1]:9000");
        assert_eq!(u("mqtt://h").unwrap().to_string(), "mqtt://h:1883");
        assert_eq!(
            u("http://h").unwrap_err().to_string(),
            "unsupported scheme \"http\"; expected mqtt or mqtts"
        );
        assert!(matches!(
            u("broker:1883"),
            Err(UpstreamUrlError::NotAUrl(_))
        ));
        assert_eq!(u("mqtt://"), Err(UpstreamUrlError::MissingHost));
        assert_eq!(u("mqtt://:1883"), Err(UpstreamUrlError::MissingHost));
        assert_eq!(u("mqtt://u:p@h"), Err(UpstreamUrlError::Credentials));
        assert!(matches!(
            u("mqtt://h/topic"),
            Err(UpstreamUrlError::TrailingPart(_))
        ));
        for bad_port in [
            "mqtt://h:0",
            "mqtt://h:65536",
            "mqtt://h:",
            "mqtt://h:x",
            "mqtt://h:+1",
        ] {
            assert!(
                matches!(u(bad_port), Err(UpstreamUrlError::InvalidPort(_))),
                "{bad_port}"
            );
        }
        assert!(matches!(
            u("mqtt://[zz]:1"),
            Err(UpstreamUrlError::InvalidHost(_))
        ));
        assert!(matches!(
            u("mqtt://a b"),
            Err(UpstreamUrlError::InvalidHost(_))
        ));
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s} {s:#?}"), "*** *** ***");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn upstream_protocol_versions() {
        use MqttVersion::{V5, V311};
        let p = UpstreamProtocol::Auto;
        assert_eq!((p.first(), p.fallback()), (V5, Some(V311)));
        assert!(p.allows(V5) && p.allows(V311));
        let p = UpstreamProtocol::V5;
        assert_eq!((p.first(), p.fallback()), (V5, None));
        assert!(p.allows(V5) && !p.allows(V311));
        let p = UpstreamProtocol::V311;
        assert_eq!((p.first(), p.fallback()), (V311, None));
        assert!(!p.allows(V5) && p.allows(V311));
        assert_eq!(MetadataMode::default_for(V5), MetadataMode::Properties);
        assert_eq!(MetadataMode::default_for(V311), MetadataMode::None);
    }

    #[test]
    fn enums_round_trip_their_names() {
        for name in WhenFull::NAMES {
            assert_eq!(WhenFull::parse(name).unwrap().as_str(), *name);
        }
        assert_eq!(
            Priority::parse("urgent").unwrap_err(),
            "unknown value \"urgent\"; expected \"high\", \"normal\" or \"low\""
        );
        assert_eq!(UpstreamProtocol::parse("5"), Ok(UpstreamProtocol::V5));
        assert_eq!(UpstreamProtocol::NAMES, ["auto", "5", "3.1.1"]);
        assert_eq!(UpstreamProtocol::default(), UpstreamProtocol::Auto);
        assert_eq!(MqttVersion::V311.to_string(), "3.1.1");
        assert_eq!(MetadataMode::NAMES, ["properties", "envelope", "none"]);
        assert_eq!(
            MetadataMode::parse("cbor").unwrap_err(),
            "unknown value \"cbor\"; expected \"properties\", \"envelope\" or \"none\""
        );
        for name in PayloadFormat::NAMES {
            assert_eq!(PayloadFormat::parse(name).unwrap().to_string(), *name);
        }
        assert_eq!(
            PayloadFormat::parse("senml+cbor"),
            Ok(PayloadFormat::SenmlCbor)
        );
        assert!(PayloadFormat::SenmlJson.is_senml() && !PayloadFormat::Cbor.is_senml());
        assert_eq!(StoreMode::NAMES, ["original", "normalised"]);
        assert_eq!(StoreMode::default(), StoreMode::Original);
        assert_eq!(StoreMode::parse("normalised"), Ok(StoreMode::Normalised));
        assert!(StoreMode::parse("normalized").is_err());
    }
}
