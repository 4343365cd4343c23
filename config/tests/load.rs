//! `Config::load` through the public API: defaults, the default file, every validation rule,
//! error collection, overrides and the environment seam.

// Tests may unwrap: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use outpost_config::{
    AllowAnonymous, CheckKind, CoapConfig, Config, ConfigErrors, ConfigWarning, Durability, Env,
    HealthConfig, ListenerConfig, MQTT_MAX_PACKET_SIZE, MetadataMode, MqttVersion, NodeName,
    ObserveConfig, Overrides, PasswordHash, PayloadFormat, Priority, RouteTarget, Secret,
    StoreMode, TlsListenerConfig, UpstreamConfig, UpstreamProtocol, UpstreamUrl, WhenFull,
    default_config_toml,
};

/// An environment with nothing set.
fn no_env() -> BTreeMap<String, String> {
    BTreeMap::new()
}

fn load(text: &str) -> Result<Config, ConfigErrors> {
    Config::load(Some(text), &Overrides::default(), &no_env())
}

fn load_ok(text: &str) -> Config {
    load(text).unwrap_or_else(|e| panic!("expected a valid config, got:\n{e}"))
}

/// Loads `text`, expects failure, and returns `(path, message)` pairs.
fn errors(text: &str) -> Vec<(String, String)> {
    match load(text) {
        Ok(config) => panic!("expected errors, got {config:#?}"),
        Err(e) => e.0.into_iter().map(|e| (e.path, e.message)).collect(),
    }
}

/// Expects exactly one error, at `path`, whose message contains `needle`.
fn assert_one_error(text: &str, path: &str, needle: &str) {
    let errs = errors(text);
    assert_eq!(errs.len(), 1, "{text}\n=> {errs:#?}");
    assert_eq!(errs[0].0, path, "{text}\n=> {errs:#?}");
    assert!(
        errs[0].1.contains(needle),
        "{text}\n=> {:?} lacks {needle:?}",
        errs[0].1
    );
}

// ---------------------------------------------------------------------------------------------
// Defaults

#[test]
fn no_file_gives_documented_defaults() {
    let c = Config::load(None, &Overrides::default(), &no_env()).unwrap();
    assert_eq!(c, Config::default());
    assert_eq!(c.node.name.as_str(), "outpost");
    assert!(c.node.labels.is_empty());
    assert_eq!(c.node.capabilities, ["mqtt", "store-and-forward"]);
    assert_eq!(
        c.broker.listeners,
        ["127.0.0.1:1883".parse::<SocketAddr>().unwrap()]
    );
    assert_eq!(c.broker.max_connections, 1000);
    assert_eq!(c.broker.max_packet_size, 256 * 1024);
    assert_eq!(c.broker.max_inflight, 32);
    assert_eq!(c.broker.max_inbound_pending, 64);
    assert_eq!(c.broker.max_queued_messages, 1000);
    assert_eq!(c.broker.max_retained, 10_000);
    assert_eq!(c.broker.max_retained_bytes, 16 << 20);
    assert_eq!(c.broker.max_sessions, 1000);
    assert_eq!(c.broker.session_expiry_311, Duration::from_secs(7 * 86_400));
    assert_eq!(c.broker.max_session_expiry, Duration::from_secs(7 * 86_400));
    assert_eq!(c.broker.connect_timeout, Duration::from_secs(10));
    assert_eq!(
        c.coap.listeners,
        ["0.0.0.0:5683".parse::<SocketAddr>().unwrap()]
    );
    assert_eq!(c.coap.ingest_path, "t");
    assert_eq!(c.coap.topic_prefix, "sensors");
    assert_eq!(c.coap.max_payload, 64 * 1024);
    assert_eq!(c.coap.exchange_lifetime, Duration::from_secs(247));
    assert_eq!(c.coap.max_exchanges, 4096);
    assert_eq!(c.coap.max_observers, 64);
    assert_eq!(CoapConfig::DEFAULT_PORT, 5683);
    assert!(c.observe.is_empty());
    assert_eq!(c.storage.data_dir, PathBuf::from("outpost-data"));
    assert_eq!(
        c.storage.db_path(),
        PathBuf::from("outpost-data").join("outpost.db")
    );
    assert_eq!(c.storage.quota, 1 << 30);
    assert_eq!(c.storage.ttl, None);
    assert_eq!(c.storage.when_full, WhenFull::EvictLowestOldest);
    assert_eq!(c.storage.commit_batch_records, 512);
    assert_eq!(c.storage.commit_interval, Duration::ZERO);
    assert_eq!(c.storage.durability, Durability::Full);
    assert_eq!(c.storage.dead_letter_max_records, 1000);
    assert_eq!(c.storage.dead_letter_max_bytes, 4 << 20);
    assert_eq!(c.storage.refused_max_records, 1000);
    assert_eq!(c.storage.refused_max_bytes, 64 << 20);
    assert!(c.routes.is_empty());
    assert_eq!(c.default_route, RouteTarget::Cloud);
    assert_eq!(c.upstream, None);
    assert_eq!(c.sync.inflight_window, 100);
    assert_eq!(c.sync.read_batch, 256);
    assert_eq!(c.sync.backoff_min, Duration::from_millis(100));
    assert_eq!(c.sync.backoff_max, Duration::from_secs(1));
    assert_eq!(c.log.level, "info");
    assert_eq!(
        c.health.listen,
        Some("127.0.0.1:9180".parse::<SocketAddr>().unwrap())
    );
    assert_eq!(c.health.resource_interval, Some(Duration::from_secs(30)));
    assert_eq!(c.health.resource_priority, Priority::Low);
    assert_eq!(c.health.heartbeat_interval, Duration::from_secs(60));
    assert!(c.checks.is_empty());
}

#[test]
fn empty_file_equals_no_file() {
    assert_eq!(load_ok(""), Config::default());
    assert_eq!(load_ok("# only a comment\n"), Config::default());
}

#[test]
fn default_toml_parses_to_exactly_the_defaults() {
    let from_text = load_ok(default_config_toml());
    let from_none = Config::load(None, &Overrides::default(), &no_env()).unwrap();
    assert_eq!(from_text, from_none);
}

/// Strips one leading `#` (and a space after it) from each line of the commented-out block that
/// starts with `start` and runs to the next blank line.
fn uncomment_block(text: &str, start: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let first = lines.iter().position(|l| *l == start).expect("block start");
    lines[first..]
        .iter()
        .take_while(|l| !l.trim().is_empty())
        .map(|l| {
            l.strip_prefix("# ")
                .or_else(|| l.strip_prefix('#'))
                .unwrap_or(l)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn default_toml_examples_are_valid() {
    let defaults = default_config_toml();
    let routes = uncomment_block(defaults, "# [[route]]");
    let upstream = uncomment_block(defaults, "# [upstream]");
    let text = format!("{routes}\n\n{upstream}\n");
    let env = BTreeMap::from([("OUTPOST_UPSTREAM_PASSWORD".to_owned(), "pw".to_owned())]);
    let c = Config::load(Some(&text), &Overrides::default(), &env)
        .unwrap_or_else(|e| panic!("{text}\n=> {e}"));
    assert_eq!(c.routes.len(), 2);
    assert_eq!(c.routes[0].priority, Priority::High);
    assert_eq!(c.routes[0].format, Some(PayloadFormat::SenmlCbor));
    assert_eq!(c.routes[0].store, StoreMode::Normalised);
    assert_eq!(c.routes[1].target, RouteTarget::Local);
    assert_eq!(
        (c.routes[1].format, c.routes[1].store),
        (None, StoreMode::Original)
    );
    let up = c.upstream.expect("upstream");
    assert_eq!(up.url.to_string(), "mqtts://broker.example.com:8883");
    assert_eq!(up.password.as_ref().map(Secret::expose), Some("pw"));
    // The example lists the defaults of the keys it shows.
    let by_url = Config::load(
        Some("[upstream]\nurl = \"mqtts://broker.example.com\"\nusername = \"gateway\"\npassword = \"pw\""),
        &Overrides::default(),
        &no_env(),
    )
    .unwrap();
    assert_eq!(Some(up), by_url.upstream);
}

#[test]
fn default_toml_observe_examples_are_valid() {
    let text = uncomment_block(default_config_toml(), "# [[observe]]");
    let c = load(&text).unwrap_or_else(|e| panic!("{text}\n=> {e}"));
    assert_eq!(
        c.observe,
        [
            ObserveConfig {
                target: "192.168.1.20:5683".parse().unwrap(),
                path: "/temp".into(),
                uri: "coap://192.168.1.20:5683/temp".into(),
                topic: "sensors/dev20/temp".into(),
            },
            ObserveConfig {
                target: "[fd00::20]:5683".parse().unwrap(),
                path: "/env/humidity".into(),
                uri: "coap://[fd00::20]/env/humidity".into(),
                topic: "sensors/dev20/humidity".into(),
            },
        ]
    );
}

#[test]
fn default_toml_check_examples_are_valid() {
    let text = uncomment_block(default_config_toml(), "# [[check]]");
    let c = load(&text).unwrap_or_else(|e| panic!("{text}\n=> {e}"));
    let kinds: Vec<&str> = c.checks.iter().map(|c| c.kind.as_str()).collect();
    assert_eq!(kinds, ["http", "tcp", "command"]);
    // The first example lists the defaults of the keys it shows.
    let http = &c.checks[0];
    assert_eq!(http.interval, Duration::from_secs(30));
    assert_eq!(http.timeout, Duration::from_secs(5));
    assert_eq!((http.failure_threshold, http.recovery_threshold), (3, 1));
    let CheckKind::Http {
        url,
        expected_status,
        headers,
    } = &http.kind
    else {
        panic!("{http:?}")
    };
    assert_eq!(url.to_string(), "http://127.0.0.1:8080/health");
    assert_eq!(*expected_status, 200);
    assert_eq!(headers["Authorization"].expose(), "Bearer change-me");
    let minimal = load_ok(
        "[[check]]\nname = \"x\"\nkind = \"http\"\nurl = \"http://127.0.0.1:8080/health\"\nheaders = { Authorization = \"Bearer change-me\" }",
    );
    assert_eq!(minimal.checks[0].kind, http.kind);
    assert_eq!(
        (minimal.checks[0].interval, minimal.checks[0].timeout),
        (http.interval, http.timeout)
    );
}

#[test]
fn default_toml_mentions_every_key() {
    let text = default_config_toml();
    for key in [
        "default_route",
        "name",
        "labels",
        "capabilities",
        "listeners",
        "max_connections",
        "max_packet_size",
        "max_inflight",
        "max_inbound_pending",
        "max_queued_messages",
        "max_queued_bytes",
        "max_retained",
        "max_retained_bytes",
        "max_sessions",
        "session_expiry_311",
        "max_session_expiry",
        "max_keep_alive",
        "connect_timeout",
        "coap",
        "ingest_path",
        "max_payload",
        "exchange_lifetime",
        "max_exchanges",
        "max_observers",
        "observe",
        "uri",
        "topic",
        "data_dir",
        "quota",
        "ttl",
        "when_full",
        "commit_batch_records",
        "commit_interval",
        "durability",
        "dead_letter_max_records",
        "dead_letter_max_bytes",
        "refused_max_records",
        "refused_max_bytes",
        "qos0_inflight_bytes",
        "dead_letter_queue_bytes",
        "implicit",
        "implicit_coap",
        "max_devices",
        "filter",
        "target",
        "priority",
        "upstream_topic",
        "format",
        "store",
        "url",
        "client_id",
        "username",
        "password",
        "password_env",
        "ca_file",
        "keep_alive",
        "protocol",
        "max_packet_size",
        "metadata",
        "topic_prefix",
        "command_topic",
        "clean_session",
        "inflight_window",
        "read_batch",
        "backoff_min",
        "backoff_max",
        "level",
        "listen",
        "resource_interval",
        "resource_priority",
        "heartbeat_interval",
        "kind",
        "expected_status",
        "headers",
        "address",
        "command",
        "interval",
        "timeout",
        "failure_threshold",
        "recovery_threshold",
    ] {
        assert!(
            text.contains(&format!("{key} =")) || text.contains(&format!("{key}]")),
            "{key}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A full file

#[test]
fn full_file_is_typed() {
    let c = load_ok(
        r##"
        default_route = "local"
        [node]
        name = "gw-7"
        labels = { location = "plant-3", zone = "a" }
        capabilities = ["mqtt"]
        [broker]
        listeners = ["127.0.0.1:1883", "[::1]:1884"]
        max_packet_size = 1048576
        max_inflight = 65535
        [storage]
        data_dir = "/var/lib/outpost"
        quota = "512MiB"
        ttl = "7d"
        when_full = "reject-new"
        commit_interval = "1s"
        durability = "normal"
        [[route]]
        filter = "sensors/+/temp"
        priority = "low"
        upstream_topic = "plant/{node}/{level2}"
        [[route]]
        filter = "#"
        target = "local"
        [upstream]
        url = "mqtt://10.0.0.5:1884"
        client_id = "gw"
        username = "u"
        keep_alive = "1m"
        protocol = "5"
        max_packet_size = "100KB"
        metadata = "envelope"
        topic_prefix = "factory/eu"
        command_topic = false
        clean_session = true
        [sync]
        backoff_min = "1s"
        backoff_max = "1s"
        [log]
        level = "trace"
        "##,
    );
    assert_eq!(c.default_route, RouteTarget::Local);
    assert_eq!(c.node.labels["location"], "plant-3");
    assert_eq!(c.broker.listeners.len(), 2);
    assert_eq!(c.broker.max_packet_size, 1 << 20);
    assert_eq!(c.storage.quota, 512 << 20);
    assert_eq!(c.storage.ttl, Some(Duration::from_secs(7 * 86_400)));
    assert_eq!(c.storage.when_full, WhenFull::RejectNew);
    assert_eq!(c.storage.durability, Durability::Normal);
    assert_eq!(
        c.storage.db_path(),
        PathBuf::from("/var/lib/outpost/outpost.db")
    );
    let r = &c.routes[0];
    assert_eq!((r.target, r.priority), (RouteTarget::Cloud, Priority::Low));
    assert_eq!(
        r.upstream_topic.render("p", "gw-7", "sensors/s1/temp"),
        "plant/gw-7/s1"
    );
    assert!(r.filter.matches("sensors/x/temp"));
    let up = c.upstream.unwrap();
    assert_eq!(
        up.url,
        UpstreamUrl {
            tls: false,
            host: "10.0.0.5".into(),
            port: 1884
        }
    );
    assert_eq!(up.keep_alive, Duration::from_secs(60));
    assert_eq!(up.protocol, UpstreamProtocol::V5);
    assert_eq!(up.max_packet_size, 100_000);
    assert_eq!(up.metadata, Some(MetadataMode::Envelope));
    assert_eq!(up.metadata_for(MqttVersion::V5), MetadataMode::Envelope);
    assert_eq!(up.password, None);
    assert_eq!(up.topic_prefix, "factory/eu");
    assert!(!up.command_topic && up.clean_session);
    assert_eq!(c.log.level, "trace");
}

#[test]
fn upstream_defaults_follow_the_node_name() {
    let c = load_ok("[node]\nname = \"gw-2\"\n[upstream]\nurl = \"mqtts://cloud\"\n");
    let up = c.upstream.unwrap();
    assert_eq!(up.client_id, "outpost-gw-2");
    assert_eq!((up.url.tls, up.url.port), (true, 8883));
    assert_eq!(up.keep_alive, Duration::from_secs(30));
    assert_eq!(up.protocol, UpstreamProtocol::Auto);
    assert_eq!(up.max_packet_size, 268_435_455);
    assert_eq!(up.max_packet_size, MQTT_MAX_PACKET_SIZE);
    assert_eq!(up.metadata, None);
    assert_eq!(up.metadata_for(MqttVersion::V5), MetadataMode::Properties);
    assert_eq!(up.metadata_for(MqttVersion::V311), MetadataMode::None);
    assert_eq!(up.topic_prefix, "outpost");
    assert!(up.command_topic && !up.clean_session);
    assert_eq!((up.username, up.password, up.ca_file), (None, None, None));
}

// ---------------------------------------------------------------------------------------------
// Shape errors: one error, with path and line

#[test]
fn syntax_error_is_one_error_with_its_line() {
    let errs = errors("[broker]\nmax_inflight = = 3\n");
    assert_eq!(errs.len(), 1);
    assert!(errs[0].1.contains("line 2"), "{errs:?}");
}

#[test]
fn unknown_key_is_refused_with_its_path_and_line() {
    let errs = errors("[storage]\nquota = \"1GiB\"\nqouta = \"2GiB\"\n");
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].0, "storage.qouta");
    assert!(
        errs[0].1.contains("qouta") && errs[0].1.contains("line 3"),
        "{errs:?}"
    );
    let errs = errors("colour = \"blue\"\n");
    assert!(errs[0].1.contains("colour"), "{errs:?}");
    let errs = errors("[[route]]\nfilter = \"a\"\ntargte = \"local\"\n");
    assert_eq!(errs[0].0, "route[0].targte");
}

#[test]
fn wrong_toml_type_names_its_key() {
    assert_one_error(
        "[broker]\nmax_connections = \"many\"\n",
        "broker.max_connections",
        "line 2",
    );
    assert_one_error("[sync]\nbackoff_min = 5\n", "sync.backoff_min", "unit");
    assert_one_error("[storage]\nquota = true\n", "storage.quota", "byte size");
}

// ---------------------------------------------------------------------------------------------
// Each validation rule

#[test]
fn node_rules() {
    assert_one_error("[node]\nname = \"\"", "node.name", "empty");
    assert_one_error("[node]\nname = \"gw/1\"", "node.name", "'/'");
    assert_one_error(
        &format!("[node]\nname = \"{}\"", "n".repeat(65)),
        "node.name",
        "64",
    );
    assert_one_error(
        "[node]\ncapabilities = [\"a\", \"a\"]",
        "node.capabilities[1]",
        "duplicate",
    );
    assert_one_error(
        "[node]\ncapabilities = [\"\"]",
        "node.capabilities[0]",
        "empty",
    );
    assert_one_error("[node.labels]\n\"\" = \"x\"", "node.labels", "empty");
    assert_one_error(
        "[node.labels]\nzone = \"a\\nb\"",
        "node.labels.zone",
        "control",
    );
}

#[test]
fn listener_rules() {
    assert_one_error(
        "[broker]\nlisteners = []",
        "broker.listeners",
        "at least one",
    );
    assert_one_error(
        "[broker]\nlisteners = [\"127.0.0.1:1883\", \"localhost:1883\"]",
        "broker.listeners[1]",
        "invalid socket address \"localhost:1883\"",
    );
    assert_one_error(
        "[broker]\nallow_anonymous = true\nlisteners = [\"0.0.0.0:1883\", \"[::]:1883\", \"0.0.0.0:1883\"]",
        "broker.listeners[2]",
        "duplicate of broker.listeners[0]",
    );
    // Port 0 means "any free port": two of them are fine (tests use this).
    let c = load_ok("[broker]\nlisteners = [\"127.0.0.1:0\", \"127.0.0.1:0\"]");
    assert_eq!(c.broker.listeners.len(), 2);
}

#[test]
fn broker_limits() {
    for (key, bad, needle) in [
        ("max_connections", "0", "at least 1"),
        ("max_inflight", "0", "between 1 and 65535"),
        ("max_inflight", "65536", "between 1 and 65535"),
        ("max_inbound_pending", "-1", "between 1 and 65535"),
        ("max_queued_messages", "0", "at least 1"),
        ("max_packet_size", "0", "between 1 and 268435455"),
        ("max_packet_size", "\"256MiB\"", "between 1 and 268435455"),
        ("max_packet_size", "-5", "negative"),
        ("max_packet_size", "\"12XB\"", "invalid size \"12XB\""),
        ("connect_timeout", "\"0s\"", "at least"),
        ("connect_timeout", "\"soon\"", "invalid duration \"soon\""),
        ("max_queued_bytes", "0", "at least 1 bytes"),
        ("max_queued_bytes", "\"lots\"", "invalid size"),
        ("max_keep_alive", "\"0s\"", "between 1s and 65535s"),
        ("max_keep_alive", "\"65536s\"", "between 1s and 65535s"),
    ] {
        assert_one_error(
            &format!("[broker]\n{key} = {bad}"),
            &format!("broker.{key}"),
            needle,
        );
    }
    assert_eq!(
        load_ok("[broker]\nmax_packet_size = 268435455")
            .broker
            .max_packet_size,
        268_435_455
    );
    let c = load_ok("[broker]\nmax_queued_bytes = \"64KiB\"\nmax_keep_alive = \"2m\"");
    assert_eq!(c.broker.max_queued_bytes, 65_536);
    assert_eq!(c.broker.max_keep_alive, Some(Duration::from_secs(120)));
    let c = load_ok("[broker]\nmax_keep_alive = \"off\"");
    assert_eq!(c.broker.max_keep_alive, None);
}

#[test]
fn retained_and_session_bounds_are_validated_with_their_paths() {
    for (key, bad, needle) in [
        ("max_retained", "0", "at least 1"),
        ("max_retained", "\"many\"", "invalid type"),
        ("max_retained_bytes", "0", "at least 1 bytes"),
        ("max_retained_bytes", "\"16 MeB\"", "invalid size"),
        ("max_sessions", "-1", "at least 0"),
        ("session_expiry_311", "\"0s\"", "between 1s and 4294967295s"),
        (
            "session_expiry_311",
            "\"200y\"",
            "between 1s and 4294967295s",
        ),
        ("session_expiry_311", "\"never\"", "invalid duration"),
        ("max_session_expiry", "\"0s\"", "between 1s and 4294967294s"),
        (
            "max_session_expiry",
            "\"4294967295s\"",
            "between 1s and 4294967294s",
        ),
        (
            "max_session_expiry",
            "\"1500ms\"",
            "whole number of seconds",
        ),
    ] {
        assert_one_error(
            &format!("[broker]\n{key} = {bad}"),
            &format!("broker.{key}"),
            needle,
        );
    }
    let c = load_ok(
        "[broker]\nmax_retained = 5\nmax_retained_bytes = \"64KiB\"\nmax_sessions = 0\n\
         session_expiry_311 = \"90m\"\nmax_session_expiry = \"1d\"",
    );
    assert_eq!(
        (
            c.broker.max_retained,
            c.broker.max_retained_bytes,
            c.broker.max_sessions
        ),
        (5, 65_536, 0)
    );
    assert_eq!(c.broker.session_expiry_311, Duration::from_secs(5400));
    assert_eq!(c.broker.max_session_expiry, Duration::from_secs(86_400));
}

#[test]
fn storage_rules() {
    for (key, bad, needle) in [
        ("data_dir", "\"\"", "empty"),
        ("quota", "\"12XB\"", "invalid size \"12XB\""),
        ("quota", "\"4095\"", "at least 4096"),
        ("ttl", "\"1 fortnight\"", "invalid duration"),
        (
            "when_full",
            "\"drop\"",
            "\"evict-lowest-oldest\" or \"reject-new\"",
        ),
        ("commit_batch_records", "0", "between 1 and 100000"),
        ("commit_batch_records", "100001", "between 1 and 100000"),
        ("commit_interval", "\"2s\"", "between 0s and 1s"),
        ("durability", "\"paranoid\"", "\"full\" or \"normal\""),
        ("dead_letter_max_records", "0", "at least 1"),
        ("dead_letter_max_records", "-3", "at least 1"),
        ("dead_letter_max_bytes", "\"1023\"", "at least 1024"),
        ("dead_letter_max_bytes", "1023", "at least 1024"),
        ("dead_letter_max_bytes", "\"4 megs\"", "invalid size"),
        ("dead_letter_max_bytes", "-1", "negative"),
        ("refused_max_records", "0", "must be at least 1, got 0"),
        ("refused_max_records", "-3", "must be at least 1, got -3"),
        (
            "refused_max_bytes",
            "\"1023\"",
            "must be at least 1024 bytes, got 1023",
        ),
        (
            "refused_max_bytes",
            "1023",
            "must be at least 1024 bytes, got 1023",
        ),
        (
            "refused_max_bytes",
            "\"64 megs\"",
            "invalid size \"64 megs\"",
        ),
        ("refused_max_bytes", "-1", "must not be negative, got -1"),
    ] {
        assert_one_error(
            &format!("[storage]\n{key} = {bad}"),
            &format!("storage.{key}"),
            needle,
        );
    }
    assert_eq!(load_ok("[storage]\nquota = \"4KiB\"").storage.quota, 4096);
    let dl = load_ok("[storage]\ndead_letter_max_records = 1\ndead_letter_max_bytes = \"1KiB\"");
    assert_eq!(
        (
            dl.storage.dead_letter_max_records,
            dl.storage.dead_letter_max_bytes
        ),
        (1, 1024)
    );
    let refused = load_ok("[storage]\nrefused_max_records = 1\nrefused_max_bytes = \"1KiB\"");
    assert_eq!(
        (
            refused.storage.refused_max_records,
            refused.storage.refused_max_bytes
        ),
        (1, 1024)
    );
    let refused = load_ok("[storage]\nrefused_max_records = 50000\nrefused_max_bytes = 1000000");
    assert_eq!(
        (
            refused.storage.refused_max_records,
            refused.storage.refused_max_bytes
        ),
        (50_000, 1_000_000)
    );
    // An integer beyond i64 is either refused by TOML or reported, never clamped.
    assert!(load("[storage]\nquota = 18446744073709551616").is_err());
    assert_eq!(load_ok("[storage]\nttl = \"0s\"").storage.ttl, None);
    assert_eq!(
        load_ok("[storage]\ncommit_interval = \"0ms\"")
            .storage
            .commit_interval,
        Duration::ZERO
    );
}

#[test]
fn route_rules() {
    assert_one_error(
        "[[route]]\ntarget = \"cloud\"",
        "route[0].filter",
        "required",
    );
    assert_one_error(
        "[[route]]\nfilter = \"a\"\n[[route]]\nfilter = \"b\"\n[[route]]\nfilter = \"a/#/b\"",
        "route[2].filter",
        "\"#\" must be the last level",
    );
    assert_one_error(
        "[[route]]\nfilter = \"a/b+\"",
        "route[0].filter",
        "\"+\" must be a whole level",
    );
    assert_one_error("[[route]]\nfilter = \"\"", "route[0].filter", "empty");
    assert_one_error(
        "[[route]]\nfilter = \"a\"\ntarget = \"edge\"",
        "route[0].target",
        "\"cloud\" or \"local\"",
    );
    assert_one_error(
        "[[route]]\nfilter = \"a\"\npriority = \"urgent\"",
        "route[0].priority",
        "\"high\"",
    );
    assert_one_error(
        "[[route]]\nfilter = \"a/#\"\n[[route]]\nfilter = \"a/#\"",
        "route[1].filter",
        "same filter as route[0]",
    );
    assert_one_error(
        "[[route]]\nfilter = \"a\"\ntarget = \"local\"\nupstream_topic = \"x/{topic}\"",
        "route[0].upstream_topic",
        "no effect",
    );
    assert_one_error(
        "[[route]]\nfilter = \"a\"\ntarget = \"local\"\npriority = \"high\"",
        "route[0].priority",
        "no effect",
    );
    for (template, needle) in [
        ("x/{host}", "unknown placeholder {host}"),
        ("x/{topic", "unbalanced"),
        ("x/}", "unbalanced"),
        ("x/+/{topic}", "'+'"),
        ("x/#", "'#'"),
        ("", "empty"),
    ] {
        assert_one_error(
            &format!("[[route]]\nfilter = \"a\"\nupstream_topic = \"{template}\""),
            "route[0].upstream_topic",
            needle,
        );
    }
    assert_one_error(
        "default_route = \"nowhere\"",
        "default_route",
        "\"cloud\" or \"local\"",
    );
}

#[test]
fn route_format_and_store() {
    let c = load_ok(
        r#"
        [[route]]
        filter = "a"
        format = "text"
        [[route]]
        filter = "b"
        format = "json"
        store = "original"
        [[route]]
        filter = "c"
        format = "cbor"
        [[route]]
        filter = "d"
        format = "senml+json"
        store = "normalised"
        [[route]]
        filter = "e"
        format = "senml+cbor"
        store = "normalised"
        [[route]]
        filter = "f"
        format = "senml+cbor"
        [[route]]
        filter = "g"
        target = "local"
        format = "json"
        [[route]]
        filter = "h"
        "#,
    );
    let got: Vec<(Option<PayloadFormat>, StoreMode)> =
        c.routes.iter().map(|r| (r.format, r.store)).collect();
    use PayloadFormat::*;
    use StoreMode::*;
    assert_eq!(
        got,
        [
            (Some(Text), Original),
            (Some(Json), Original),
            (Some(Cbor), Original),
            (Some(SenmlJson), Normalised),
            (Some(SenmlCbor), Normalised),
            (Some(SenmlCbor), Original),
            (Some(Json), Original),
            (None, Original),
        ]
    );
    assert_eq!(
        PayloadFormat::NAMES,
        ["text", "json", "cbor", "senml+json", "senml+cbor"]
    );
    assert_eq!(SenmlCbor.as_str(), "senml+cbor");
    assert_eq!(SenmlJson.to_string(), "senml+json");
    assert_eq!(StoreMode::NAMES, ["original", "normalised"]);
    assert_eq!(Normalised.to_string(), "normalised");
    assert_eq!(StoreMode::default(), Original);
}

#[test]
fn route_format_and_store_rules() {
    let route = |rest: &str| format!("[[route]]\nfilter = \"a\"\n{rest}");
    assert_one_error(
        &route("format = \"xml\""),
        "route[0].format",
        "unknown value \"xml\"; expected \"text\", \"json\", \"cbor\", \"senml+json\" or \"senml+cbor\"",
    );
    assert_one_error(
        &route("store = \"normalized\""),
        "route[0].store",
        "\"original\" or \"normalised\"",
    );
    assert_one_error(
        &route("store = \"normalised\""),
        "route[0].store",
        "needs format = \"senml+json\" or \"senml+cbor\"",
    );
    for format in ["text", "json", "cbor"] {
        assert_one_error(
            &route(&format!("format = \"{format}\"\nstore = \"normalised\"")),
            "route[0].store",
            &format!("not \"{format}\""),
        );
    }
    // An unknown format is reported once, not again as a reason to refuse `store`.
    assert_one_error(
        &route("format = \"senml\"\nstore = \"normalised\""),
        "route[0].format",
        "unknown value \"senml\"",
    );
    // Nothing is stored for a local route, so `store` is refused there, whatever its value.
    for store in ["original", "normalised"] {
        assert_one_error(
            &route(&format!(
                "target = \"local\"\nformat = \"senml+json\"\nstore = \"{store}\""
            )),
            "route[0].store",
            "no effect on a route with target \"local\"",
        );
    }
    assert_one_error(
        "[[route]]\nfilter = \"a\"\n[[route]]\nfilter = \"b\"\nformat = \"cbor\"\nstore = \"normalised\"",
        "route[1].store",
        "senml",
    );
    assert_one_error(&route("fromat = \"json\""), "route[0].fromat", "fromat");
    assert_one_error(&route("format = 1"), "route[0].format", "line 3");
}

#[test]
fn upstream_url_rules() {
    assert_one_error("[upstream]\nclient_id = \"x\"", "upstream.url", "required");
    assert_one_error(
        "[upstream]\nurl = \"http://broker\"",
        "upstream.url",
        "unsupported scheme \"http\"; expected mqtt or mqtts",
    );
    assert_one_error(
        "[upstream]\nurl = \"broker:1883\"",
        "upstream.url",
        "expected mqtt://host",
    );
    assert_one_error(
        "[upstream]\nurl = \"mqtt://broker:99999\"",
        "upstream.url",
        "invalid port",
    );
    assert_one_error(
        "[upstream]\nurl = \"mqtt://u:p@broker\"",
        "upstream.url",
        "credentials",
    );
}

#[test]
fn upstream_field_rules() {
    let up = |rest: &str| format!("[upstream]\nurl = \"mqtts://b\"\n{rest}");
    assert_one_error(&up("client_id = \"\""), "upstream.client_id", "empty");
    assert_one_error(
        &up(&format!("client_id = \"{}\"", "c".repeat(65_536))),
        "upstream.client_id",
        "65535",
    );
    assert_one_error(
        &up("keep_alive = \"4s\""),
        "upstream.keep_alive",
        "between 5s and",
    );
    assert_one_error(
        &up("keep_alive = \"65536s\""),
        "upstream.keep_alive",
        "between 5s and 65535s",
    );
    assert_one_error(
        &up("keep_alive = \"5500ms\""),
        "upstream.keep_alive",
        "whole number of seconds",
    );
    assert_one_error(
        &up("protocol = \"4\""),
        "upstream.protocol",
        "unknown value \"4\"; expected \"auto\", \"5\" or \"3.1.1\"",
    );
    assert_one_error(&up("topic_prefix = \"\""), "upstream.topic_prefix", "empty");
    assert_one_error(
        &up("topic_prefix = \"a/+\""),
        "upstream.topic_prefix",
        "wildcards",
    );
    assert_one_error(&up("topic_prefix = \"a/\""), "upstream.topic_prefix", "'/'");
    assert_one_error(&up("topic_prefix = \"/a\""), "upstream.topic_prefix", "'/'");
    assert_one_error(
        &up("ca_file = \"/nonexistent/ca.pem\""),
        "upstream.ca_file",
        "does not exist",
    );
    assert_one_error(
        "[upstream]\nurl = \"mqtt://b\"\nca_file = \"/nonexistent/ca.pem\"",
        "upstream.ca_file",
        "no TLS",
    );
    // MQTT 3.1.1 forbids a password without a username; MQTT 5 allows it; "auto" (the
    // default) may fall back to 3.1.1.
    assert_one_error(
        &up("password = \"p\""),
        "upstream.username",
        "requires a username",
    );
    assert_one_error(
        &up("password = \"p\""),
        "upstream.username",
        "protocol \"auto\" falls back to 3.1.1",
    );
    assert_one_error(
        &up("password = \"p\"\nprotocol = \"3.1.1\""),
        "upstream.username",
        "MQTT 3.1.1 requires a username when a password is set",
    );
    assert!(
        load_ok(&up("password = \"p\"\nprotocol = \"5\""))
            .upstream
            .unwrap()
            .password
            .is_some()
    );
    // The system roots are used when mqtts has no ca_file.
    assert_eq!(load_ok(&up("")).upstream.unwrap().ca_file, None);
}

#[test]
fn upstream_protocol_values() {
    let up = |rest: &str| {
        load_ok(&format!("[upstream]\nurl = \"mqtts://b\"\n{rest}"))
            .upstream
            .unwrap()
    };
    assert_eq!(up("").protocol, UpstreamProtocol::Auto);
    assert_eq!(up("protocol = \"auto\"").protocol, UpstreamProtocol::Auto);
    assert_eq!(up("protocol = \"5\"").protocol, UpstreamProtocol::V5);
    assert_eq!(up("protocol = \"3.1.1\"").protocol, UpstreamProtocol::V311);
    let bad = |value: &str| format!("[upstream]\nurl = \"mqtts://b\"\nprotocol = {value}");
    for value in ["\"4\"", "\"v5\"", "\"3.1\"", "\"AUTO\"", "\"\""] {
        assert_one_error(
            &bad(value),
            "upstream.protocol",
            "; expected \"auto\", \"5\" or \"3.1.1\"",
        );
    }
    // A number is the wrong TOML type: one error at the key.
    let errs = errors(&bad("5"));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].0, "upstream.protocol", "{errs:?}");
}

#[test]
fn upstream_max_packet_size_values() {
    let size = |value: &str| {
        load_ok(&format!(
            "[upstream]\nurl = \"mqtts://b\"\nmax_packet_size = {value}"
        ))
        .upstream
        .unwrap()
        .max_packet_size
    };
    assert_eq!(size("\"100KB\""), 100_000);
    assert_eq!(size("\"256KiB\""), 256 * 1024);
    assert_eq!(size("1048576"), 1 << 20);
    assert_eq!(size("128"), 128);
    assert_eq!(size("\"128B\""), 128);
    assert_eq!(size("268435455"), 268_435_455);
    assert_eq!(size("\"268435455\""), MQTT_MAX_PACKET_SIZE);
    let bad = |value: &str| format!("[upstream]\nurl = \"mqtts://b\"\nmax_packet_size = {value}");
    for (value, needle) in [
        ("127", "must be between 128 and 268435455 bytes, got 127"),
        ("0", "must be between 128 and 268435455 bytes, got 0"),
        (
            "268435456",
            "must be between 128 and 268435455 bytes, got 268435456",
        ),
        (
            "\"256MiB\"",
            "must be between 128 and 268435455 bytes, got 268435456",
        ),
        ("\"1GB\"", "must be between 128 and 268435455 bytes"),
        ("-1", "must not be negative, got -1"),
        ("\"10 kilos\"", "invalid size \"10 kilos\""),
        ("\"1.5KiB\"", "invalid size \"1.5KiB\""),
    ] {
        assert_one_error(&bad(value), "upstream.max_packet_size", needle);
    }
}

#[test]
fn upstream_metadata_values() {
    let up = |rest: &str| {
        load_ok(&format!("[upstream]\nurl = \"mqtts://b\"\n{rest}"))
            .upstream
            .unwrap()
    };
    // Not written: decided by the version the connection speaks.
    let default = up("");
    assert_eq!(default.metadata, None);
    assert_eq!(
        default.metadata_for(MqttVersion::V5),
        MetadataMode::Properties
    );
    assert_eq!(default.metadata_for(MqttVersion::V311), MetadataMode::None);
    let pinned = up("protocol = \"3.1.1\"");
    assert_eq!(pinned.metadata, None);
    assert_eq!(pinned.metadata_for(MqttVersion::V311), MetadataMode::None);
    // Written: that, whatever the version.
    for (value, mode) in [
        ("properties", MetadataMode::Properties),
        ("envelope", MetadataMode::Envelope),
        ("none", MetadataMode::None),
    ] {
        for protocol in ["auto", "5"] {
            let u = up(&format!(
                "protocol = \"{protocol}\"\nmetadata = \"{value}\""
            ));
            assert_eq!(u.metadata, Some(mode), "{protocol} {value}");
            assert_eq!(u.metadata_for(MqttVersion::V5), mode);
            assert_eq!(u.metadata.unwrap().as_str(), value);
        }
    }
    for value in ["envelope", "none"] {
        let u = up(&format!("protocol = \"3.1.1\"\nmetadata = \"{value}\""));
        assert_eq!(u.metadata_for(MqttVersion::V311).as_str(), value);
    }
    let bad = |value: &str| format!("[upstream]\nurl = \"mqtts://b\"\nmetadata = {value}");
    for value in ["\"cbor\"", "\"Properties\"", "\"\"", "\"off\""] {
        assert_one_error(
            &bad(value),
            "upstream.metadata",
            "; expected \"properties\", \"envelope\" or \"none\"",
        );
    }
    let errs = errors(&bad("false"));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].0, "upstream.metadata", "{errs:?}");
}

#[test]
fn metadata_properties_on_mqtt_3_1_1_is_an_error() {
    let text = "[upstream]\nurl = \"mqtts://b\"\nprotocol = \"3.1.1\"\nmetadata = \"properties\"";
    assert_one_error(
        text,
        "upstream.metadata",
        "\"properties\" needs MQTT 5, and protocol is \"3.1.1\": MQTT 3.1.1 has no properties; use \"envelope\"",
    );
    // Reported beside the section's other problems, each at its key.
    let errs = errors(&format!("{text}\nmax_packet_size = 1\nkeep_alive = \"1s\""));
    let paths: Vec<&str> = errs.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "upstream.max_packet_size",
            "upstream.metadata",
            "upstream.keep_alive"
        ],
        "{errs:#?}"
    );
    // A bad protocol is not also blamed on metadata.
    assert_one_error(
        "[upstream]\nurl = \"mqtts://b\"\nprotocol = \"3\"\nmetadata = \"properties\"",
        "upstream.protocol",
        "unknown value \"3\"",
    );
}

#[test]
fn upstream_with_url_speaks_auto() {
    let node = NodeName::new("gw").unwrap();
    let up = UpstreamConfig::with_url(UpstreamUrl::parse("mqtt://h").unwrap(), &node);
    assert_eq!(up.protocol, UpstreamProtocol::Auto);
    assert_eq!(up.max_packet_size, MQTT_MAX_PACKET_SIZE);
    assert_eq!(up.metadata, None);
    // `outpost run --upstream URL` without a file: the same.
    let overrides = Overrides {
        upstream_url: Some("mqtt://h".into()),
        ..Overrides::default()
    };
    let c = Config::load(None, &overrides, &no_env()).unwrap();
    assert_eq!(
        c.upstream,
        Some(UpstreamConfig::with_url(up.url, &c.node.name))
    );
}

#[test]
fn broker_packets_larger_than_upstream_ones_are_a_warning() {
    // Defaults (no upstream, or the default one): nothing to say.
    assert_eq!(Config::default().warnings(), []);
    assert_eq!(load_ok(default_config_toml()).warnings(), []);
    let upstream = "[upstream]\nurl = \"mqtt://h\"\n";
    assert_eq!(load_ok(upstream).warnings(), []);
    // Equal sizes, or a smaller broker limit: no warning.
    let text = format!("[broker]\nmax_packet_size = \"100KB\"\n{upstream}max_packet_size = 100000");
    assert_eq!(load_ok(&text).warnings(), []);
    // No upstream: nothing can be refused upstream.
    assert_eq!(
        load_ok("[broker]\nmax_packet_size = 268435455").warnings(),
        []
    );
    // Larger: one warning, and the configuration still loads.
    let text =
        format!("[broker]\nmax_packet_size = \"256KiB\"\n{upstream}max_packet_size = \"100KB\"");
    let warnings = load_ok(&text).warnings();
    assert_eq!(
        warnings,
        [ConfigWarning {
            path: "broker.max_packet_size".into(),
            message: "262144 bytes is more than upstream.max_packet_size (100000 bytes): a reading the local broker accepts may be refused upstream (it is kept in the refused table)".into(),
        }]
    );
    assert_eq!(
        warnings[0].to_string(),
        format!("broker.max_packet_size: {}", warnings[0].message)
    );
    // The broker's default (256KiB) against a small upstream limit.
    let text = format!("{upstream}max_packet_size = \"1KiB\"");
    let warnings = load_ok(&text).warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0]
            .message
            .contains("may be refused upstream (it is kept in the refused table)")
    );
}

#[test]
fn broker_state_larger_than_the_store_quota_is_a_warning_with_the_worst_case() {
    // The defaults: 16MiB (+ 2MiB for replacements) + 1000 x 1MiB is just under 1GiB.
    assert_eq!(load_ok(default_config_toml()).warnings(), []);
    // A smaller quota: the state table could outgrow it.
    let warnings = load_ok("[storage]\nquota = \"256MiB\"").warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].path, "broker.max_sessions");
    let message = &warnings[0].message;
    for needle in [
        "outside storage.quota",
        "up to 1018MiB",
        "max_retained_bytes 16MiB and the eighth more that replacements may use, + max_sessions 1000 x max_queued_bytes 1MiB",
        "more than storage.quota (256MiB)",
        "7.8GiB more (max_sessions x max_inflight 32 x max_packet_size 256KiB)",
    ] {
        assert!(message.contains(needle), "{needle:?} not in {message:?}");
    }
    // More sessions than the default quota can take beside them.
    let warnings = load_ok("[broker]\nmax_sessions = 2000").warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    // Fewer sessions, or smaller queues: quiet again.
    assert_eq!(
        load_ok("[storage]\nquota = \"256MiB\"\n[broker]\nmax_sessions = 100").warnings(),
        []
    );
    assert_eq!(
        load_ok("[storage]\nquota = \"256MiB\"\n[broker]\nmax_queued_bytes = \"64KiB\"").warnings(),
        []
    );
}

#[test]
fn ca_file_that_exists_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
    let text = format!(
        "[upstream]\nurl = \"mqtts://b\"\nca_file = {:?}\n",
        ca.to_str().unwrap()
    );
    assert_eq!(load_ok(&text).upstream.unwrap().ca_file, Some(ca.clone()));
    // A directory is not a CA file.
    let text = format!(
        "[upstream]\nurl = \"mqtts://b\"\nca_file = {:?}\n",
        dir.path().to_str().unwrap()
    );
    assert_one_error(&text, "upstream.ca_file", "not a file");
}

#[test]
fn sync_and_log_rules() {
    assert_one_error(
        "[sync]\ninflight_window = 0",
        "sync.inflight_window",
        "between 1 and 65535",
    );
    assert_one_error(
        "[sync]\ninflight_window = 65536",
        "sync.inflight_window",
        "between 1 and 65535",
    );
    assert_one_error("[sync]\nread_batch = 0", "sync.read_batch", "at least 1");
    assert_one_error(
        "[sync]\nbackoff_min = \"0s\"",
        "sync.backoff_min",
        "at least",
    );
    assert_one_error(
        "[sync]\nbackoff_min = \"2s\"\nbackoff_max = \"1s\"",
        "sync.backoff_max",
        "less than sync.backoff_min",
    );
    assert_one_error(
        "[log]\nlevel = \"verbose\"",
        "log.level",
        "\"error\", \"warn\", \"info\", \"debug\" or \"trace\"",
    );
    assert_one_error("[log]\nlevel = \"INFO\"", "log.level", "unknown value");
}

#[test]
fn health_section_is_typed() {
    let c = load_ok(
        "[health]\nlisten = \"[::1]:0\"\nresource_interval = \"1s\"\nresource_priority = \"high\"\nheartbeat_interval = \"5m\"\n",
    );
    assert_eq!(
        c.health,
        HealthConfig {
            listen: Some("[::1]:0".parse().unwrap()),
            resource_interval: Some(Duration::from_secs(1)),
            resource_priority: Priority::High,
            heartbeat_interval: Duration::from_secs(300),
        }
    );
    assert_eq!(load_ok("[health]\nlisten = \"off\"").health.listen, None);
}

#[test]
fn health_section_rules() {
    assert_one_error(
        "[health]\nlisten = \"localhost:9180\"",
        "health.listen",
        "or \"off\"",
    );
    assert_one_error(
        "[health]\nresource_interval = \"500ms\"",
        "health.resource_interval",
        "at least 1s",
    );
    assert_one_error(
        "[health]\nheartbeat_interval = \"0s\"",
        "health.heartbeat_interval",
        "at least 1s",
    );
    assert_one_error(
        "[health]\nresource_priority = \"lowest\"",
        "health.resource_priority",
        "\"high\", \"normal\" or \"low\"",
    );
    assert_one_error("[health]\nlistne = \"off\"", "health.listne", "listne");
    // The endpoint and the broker cannot share a port on overlapping addresses.
    assert_one_error(
        "[broker]\nlisteners = [\"127.0.0.1:1883\"]\n[health]\nlisten = \"127.0.0.1:1883\"",
        "health.listen",
        "overlaps broker.listeners[0]",
    );
    load_ok("[broker]\nlisteners = [\"127.0.0.1:1883\"]\n[health]\nlisten = \"127.0.0.2:1883\"");
    load_ok("[broker]\nlisteners = [\"127.0.0.1:0\"]\n[health]\nlisten = \"127.0.0.1:0\"");
}

#[test]
fn checks_of_every_kind_are_typed() {
    let c = load_ok(
        r#"
        [[check]]
        name = "plc"
        kind = "http"
        url = "http://plc.local:8080/health?deep=1"
        expected_status = 204
        headers = { "X-Token" = "t0ken", Host = "plc" }
        interval = "10s"
        timeout = "2s"
        failure_threshold = 1
        recovery_threshold = 2
        [[check]]
        name = "modbus"
        kind = "tcp"
        address = "[::1]:502"
        interval = "100ms"
        timeout = "50ms"
        [[check]]
        name = "ok-file"
        kind = "command"
        command = ["/usr/bin/test", "-f", "/tmp/ok"]
        "#,
    );
    assert_eq!(c.checks.len(), 3);
    let plc = &c.checks[0];
    assert_eq!(plc.name.as_str(), "plc");
    assert_eq!(
        (plc.interval, plc.timeout),
        (Duration::from_secs(10), Duration::from_secs(2))
    );
    assert_eq!((plc.failure_threshold, plc.recovery_threshold), (1, 2));
    let CheckKind::Http {
        url,
        expected_status,
        headers,
    } = &plc.kind
    else {
        panic!("{plc:?}")
    };
    assert_eq!(
        (url.host.as_str(), url.port, url.path_and_query.as_str()),
        ("plc.local", 8080, "/health?deep=1")
    );
    assert_eq!(*expected_status, 204);
    assert_eq!(headers["X-Token"].expose(), "t0ken");
    assert_eq!(headers["Host"].expose(), "plc");
    let CheckKind::Tcp { address } = &c.checks[1].kind else {
        panic!()
    };
    assert_eq!((address.host.as_str(), address.port), ("::1", 502));
    assert_eq!(c.checks[1].interval, Duration::from_millis(100));
    let cmd = &c.checks[2];
    assert_eq!(
        cmd.kind,
        CheckKind::Command {
            argv: vec!["/usr/bin/test".into(), "-f".into(), "/tmp/ok".into()]
        }
    );
    assert_eq!(
        (
            cmd.interval,
            cmd.timeout,
            cmd.failure_threshold,
            cmd.recovery_threshold
        ),
        (Duration::from_secs(30), Duration::from_secs(5), 3, 1)
    );
}

#[test]
fn check_rules() {
    let http = |rest: &str| format!("[[check]]\nname = \"h\"\nkind = \"http\"\n{rest}");
    let url = "url = \"http://127.0.0.1/\"\n";
    assert_one_error(
        "[[check]]\nkind = \"tcp\"\naddress = \"h:1\"",
        "check[0].name",
        "required",
    );
    assert_one_error(
        "[[check]]\nname = \"a b\"\nkind = \"tcp\"\naddress = \"h:1\"",
        "check[0].name",
        "' '",
    );
    assert_one_error(
        "[[check]]\nname = \"a\"\naddress = \"h:1\"",
        "check[0].kind",
        "required: \"http\", \"tcp\" or \"command\"",
    );
    assert_one_error(
        "[[check]]\nname = \"a\"\nkind = \"ping\"",
        "check[0].kind",
        "unknown value \"ping\"",
    );
    assert_one_error(&http(""), "check[0].url", "required for kind = \"http\"");
    assert_one_error(
        &http("url = \"https://plc/health\""),
        "check[0].url",
        "https is not supported",
    );
    assert_one_error(
        &http("url = \"http://plc/a b\""),
        "check[0].url",
        "percent-encoded",
    );
    assert_one_error(
        &http(&format!("{url}expected_status = 99")),
        "check[0].expected_status",
        "between 100 and 599",
    );
    assert_one_error(
        &http(&format!("{url}headers = {{ \"X Y\" = \"v\" }}")),
        "check[0].headers",
        "invalid header name \"X Y\"",
    );
    assert_one_error(
        &http(&format!("{url}headers = {{ Connection = \"close\" }}")),
        "check[0].headers.Connection",
        "set by the check itself",
    );
    assert_one_error(
        &http(&format!("{url}headers = {{ X-A = \"1\", x-a = \"2\" }}")),
        "check[0].headers.x-a",
        "duplicate header",
    );
    assert_one_error(
        "[[check]]\nname = \"t\"\nkind = \"tcp\"",
        "check[0].address",
        "required for kind = \"tcp\"",
    );
    assert_one_error(
        "[[check]]\nname = \"t\"\nkind = \"tcp\"\naddress = \"plc\"",
        "check[0].address",
        "no port",
    );
    assert_one_error(
        "[[check]]\nname = \"c\"\nkind = \"command\"",
        "check[0].command",
        "required for kind = \"command\"",
    );
    assert_one_error(
        "[[check]]\nname = \"c\"\nkind = \"command\"\ncommand = []",
        "check[0].command",
        "must not be empty",
    );
    assert_one_error(
        "[[check]]\nname = \"c\"\nkind = \"command\"\ncommand = [\"\"]",
        "check[0].command[0]",
        "must not be empty",
    );
    assert_one_error(
        "[[check]]\nname = \"c\"\nkind = \"command\"\ncommand = [\"true\", \"a\\u0000b\"]",
        "check[0].command[1]",
        "NUL",
    );
    // Keys of another kind are refused, not ignored.
    assert_one_error(
        "[[check]]\nname = \"t\"\nkind = \"tcp\"\naddress = \"h:1\"\nurl = \"http://h/\"",
        "check[0].url",
        "applies only to kind = \"http\", not \"tcp\"",
    );
    assert_one_error(
        &http(&format!("{url}command = [\"true\"]")),
        "check[0].command",
        "applies only to kind = \"command\"",
    );
    // Timing.
    assert_one_error(
        &http(&format!("{url}interval = \"50ms\"\ntimeout = \"10ms\"")),
        "check[0].interval",
        "at least 100ms",
    );
    assert_one_error(
        &http(&format!("{url}interval = \"1s\"")),
        "check[0].timeout",
        "5s must be less than interval (1s)",
    );
    assert_one_error(
        &http(&format!("{url}timeout = \"30s\"")),
        "check[0].timeout",
        "less than interval",
    );
    assert_one_error(
        &http(&format!("{url}timeout = \"0s\"")),
        "check[0].timeout",
        "at least 1ms",
    );
    assert_one_error(
        &http(&format!("{url}failure_threshold = 0")),
        "check[0].failure_threshold",
        "between 1 and 4294967295",
    );
    assert_one_error(
        &http(&format!("{url}recovery_threshold = -1")),
        "check[0].recovery_threshold",
        "between 1",
    );
    assert_one_error(
        &format!(
            "{}\n[[check]]\nname = \"h\"\nkind = \"tcp\"\naddress = \"h:1\"",
            http(url)
        ),
        "check[1].name",
        "same name as check[0]",
    );
    assert_one_error(&http(&format!("{url}urll = 1")), "check[0].urll", "urll");
}

#[test]
fn every_check_problem_is_reported_with_its_path() {
    let text = r#"
        [health]
        listen = "nowhere"
        [[check]]
        name = "a"
        kind = "http"
        url = "https://x"
        headers = { "bad name" = "v" }
        [[check]]
        name = "a"
        kind = "tcp"
        address = "x"
        timeout = "1m"
        [[check]]
        name = "c"
        kind = "command"
        command = []
        failure_threshold = 0
    "#;
    let err = load(text).unwrap_err();
    let paths: Vec<&str> = err.0.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "health.listen",
            "check[0].url",
            "check[0].headers",
            "check[1].name",
            "check[1].address",
            "check[1].timeout",
            "check[2].command",
            "check[2].failure_threshold",
        ],
        "{err}"
    );
}

#[test]
fn header_values_are_secrets() {
    let c = load_ok(
        "[[check]]\nname = \"h\"\nkind = \"http\"\nurl = \"http://h/\"\nheaders = { Authorization = \"Bearer hunter2-token\" }",
    );
    for printed in [format!("{c:?}"), format!("{c:#?}")] {
        assert!(!printed.contains("hunter2"), "{printed}");
    }
    // A bad value is reported without echoing it.
    let errs = errors(
        "[[check]]\nname = \"h\"\nkind = \"http\"\nurl = \"http://h/\"\nheaders = { X-Token = \"hunter2\\n\" }",
    );
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].0, "check[0].headers.X-Token");
    assert!(!errs[0].1.contains("hunter2"), "{errs:?}");
}

// ---------------------------------------------------------------------------------------------
// CoAP

#[test]
fn coap_section_is_typed() {
    let c = load_ok(
        r#"
        [broker]
        listeners = ["0.0.0.0:5683"]
        allow_anonymous = true
        [coap]
        listeners = ["0.0.0.0:5683", "[::]:5683", "127.0.0.1:0", "127.0.0.1:0"]
        ingest_path = "ingest.v1"
        topic_prefix = "site/coap"
        max_payload = "16MiB"
        exchange_lifetime = "1h"
        max_exchanges = 16
        max_observers = 1
        "#,
    );
    assert_eq!(
        c.coap,
        CoapConfig {
            listeners: ["0.0.0.0:5683", "[::]:5683", "127.0.0.1:0", "127.0.0.1:0"]
                .iter()
                .map(|a| a.parse().unwrap())
                .collect(),
            ingest_path: "ingest.v1".into(),
            topic_prefix: "site/coap".into(),
            max_payload: 16 << 20,
            exchange_lifetime: Duration::from_secs(3600),
            max_exchanges: 16,
            max_observers: 1,
        }
    );
    // The CoAP endpoint is optional: [] turns it off.
    assert!(load_ok("[coap]\nlisteners = []").coap.listeners.is_empty());
    // Lower bounds are inclusive.
    let low = load_ok("[coap]\nmax_payload = \"1KiB\"\nexchange_lifetime = \"1s\"");
    assert_eq!(
        (low.coap.max_payload, low.coap.exchange_lifetime),
        (1024, Duration::from_secs(1))
    );
    // A section with some keys keeps the defaults of the others.
    let partial = load_ok("[coap]\ningest_path = \"in\"").coap;
    assert_eq!(
        partial,
        CoapConfig {
            ingest_path: "in".into(),
            ..CoapConfig::default()
        }
    );
}

#[test]
fn coap_rules() {
    for (key, bad, needle) in [
        (
            "listeners[1]",
            "listeners = [\"0.0.0.0:5683\", \"coap.local:5683\"]",
            "invalid socket address \"coap.local:5683\"; expected IP:port, e.g. \"0.0.0.0:5683\"",
        ),
        (
            "listeners[2]",
            "listeners = [\"0.0.0.0:5683\", \"[::]:5683\", \"0.0.0.0:5683\"]",
            "duplicate of coap.listeners[0]",
        ),
        ("ingest_path", "ingest_path = \"\"", "empty"),
        ("ingest_path", "ingest_path = \"/t\"", "one path segment"),
        ("ingest_path", "ingest_path = \"t/\"", "one path segment"),
        ("ingest_path", "ingest_path = \"a/b\"", "one path segment"),
        ("ingest_path", "ingest_path = \"a b\"", "' '"),
        ("ingest_path", "ingest_path = \"t%41\"", "'%'"),
        ("ingest_path", "ingest_path = \"..\"", "relative"),
        (
            "ingest_path",
            "ingest_path = \".well-known\"",
            "served by the CoAP endpoint",
        ),
        (
            "ingest_path",
            "ingest_path = \"status\"",
            "served by the CoAP endpoint",
        ),
        ("topic_prefix", "topic_prefix = \"\"", "empty"),
        ("topic_prefix", "topic_prefix = \"s/+\"", "wildcards"),
        ("topic_prefix", "topic_prefix = \"s/#\"", "wildcards"),
        ("topic_prefix", "topic_prefix = \"/s\"", "'/'"),
        ("topic_prefix", "topic_prefix = \"s/\"", "'/'"),
        ("topic_prefix", "topic_prefix = \"s\\u0000\"", "NUL"),
        (
            "max_payload",
            "max_payload = \"1023\"",
            "between 1024 and 16777216",
        ),
        (
            "max_payload",
            "max_payload = \"17MiB\"",
            "between 1024 and 16777216",
        ),
        ("max_payload", "max_payload = -1", "negative"),
        ("max_payload", "max_payload = \"64 KiBs\"", "invalid size"),
        (
            "exchange_lifetime",
            "exchange_lifetime = \"999ms\"",
            "between 1s and 1h",
        ),
        (
            "exchange_lifetime",
            "exchange_lifetime = \"61m\"",
            "between 1s and 1h",
        ),
        (
            "exchange_lifetime",
            "exchange_lifetime = \"soon\"",
            "invalid duration",
        ),
        ("max_exchanges", "max_exchanges = 15", "at least 16, got 15"),
        ("max_observers", "max_observers = 0", "at least 1, got 0"),
    ] {
        assert_one_error(&format!("[coap]\n{bad}"), &format!("coap.{key}"), needle);
    }
    assert_one_error(
        "[coap]\nlisteners = \"0.0.0.0:5683\"",
        "coap.listeners",
        "sequence",
    );
    assert_one_error(
        "[coap]\nmax_exchanges = \"4096\"",
        "coap.max_exchanges",
        "line 2",
    );
    assert_one_error(
        "[coap]\nexchange_lifetime = 247",
        "coap.exchange_lifetime",
        "unit",
    );
    assert_one_error("[coap]\ningest = \"t\"", "coap.ingest", "ingest");
}

#[test]
fn coap_listeners_are_udp_and_may_share_tcp_ports() {
    let c = load_ok(
        "[broker]\nlisteners = [\"127.0.0.1:9180\"]\n[coap]\nlisteners = [\"127.0.0.1:9180\"]\n[health]\nlisten = \"off\"",
    );
    assert_eq!(c.coap.listeners, c.broker.listeners);
    let c = load_ok("[coap]\nlisteners = [\"127.0.0.1:9180\"]");
    assert_eq!(Some(c.coap.listeners[0]), c.health.listen);
    // --listen replaces the broker's listeners only.
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Overrides::default()
    };
    let c = Config::load(None, &overrides, &no_env()).unwrap();
    assert_eq!(c.coap, CoapConfig::default());
}

#[test]
fn observe_entries_are_typed() {
    let c = load_ok(
        r#"
        [[observe]]
        uri = "coap://192.168.1.20:5683/temp"
        topic = "sensors/dev20/temp"
        [[observe]]
        uri = "coap://10.0.0.7/a/b"
        topic = "x"
        [[observe]]
        uri = "coap://[fd00::7]:6000/env"
        topic = "sensors/dev7/env"
        [[observe]]
        uri = "coap://10.0.0.7/a/c"
        topic = "x"
        "#,
    );
    let got: Vec<(String, &str, &str, &str)> = c
        .observe
        .iter()
        .map(|o| {
            (
                o.target.to_string(),
                o.path.as_str(),
                o.uri.as_str(),
                o.topic.as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                "192.168.1.20:5683".to_owned(),
                "/temp",
                "coap://192.168.1.20:5683/temp",
                "sensors/dev20/temp"
            ),
            (
                "10.0.0.7:5683".to_owned(),
                "/a/b",
                "coap://10.0.0.7/a/b",
                "x"
            ),
            (
                "[fd00::7]:6000".to_owned(),
                "/env",
                "coap://[fd00::7]:6000/env",
                "sensors/dev7/env"
            ),
            (
                "10.0.0.7:5683".to_owned(),
                "/a/c",
                "coap://10.0.0.7/a/c",
                "x"
            ),
        ]
    );
    // Observing needs no CoAP listener: it is a client.
    let c =
        load_ok("[coap]\nlisteners = []\n[[observe]]\nuri = \"coap://10.0.0.1/t\"\ntopic = \"t\"");
    assert_eq!(c.observe.len(), 1);
}

#[test]
fn observe_rules() {
    let entry = |uri: &str| format!("[[observe]]\nuri = \"{uri}\"\ntopic = \"t\"");
    for (uri, needle) in [
        ("10.0.0.1/temp", "expected coap://IP[:port]/path"),
        ("coaps://10.0.0.1/temp", "coaps (DTLS) is not supported"),
        (
            "http://10.0.0.1/temp",
            "unsupported scheme \"http\"; expected coap",
        ),
        ("coap://u:p@10.0.0.1/temp", "credentials"),
        ("coap:///temp", "no host"),
        ("coap://sensor.local/temp", "not an IP address"),
        ("coap://fd00::1/temp", "not an IP address"),
        ("coap://[fd00::1/temp", "not an IP address"),
        ("coap://10.0.0.1:0/temp", "invalid port \"0\""),
        ("coap://10.0.0.1:99999/temp", "invalid port \"99999\""),
        ("coap://10.0.0.1", "no resource path"),
        ("coap://10.0.0.1/", "no resource path"),
        ("coap://10.0.0.1/temp?unit=C", "query or fragment"),
        ("coap://10.0.0.1/a//b", "empty segment"),
        ("coap://10.0.0.1/temp/", "empty segment"),
        ("coap://10.0.0.1/a/../b", "relative"),
        ("coap://10.0.0.1/te%6Dp", "percent-encoding"),
        ("", "invalid uri \"\""),
    ] {
        assert_one_error(&entry(uri), "observe[0].uri", needle);
    }
    assert_one_error("[[observe]]\ntopic = \"t\"", "observe[0].uri", "required");
    assert_one_error(
        "[[observe]]\nuri = \"coap://10.0.0.1/t\"",
        "observe[0].topic",
        "required",
    );
    for (topic, needle) in [
        ("", "empty"),
        ("a/+/c", "wildcards"),
        ("a/#", "wildcards"),
        ("a\\u0000", "NUL"),
    ] {
        assert_one_error(
            &format!("[[observe]]\nuri = \"coap://10.0.0.1/t\"\ntopic = \"{topic}\""),
            "observe[0].topic",
            needle,
        );
    }
    assert_one_error(
        &format!(
            "[[observe]]\nuri = \"coap://10.0.0.1/t\"\ntopic = \"{}\"",
            "t".repeat(65_536)
        ),
        "observe[0].topic",
        "at most 65535",
    );
    // The same resource twice, even written differently, is refused at the repeat.
    assert_one_error(
        &format!(
            "{}\n{}\n{}",
            entry("coap://10.0.0.1/a"),
            entry("coap://10.0.0.2/a"),
            entry("COAP://10.0.0.1:5683/a")
        ),
        "observe[2].uri",
        "same resource as observe[0]",
    );
    assert_one_error(
        "[[observe]]\nuri = \"coap://10.0.0.1/t\"\ntopic = \"t\"\ninterval = \"1s\"",
        "observe[0].interval",
        "interval",
    );
    assert_one_error(
        "[[observe]]\nuri = 5\ntopic = \"t\"",
        "observe[0].uri",
        "line 2",
    );
}

#[test]
fn every_coap_problem_is_reported_with_its_path() {
    let text = r#"
        [coap]
        listeners = ["0.0.0.0:5683", "udp:5683"]
        ingest_path = "status"
        topic_prefix = "+"
        max_payload = "1B"
        exchange_lifetime = "2h"
        max_exchanges = 1
        max_observers = 0
        [[observe]]
        uri = "coap://10.0.0.1/a"
        topic = "ok"
        [[observe]]
        uri = "coap://host/a"
        topic = "a/#"
        [[observe]]
        topic = "x"
        [storage]
        dead_letter_max_records = 0
        dead_letter_max_bytes = "1B"
        [[route]]
        filter = "a"
        store = "normalised"
        [[route]]
        filter = "b"
        format = "yaml"
        [[route]]
        filter = "c"
        target = "local"
        store = "original"
    "#;
    let err = load(text).unwrap_err();
    let paths: Vec<&str> = err.0.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "coap.listeners[1]",
            "coap.ingest_path",
            "coap.topic_prefix",
            "coap.max_payload",
            "coap.exchange_lifetime",
            "coap.max_exchanges",
            "coap.max_observers",
            "observe[1].uri",
            "observe[1].topic",
            "observe[2].uri",
            "storage.dead_letter_max_records",
            "storage.dead_letter_max_bytes",
            "route[0].store",
            "route[1].format",
            "route[2].store",
        ],
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Every problem at once

#[test]
fn several_errors_are_all_reported_with_paths() {
    let text = r#"
        [node]
        name = "bad name"
        [broker]
        listeners = ["0.0.0.0:1883", "nope"]
        allow_anonymous = true
        max_inflight = 0
        [storage]
        quota = "12XB"
        when_full = "panic"
        [[route]]
        filter = "ok/#"
        [[route]]
        filter = "x"
        [[route]]
        filter = "a/#/b"
        upstream_topic = "{oops}"
        [upstream]
        url = "http://example.com"
        password = "p"
        password_env = "PW"
        keep_alive = "1s"
        [sync]
        backoff_min = "5s"
        [log]
        level = "loud"
    "#;
    let err = load(text).unwrap_err();
    let paths: Vec<&str> = err.0.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "node.name",
            "broker.listeners[1]",
            "broker.max_inflight",
            "storage.quota",
            "storage.when_full",
            "route[2].filter",
            "route[2].upstream_topic",
            "upstream.url",
            "upstream.password",
            "upstream.keep_alive",
            "sync.backoff_max",
            "log.level",
        ],
        "{err}"
    );
    let display = err.to_string();
    assert_eq!(display.lines().count(), paths.len());
    assert!(
        display.contains("storage.quota: invalid size \"12XB\""),
        "{display}"
    );
    assert!(
        display.contains("route[2].filter: \"#\" must be the last level"),
        "{display}"
    );
    assert!(
        display.contains("upstream.url: unsupported scheme \"http\"; expected mqtt or mqtts"),
        "{display}"
    );
}

#[test]
fn three_wrong_fields_give_three_errors() {
    let errs =
        errors("[broker]\nmax_connections = 0\n[sync]\nread_batch = 0\n[log]\nlevel = \"x\"\n");
    assert_eq!(errs.len(), 3, "{errs:?}");
}

// ---------------------------------------------------------------------------------------------
// Overrides

#[test]
fn listen_override_replaces_the_listener_list() {
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Overrides::default()
    };
    let text = "[broker]\nlisteners = [\"0.0.0.0:1883\", \"[::]:1883\"]\nallow_anonymous = true\n";
    let c = Config::load(Some(text), &overrides, &no_env()).unwrap();
    assert_eq!(
        c.broker.listeners,
        ["127.0.0.1:0".parse::<SocketAddr>().unwrap()]
    );
    // It also fixes a file whose listeners are invalid.
    let c = Config::load(Some("[broker]\nlisteners = []"), &overrides, &no_env()).unwrap();
    assert_eq!(c.broker.listeners.len(), 1);
}

#[test]
fn upstream_override_creates_or_sets_the_section() {
    let overrides = Overrides {
        upstream_url: Some("mqtt://127.0.0.1:18830".into()),
        ..Overrides::default()
    };
    let created = Config::load(None, &overrides, &no_env())
        .unwrap()
        .upstream
        .unwrap();
    assert_eq!(created.url.to_string(), "mqtt://127.0.0.1:18830");
    assert_eq!(created.client_id, "outpost-outpost");

    let text = "[upstream]\nurl = \"mqtts://cloud\"\nclient_id = \"keep-me\"\n";
    let set = Config::load(Some(text), &overrides, &no_env())
        .unwrap()
        .upstream
        .unwrap();
    assert_eq!((set.url.port, set.client_id.as_str()), (18830, "keep-me"));

    let bad = Overrides {
        upstream_url: Some("http://x".into()),
        ..Overrides::default()
    };
    let err = Config::load(None, &bad, &no_env()).unwrap_err();
    assert!(err.has_path("upstream.url"), "{err}");
}

#[test]
fn data_dir_override_sets_the_store_location() {
    let overrides = Overrides {
        data_dir: Some(PathBuf::from("/tmp/x")),
        ..Overrides::default()
    };
    let c = Config::load(
        Some("[storage]\ndata_dir = \"/var/lib/outpost\""),
        &overrides,
        &no_env(),
    )
    .unwrap();
    assert_eq!(c.storage.db_path(), PathBuf::from("/tmp/x/outpost.db"));
}

// ---------------------------------------------------------------------------------------------
// Environment seam and secrets

/// Records which variables were asked for, to prove the seam is the only way in.
struct RecordingEnv(std::cell::RefCell<Vec<String>>, BTreeMap<String, String>);

impl Env for RecordingEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0.borrow_mut().push(name.to_owned());
        self.1.get(name).cloned()
    }
}

#[test]
fn password_env_is_read_through_the_seam() {
    let env = RecordingEnv(
        Default::default(),
        BTreeMap::from([("OUTPOST_PW".to_owned(), "s3cret".to_owned())]),
    );
    let text = "[upstream]\nurl = \"mqtts://b\"\nusername = \"u\"\npassword_env = \"OUTPOST_PW\"\n";
    let c = Config::load(Some(text), &Overrides::default(), &env).unwrap();
    assert_eq!(c.upstream.unwrap().password.unwrap().expose(), "s3cret");
    assert_eq!(*env.0.borrow(), ["OUTPOST_PW"]);
}

#[test]
fn missing_password_env_is_an_error_at_that_key() {
    let text =
        "[upstream]\nurl = \"mqtts://b\"\nusername = \"u\"\npassword_env = \"OUTPOST_PW_UNSET\"\n";
    assert_one_error(
        text,
        "upstream.password_env",
        "\"OUTPOST_PW_UNSET\" is not set",
    );
    assert_one_error(
        "[upstream]\nurl = \"mqtts://b\"\nusername = \"u\"\npassword_env = \"\"\n",
        "upstream.password_env",
        "must name",
    );
}

#[test]
fn password_and_password_env_together_is_an_error() {
    let env = BTreeMap::from([("PW".to_owned(), "x".to_owned())]);
    let text = "[upstream]\nurl = \"mqtts://b\"\nusername = \"u\"\npassword = \"p\"\npassword_env = \"PW\"\n";
    let err = Config::load(Some(text), &Overrides::default(), &env).unwrap_err();
    assert_eq!(err.0.len(), 1, "{err}");
    assert_eq!(err.0[0].path, "upstream.password");
}

#[test]
fn secret_never_printed_by_debug() {
    let text =
        "[upstream]\nurl = \"mqtts://b\"\nusername = \"u\"\npassword = \"hunter2-very-secret\"\n";
    let c = load_ok(text);
    assert_eq!(
        c.upstream
            .as_ref()
            .unwrap()
            .password
            .as_ref()
            .unwrap()
            .expose(),
        "hunter2-very-secret"
    );
    for printed in [format!("{c:?}"), format!("{c:#?}")] {
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("***"));
    }
}

#[test]
fn process_env_reads_the_real_environment() {
    // PATH is set in every environment these tests run in; nothing is written.
    assert!(outpost_config::ProcessEnv.var("PATH").is_some());
    assert_eq!(
        outpost_config::ProcessEnv.var("OUTPOST_SURELY_UNSET_VARIABLE_3141"),
        None
    );
}

// ---------------------------------------------------------------------------------------------
// Never panic

#[test]
fn hostile_inputs_never_panic() {
    for text in [
        "\u{0}",
        "[",
        "[[route]]\n[[route]]\n",
        "route = 5",
        "[node]\nname = \"é\"",
        "[broker]\nmax_connections = 9223372036854775807",
        "[broker]\nmax_connections = -9223372036854775808",
        "[storage]\nquota = 18446744073709551615",
        "[storage]\nquota = \"99999999999999999999TiB\"",
        "[storage]\nttl = \"99999999999999999999999d\"",
        "[upstream]\nurl = \"mqtt://[\"",
        "[upstream]\nurl = \"mqtt://[::1\"",
        "[upstream]\nurl = \"mqtt://[::1]x\"",
        "[upstream]\nurl = \"://\"",
        "[[route]]\nfilter = \"a\"\nupstream_topic = \"{\"",
        "[[route]]\nfilter = \"a\"\nupstream_topic = \"{level}\"",
        "\u{feff}[log]\nlevel = \"info\"",
        "[log]\nlevel = \"\u{1F600}\"",
        "[[observe]]\nuri = \"coap://[\"",
        "[[observe]]\nuri = \"coap://[]:\"\ntopic = \"\"",
        "[[observe]]\nuri = \"coap://\u{e9}/\u{e9}\"",
        "[[observe]]\nuri = \"\u{e9}://\"",
        "[[observe]]\nuri = \"coap://1.2.3.4:\u{e9}/x\"",
        "[coap]\ningest_path = \"\u{e9}\"\nmax_payload = 18446744073709551615",
        "[coap]\nmax_exchanges = 9223372036854775807\nmax_observers = -9223372036854775808",
        "[coap]\nexchange_lifetime = \"99999999999999999999999d\"",
        "[[route]]\nfilter = \"a\"\nformat = \"\"\nstore = \"\"",
    ] {
        let _ = load(text);
    }
}

#[test]
fn resource_sampling_can_be_switched_off() {
    let c = load_ok("[health]\nresource_interval = \"off\"\n");
    assert_eq!(c.health.resource_interval, None);
    assert_one_error(
        "[health]\nresource_interval = \"500ms\"\n",
        "health.resource_interval",
        "",
    );
}

// ---------------------------------------------------------------------------------------------
// Broker authentication and authorisation

/// Generated by `mosquitto_passwd -b FILE alice secret` (mosquitto 2.0.11).
const ALICE: &str = "alice:$7$101$OGHa2DYnj9xUSOMu$VTsrTPra1zIlZKNn+f7lTNk6fOXrI2/zkYLtqxOuG7JyQMCZWUHM4zTixl8csq0sqDq0tXHqBBFWnV4v9LjT2w==";

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    // TOML basic strings: escape backslashes for any platform's paths.
    path.display().to_string().replace('\\', "\\\\")
}

#[test]
fn by_default_only_loopback_listeners_admit_anonymous_clients() {
    let c = Config::load(None, &Overrides::default(), &no_env()).unwrap();
    assert_eq!(c.broker.allow_anonymous, AllowAnonymous::LoopbackOnly);
    assert_eq!(
        c.broker.listener_settings,
        [ListenerConfig {
            address: "127.0.0.1:1883".parse().unwrap(),
            allow_anonymous: true,
            tls: None,
        }]
    );
    assert!(c.broker.password_file.is_none() && c.broker.acl_file.is_none());
    // A network listener requires a login by default: without a password file nobody could
    // connect there, which is an error that says what to do.
    for text in [
        "[broker]\nlisteners = [\"0.0.0.0:1883\"]",
        "[broker]\nlisteners = [\"127.0.0.1:1883\", \"[::]:1884\"]",
        "[[broker.listener]]\naddress = \"192.168.1.10:1883\"",
    ] {
        let errs = errors(text);
        assert_eq!(errs.len(), 1, "{text}: {errs:?}");
        assert_eq!(errs[0].0, "broker.allow_anonymous", "{text}");
        for needle in [
            "not a loopback address",
            "password_file",
            "allow_anonymous = true",
        ] {
            assert!(
                errs[0].1.contains(needle),
                "{text}: {:?} lacks {needle:?}",
                errs[0].1
            );
        }
    }
    // Saying so admits anonymous clients from the network.
    let c = load_ok("[broker]\nlisteners = [\"0.0.0.0:1883\"]\nallow_anonymous = true");
    assert!(c.broker.listener_settings[0].allow_anonymous);
}

#[test]
fn password_and_acl_files_are_parsed_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let pw = write(&dir, "passwd", &format!("{ALICE}\n"));
    let acl = write(
        &dir,
        "acl",
        "user alice\ntopic alice/#\npattern devices/%c/#\n",
    );
    let c = load_ok(&format!(
        "[broker]\nlisteners = [\"127.0.0.1:1883\", \"0.0.0.0:1884\", \"[::1]:1885\"]\npassword_file = \"{pw}\"\nacl_file = \"{acl}\"\n"
    ));
    let b = &c.broker;
    let passwords = b.password_file.as_ref().unwrap();
    assert_eq!(passwords.users().collect::<Vec<_>>(), ["alice"]);
    assert!(matches!(
        passwords.get("alice"),
        Some(PasswordHash::Pbkdf2Sha512 { .. })
    ));
    let rules = b.acl_file.as_ref().unwrap();
    assert_eq!(rules.user_rules("alice").unwrap().len(), 1);
    assert_eq!(rules.patterns()[0].filter.as_str(), "devices/%c/#");
    // With a password file, anonymous clients are admitted on loopback listeners only.
    assert_eq!(b.allow_anonymous, AllowAnonymous::LoopbackOnly);
    let open: Vec<bool> = b
        .listener_settings
        .iter()
        .map(|l| l.allow_anonymous)
        .collect();
    assert_eq!(open, [true, false, true]);
    assert_eq!(
        b.listeners,
        b.listener_settings
            .iter()
            .map(|l| l.address)
            .collect::<Vec<_>>()
    );
    // Neither hashes nor salts are printed.
    let printed = format!("{c:?}");
    assert!(
        !printed.contains("OGHa") && !printed.contains("VTsr"),
        "{printed}"
    );
}

#[test]
fn bad_auth_files_report_every_line_at_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let pw = write(
        &dir,
        "passwd",
        &format!("{ALICE}\n# ok\nbob:hunter2\ncarol:$6$x\n"),
    );
    let acl = write(&dir, "acl", "topic read\nuser bob\nallow all\n");
    let err = load(&format!(
        "[broker]\npassword_file = \"{pw}\"\nacl_file = \"{acl}\"\n"
    ))
    .unwrap_err();
    let shown: Vec<String> = err.iter().map(ToString::to_string).collect();
    assert_eq!(shown.len(), 4, "{shown:#?}");
    assert!(
        shown[0]
            .starts_with("broker.password_file: line 3: user \"bob\": the password is not hashed"),
        "{shown:#?}"
    );
    assert!(shown[1].starts_with("broker.password_file: line 4: user \"carol\""));
    assert_eq!(
        shown[2],
        "broker.acl_file: line 1: `topic` needs a topic filter"
    );
    assert!(shown[3].starts_with("broker.acl_file: line 3: unknown keyword \"allow\""));
    assert!(!err.to_string().contains("hunter2"), "{err}");

    let missing = dir.path().join("nope").display().to_string();
    assert_one_error(
        &format!("[broker]\npassword_file = \"{missing}\""),
        "broker.password_file",
        "cannot read",
    );
    assert_one_error(
        "[broker]\nacl_file = \"\"",
        "broker.acl_file",
        "must not be empty",
    );
}

#[test]
fn allow_anonymous_values_and_refusing_everyone_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let pw = write(&dir, "passwd", ALICE);
    for (value, expected) in [
        ("true", [true, true]),
        ("false", [false, false]),
        ("\"loopback-only\"", [true, false]),
    ] {
        let c = load_ok(&format!(
            "[broker]\nlisteners = [\"127.0.0.1:1883\", \"10.0.0.1:1883\"]\npassword_file = \"{pw}\"\nallow_anonymous = {value}\n"
        ));
        let open: Vec<bool> = c
            .broker
            .listener_settings
            .iter()
            .map(|l| l.allow_anonymous)
            .collect();
        assert_eq!(open, expected, "{value}");
    }
    assert_one_error(
        "[broker]\nallow_anonymous = \"sometimes\"",
        "broker.allow_anonymous",
        "expected true, false or \"loopback-only\"",
    );
    assert_one_error(
        "[broker]\nallow_anonymous = 1",
        "broker.allow_anonymous",
        "loopback-only",
    );
    // Without a password file nobody could log in where anonymous clients are refused.
    assert_one_error(
        "[broker]\nallow_anonymous = false",
        "broker.allow_anonymous",
        "no broker.password_file",
    );
    assert_one_error(
        "[broker]\nlisteners = [\"0.0.0.0:1883\"]\nallow_anonymous = \"loopback-only\"",
        "broker.allow_anonymous",
        "loopback-only refuses anonymous clients on 0.0.0.0:1883",
    );
    // ... which is fine when every listener is on loopback.
    load_ok("[broker]\nlisteners = [\"127.0.0.1:1883\"]\nallow_anonymous = \"loopback-only\"");
}

#[test]
fn listener_tables_set_anonymous_per_listener() {
    let dir = tempfile::tempdir().unwrap();
    let pw = write(&dir, "passwd", ALICE);
    let c = load_ok(&format!(
        r#"
        [broker]
        password_file = "{pw}"
        allow_anonymous = false
        [[broker.listener]]
        address = "127.0.0.1:1883"
        [[broker.listener]]
        address = "0.0.0.0:1884"
        allow_anonymous = true
        [[broker.listener]]
        address = "[::]:1885"
        allow_anonymous = "loopback-only"
    "#
    ));
    let got: Vec<(String, bool)> = c
        .broker
        .listener_settings
        .iter()
        .map(|l| (l.address.to_string(), l.allow_anonymous))
        .collect();
    assert_eq!(
        got,
        [
            ("127.0.0.1:1883".to_owned(), false),
            ("0.0.0.0:1884".to_owned(), true),
            ("[::]:1885".to_owned(), false),
        ]
    );
    assert_eq!(c.broker.listeners.len(), 3);

    // The override replaces the tables; the broker-wide policy applies to it.
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Overrides::default()
    };
    let text = format!(
        "[broker]\npassword_file = \"{pw}\"\n[[broker.listener]]\naddress = \"0.0.0.0:1\"\nallow_anonymous = true\n"
    );
    let c = Config::load(Some(&text), &overrides, &no_env()).unwrap();
    assert_eq!(
        c.broker.listener_settings,
        [ListenerConfig {
            address: "127.0.0.1:0".parse().unwrap(),
            allow_anonymous: true,
            tls: None,
        }]
    );
}

#[test]
fn listener_table_problems_have_paths() {
    let text = r#"
        [broker]
        allow_anonymous = true
        [[broker.listener]]
        address = "0.0.0.0:1883"
        [[broker.listener]]
        allow_anonymous = true
        [[broker.listener]]
        address = "nowhere"
        [[broker.listener]]
        address = "0.0.0.0:1883"
        [[broker.listener]]
        address = "10.0.0.1:1883"
        allow_anonymous = false
        [[broker.listener]]
        address = "10.0.0.2:1883"
        allow_anonymous = "maybe"
    "#;
    let err = load(text).unwrap_err();
    let paths: Vec<&str> = err.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "broker.listener[1].address",
            "broker.listener[2].address",
            "broker.listener[3].address",
            "broker.listener[4].allow_anonymous",
            "broker.listener[5].allow_anonymous",
        ],
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("duplicate of broker.listener[0].address"),
        "{err}"
    );
    assert_one_error(
        "[broker]\nlisteners = [\"0.0.0.0:1883\"]\n[[broker.listener]]\naddress = \"127.0.0.1:1883\"",
        "broker.listener",
        "not both",
    );
    assert_one_error("[broker]\nlistener = []", "broker.listener", "at least one");
    assert_one_error(
        "[[broker.listener]]\naddress = \"0.0.0.0:1\"\nport = 1",
        "broker.listener[0].port",
        "unknown field",
    );
}

#[test]
fn default_toml_listener_examples_are_valid() {
    let dir = tempfile::tempdir().unwrap();
    let pw = write(&dir, "passwd", ALICE);
    let tables = uncomment_block(default_config_toml(), "# [[broker.listener]]");
    let text = format!("[broker]\npassword_file = \"{pw}\"\n{tables}\n");
    let c = load(&text).unwrap_or_else(|e| panic!("{text}\n=> {e}"));
    let open: Vec<bool> = c
        .broker
        .listener_settings
        .iter()
        .map(|l| l.allow_anonymous)
        .collect();
    assert_eq!(open, [true, false]);
}

#[test]
fn discovery_section_is_validated_with_every_error_reported() {
    let c = load_ok(
        "[discovery]\nannounce_prefix = \"site/announce\"\nstale_after = \"10s\"\noffline_after = \"1m\"\ninterfaces = [\"eth0\"]\ncoap_interval = \"off\"\n",
    );
    assert_eq!(c.discovery.announce_prefix, "site/announce");
    assert_eq!(c.discovery.stale_after, Duration::from_secs(10));
    assert_eq!(c.discovery.interfaces, ["eth0"]);
    assert_eq!(c.discovery.coap_interval, None);
    let errs = errors(
        "[discovery]\nannounce_prefix = \"a/#\"\nstale_after = \"10m\"\noffline_after = \"1m\"\ninterfaces = [\"eth0\", \"eth0\", \"\"]\nmdns_browse = [\"coap\"]\n",
    );
    let paths: Vec<&str> = errs.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "discovery.announce_prefix",
            "discovery.offline_after",
            "discovery.interfaces[1]",
            "discovery.interfaces[2]",
            "discovery.mdns_browse[0]"
        ],
        "{errs:#?}"
    );
}

#[test]
fn bounds_on_network_input_have_documented_defaults() {
    let c = Config::default();
    assert_eq!(c.storage.qos0_inflight_bytes, 4 << 20);
    assert_eq!(c.storage.dead_letter_queue_bytes, 1 << 20);
    assert!(c.discovery.implicit, "MQTT implicit registration stays on");
    assert!(
        !c.discovery.implicit_coap,
        "CoAP sources are spoofable: off by default"
    );
    assert_eq!(c.discovery.max_devices, 1000);
    let from_text = load_ok(default_config_toml());
    assert_eq!(
        (
            from_text.storage.qos0_inflight_bytes,
            from_text.storage.dead_letter_queue_bytes,
            from_text.discovery.implicit_coap,
            from_text.discovery.max_devices
        ),
        (4 << 20, 1 << 20, false, 1000)
    );
}

#[test]
fn bounds_on_network_input_are_typed() {
    let c = load_ok(
        "[storage]\nqos0_inflight_bytes = \"1KiB\"\ndead_letter_queue_bytes = 65536\n\
         [discovery]\nimplicit_coap = true\nmax_devices = 1\n",
    );
    assert_eq!(c.storage.qos0_inflight_bytes, 1024);
    assert_eq!(c.storage.dead_letter_queue_bytes, 65536);
    assert!(c.discovery.implicit_coap);
    assert_eq!(c.discovery.max_devices, 1);
    let c =
        load_ok("[storage]\nqos0_inflight_bytes = \"1GiB\"\n[discovery]\nmax_devices = 100000\n");
    assert_eq!(c.storage.qos0_inflight_bytes, 1 << 30);
    assert_eq!(c.discovery.max_devices, 100_000);
}

#[test]
fn bounds_on_network_input_rules() {
    for (section, key, bad, needle) in [
        (
            "storage",
            "qos0_inflight_bytes",
            "\"1023\"",
            "must be at least 1024 bytes, got 1023",
        ),
        (
            "storage",
            "qos0_inflight_bytes",
            "0",
            "must be at least 1024 bytes, got 0",
        ),
        (
            "storage",
            "qos0_inflight_bytes",
            "-1",
            "must not be negative, got -1",
        ),
        (
            "storage",
            "qos0_inflight_bytes",
            "\"4 megs\"",
            "invalid size \"4 megs\"",
        ),
        (
            "storage",
            "dead_letter_queue_bytes",
            "1023",
            "must be at least 1024 bytes, got 1023",
        ),
        (
            "storage",
            "dead_letter_queue_bytes",
            "\"lots\"",
            "invalid size \"lots\"",
        ),
        ("discovery", "max_devices", "0", "must be at least 1, got 0"),
        (
            "discovery",
            "max_devices",
            "-5",
            "must be at least 1, got -5",
        ),
        (
            "discovery",
            "implicit_coap",
            "\"yes\"",
            "expected a boolean (line 2",
        ),
    ] {
        assert_one_error(
            &format!("[{section}]\n{key} = {bad}"),
            &format!("{section}.{key}"),
            needle,
        );
    }
    // Every problem at once, each at its path.
    let errs = errors(
        "[storage]\nqos0_inflight_bytes = 1\ndead_letter_queue_bytes = 2\n[discovery]\nmax_devices = 0\n",
    );
    let paths: Vec<&str> = errs.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "storage.qos0_inflight_bytes",
            "storage.dead_letter_queue_bytes",
            "discovery.max_devices"
        ],
        "{errs:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// TLS listeners

/// A CA, a server certificate signed by it (with its key), and an unrelated key, as PEM files
/// in `dir`; returns their paths as TOML-ready strings: (ca, cert, key, other_key).
fn tls_files(dir: &tempfile::TempDir) -> (String, String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Outpost test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let other = KeyPair::generate().unwrap();
    (
        write(dir, "ca.pem", &ca.pem()),
        write(dir, "server.pem", &cert.pem()),
        write(dir, "server.key", &key.serialize_pem()),
        write(dir, "other.key", &other.serialize_pem()),
    )
}

#[test]
fn tls_listener_files_are_read_and_checked_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key, _) = tls_files(&dir);
    let c = load_ok(&format!(
        r#"
        [broker]
        allow_anonymous = true
        [[broker.listener]]
        address = "127.0.0.1:1883"
        [[broker.listener]]
        address = "0.0.0.0:8883"
        tls = {{ cert_file = "{cert}", key_file = "{key}" }}
        [[broker.listener]]
        address = "0.0.0.0:8884"
        [broker.listener.tls]
        cert_file = "{cert}"
        key_file = "{key}"
        client_ca_file = "{ca}"
        require_client_cert = true
    "#
    ));
    let l = &c.broker.listener_settings;
    assert_eq!(l[0].tls, None);
    assert_eq!(
        l[1].tls,
        Some(TlsListenerConfig {
            cert_file: PathBuf::from(&cert),
            key_file: PathBuf::from(&key),
            client_ca_file: None,
            require_client_cert: false,
        })
    );
    let t = l[2].tls.as_ref().unwrap();
    assert_eq!(
        t.client_ca_file.as_deref(),
        Some(PathBuf::from(&ca).as_path())
    );
    assert!(t.require_client_cert);
    // The same loader the broker uses; nothing of the key in Debug output.
    let material = t.load().unwrap();
    assert_eq!(material.cert_chain.len(), 1);
    assert!(material.client_roots.is_some());
    let key_text = std::fs::read_to_string(&key).unwrap();
    let key_body = key_text.lines().nth(1).unwrap();
    assert!(!format!("{material:?}{c:?}").contains(key_body));
}

#[test]
fn tls_problems_are_reported_at_their_keys_without_key_material() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key, other) = tls_files(&dir);
    let missing = dir.path().join("nope.pem").display().to_string();
    let garbage_key = write(
        &dir,
        "garbage.key",
        "-----BEGIN PRIVATE KEY-----\nTOPSECRETMATERIAL!!\n-----END PRIVATE KEY-----\n",
    );
    let at = |i: usize, k: &str| format!("broker.listener[{i}].tls.{k}");
    let listener = |i: usize, tls: &str| {
        format!(
            "[[broker.listener]]\naddress = \"127.0.0.1:{}\"\ntls = {tls}\n",
            8000 + i
        )
    };
    let text = [
        listener(
            0,
            &format!(r#"{{ cert_file = "{missing}", key_file = "{missing}" }}"#),
        ),
        listener(
            1,
            &format!(r#"{{ cert_file = "{key}", key_file = "{cert}" }}"#),
        ),
        listener(
            2,
            &format!(r#"{{ cert_file = "{cert}", key_file = "{other}" }}"#),
        ),
        listener(
            3,
            &format!(r#"{{ cert_file = "{cert}", key_file = "{garbage_key}" }}"#),
        ),
        listener(
            4,
            &format!(r#"{{ key_file = "{key}", require_client_cert = true }}"#),
        ),
        listener(
            5,
            &format!(r#"{{ cert_file = "{cert}", key_file = "{key}", client_ca_file = "{key}" }}"#),
        ),
        listener(
            6,
            &format!(r#"{{ cert_file = "", key_file = "{key}", client_ca_file = "{ca}" }}"#),
        ),
    ]
    .concat();
    let errs = errors(&text);
    let paths: Vec<&str> = errs.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            at(0, "cert_file"),
            at(0, "key_file"),
            at(1, "cert_file"),
            at(1, "key_file"),
            at(2, "key_file"),
            at(3, "key_file"),
            at(4, "cert_file"),
            at(4, "require_client_cert"),
            at(5, "client_ca_file"),
            at(6, "cert_file"),
        ],
        "{errs:#?}"
    );
    let msg = |i: usize| errs[i].1.as_str();
    assert!(
        msg(0).contains("cannot read") && msg(0).contains("nope.pem"),
        "{errs:#?}"
    );
    assert!(msg(2).contains("no PEM certificate"), "{errs:#?}");
    assert!(msg(3).contains("no PEM private key"), "{errs:#?}");
    assert!(msg(4).contains("does not match"), "{errs:#?}");
    assert!(msg(6).contains("required"), "{errs:#?}");
    assert!(msg(7).contains("needs client_ca_file"), "{errs:#?}");
    assert!(msg(9).contains("must not be empty"), "{errs:#?}");
    let all = format!("{errs:?}");
    assert!(!all.contains("TOPSECRET"), "{all}");
    for k in [&key, &other] {
        let body = std::fs::read_to_string(k).unwrap();
        assert!(!all.contains(body.lines().nth(1).unwrap()), "{all}");
    }
    assert_one_error(
        &format!(
            "[[broker.listener]]\naddress = \"127.0.0.1:1\"\ntls = {{ cert_file = \"{cert}\", key_file = \"{key}\", certfile = \"x\" }}"
        ),
        "broker.listener[0].tls.certfile",
        "unknown field",
    );
}

#[test]
fn client_certificates_make_refusing_anonymous_clients_valid_without_passwords() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key, _) = tls_files(&dir);
    let c = load_ok(&format!(
        "[[broker.listener]]\naddress = \"0.0.0.0:8883\"\nallow_anonymous = false\ntls = {{ cert_file = \"{cert}\", key_file = \"{key}\", client_ca_file = \"{ca}\" }}\n"
    ));
    assert!(!c.broker.listener_settings[0].allow_anonymous);
    // Without a client CA nobody could log in there.
    assert_one_error(
        &format!(
            "[[broker.listener]]\naddress = \"0.0.0.0:8883\"\nallow_anonymous = false\ntls = {{ cert_file = \"{cert}\", key_file = \"{key}\" }}\n"
        ),
        "broker.listener[0].allow_anonymous",
        "no broker.password_file",
    );
}

#[test]
fn default_toml_tls_listener_examples_are_valid() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key, _) = tls_files(&dir);
    let pw = write(&dir, "passwd", ALICE);
    let tables = uncomment_block(
        default_config_toml(),
        "# [[broker.listener]]   # MQTT over TLS",
    )
    .replace("/etc/outpost/tls/server.pem", &cert)
    .replace("/etc/outpost/tls/server.key", &key)
    .replace("/etc/outpost/tls/devices-ca.pem", &ca);
    let text = format!("[broker]\npassword_file = \"{pw}\"\n{tables}\n");
    let c = load(&text).unwrap_or_else(|e| panic!("{text}\n=> {e}"));
    let l = &c.broker.listener_settings;
    assert_eq!(l.len(), 2);
    assert!(
        l[0].tls
            .as_ref()
            .is_some_and(|t| t.client_ca_file.is_none())
    );
    assert!(l[1].tls.as_ref().is_some_and(|t| t.require_client_cert));
    for key in [
        "tls",
        "cert_file",
        "key_file",
        "client_ca_file",
        "require_client_cert",
    ] {
        assert!(default_config_toml().contains(&format!("{key} =")), "{key}");
    }
}
