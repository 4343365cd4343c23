//! Outpost's configuration: TOML text in, a validated, typed [`Config`] out, or a
//! [`ConfigErrors`] naming *every* problem with its key path.
//!
//! # Pipeline
//!
//! ```text
//! TOML text --serde (deny_unknown_fields)--> raw structs --Overrides--> validate() --> Config
//!                                                                          \--> ConfigErrors
//! ```
//!
//! # Invariants
//!
//! - A [`Config`] that exists is valid: every value was range-checked, every name, filter,
//!   template and url was parsed into a type that can only be built valid ([`NodeName`],
//!   [`TopicFilter`], [`TopicTemplate`], [`UpstreamUrl`]). Consumers never re-validate.
//! - Loading never panics on input, and never reads the process environment directly: variables
//!   come through the [`Env`] seam, so tests never call `set_var`.
//! - Validation does not stop at the first problem. A file with three bad values yields three
//!   [`ConfigError`]s, each with the path as written in the file (`upstream.url`,
//!   `route[2].filter`). Only a TOML syntax error, an unknown key or a value of the wrong TOML type
//!   stops early (the file's shape is unknown past that point); it is reported as one error with
//!   its path and line.
//! - Every key is optional. The defaults live once, in the `Default` impls here;
//!   [`default_config_toml`] documents them and a test proves it parses to exactly
//!   `Config::load(None, ..)`.
//! - Secrets are [`Secret`]s: `Debug` and `Display` print `***`.
//!
//! # Layout
//!
//! - `lib.rs`: the typed [`Config`], [`Env`], [`Overrides`], [`Config::load`].
//! - `raw.rs`: the file's shape for serde, and parse errors with path and line.
//! - `validate.rs`: raw -> typed, collecting every problem; [`Config::warnings`].
//! - `types.rs`: validated newtypes and enums. `units.rs`: byte sizes and durations.
//! - `auth_files.rs`: the broker's password file and ACL file, in mosquitto's formats.
//! - `tls.rs`: a TLS listener's certificate, key and client CA files ([`TlsListenerConfig`]).
//! - `check.rs`: the newtypes of `[[check]]` entries ([`CheckName`], [`HttpUrl`], [`HostPort`]).
//! - `coap.rs`: the rules of the CoAP ingest path and of `[[observe]]` `coap://` URIs.
//! - `default.toml`: the annotated default configuration (`outpost print-default-config`).

#![forbid(unsafe_code)]

mod auth_files;
mod check;
mod coap;
mod error;
mod raw;
mod tls;
mod types;
mod units;
mod validate;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use auth_files::{
    AclAccess, AclFile, AclRule, AuthFileError, LineError, PASSWORD_HASH_LEN, PasswordFile,
    PasswordHash,
};
pub use check::{AuthorityError, CheckName, CheckNameError, HostPort, HttpUrl, HttpUrlError};
pub use error::{ConfigError, ConfigErrors, ConfigWarning};
pub use tls::{TlsFileError, TlsFileKey, TlsListenerConfig, TlsMaterial};
pub use types::{
    AllowAnonymous, Durability, MQTT_MAX_PACKET_SIZE, MQTT_MAX_STRING_BYTES, MetadataMode,
    MqttVersion, NodeName, NodeNameError, PayloadFormat, Priority, RouteTarget, Secret, StoreMode,
    TopicFilter, TopicFilterError, TopicTemplate, TopicTemplateError, UpstreamProtocol,
    UpstreamUrl, UpstreamUrlError, WhenFull,
};
pub use units::{DurationError, SizeError, parse_duration, parse_size};

/// Where environment variables come from. The process uses [`ProcessEnv`]; tests pass a map.
pub trait Env {
    /// The variable's value, or `None` if it is unset (or not valid Unicode).
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

impl<S: std::hash::BuildHasher> Env for HashMap<String, String, S> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// Command-line settings that win over the file. They are applied to the raw file before
/// validation, so a bad override is reported like a bad key (at the key it replaces).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen`: replaces every broker listener (the `broker.listeners` list and any
    /// `[[broker.listener]]` tables, TLS ones included) with this one plain-TCP address, under
    /// `broker.allow_anonymous`.
    pub listen: Option<SocketAddr>,
    /// `--upstream`: sets `upstream.url`, creating the `[upstream]` section if the file has none.
    pub upstream_url: Option<String>,
    /// `--data-dir`: sets `storage.data_dir`.
    pub data_dir: Option<PathBuf>,
}

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Config {
    /// Who this gateway is: its name goes into upstream topics and the birth message.
    pub node: NodeConfig,
    /// The local MQTT broker sensors publish to.
    pub broker: BrokerConfig,
    /// The CoAP endpoint constrained sensors POST readings to.
    pub coap: CoapConfig,
    /// `[[observe]]` entries, in file order: CoAP resources on devices that the gateway observes
    /// (RFC 7641) and ingests. Each resource (address and path) appears once.
    pub observe: Vec<ObserveConfig>,
    /// The store-and-forward buffer that holds every reading until upstream has acked it.
    pub storage: StorageConfig,
    /// `[[route]]` entries, in file order; the first whose filter matches a topic decides.
    pub routes: Vec<Route>,
    /// Where a message goes when no route matches (`default_route`, default `cloud`).
    pub default_route: RouteTarget,
    /// The cloud broker. `None`: no `[upstream]` section; cloud-bound data is stored (within the
    /// quota) until one is configured.
    pub upstream: Option<UpstreamConfig>,
    /// How the backlog is sent upstream.
    pub sync: SyncConfig,
    /// `[discovery]`: finding devices and keeping the device registry.
    pub discovery: DiscoveryConfig,
    /// Logging.
    pub log: LogConfig,
    /// `[health]`: the local status endpoint, resource sampling and the upstream heartbeat.
    pub health: HealthConfig,
    /// `[[check]]` entries, in file order: health checks of the services around the gateway.
    /// Names are unique.
    pub checks: Vec<CheckConfig>,
}

/// `[node]`: the gateway's identity.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    /// Topic level upstream (`<prefix>/<node>/...`) and default client id suffix. Default `outpost`.
    pub name: NodeName,
    /// Free-form metadata published in the birth message (`location`, `zone`, ...).
    pub labels: BTreeMap<String, String>,
    /// What this gateway advertises it can do, in the birth message.
    /// Default `["mqtt", "store-and-forward"]`.
    pub capabilities: Vec<String>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            name: NodeName::default_name(),
            labels: BTreeMap::new(),
            capabilities: vec![String::from("mqtt"), String::from("store-and-forward")],
        }
    }
}

/// `[broker]`: the local MQTT broker.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerConfig {
    /// Addresses to accept MQTT on. At least one, no duplicates (port 0 excepted, for tests).
    /// Default `["127.0.0.1:1883"]` (like mosquitto 2: the network is opted into, with logins
    /// or an explicit `allow_anonymous = true`).
    pub listeners: Vec<SocketAddr>,
    /// Past this many clients a CONNECT is refused with a CONNACK, bounding memory. Default 1000.
    pub max_connections: usize,
    /// Largest MQTT packet accepted, in bytes (1..=268435455, the protocol's limit). Default 256KiB.
    pub max_packet_size: u64,
    /// Outbound QoS 1/2 messages in flight per client before we wait for its acks. Default 32.
    pub max_inflight: u16,
    /// Inbound QoS 1/2 messages per client awaiting a storage commit before we stop reading from
    /// it (MQTT 5 receive maximum). This is the back-pressure that keeps "acked means stored"
    /// from becoming "acked means dropped". Default 64.
    pub max_inbound_pending: u16,
    /// Messages queued for a slow or offline subscriber before new ones are dropped (counted).
    /// Default 1000.
    pub max_queued_messages: usize,
    /// Bytes (topic + payload) queued for one slow or offline subscriber before new messages
    /// are dropped (counted). Default 1 MiB.
    pub max_queued_bytes: u64,
    /// Retained messages kept at most. A retained message on a new topic beyond it is not
    /// kept (MQTT 5 QoS 1/2: refused with PUBACK/PUBREC 0x97; otherwise delivered to current
    /// subscribers and not retained, counted); replacing or clearing a topic held always
    /// works. Kept in the store's database, outside `storage.quota`. Default 10000.
    pub max_retained: usize,
    /// Bytes (topic + payload + MQTT 5 properties) of retained messages kept at most, with the
    /// same policy; replacements may take the total up to an eighth over it. Default 16 MiB.
    pub max_retained_bytes: u64,
    /// Sessions that outlive their connections (3.1.1 clean session 0, MQTT 5 session expiry
    /// above 0) kept at most, connected or not; a CONNECT starting one more is refused
    /// (3.1.1 0x03, MQTT 5 0x97). 0: no client gets one. Clean sessions are never refused for
    /// it. Default 1000.
    pub max_sessions: usize,
    /// How long an MQTT 3.1.1 clean-session-0 session is kept after its client disconnects.
    /// 1s to 4294967295s. Default 7 days.
    pub session_expiry_311: Duration,
    /// The longest session expiry interval an MQTT 5 client gets (one asking for more, or for
    /// 0xFFFFFFFF "never", is given this and told so in CONNACK). 1s to 4294967294s, whole
    /// seconds. Default 7 days.
    pub max_session_expiry: Duration,
    /// The longest keep-alive an MQTT 5 client may use (CONNACK server keep-alive tells it);
    /// `None` ("off", the default): the client's own. 1s to 65535s.
    pub max_keep_alive: Option<Duration>,
    /// A client that has not sent CONNECT within this time is disconnected. Default 10s.
    pub connect_timeout: Duration,
    /// The broker-wide policy for clients without a username, as written, or when not written
    /// [`AllowAnonymous::LoopbackOnly`]: a listener on a non-loopback address requires a login
    /// unless the configuration says otherwise (and without a password file such a listener is
    /// a configuration error: no client could connect there).
    pub allow_anonymous: AllowAnonymous,
    /// Every listener with its resolved settings, in the order of (and with the same addresses
    /// as) `listeners`. No listener refuses anonymous clients unless `password_file` is set
    /// (or its TLS settings verify client certificates).
    pub listener_settings: Vec<ListenerConfig>,
    /// `password_file`: users and their hashes, in mosquitto's format (`mosquitto_passwd`),
    /// parsed at load. `None`: no client can log in; usernames are not checked (such clients
    /// count as anonymous). Default `None`.
    pub password_file: Option<PasswordFile>,
    /// `acl_file`: mosquitto's ACL syntax, parsed at load. `None`: every client may publish and
    /// subscribe to everything. Default `None`.
    pub acl_file: Option<AclFile>,
}

/// One MQTT listener and its own settings (from `listeners` or a `[[broker.listener]]` table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Where it listens.
    pub address: SocketAddr,
    /// Whether clients without a username are admitted here: the table's `allow_anonymous`, or
    /// `broker.allow_anonymous` applied to `address`.
    pub allow_anonymous: bool,
    /// `Some`: MQTT over TLS on this listener (a table's `tls = {..}`; its files were read and
    /// checked at load). `None` (the default, and always for the `listeners` list): plain TCP.
    pub tls: Option<TlsListenerConfig>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            listeners: vec![SocketAddr::from(([127, 0, 0, 1], 1883))],
            max_connections: 1000,
            max_packet_size: 256 * 1024,
            max_inflight: 32,
            max_inbound_pending: 64,
            max_queued_messages: 1000,
            max_queued_bytes: 1024 * 1024,
            max_retained: 10_000,
            max_retained_bytes: 16 * 1024 * 1024,
            max_sessions: 1000,
            session_expiry_311: Duration::from_secs(7 * 24 * 3600),
            max_session_expiry: Duration::from_secs(7 * 24 * 3600),
            max_keep_alive: None,
            connect_timeout: Duration::from_secs(10),
            allow_anonymous: AllowAnonymous::LoopbackOnly,
            listener_settings: vec![ListenerConfig {
                address: SocketAddr::from(([127, 0, 0, 1], 1883)),
                allow_anonymous: true,
                tls: None,
            }],
            password_file: None,
            acl_file: None,
        }
    }
}

/// `[coap]`: the CoAP endpoint (RFC 7252 over UDP).
///
/// `POST|PUT /<ingest_path>/a/b` stores a reading under the local topic `<topic_prefix>/a/b`,
/// routed like an MQTT publish to that topic.
#[derive(Debug, Clone, PartialEq)]
pub struct CoapConfig {
    /// UDP addresses to listen on. Empty: no CoAP endpoint. No duplicates (port 0 excepted, for
    /// tests). A port may equal a broker or health port: those are TCP.
    /// Default `["0.0.0.0:5683"]`.
    pub listeners: Vec<SocketAddr>,
    /// The ingest resource's path segment: one segment of `[A-Za-z0-9._~-]`, not `.`, `..`,
    /// `.well-known` or `status` (served by the endpoint itself). Default `t`.
    pub ingest_path: String,
    /// First level(s) of the local topic of a CoAP reading. No wildcards, no leading or trailing
    /// `/`. Default `sensors`.
    pub topic_prefix: String,
    /// Largest request body in bytes, after Block1 reassembly (1KiB..=16MiB). Default 64KiB.
    pub max_payload: u64,
    /// How long a request's (endpoint, message id) is remembered to spot duplicates
    /// (1s..=1h). Default 247s, RFC 7252's EXCHANGE_LIFETIME.
    pub exchange_lifetime: Duration,
    /// Bound on remembered exchanges and on Block1 uploads in progress (at least 16).
    /// Default 4096.
    pub max_exchanges: usize,
    /// Bound on registered observers of `/status` (at least 1). Default 64.
    pub max_observers: usize,
}

impl CoapConfig {
    /// `coap://`'s default port, of the default listener and of `[[observe]]` URIs.
    pub const DEFAULT_PORT: u16 = coap::COAP_PORT;
}

impl Default for CoapConfig {
    fn default() -> Self {
        Self {
            listeners: vec![SocketAddr::from(([0, 0, 0, 0], Self::DEFAULT_PORT))],
            ingest_path: String::from("t"),
            topic_prefix: String::from("sensors"),
            max_payload: 64 * 1024,
            exchange_lifetime: Duration::from_secs(247),
            max_exchanges: 4096,
            max_observers: 64,
        }
    }
}

/// One `[[observe]]`: a resource on a device that the gateway observes (RFC 7641); every
/// notification is ingested under `topic`, routed like an MQTT publish to it.
#[derive(Debug, Clone, PartialEq)]
pub struct ObserveConfig {
    /// The device's address, from the URI (port 5683 when it names none).
    pub target: SocketAddr,
    /// The resource path from the URI, with its leading `/` (`/temp`, `/sensors/temp`): non-empty
    /// segments of URI path characters, no percent-encoding, no `.` or `..`.
    pub path: String,
    /// The URI as written (`coap://IP[:port]/path`, IPv6 in brackets), for logs and status.
    pub uri: String,
    /// The local topic notifications are ingested under: a topic name (no wildcards).
    pub topic: String,
}

/// `[storage]`: the SQLite store-and-forward buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageConfig {
    /// Directory holding the database (see [`StorageConfig::db_path`]). Default `outpost-data`,
    /// relative to the working directory.
    pub data_dir: PathBuf,
    /// Byte budget for stored records; `when_full` applies beyond it. At least 4KiB (small quotas
    /// exist for tests). Default 1GiB.
    pub quota: u64,
    /// Records older than this are dropped (counted) even if never synced. `None`: keep until
    /// synced. Default `None`.
    pub ttl: Option<Duration>,
    /// What happens at the quota. Default [`WhenFull::EvictLowestOldest`].
    pub when_full: WhenFull,
    /// A write batch commits at this many records... (1..=100000). Default 512.
    pub commit_batch_records: usize,
    /// ...or after waiting this long for more writes, whichever comes first (at most 1s:
    /// publishers wait for it before their ack). Default 0: commit as soon as no more writes
    /// are queued; batches then form on their own while the previous commit runs (measured
    /// 2-10x the throughput of a 5 ms wait, see BENCHMARKS.md). A non-zero value trades latency
    /// for fewer, larger commits at moderate rates (slow flash).
    pub commit_interval: Duration,
    /// fsync policy. Default [`Durability::Full`].
    pub durability: Durability,
    /// At most this many dead letters (payloads that failed to decode as their route's
    /// `format`) are kept; the oldest make room. At least 1. Default 1000.
    pub dead_letter_max_records: u64,
    /// Bound on the dead letters' accounted bytes, separate from `quota`. At least 1KiB.
    /// Default 4MiB.
    pub dead_letter_max_bytes: u64,
    /// At most this many refused records (records the upstream refused for good: larger than
    /// it takes, not authorized, ...) are kept, in a table of their own; the oldest make room.
    /// At least 1. Default 1000.
    pub refused_max_records: u64,
    /// Bound on the refused records' accounted bytes, separate from `quota`; the oldest make
    /// room. At least 1KiB. Default 64MiB.
    pub refused_max_bytes: u64,
    /// Bytes of QoS 0 readings (payload and topic, accounted like the quota) held in memory
    /// between the broker's hand-over and their commit. Nobody waits for a QoS 0 ack, so
    /// nothing else slows those publishers: beyond this a QoS 0 reading is dropped (counted),
    /// while QoS 1/2 publishers are slowed instead. At least 1KiB. Default 4MiB.
    pub qos0_inflight_bytes: u64,
    /// Bytes of dead letters (accounted like the dead-letter table) waiting in memory for
    /// their write; beyond this a dead letter is dropped (counted), its sender is still told
    /// the payload is invalid. At least 1KiB. Default 1MiB.
    pub dead_letter_queue_bytes: u64,
}

impl StorageConfig {
    /// The database file: `data_dir/outpost.db`.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("outpost.db")
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("outpost-data"),
            quota: 1 << 30,
            ttl: None,
            when_full: WhenFull::EvictLowestOldest,
            commit_batch_records: 512,
            commit_interval: Duration::ZERO,
            durability: Durability::Full,
            dead_letter_max_records: 1000,
            dead_letter_max_bytes: 4 << 20,
            refused_max_records: 1000,
            refused_max_bytes: 64 << 20,
            qos0_inflight_bytes: 4 << 20,
            dead_letter_queue_bytes: 1 << 20,
        }
    }
}

/// One `[[route]]`: which local topics go where, how urgently, under which upstream name.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Local topics this route applies to. Unique among routes (a repeat could never match).
    pub filter: TopicFilter,
    /// Where matching messages go. Default `cloud`.
    pub target: RouteTarget,
    /// Delivery and eviction class. Default `normal`.
    pub priority: Priority,
    /// Upstream topic name. Default `{prefix}/{node}/{topic}`.
    pub upstream_topic: TopicTemplate,
    /// The format payloads must decode as; one that does not becomes a dead letter. `None`
    /// (default): payloads are opaque and never decoded.
    pub format: Option<PayloadFormat>,
    /// What is stored. [`StoreMode::Normalised`] only with a SenML `format`, and never on a
    /// `local` route. Default [`StoreMode::Original`].
    pub store: StoreMode,
}

/// `[upstream]`: the cloud MQTT broker.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// `mqtt://host[:port]` or `mqtts://host[:port]`. Required in an `[upstream]` section.
    pub url: UpstreamUrl,
    /// MQTT client id (1..=65535 bytes). Default `outpost-<node name>`. Ids over 23 characters
    /// may be refused by strict 3.1.1 brokers.
    pub client_id: String,
    /// MQTT username, if the broker wants one.
    pub username: Option<String>,
    /// MQTT password, from `password` or, better, the variable named by `password_env`.
    pub password: Option<Secret>,
    /// PEM CA bundle to trust for `mqtts://`; `None` uses the system roots. Must exist.
    pub ca_file: Option<PathBuf>,
    /// MQTT keep-alive, whole seconds in 5s..=65535s. Default 30s.
    pub keep_alive: Duration,
    /// Which MQTT version to speak. Default [`UpstreamProtocol::Auto`]: MQTT 5, and 3.1.1 when
    /// the broker refuses MQTT 5 at CONNECT.
    pub protocol: UpstreamProtocol,
    /// Largest packet the gateway sends upstream, in bytes (128..=268435455). Default
    /// [`MQTT_MAX_PACKET_SIZE`]. An MQTT 5 broker's own limit (CONNACK Maximum Packet Size)
    /// applies on top; rumqttc's 10 KiB default never applies.
    /// A record whose packet would be larger is refused, not sent: it goes to the refused
    /// records (`storage.refused_max_*`).
    pub max_packet_size: u64,
    /// How record metadata travels, as written. `None` (not written): the default of the
    /// version the connection negotiated ([`MetadataMode::default_for`]): properties on MQTT 5,
    /// none on 3.1.1; [`UpstreamConfig::metadata_for`] resolves it. Never
    /// [`MetadataMode::Properties`] with [`UpstreamProtocol::V311`] (a load error).
    pub metadata: Option<MetadataMode>,
    /// First level(s) of every default upstream topic. No wildcards, no leading or trailing `/`.
    /// Default `outpost`.
    pub topic_prefix: String,
    /// Subscribe to `<prefix>/<node>/cmd/#` and republish commands on the local broker.
    /// Default true.
    pub command_topic: bool,
    /// Start a clean session on every connect. Default false: the broker keeps our session (and
    /// the command subscription) across reconnects; the store is the source of truth either way.
    pub clean_session: bool,
}

impl UpstreamConfig {
    /// Default `keep_alive`.
    pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(30);
    /// Default `topic_prefix`.
    pub const DEFAULT_TOPIC_PREFIX: &'static str = "outpost";

    /// The upstream section with only `url` given: every other key at its default.
    pub fn with_url(url: UpstreamUrl, node: &NodeName) -> Self {
        Self {
            url,
            client_id: format!("outpost-{node}"),
            username: None,
            password: None,
            ca_file: None,
            keep_alive: Self::DEFAULT_KEEP_ALIVE,
            protocol: UpstreamProtocol::Auto,
            max_packet_size: MQTT_MAX_PACKET_SIZE,
            metadata: None,
            topic_prefix: String::from(Self::DEFAULT_TOPIC_PREFIX),
            command_topic: true,
            clean_session: false,
        }
    }

    /// The metadata mode on a connection that negotiated `version`: `metadata` as written, or
    /// its default for that version. With `protocol = "auto"` and `metadata = "properties"`
    /// written, a fallback to 3.1.1 still returns [`MetadataMode::Properties`], which 3.1.1
    /// cannot carry: the caller decides what that connection does.
    pub fn metadata_for(&self, version: MqttVersion) -> MetadataMode {
        self.metadata
            .unwrap_or_else(|| MetadataMode::default_for(version))
    }
}

/// `[sync]`: sending the stored backlog upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncConfig {
    /// Upstream publishes awaiting PUBACK at once (1..=65535). Default 100.
    pub inflight_window: u16,
    /// Records read from the store per query. Default 256.
    pub read_batch: usize,
    /// First reconnect delay; doubled (with jitter) per failure. Default 100ms.
    pub backoff_min: Duration,
    /// Cap on the reconnect delay, so a returning upstream is used within about this long.
    /// At least `backoff_min`. Default 1s.
    pub backoff_max: Duration,
}

/// `[discovery]`: how devices are found and when they count as stale or offline.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoveryConfig {
    /// Devices announce themselves on `<announce_prefix>/<device id>` (a JSON or CBOR
    /// descriptor; `{"status":"offline"}` or an empty payload, e.g. as their MQTT will, marks
    /// them offline). A valid topic prefix without wildcards. Default `devices/announce`.
    pub announce_prefix: String,
    /// Register devices that send data without announcing: MQTT clients by client id, and
    /// devices whose CoAP resources the gateway observes. Default true.
    pub implicit: bool,
    /// Also register CoAP clients that POST/PUT readings, by source host (only with
    /// `implicit`). Default false: a UDP source address can be forged, and each forged one
    /// would become a device, a state row and a retained record upstream.
    pub implicit_coap: bool,
    /// At most this many devices are registered; a new one beyond is refused (counted),
    /// devices already registered are unaffected. At least 1. Default 1000.
    pub max_devices: usize,
    /// A device without a message for this long is `stale`. Default 5m.
    pub stale_after: Duration,
    /// ...and `offline` after this long (more than `stale_after`). Default 30m.
    pub offline_after: Duration,
    /// LAN-side network interfaces on which the gateway advertises itself over mDNS, browses,
    /// and sends CoAP multicast discovery. Never list the WAN side. Empty (default): mDNS and
    /// CoAP multicast discovery are off.
    pub interfaces: Vec<String>,
    /// mDNS service types browsed for devices. Default `["_coap._udp.local."]`.
    pub mdns_browse: Vec<String>,
    /// How often CoAP multicast discovery runs. `None` ("off"): never. Default 5m.
    pub coap_interval: Option<Duration>,
    /// Observe and ingest the `obs` resources of discovered CoAP devices. Default false.
    pub observe_discovered: bool,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            announce_prefix: "devices/announce".to_owned(),
            implicit: true,
            implicit_coap: false,
            max_devices: 1000,
            stale_after: Duration::from_secs(300),
            offline_after: Duration::from_secs(1800),
            interfaces: Vec::new(),
            mdns_browse: vec!["_coap._udp.local.".to_owned()],
            coap_interval: Some(Duration::from_secs(300)),
            observe_discovered: false,
        }
    }
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            inflight_window: 100,
            read_batch: 256,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// One of `error`, `warn`, `info`, `debug`, `trace`. Default `info`.
    pub level: String,
}

impl LogConfig {
    /// Accepted values of `level`.
    pub const LEVELS: &'static [&'static str] = &["error", "warn", "info", "debug", "trace"];
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: String::from("info"),
        }
    }
}

/// `[health]`: how the gateway reports on itself.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// Address of the local HTTP endpoint (`/healthz`, `/readyz`, `/metrics`, `/status`).
    /// `None`: written `"off"`, no endpoint. Default `127.0.0.1:9180`: loopback, because the
    /// endpoint has no authentication and shows the gateway's internals.
    pub listen: Option<SocketAddr>,
    /// How often resource usage (CPU, memory, disk, network, own RSS and fds) is sampled and
    /// stored as the gateway's own stream. At least 1s; `None` (written "off"): no sampling.
    /// Default 30s.
    pub resource_interval: Option<Duration>,
    /// Priority of the stored resource samples. Default [`Priority::Low`]: they are sent after
    /// sensor data and evicted before it.
    pub resource_priority: Priority,
    /// How often a heartbeat with the key health figures is published upstream. At least 1s.
    /// Default 60s.
    pub heartbeat_interval: Duration,
}

impl HealthConfig {
    /// Default `listen`.
    pub const DEFAULT_LISTEN: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9180);
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            listen: Some(Self::DEFAULT_LISTEN),
            resource_interval: Some(Duration::from_secs(30)),
            resource_priority: Priority::Low,
            heartbeat_interval: Duration::from_secs(60),
        }
    }
}

/// One `[[check]]`: a probe of a service the gateway's site depends on, run every `interval`.
///
/// Its state goes healthy -> degraded (first failure) -> unhealthy (`failure_threshold`
/// consecutive failures), and back to healthy after `recovery_threshold` consecutive successes.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckConfig {
    /// Unique name: metric label, status key, part of the upstream change message.
    pub name: CheckName,
    /// What is probed, and how.
    pub kind: CheckKind,
    /// Time between the starts of two runs. At least 100ms. Default 30s.
    pub interval: Duration,
    /// A run not finished within this long is a failure (a command is killed). Less than
    /// `interval`, so runs never overlap. Default 5s.
    pub timeout: Duration,
    /// Consecutive failures that make the check unhealthy (at least 1; with 1 the first failure
    /// does). Default 3.
    pub failure_threshold: u32,
    /// Consecutive successes that bring a degraded or unhealthy check back to healthy (at
    /// least 1). Default 1.
    pub recovery_threshold: u32,
}

impl CheckConfig {
    /// Default `interval`.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
    /// Default `timeout`.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
    /// Default `failure_threshold`.
    pub const DEFAULT_FAILURE_THRESHOLD: u32 = 3;
    /// Default `recovery_threshold`.
    pub const DEFAULT_RECOVERY_THRESHOLD: u32 = 1;
    /// Shortest accepted `interval`.
    pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
}

/// What a check probes (`kind = "http" | "tcp" | "command"`).
#[derive(Debug, Clone, PartialEq)]
pub enum CheckKind {
    /// `GET url`; succeeds when the response status equals `expected_status`.
    Http {
        /// Plain `http://` only.
        url: HttpUrl,
        /// 100..=599. Default 200.
        expected_status: u16,
        /// Extra request headers (tokens, API keys). Names are valid HTTP header names, unique
        /// regardless of case; values are [`Secret`]s, never logged or printed.
        headers: BTreeMap<String, Secret>,
    },
    /// A TCP connect; succeeds when the connection is established.
    Tcp {
        /// Resolved at every run.
        address: HostPort,
    },
    /// A program run without a shell; succeeds on exit code 0.
    Command {
        /// Program and arguments; non-empty, no NUL. The program is looked up in `PATH` unless
        /// it contains a `/`; one that cannot be started is a failed run (with the reason), not
        /// a configuration error, so a check can name a tool installed later.
        argv: Vec<String>,
    },
}

impl CheckKind {
    /// Accepted spellings of `kind`.
    pub const NAMES: &'static [&'static str] = &["http", "tcp", "command"];

    /// The `kind` spelling: `http`, `tcp` or `command`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Http { .. } => "http",
            Self::Tcp { .. } => "tcp",
            Self::Command { .. } => "command",
        }
    }
}

impl Config {
    /// Parses and validates a configuration.
    ///
    /// `text` is the TOML file's contents; `None` means no file (every key at its default, the
    /// same as [`default_config_toml`]). `overrides` are applied before validation. Variables
    /// named by `*_env` keys are read from `env` only.
    pub fn load(
        text: Option<&str>,
        overrides: &Overrides,
        env: &dyn Env,
    ) -> Result<Config, ConfigErrors> {
        let mut raw = match text {
            Some(text) => raw::parse(text)?,
            None => raw::RawConfig::default(),
        };
        validate::apply_overrides(&mut raw, overrides);
        validate::validate(raw, env)
    }

    /// Valid settings that are probably a mistake, for `outpost check-config` and start-up to
    /// print (each with its key path). Empty for the defaults.
    pub fn warnings(&self) -> Vec<ConfigWarning> {
        validate::warnings(self)
    }
}

/// The annotated default configuration: every key, its default, and what it is for. What
/// `outpost print-default-config` prints.
pub fn default_config_toml() -> &'static str {
    include_str!("default.toml")
}
