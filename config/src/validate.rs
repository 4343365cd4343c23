//! Raw file shape -> typed [`Config`], collecting every problem.
//!
//! Each check reports into a [`Collector`] and yields a value anyway (the default when the given
//! one is bad), so validation always runs to the end and the caller sees all problems at once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::auth_files::{AclFile, AuthFileError, PasswordFile};
use crate::check::{CheckName, HostPort, HttpUrl};
use crate::coap::{check_ingest_path, parse_coap_uri};
use crate::error::{Collector, ConfigErrors, ConfigWarning};
use crate::raw::{
    RawAnonymous, RawBroker, RawCheck, RawCoap, RawConfig, RawDiscovery, RawDuration, RawHealth,
    RawLog, RawNode, RawObserve, RawRoute, RawSize, RawStorage, RawSync, RawTls, RawUpstream,
};
use crate::tls::TlsListenerConfig;
use crate::types::{
    AllowAnonymous, Durability, MQTT_MAX_PACKET_SIZE, MQTT_MAX_STRING_BYTES, MetadataMode,
    NodeName, PayloadFormat, Priority, RouteTarget, Secret, StoreMode, TopicFilter, TopicTemplate,
    UpstreamProtocol, UpstreamUrl, WhenFull,
};
use crate::units::{parse_duration, parse_size};
use crate::{
    BrokerConfig, CheckConfig, CheckKind, CoapConfig, Config, DiscoveryConfig, Env, HealthConfig,
    ListenerConfig, LogConfig, NodeConfig, ObserveConfig, Overrides, Route, StorageConfig,
    SyncConfig, UpstreamConfig,
};

const U16_MAX: i64 = u16::MAX as i64;
const MIN_QUOTA: u64 = 4 * 1024;
const MAX_COMMIT_BATCH_RECORDS: i64 = 100_000;
const MAX_COMMIT_INTERVAL: Duration = Duration::from_secs(1);
const MIN_KEEP_ALIVE: Duration = Duration::from_secs(5);
const MAX_KEEP_ALIVE: Duration = Duration::from_secs(65_535);
const MIN_HEALTH_INTERVAL: Duration = Duration::from_secs(1);
const U32_MAX: i64 = u32::MAX as i64;
const MIN_COAP_PAYLOAD: u64 = 1024;
const MAX_COAP_PAYLOAD: u64 = 16 << 20;
const MIN_EXCHANGE_LIFETIME: Duration = Duration::from_secs(1);
const MAX_EXCHANGE_LIFETIME: Duration = Duration::from_secs(3600);
const MIN_COAP_EXCHANGES: i64 = 16;
const MIN_DEAD_LETTER_BYTES: u64 = 1024;
const MIN_REFUSED_BYTES: u64 = 1024;
const MIN_QOS0_INFLIGHT_BYTES: u64 = 1024;
const MIN_DEAD_LETTER_QUEUE_BYTES: u64 = 1024;
/// Room for the fixed header, a short topic and a small payload: below this nothing useful fits.
const MIN_UPSTREAM_PACKET_SIZE: u64 = 128;
/// Headers an HTTP check sets itself (framing and connection handling of a bodiless GET on a
/// fresh connection); a configured value would break the request.
const RESERVED_HEADERS: &[&str] = &[
    "connection",
    "content-length",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

pub(crate) fn apply_overrides(raw: &mut RawConfig, overrides: &Overrides) {
    if let Some(listen) = overrides.listen {
        let broker = raw.broker.get_or_insert_default();
        broker.listeners = Some(vec![listen.to_string()]);
        broker.listener = None;
    }
    if let Some(url) = &overrides.upstream_url {
        raw.upstream.get_or_insert_default().url = Some(url.clone());
    }
    if let Some(dir) = &overrides.data_dir {
        raw.storage.get_or_insert_default().data_dir = Some(dir.clone());
    }
}

pub(crate) fn validate(raw: RawConfig, env: &dyn Env) -> Result<Config, ConfigErrors> {
    let mut c = Collector::default();
    let node = node(&mut c, raw.node.unwrap_or_default());
    let broker = broker(&mut c, raw.broker.unwrap_or_default());
    let coap = coap(&mut c, raw.coap.unwrap_or_default());
    let observe = observe(&mut c, raw.observe);
    let storage = storage(&mut c, raw.storage.unwrap_or_default());
    let routes = routes(&mut c, raw.route);
    let default_route = choice(
        &mut c,
        "default_route",
        raw.default_route,
        RouteTarget::default(),
        RouteTarget::parse,
    );
    let upstream = raw.upstream.map(|u| upstream(&mut c, u, &node.name, env));
    let sync = sync(&mut c, raw.sync.unwrap_or_default());
    let discovery = discovery(&mut c, raw.discovery.unwrap_or_default());
    let log = log(&mut c, raw.log.unwrap_or_default());
    let health = health(&mut c, raw.health.unwrap_or_default(), &broker.listeners);
    let checks = checks(&mut c, raw.check);
    c.finish(Config {
        node,
        broker,
        coap,
        observe,
        storage,
        routes,
        default_route,
        upstream: upstream.flatten(),
        sync,
        discovery,
        log,
        health,
        checks,
    })
}

/// Valid settings that are probably a mistake (see [`Config::warnings`]).
pub(crate) fn warnings(config: &Config) -> Vec<ConfigWarning> {
    let mut out = Vec::new();
    if let Some(up) = &config.upstream
        && config.broker.max_packet_size > up.max_packet_size
    {
        out.push(ConfigWarning::new(
            "broker.max_packet_size",
            format!(
                "{} bytes is more than upstream.max_packet_size ({} bytes): a reading the local broker accepts may be refused upstream (it is kept in the refused table)",
                config.broker.max_packet_size, up.max_packet_size
            ),
        ));
    }
    // The broker's state table (retained messages, persistent sessions and their queues) is
    // in the store's database but outside storage.quota.
    let b = &config.broker;
    // Replacements may take the retained bytes an eighth over their bound.
    let retained = b
        .max_retained_bytes
        .saturating_add(b.max_retained_bytes / 8);
    let state = retained.saturating_add(
        u64::try_from(b.max_sessions)
            .unwrap_or(u64::MAX)
            .saturating_mul(b.max_queued_bytes),
    );
    if state > config.storage.quota {
        let inflight = u64::try_from(b.max_sessions)
            .unwrap_or(u64::MAX)
            .saturating_mul(u64::from(b.max_inflight))
            .saturating_mul(b.max_packet_size);
        out.push(ConfigWarning::new(
            "broker.max_sessions",
            format!(
                "retained messages and persistent sessions are kept in the store's database outside storage.quota, and can take up to {} there (max_retained_bytes {} and the eighth more that replacements may use, + max_sessions {} x max_queued_bytes {}), more than storage.quota ({}); messages in flight to those sessions can add up to {} more (max_sessions x max_inflight {} x max_packet_size {}). Lower max_sessions or max_queued_bytes, or leave that much room on the disk",
                show_size(state),
                show_size(b.max_retained_bytes),
                b.max_sessions,
                show_size(b.max_queued_bytes),
                show_size(config.storage.quota),
                show_size(inflight),
                b.max_inflight,
                show_size(b.max_packet_size),
            ),
        ));
    }
    out
}

/// A byte count the way a person reads it: `512B`, `16MiB`, `1.5GiB`.
fn show_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    let mut whole = bytes;
    while whole >= 1024 && unit + 1 < UNITS.len() {
        whole /= 1024;
        unit += 1;
    }
    let exact = bytes.is_multiple_of(1 << (10 * unit));
    if exact || unit == 0 {
        format!("{whole}{}", UNITS[unit])
    } else {
        #[allow(clippy::cast_precision_loss)]
        let value = bytes as f64 / (1u64 << (10 * unit)) as f64;
        format!("{value:.1}{}", UNITS[unit])
    }
}

fn discovery(c: &mut Collector, raw: RawDiscovery) -> DiscoveryConfig {
    let d = DiscoveryConfig::default();
    let announce_prefix = match raw.announce_prefix {
        None => d.announce_prefix.clone(),
        Some(p) => {
            if p.is_empty()
                || p.starts_with('/')
                || p.ends_with('/')
                || p.contains(['+', '#', '\0'])
                || p.starts_with('$')
            {
                c.push(
                    "discovery.announce_prefix",
                    format!("{p:?} is not a topic prefix: non-empty, no wildcards, no leading '$' or '/', no trailing '/'"),
                );
            }
            p
        }
    };
    let stale_after = duration(
        c,
        "discovery.stale_after",
        raw.stale_after,
        d.stale_after,
        Duration::from_secs(1),
        None,
    );
    let offline_after = duration(
        c,
        "discovery.offline_after",
        raw.offline_after,
        d.offline_after,
        Duration::from_secs(1),
        None,
    );
    if offline_after <= stale_after {
        c.push(
            "discovery.offline_after",
            format!(
                "{} must be longer than discovery.stale_after ({})",
                show(offline_after),
                show(stale_after)
            ),
        );
    }
    let interfaces = raw.interfaces.unwrap_or_default();
    for (i, name) in interfaces.iter().enumerate() {
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
            c.push(
                format!("discovery.interfaces[{i}]"),
                format!("{name:?} is not a network interface name"),
            );
        } else if interfaces[..i].contains(name) {
            c.push(
                format!("discovery.interfaces[{i}]"),
                format!("duplicate interface {name:?}"),
            );
        }
    }
    let mdns_browse = raw.mdns_browse.unwrap_or(d.mdns_browse);
    for (i, t) in mdns_browse.iter().enumerate() {
        let ok = t.starts_with('_')
            && (t.ends_with("._udp.local.") || t.ends_with("._tcp.local."))
            && t.len() <= 63 + 12;
        if !ok {
            c.push(
                format!("discovery.mdns_browse[{i}]"),
                format!("{t:?} is not an mDNS service type like \"_coap._udp.local.\""),
            );
        }
    }
    let coap_interval = duration_or_off(
        c,
        "discovery.coap_interval",
        raw.coap_interval,
        d.coap_interval,
        Duration::from_secs(1),
        None,
    );
    DiscoveryConfig {
        announce_prefix,
        implicit: raw.implicit.unwrap_or(d.implicit),
        implicit_coap: raw.implicit_coap.unwrap_or(d.implicit_coap),
        max_devices: int(
            c,
            "discovery.max_devices",
            raw.max_devices,
            d.max_devices,
            1,
            None,
        ),
        stale_after,
        offline_after,
        interfaces,
        mdns_browse,
        coap_interval,
        observe_discovered: raw.observe_discovered.unwrap_or(d.observe_discovered),
    }
}

fn node(c: &mut Collector, raw: RawNode) -> NodeConfig {
    let defaults = NodeConfig::default();
    let name = match raw.name {
        None => defaults.name,
        Some(name) => NodeName::new(name).unwrap_or_else(|e| {
            c.push("node.name", e);
            defaults.name
        }),
    };
    let labels = raw.labels.unwrap_or_default();
    for (key, value) in &labels {
        if key.is_empty() {
            c.push("node.labels", "label names must not be empty");
        }
        if key.chars().chain(value.chars()).any(char::is_control) {
            c.push(
                format!("node.labels.{key}"),
                "labels must not contain control characters",
            );
        }
    }
    let capabilities = raw.capabilities.unwrap_or(defaults.capabilities);
    for (i, capability) in capabilities.iter().enumerate() {
        let path = format!("node.capabilities[{i}]");
        if capability.is_empty() {
            c.push(path, "must not be empty");
        } else if capabilities[..i].contains(capability) {
            c.push(path, format!("duplicate capability {capability:?}"));
        }
    }
    NodeConfig {
        name,
        labels,
        capabilities,
    }
}

fn broker(c: &mut Collector, raw: RawBroker) -> BrokerConfig {
    let d = BrokerConfig::default();
    let password_file = raw
        .password_file
        .as_deref()
        .and_then(|p| auth_file(c, "broker.password_file", p, PasswordFile::load));
    let acl_file = raw
        .acl_file
        .as_deref()
        .and_then(|p| auth_file(c, "broker.acl_file", p, AclFile::load));
    // A password file that failed to load still counts as set: its errors are reported, and
    // the defaults below must not add a second, misleading one.
    let has_passwords = raw.password_file.is_some();
    let anonymous_written = raw.allow_anonymous.is_some();
    let allow_anonymous = raw
        .allow_anonymous
        .and_then(|value| anonymous(c, "broker.allow_anonymous", value))
        .unwrap_or(AllowAnonymous::LoopbackOnly);
    // Each listener with its own `allow_anonymous` (None: the broker-wide one) and its TLS
    // settings.
    let mut entries: Vec<(
        SocketAddr,
        Option<AllowAnonymous>,
        Option<TlsListenerConfig>,
    )> = Vec::new();
    match (raw.listeners, raw.listener) {
        (Some(_), Some(_)) => c.push(
            "broker.listener",
            "use either broker.listeners or [[broker.listener]] tables, not both",
        ),
        (Some(texts), None) => {
            if texts.is_empty() {
                c.push("broker.listeners", "at least one listener is required");
            }
            let addrs = listeners(c, "broker.listeners", &texts, 1883);
            entries.extend(addrs.into_iter().map(|a| (a, None, None)));
        }
        (None, Some(tables)) => {
            if tables.is_empty() {
                c.push("broker.listener", "at least one listener is required");
            }
            let mut seen: Vec<Option<SocketAddr>> = Vec::with_capacity(tables.len());
            for (i, t) in tables.into_iter().enumerate() {
                let path = |key: &str| format!("broker.listener[{i}].{key}");
                let own = t
                    .allow_anonymous
                    .and_then(|v| anonymous(c, &path("allow_anonymous"), v));
                let tls = t
                    .tls
                    .and_then(|raw| tls(c, &format!("broker.listener[{i}].tls"), raw));
                // Clients can log in with a certificate there: refusing anonymous ones is fine.
                let client_certs = tls.as_ref().is_some_and(|t| t.client_ca_file.is_some());
                let addr = match t.address.as_deref().map(str::trim) {
                    None => {
                        c.push(path("address"), "required: IP:port, e.g. \"0.0.0.0:1883\"");
                        None
                    }
                    Some(text) => match text.parse::<SocketAddr>() {
                        Err(_) => {
                            c.push(
                                path("address"),
                                format!(
                                    "invalid socket address {text:?}; expected IP:port, e.g. \"0.0.0.0:1883\" or \"[::]:1883\""
                                ),
                            );
                            None
                        }
                        Ok(addr) => {
                            // Port 0 asks the OS for a free port each time: no collision.
                            let first = seen
                                .iter()
                                .position(|s| *s == Some(addr) && addr.port() != 0);
                            match first {
                                Some(first) => {
                                    c.push(
                                        path("address"),
                                        format!(
                                            "duplicate of broker.listener[{first}].address ({addr})"
                                        ),
                                    );
                                    None
                                }
                                None => Some(addr),
                            }
                        }
                    },
                };
                seen.push(addr);
                if let Some(addr) = addr {
                    entries.push((addr, own, tls));
                    if own.is_some_and(|p| !p.allows(addr)) && !has_passwords && !client_certs {
                        c.push(
                            path("allow_anonymous"),
                            format!(
                                "{addr} would refuse every client: anonymous clients are refused there and no broker.password_file is set"
                            ),
                        );
                    }
                }
            }
        }
        (None, None) => entries.extend(d.listeners.iter().map(|a| (*a, None, None))),
    }
    if !has_passwords
        && let Some((addr, _, _)) = entries.iter().find(|(a, own, tls)| {
            own.is_none()
                && !allow_anonymous.allows(*a)
                && tls.as_ref().is_none_or(|t| t.client_ca_file.is_none())
        })
    {
        let message = if anonymous_written {
            format!(
                "{allow_anonymous} refuses anonymous clients on {addr}, and no broker.password_file is set: no client could connect there"
            )
        } else {
            format!(
                "{addr} is not a loopback address, where anonymous clients are refused by default, and no broker.password_file is set: no client could connect there. Set broker.password_file (users made with mosquitto_passwd), or allow_anonymous = true to let anyone who reaches {addr} publish and subscribe"
            )
        };
        c.push("broker.allow_anonymous", message);
    }
    let listener_settings: Vec<ListenerConfig> = entries
        .into_iter()
        .map(|(address, own, tls)| ListenerConfig {
            address,
            allow_anonymous: own.unwrap_or(allow_anonymous).allows(address),
            tls,
        })
        .collect();
    let listeners = listener_settings.iter().map(|l| l.address).collect();
    BrokerConfig {
        listeners,
        max_connections: int(
            c,
            "broker.max_connections",
            raw.max_connections,
            d.max_connections,
            1,
            None,
        ),
        max_packet_size: size(
            c,
            "broker.max_packet_size",
            raw.max_packet_size,
            d.max_packet_size,
            1,
            MQTT_MAX_PACKET_SIZE,
        ),
        max_inflight: int(
            c,
            "broker.max_inflight",
            raw.max_inflight,
            d.max_inflight,
            1,
            Some(U16_MAX),
        ),
        max_inbound_pending: int(
            c,
            "broker.max_inbound_pending",
            raw.max_inbound_pending,
            d.max_inbound_pending,
            1,
            Some(U16_MAX),
        ),
        max_queued_messages: int(
            c,
            "broker.max_queued_messages",
            raw.max_queued_messages,
            d.max_queued_messages,
            1,
            None,
        ),
        max_queued_bytes: size(
            c,
            "broker.max_queued_bytes",
            raw.max_queued_bytes,
            d.max_queued_bytes,
            1,
            u64::MAX,
        ),
        max_retained: int(
            c,
            "broker.max_retained",
            raw.max_retained,
            d.max_retained,
            1,
            None,
        ),
        max_retained_bytes: size(
            c,
            "broker.max_retained_bytes",
            raw.max_retained_bytes,
            d.max_retained_bytes,
            1,
            u64::MAX,
        ),
        max_sessions: int(
            c,
            "broker.max_sessions",
            raw.max_sessions,
            d.max_sessions,
            0,
            None,
        ),
        session_expiry_311: duration(
            c,
            "broker.session_expiry_311",
            raw.session_expiry_311,
            d.session_expiry_311,
            Duration::from_secs(1),
            Some(Duration::from_secs(u64::from(u32::MAX))),
        ),
        max_session_expiry: whole_seconds(
            c,
            "broker.max_session_expiry",
            raw.max_session_expiry,
            d.max_session_expiry,
            Duration::from_secs(1),
            Duration::from_secs(u64::from(u32::MAX - 1)),
        ),
        max_keep_alive: duration_or_off(
            c,
            "broker.max_keep_alive",
            raw.max_keep_alive,
            d.max_keep_alive,
            Duration::from_secs(1),
            Some(Duration::from_secs(65535)),
        ),
        connect_timeout: duration(
            c,
            "broker.connect_timeout",
            raw.connect_timeout,
            d.connect_timeout,
            Duration::from_millis(1),
            None,
        ),
        allow_anonymous,
        listener_settings,
        password_file,
        acl_file,
    }
}

/// A listener's `tls` table at `key` (`broker.listener[i].tls`): required keys present, the
/// files read and checked (each problem at its own key). `None` when a key is missing; the
/// settings (reported) when a file is bad.
fn tls(c: &mut Collector, key: &str, raw: RawTls) -> Option<TlsListenerConfig> {
    let mut file = |name: &str, value: Option<std::path::PathBuf>, required: bool| match value {
        None if required => {
            c.push(
                format!("{key}.{name}"),
                "required in a tls table: the path of a PEM file",
            );
            None
        }
        Some(p) if p.as_os_str().is_empty() => {
            c.push(format!("{key}.{name}"), "must not be empty");
            None
        }
        other => other,
    };
    let cert_file = file("cert_file", raw.cert_file, true);
    let key_file = file("key_file", raw.key_file, true);
    let client_ca_given = raw.client_ca_file.is_some();
    let client_ca_file = file("client_ca_file", raw.client_ca_file, false);
    let require_client_cert = raw.require_client_cert.unwrap_or(false);
    if require_client_cert && !client_ca_given {
        c.push(
            format!("{key}.require_client_cert"),
            "needs client_ca_file: the CA that client certificates are checked against",
        );
    }
    let config = TlsListenerConfig {
        cert_file: cert_file?,
        key_file: key_file?,
        client_ca_file,
        require_client_cert,
    };
    if client_ca_given && config.client_ca_file.is_none() {
        return None;
    }
    if let Err(errors) = config.load_all() {
        for e in errors {
            // Names the file and what is wrong with it; never its contents.
            c.push(format!("{key}.{}", e.key().as_str()), e.to_string());
        }
    }
    Some(config)
}

/// `true`, `false` or `"loopback-only"`; `None` (reported) for anything else, so the caller
/// falls back to its default instead of adding follow-on errors.
fn anonymous(c: &mut Collector, path: &str, raw: RawAnonymous) -> Option<AllowAnonymous> {
    match raw {
        RawAnonymous::Bool(true) => Some(AllowAnonymous::Always),
        RawAnonymous::Bool(false) => Some(AllowAnonymous::Never),
        RawAnonymous::Text(text) if text == "loopback-only" => Some(AllowAnonymous::LoopbackOnly),
        RawAnonymous::Text(text) => {
            c.push(
                path,
                format!("unknown value {text:?}; expected true, false or \"loopback-only\""),
            );
            None
        }
    }
}

/// Loads one of the broker's access files; each bad line is one error at `path`.
fn auth_file<T>(
    c: &mut Collector,
    path: &str,
    file: &Path,
    load: fn(&Path) -> Result<T, AuthFileError>,
) -> Option<T> {
    if file.as_os_str().is_empty() {
        c.push(path, "must not be empty");
        return None;
    }
    match load(file) {
        Ok(parsed) => Some(parsed),
        Err(AuthFileError::Read { source, .. }) => {
            c.push(path, format!("cannot read {}: {source}", file.display()));
            None
        }
        Err(AuthFileError::Invalid { errors, .. }) => {
            for e in errors {
                c.push(path, e);
            }
            None
        }
    }
}

/// The addresses of a `listeners` list at `key`; `port` is the one its examples show.
fn listeners(c: &mut Collector, key: &str, texts: &[String], port: u16) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        let path = format!("{key}[{i}]");
        match text.trim().parse::<SocketAddr>() {
            Err(_) => c.push(
                path,
                format!(
                    "invalid socket address {text:?}; expected IP:port, e.g. \"0.0.0.0:{port}\" or \"[::]:{port}\""
                ),
            ),
            // Port 0 asks the OS for a free port each time, so two of them do not collide.
            Ok(addr) => match out.iter().position(|a| *a == addr && addr.port() != 0) {
                Some(first) => c.push(path, format!("duplicate of {key}[{first}] ({addr})")),
                None => out.push(addr),
            },
        }
    }
    out
}

fn coap(c: &mut Collector, raw: RawCoap) -> CoapConfig {
    let d = CoapConfig::default();
    // An empty list is allowed: it turns the CoAP endpoint off. The ports may equal the broker's
    // or the health endpoint's, which are TCP.
    let listeners = match raw.listeners {
        None => d.listeners,
        Some(texts) => listeners(c, "coap.listeners", &texts, CoapConfig::DEFAULT_PORT),
    };
    let ingest_path = match raw.ingest_path {
        None => d.ingest_path,
        Some(path) => {
            if let Err(e) = check_ingest_path(&path) {
                c.push("coap.ingest_path", e);
            }
            path
        }
    };
    let topic_prefix = match raw.topic_prefix {
        None => d.topic_prefix,
        Some(prefix) => {
            topic_prefix(c, "coap.topic_prefix", &prefix);
            prefix
        }
    };
    CoapConfig {
        listeners,
        ingest_path,
        topic_prefix,
        max_payload: size(
            c,
            "coap.max_payload",
            raw.max_payload,
            d.max_payload,
            MIN_COAP_PAYLOAD,
            MAX_COAP_PAYLOAD,
        ),
        exchange_lifetime: duration(
            c,
            "coap.exchange_lifetime",
            raw.exchange_lifetime,
            d.exchange_lifetime,
            MIN_EXCHANGE_LIFETIME,
            Some(MAX_EXCHANGE_LIFETIME),
        ),
        max_exchanges: int(
            c,
            "coap.max_exchanges",
            raw.max_exchanges,
            d.max_exchanges,
            MIN_COAP_EXCHANGES,
            None,
        ),
        max_observers: int(
            c,
            "coap.max_observers",
            raw.max_observers,
            d.max_observers,
            1,
            None,
        ),
    }
}

fn observe(c: &mut Collector, raw: Vec<RawObserve>) -> Vec<ObserveConfig> {
    let mut out: Vec<ObserveConfig> = Vec::with_capacity(raw.len());
    // The resource of every entry so far, valid or not, so a repeat is reported at the repeat.
    let mut seen: Vec<Option<(SocketAddr, String)>> = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let path = |key: &str| format!("observe[{i}].{key}");
        let resource = match r.uri.as_deref().map(parse_coap_uri) {
            None => {
                c.push(
                    path("uri"),
                    "required: the resource to observe, e.g. \"coap://192.168.1.20/temp\"",
                );
                None
            }
            Some(Err(e)) => {
                c.push(path("uri"), e);
                None
            }
            Some(Ok(resource)) => {
                if let Some(first) = seen.iter().position(|s| s.as_ref() == Some(&resource)) {
                    c.push(
                        path("uri"),
                        format!("same resource as observe[{first}]; observe it once"),
                    );
                }
                Some(resource)
            }
        };
        seen.push(resource.clone());
        let topic = match r.topic {
            None => {
                c.push(
                    path("topic"),
                    "required: the local topic notifications are ingested under",
                );
                None
            }
            Some(topic) => topic_name(c, &path("topic"), &topic).then_some(topic),
        };
        if let (Some((target, resource_path)), Some(uri), Some(topic)) = (resource, r.uri, topic) {
            out.push(ObserveConfig {
                target,
                path: resource_path,
                uri,
                topic,
            });
        }
    }
    out
}

/// An MQTT topic name (what a PUBLISH carries): non-empty, no wildcards, an MQTT string.
/// Whether it passed.
fn topic_name(c: &mut Collector, path: &str, topic: &str) -> bool {
    let mut ok = true;
    if topic.is_empty() {
        c.push(path, "must not be empty");
        ok = false;
    } else if topic.contains(['+', '#']) {
        c.push(
            path,
            "must not contain the wildcards '+' or '#': it is a topic name, not a filter",
        );
        ok = false;
    }
    ok & mqtt_string(c, path, topic)
}

fn storage(c: &mut Collector, raw: RawStorage) -> StorageConfig {
    let d = StorageConfig::default();
    let data_dir = match raw.data_dir {
        Some(dir) if dir.as_os_str().is_empty() => {
            c.push("storage.data_dir", "must not be empty");
            d.data_dir
        }
        Some(dir) => dir,
        None => d.data_dir,
    };
    let ttl = duration(
        c,
        "storage.ttl",
        raw.ttl,
        Duration::ZERO,
        Duration::ZERO,
        None,
    );
    StorageConfig {
        data_dir,
        quota: size(c, "storage.quota", raw.quota, d.quota, MIN_QUOTA, u64::MAX),
        ttl: (!ttl.is_zero()).then_some(ttl),
        when_full: choice(
            c,
            "storage.when_full",
            raw.when_full,
            d.when_full,
            WhenFull::parse,
        ),
        commit_batch_records: int(
            c,
            "storage.commit_batch_records",
            raw.commit_batch_records,
            d.commit_batch_records,
            1,
            Some(MAX_COMMIT_BATCH_RECORDS),
        ),
        commit_interval: duration(
            c,
            "storage.commit_interval",
            raw.commit_interval,
            d.commit_interval,
            Duration::ZERO,
            Some(MAX_COMMIT_INTERVAL),
        ),
        durability: choice(
            c,
            "storage.durability",
            raw.durability,
            d.durability,
            Durability::parse,
        ),
        dead_letter_max_records: int(
            c,
            "storage.dead_letter_max_records",
            raw.dead_letter_max_records,
            d.dead_letter_max_records,
            1,
            None,
        ),
        dead_letter_max_bytes: size(
            c,
            "storage.dead_letter_max_bytes",
            raw.dead_letter_max_bytes,
            d.dead_letter_max_bytes,
            MIN_DEAD_LETTER_BYTES,
            u64::MAX,
        ),
        refused_max_records: int(
            c,
            "storage.refused_max_records",
            raw.refused_max_records,
            d.refused_max_records,
            1,
            None,
        ),
        refused_max_bytes: size(
            c,
            "storage.refused_max_bytes",
            raw.refused_max_bytes,
            d.refused_max_bytes,
            MIN_REFUSED_BYTES,
            u64::MAX,
        ),
        qos0_inflight_bytes: size(
            c,
            "storage.qos0_inflight_bytes",
            raw.qos0_inflight_bytes,
            d.qos0_inflight_bytes,
            MIN_QOS0_INFLIGHT_BYTES,
            u64::MAX,
        ),
        dead_letter_queue_bytes: size(
            c,
            "storage.dead_letter_queue_bytes",
            raw.dead_letter_queue_bytes,
            d.dead_letter_queue_bytes,
            MIN_DEAD_LETTER_QUEUE_BYTES,
            u64::MAX,
        ),
    }
}

fn routes(c: &mut Collector, raw: Vec<RawRoute>) -> Vec<Route> {
    let mut out: Vec<Route> = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let path = |key: &str| format!("route[{i}].{key}");
        let filter = match r.filter.map(TopicFilter::new) {
            None => {
                c.push(path("filter"), "required: the topics this route applies to");
                None
            }
            Some(Err(e)) => {
                c.push(path("filter"), e);
                None
            }
            Some(Ok(filter)) => {
                // Routes are tried in order, so a repeated filter could never be reached.
                if let Some(first) = out.iter().position(|r| r.filter == filter) {
                    c.push(
                        path("filter"),
                        format!("same filter as route[{first}]; only the first would ever match"),
                    );
                }
                Some(filter)
            }
        };
        let target = choice(
            c,
            &path("target"),
            r.target,
            RouteTarget::Cloud,
            RouteTarget::parse,
        );
        if target == RouteTarget::Local {
            // Local messages are neither stored nor sent: these keys would be silently ignored.
            for (key, set) in [
                ("priority", r.priority.is_some()),
                ("upstream_topic", r.upstream_topic.is_some()),
                ("store", r.store.is_some()),
            ] {
                if set {
                    c.push(path(key), "has no effect on a route with target \"local\"");
                }
            }
        }
        let priority = choice(
            c,
            &path("priority"),
            r.priority,
            Priority::Normal,
            Priority::parse,
        );
        let upstream_topic = match r.upstream_topic {
            None => TopicTemplate::default_upstream(),
            Some(text) => TopicTemplate::new(text).unwrap_or_else(|e| {
                c.push(path("upstream_topic"), e);
                TopicTemplate::default_upstream()
            }),
        };
        // `None`: not set; `Some(None)`: set but unknown (already reported).
        let format = r.format.map(|text| {
            PayloadFormat::parse(&text)
                .map_err(|e| c.push(path("format"), e))
                .ok()
        });
        let store = choice(
            c,
            &path("store"),
            r.store,
            StoreMode::Original,
            StoreMode::parse,
        );
        // On a local route `store` was refused above already.
        if store == StoreMode::Normalised && target != RouteTarget::Local {
            match format {
                None => c.push(
                    path("store"),
                    "\"normalised\" needs format = \"senml+json\" or \"senml+cbor\"",
                ),
                Some(Some(f)) if !f.is_senml() => c.push(
                    path("store"),
                    format!(
                        "\"normalised\" applies only to format \"senml+json\" or \"senml+cbor\", not {:?}",
                        f.as_str()
                    ),
                ),
                Some(_) => {}
            }
        }
        if let Some(filter) = filter {
            out.push(Route {
                filter,
                target,
                priority,
                upstream_topic,
                format: format.flatten(),
                store,
            });
        }
    }
    out
}

fn upstream(
    c: &mut Collector,
    raw: RawUpstream,
    node: &NodeName,
    env: &dyn Env,
) -> Option<UpstreamConfig> {
    let url = match raw.url.as_deref().map(UpstreamUrl::parse) {
        None => {
            c.push(
                "upstream.url",
                "required in an [upstream] section, e.g. \"mqtts://broker.example.com\"",
            );
            None
        }
        Some(Err(e)) => {
            c.push("upstream.url", e);
            None
        }
        Some(Ok(url)) => Some(url),
    };
    // Validate everything else against a placeholder url so its problems are reported too.
    let placeholder = UpstreamUrl {
        tls: true,
        host: String::new(),
        port: UpstreamUrl::MQTTS_PORT,
    };
    let tls = url.as_ref().is_none_or(|u| u.tls);
    let d = UpstreamConfig::with_url(placeholder, node);

    let client_id = match raw.client_id {
        None => d.client_id,
        Some(id) => {
            if id.is_empty() {
                c.push("upstream.client_id", "must not be empty");
            }
            mqtt_string(c, "upstream.client_id", &id);
            id
        }
    };
    if let Some(username) = &raw.username {
        mqtt_string(c, "upstream.username", username);
    }
    let password = match (raw.password, raw.password_env) {
        (Some(_), Some(_)) => {
            c.push(
                "upstream.password",
                "set either password or password_env, not both",
            );
            None
        }
        (Some(password), None) => Some(password),
        (None, Some(var)) => {
            if var.is_empty() {
                c.push("upstream.password_env", "must name an environment variable");
                None
            } else {
                let value = env.var(&var);
                if value.is_none() {
                    c.push(
                        "upstream.password_env",
                        format!("environment variable {var:?} is not set"),
                    );
                }
                value
            }
        }
        (None, None) => None,
    };
    if let Some(password) = &password
        && password.len() > MQTT_MAX_STRING_BYTES
    {
        c.push("upstream.password", "longer than MQTT's 65535 bytes");
    }
    let protocol = choice(
        c,
        "upstream.protocol",
        raw.protocol,
        d.protocol,
        UpstreamProtocol::parse,
    );
    if password.is_some() && raw.username.is_none() && protocol != UpstreamProtocol::V5 {
        // MQTT 3.1.1 section 3.1.2.9: the password flag requires the username flag. "auto" may
        // fall back to 3.1.1.
        let message = if protocol == UpstreamProtocol::Auto {
            "MQTT 3.1.1 requires a username when a password is set, and protocol \"auto\" falls back to 3.1.1 when the broker refuses MQTT 5; set a username, or protocol = \"5\""
        } else {
            "MQTT 3.1.1 requires a username when a password is set"
        };
        c.push("upstream.username", message);
    }
    let max_packet_size = size(
        c,
        "upstream.max_packet_size",
        raw.max_packet_size,
        d.max_packet_size,
        MIN_UPSTREAM_PACKET_SIZE,
        MQTT_MAX_PACKET_SIZE,
    );
    let metadata = raw.metadata.and_then(|text| {
        MetadataMode::parse(&text)
            .map_err(|e| c.push("upstream.metadata", e))
            .ok()
    });
    if metadata == Some(MetadataMode::Properties) && protocol == UpstreamProtocol::V311 {
        c.push(
            "upstream.metadata",
            "\"properties\" needs MQTT 5, and protocol is \"3.1.1\": MQTT 3.1.1 has no properties; use \"envelope\" to carry the metadata in the payload",
        );
    }
    if let Some(ca) = &raw.ca_file {
        if !tls {
            c.push(
                "upstream.ca_file",
                "set, but the url is mqtt:// (no TLS); use mqtts://",
            );
        } else if !ca.is_file() {
            c.push(
                "upstream.ca_file",
                format!("{} does not exist or is not a file", ca.display()),
            );
        }
    }
    let keep_alive = duration(
        c,
        "upstream.keep_alive",
        raw.keep_alive,
        d.keep_alive,
        MIN_KEEP_ALIVE,
        Some(MAX_KEEP_ALIVE),
    );
    if keep_alive.subsec_nanos() != 0 {
        c.push(
            "upstream.keep_alive",
            "must be a whole number of seconds (MQTT counts keep-alive in seconds)",
        );
    }
    let topic_prefix = match raw.topic_prefix {
        None => d.topic_prefix,
        Some(prefix) => {
            topic_prefix(c, "upstream.topic_prefix", &prefix);
            prefix
        }
    };
    url.map(|url| UpstreamConfig {
        url,
        client_id,
        username: raw.username,
        password: password.map(Secret::new),
        ca_file: raw.ca_file,
        keep_alive,
        protocol,
        max_packet_size,
        metadata,
        topic_prefix,
        command_topic: raw.command_topic.unwrap_or(d.command_topic),
        clean_session: raw.clean_session.unwrap_or(d.clean_session),
    })
}

/// The first level(s) of generated topic names: non-empty, no wildcards, no leading or trailing
/// `/` (which would make an empty level), an MQTT string.
fn topic_prefix(c: &mut Collector, path: &str, prefix: &str) {
    if prefix.is_empty() {
        c.push(path, "must not be empty");
    } else if prefix.contains(['+', '#']) {
        c.push(path, "must not contain the wildcards '+' or '#'");
    } else if prefix.starts_with('/') || prefix.ends_with('/') {
        c.push(path, "must not start or end with '/'");
    }
    mqtt_string(c, path, prefix);
}

/// MQTT strings: at most 65535 bytes, no NUL. Whether it passed.
fn mqtt_string(c: &mut Collector, path: &str, text: &str) -> bool {
    let mut ok = true;
    if text.len() > MQTT_MAX_STRING_BYTES {
        c.push(
            path,
            format!("is {} bytes; MQTT allows at most 65535", text.len()),
        );
        ok = false;
    }
    if text.contains('\0') {
        c.push(path, "must not contain NUL");
        ok = false;
    }
    ok
}

fn sync(c: &mut Collector, raw: RawSync) -> SyncConfig {
    let d = SyncConfig::default();
    let backoff_min = duration(
        c,
        "sync.backoff_min",
        raw.backoff_min,
        d.backoff_min,
        Duration::from_millis(1),
        None,
    );
    let backoff_max = duration(
        c,
        "sync.backoff_max",
        raw.backoff_max,
        d.backoff_max,
        Duration::ZERO,
        None,
    );
    if backoff_max < backoff_min {
        c.push(
            "sync.backoff_max",
            format!(
                "{} is less than sync.backoff_min ({})",
                show(backoff_max),
                show(backoff_min)
            ),
        );
    }
    SyncConfig {
        inflight_window: int(
            c,
            "sync.inflight_window",
            raw.inflight_window,
            d.inflight_window,
            1,
            Some(U16_MAX),
        ),
        read_batch: int(c, "sync.read_batch", raw.read_batch, d.read_batch, 1, None),
        backoff_min,
        backoff_max,
    }
}

fn log(c: &mut Collector, raw: RawLog) -> LogConfig {
    let d = LogConfig::default();
    match raw.level {
        None => d,
        Some(level) if LogConfig::LEVELS.contains(&level.as_str()) => LogConfig { level },
        Some(level) => {
            c.push(
                "log.level",
                format!(
                    "unknown value {level:?}; expected {}",
                    crate::types::one_of(LogConfig::LEVELS)
                ),
            );
            d
        }
    }
}

fn health(c: &mut Collector, raw: RawHealth, broker: &[SocketAddr]) -> HealthConfig {
    let d = HealthConfig::default();
    let listen = match raw.listen.as_deref().map(str::trim) {
        None => d.listen,
        Some("off") => None,
        Some(text) => match text.parse::<SocketAddr>() {
            Err(_) => {
                c.push(
                    "health.listen",
                    format!(
                        "invalid socket address {text:?}; expected IP:port, e.g. \"127.0.0.1:9180\", or \"off\""
                    ),
                );
                d.listen
            }
            Ok(addr) => {
                // The same port on the same (or an unspecified) IP as a broker listener could
                // never be bound by both.
                let clash = broker.iter().position(|b| {
                    addr.port() != 0
                        && b.port() == addr.port()
                        && (b.ip() == addr.ip()
                            || b.ip().is_unspecified()
                            || addr.ip().is_unspecified())
                });
                if let Some(i) = clash {
                    c.push(
                        "health.listen",
                        format!("{addr} overlaps broker.listeners[{i}] ({})", broker[i]),
                    );
                }
                Some(addr)
            }
        },
    };
    HealthConfig {
        listen,
        resource_interval: duration_or_off(
            c,
            "health.resource_interval",
            raw.resource_interval,
            d.resource_interval,
            MIN_HEALTH_INTERVAL,
            None,
        ),
        resource_priority: choice(
            c,
            "health.resource_priority",
            raw.resource_priority,
            d.resource_priority,
            Priority::parse,
        ),
        heartbeat_interval: duration(
            c,
            "health.heartbeat_interval",
            raw.heartbeat_interval,
            d.heartbeat_interval,
            MIN_HEALTH_INTERVAL,
            None,
        ),
    }
}

fn checks(c: &mut Collector, raw: Vec<RawCheck>) -> Vec<CheckConfig> {
    let mut out: Vec<CheckConfig> = Vec::with_capacity(raw.len());
    // Names of every entry so far, valid or not, so a duplicate is reported once per repeat.
    let mut names: Vec<Option<CheckName>> = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let path = |key: &str| format!("check[{i}].{key}");
        let name = match r.name.as_deref().map(CheckName::new) {
            None => {
                c.push(path("name"), "required: a unique name for this check");
                None
            }
            Some(Err(e)) => {
                c.push(path("name"), e);
                None
            }
            Some(Ok(name)) => {
                if let Some(first) = names.iter().position(|n| n.as_ref() == Some(&name)) {
                    c.push(path("name"), format!("same name as check[{first}]"));
                }
                Some(name)
            }
        };
        names.push(name.clone());
        let kind = check_kind(c, i, &r);
        let interval = duration(
            c,
            &path("interval"),
            r.interval,
            CheckConfig::DEFAULT_INTERVAL,
            CheckConfig::MIN_INTERVAL,
            None,
        );
        let timeout = duration(
            c,
            &path("timeout"),
            r.timeout,
            CheckConfig::DEFAULT_TIMEOUT,
            Duration::from_millis(1),
            None,
        );
        if timeout >= interval {
            c.push(
                path("timeout"),
                format!(
                    "{} must be less than interval ({}), so runs never overlap",
                    show(timeout),
                    show(interval)
                ),
            );
        }
        let failure_threshold = int(
            c,
            &path("failure_threshold"),
            r.failure_threshold,
            CheckConfig::DEFAULT_FAILURE_THRESHOLD,
            1,
            Some(U32_MAX),
        );
        let recovery_threshold = int(
            c,
            &path("recovery_threshold"),
            r.recovery_threshold,
            CheckConfig::DEFAULT_RECOVERY_THRESHOLD,
            1,
            Some(U32_MAX),
        );
        if let (Some(name), Some(kind)) = (name, kind) {
            out.push(CheckConfig {
                name,
                kind,
                interval,
                timeout,
                failure_threshold,
                recovery_threshold,
            });
        }
    }
    out
}

/// The kind and its keys. Keys of another kind are refused; when `kind` itself is missing or
/// unknown, the keys present are still checked for their own format.
fn check_kind(c: &mut Collector, i: usize, r: &RawCheck) -> Option<CheckKind> {
    let path = |key: &str| format!("check[{i}].{key}");
    let kind = match r.kind.as_deref() {
        None => {
            c.push(
                path("kind"),
                format!("required: {}", crate::types::one_of(CheckKind::NAMES)),
            );
            None
        }
        Some(k) if CheckKind::NAMES.contains(&k) => Some(k),
        Some(k) => {
            c.push(
                path("kind"),
                format!(
                    "unknown value {k:?}; expected {}",
                    crate::types::one_of(CheckKind::NAMES)
                ),
            );
            None
        }
    };
    // Which kind each key belongs to, and whether it is set.
    let keys = [
        ("url", "http", r.url.is_some()),
        ("expected_status", "http", r.expected_status.is_some()),
        ("headers", "http", r.headers.is_some()),
        ("address", "tcp", r.address.is_some()),
        ("command", "command", r.command.is_some()),
    ];
    if let Some(kind) = kind {
        for (key, owner, set) in keys {
            if set && owner != kind {
                c.push(
                    path(key),
                    format!("applies only to kind = {owner:?}, not {kind:?}"),
                );
            }
        }
    }
    let url = r
        .url
        .as_deref()
        .and_then(|u| HttpUrl::parse(u).map_err(|e| c.push(path("url"), e)).ok());
    let expected_status = int(
        c,
        &path("expected_status"),
        r.expected_status,
        200u16,
        100,
        Some(599),
    );
    let headers = r
        .headers
        .as_ref()
        .map(|h| headers(c, &path("headers"), h))
        .unwrap_or_default();
    let address = r.address.as_deref().and_then(|a| {
        HostPort::parse(a)
            .map_err(|e| c.push(path("address"), e))
            .ok()
    });
    let argv = r.command.as_ref().map(|argv| {
        if argv.is_empty() {
            c.push(path("command"), "must not be empty: [program, args...]");
        } else if argv[0].trim().is_empty() {
            c.push(path("command[0]"), "the program must not be empty");
        }
        for (j, arg) in argv.iter().enumerate() {
            if arg.contains('\0') {
                c.push(path(&format!("command[{j}]")), "must not contain NUL");
            }
        }
        argv.clone()
    });
    match kind? {
        "http" => match (&r.url, url) {
            (None, _) => {
                c.push(
                    path("url"),
                    "required for kind = \"http\", e.g. \"http://127.0.0.1:8080/health\"",
                );
                None
            }
            (Some(_), url) => url.map(|url| CheckKind::Http {
                url,
                expected_status,
                headers,
            }),
        },
        "tcp" => match (&r.address, address) {
            (None, _) => {
                c.push(
                    path("address"),
                    "required for kind = \"tcp\", e.g. \"127.0.0.1:502\"",
                );
                None
            }
            (Some(_), address) => address.map(|address| CheckKind::Tcp { address }),
        },
        _ => match argv {
            None => {
                c.push(
                    path("command"),
                    "required for kind = \"command\", e.g. [\"/usr/bin/test\", \"-f\", \"/tmp/ok\"]",
                );
                None
            }
            Some(argv) => Some(CheckKind::Command { argv }),
        },
    }
}

/// Header names must be HTTP tokens, unique regardless of case and not ones the check sets
/// itself; values must hold no control characters. Values are never quoted in a message.
fn headers(
    c: &mut Collector,
    path: &str,
    raw: &BTreeMap<String, String>,
) -> BTreeMap<String, Secret> {
    let token_char = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    let mut out = BTreeMap::new();
    let mut seen: Vec<String> = Vec::new();
    for (name, value) in raw {
        let lower = name.to_ascii_lowercase();
        if name.is_empty() || !name.bytes().all(token_char) {
            c.push(path, format!("invalid header name {name:?}"));
            continue;
        }
        if RESERVED_HEADERS.contains(&lower.as_str()) {
            c.push(
                format!("{path}.{name}"),
                "is set by the check itself and cannot be configured",
            );
            continue;
        }
        if seen.contains(&lower) {
            c.push(
                format!("{path}.{name}"),
                "duplicate header (names are case-insensitive)",
            );
            continue;
        }
        seen.push(lower);
        if value.chars().any(char::is_control) {
            c.push(
                format!("{path}.{name}"),
                "value must not contain control characters (the value is not shown: it may be a secret)",
            );
            continue;
        }
        out.insert(name.clone(), Secret::new(value.clone()));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Scalar helpers: each returns `default` after reporting a problem, so validation continues.

/// An integer in `min..=max` (`max` `None`: as large as the target type holds).
fn int<T>(
    c: &mut Collector,
    path: &str,
    raw: Option<i64>,
    default: T,
    min: i64,
    max: Option<i64>,
) -> T
where
    T: TryFrom<i64> + Copy,
{
    let Some(value) = raw else { return default };
    if value < min || max.is_some_and(|m| value > m) {
        let message = match max {
            Some(max) => format!("must be between {min} and {max}, got {value}"),
            None => format!("must be at least {min}, got {value}"),
        };
        c.push(path, message);
        return default;
    }
    T::try_from(value).unwrap_or_else(|_| {
        c.push(path, format!("{value} is too large"));
        default
    })
}

/// A byte size in `min..=max`.
fn size(
    c: &mut Collector,
    path: &str,
    raw: Option<RawSize>,
    default: u64,
    min: u64,
    max: u64,
) -> u64 {
    let bytes = match raw {
        None => return default,
        Some(RawSize::Text(text)) => match parse_size(&text) {
            Ok(bytes) => bytes,
            Err(e) => {
                c.push(path, e);
                return default;
            }
        },
        Some(RawSize::Bytes(n)) if n < 0 => {
            c.push(path, format!("must not be negative, got {n}"));
            return default;
        }
        Some(RawSize::Bytes(n)) => match u64::try_from(n) {
            Ok(bytes) => bytes,
            Err(_) => {
                c.push(path, format!("{n} is too large"));
                return default;
            }
        },
    };
    if bytes < min || bytes > max {
        let range = if max == u64::MAX {
            format!("at least {min} bytes")
        } else {
            format!("between {min} and {max} bytes")
        };
        c.push(path, format!("must be {range}, got {bytes}"));
        return default;
    }
    bytes
}

/// A duration in `min..=max` that may also be `"off"` (`None`); not written: `default`.
fn duration_or_off(
    c: &mut Collector,
    path: &str,
    raw: Option<RawDuration>,
    default: Option<Duration>,
    min: Duration,
    max: Option<Duration>,
) -> Option<Duration> {
    match raw {
        None => default,
        Some(RawDuration(text)) if text == "off" => None,
        other => Some(duration(c, path, other, default.unwrap_or(min), min, max)),
    }
}

/// A duration in `min..=max` that is a whole number of seconds (an MQTT interval).
fn whole_seconds(
    c: &mut Collector,
    path: &str,
    raw: Option<RawDuration>,
    default: Duration,
    min: Duration,
    max: Duration,
) -> Duration {
    let text = raw.as_ref().map(|r| r.0.clone());
    let value = duration(c, path, raw, default, min, Some(max));
    if value.subsec_nanos() != 0 {
        c.push(
            path,
            format!(
                "must be a whole number of seconds, got {:?}",
                text.unwrap_or_default()
            ),
        );
        return default;
    }
    value
}

/// A duration in `min..=max` (`max` `None`: unbounded).
fn duration(
    c: &mut Collector,
    path: &str,
    raw: Option<RawDuration>,
    default: Duration,
    min: Duration,
    max: Option<Duration>,
) -> Duration {
    let Some(RawDuration(text)) = raw else {
        return default;
    };
    let value = match parse_duration(&text) {
        Ok(value) => value,
        Err(e) => {
            c.push(path, e);
            return default;
        }
    };
    if value < min || max.is_some_and(|m| value > m) {
        let message = match max {
            Some(max) => format!(
                "must be between {} and {}, got {text:?}",
                show(min),
                show(max)
            ),
            None => format!("must be at least {}, got {text:?}", show(min)),
        };
        c.push(path, message);
        return default;
    }
    value
}

/// A duration the way a person would write it: `100ms`, `10m`, but `65535s` rather than
/// `18h 12m 15s` when the bound is a count of seconds.
fn show(d: Duration) -> String {
    if d.subsec_nanos() == 0 && d.as_secs() > 60 && !d.as_secs().is_multiple_of(60) {
        format!("{}s", d.as_secs())
    } else {
        humantime::format_duration(d).to_string()
    }
}

/// One of an enum's spellings.
fn choice<T: Copy>(
    c: &mut Collector,
    path: &str,
    raw: Option<String>,
    default: T,
    parse: fn(&str) -> Result<T, String>,
) -> T {
    match raw.as_deref().map(parse) {
        None => default,
        Some(Ok(value)) => value,
        Some(Err(message)) => {
            c.push(path, message);
            default
        }
    }
}
