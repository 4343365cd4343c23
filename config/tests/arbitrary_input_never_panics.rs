//! The configuration faces a file an integrator edited by hand: whatever it holds, loading gives a
//! `Config` or a list of errors, never a panic.

use outpost_config::{Config, Overrides};
use proptest::prelude::*;
use std::collections::BTreeMap;

fn load(text: &str) -> Result<Config, outpost_config::ConfigErrors> {
    let env: BTreeMap<String, String> = BTreeMap::new();
    Config::load(Some(text), &Overrides::default(), &env)
}

/// Plausible keys and values, so the generator reaches validation and not only the TOML parser.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\"\"".to_owned()),
        Just("\"#\"".to_owned()),
        Just("\"a/+/#\"".to_owned()),
        Just("\"mqtt://h:0\"".to_owned()),
        Just("\"mqtts://[::1]:99999\"".to_owned()),
        Just("\"1GiB\"".to_owned()),
        Just("\"http://[::1]:8080/h%2\"".to_owned()),
        Just("\"https://h\"".to_owned()),
        Just("\"tcp\"".to_owned()),
        Just("\"command\"".to_owned()),
        Just("\"off\"".to_owned()),
        Just("\"coap://[::1]:5683/a/b\"".to_owned()),
        Just("\"coap://10.0.0.1:0/a//%\"".to_owned()),
        Just("\"senml+cbor\"".to_owned()),
        Just("\"normalised\"".to_owned()),
        Just("\"auto\"".to_owned()),
        Just("\"3.1.1\"".to_owned()),
        Just("\"properties\"".to_owned()),
        Just("\"envelope\"".to_owned()),
        Just("\"256MiB\"".to_owned()),
        Just("127".to_owned()),
        Just("\"status\"".to_owned()),
        Just("[]".to_owned()),
        Just("{ \"X Y\" = \"\\u0000\", Connection = \"x\" }".to_owned()),
        Just("\"-5ms\"".to_owned()),
        Just("-1".to_owned()),
        Just("9223372036854775807".to_owned()),
        Just("[\"0.0.0.0:1883\", \"nope\"]".to_owned()),
        "\"[ -~]{0,12}\"",
        any::<i64>().prop_map(|n| n.to_string()),
    ]
}

fn document() -> impl Strategy<Value = String> {
    let section = prop_oneof![
        Just("node"),
        Just("broker"),
        Just("storage"),
        Just("upstream"),
        Just("sync"),
        Just("log"),
        Just("[route]"),
        Just("health"),
        Just("[check]"),
        Just("coap"),
        Just("[observe]")
    ];
    let key = prop_oneof![
        Just("name"),
        Just("listeners"),
        Just("quota"),
        Just("ttl"),
        Just("url"),
        Just("filter"),
        Just("upstream_topic"),
        Just("priority"),
        Just("keep_alive"),
        Just("backoff_min"),
        Just("backoff_max"),
        Just("max_packet_size"),
        Just("level"),
        Just("protocol"),
        Just("password_env"),
        Just("kind"),
        Just("address"),
        Just("command"),
        Just("headers"),
        Just("expected_status"),
        Just("interval"),
        Just("timeout"),
        Just("failure_threshold"),
        Just("listen"),
        Just("resource_interval"),
        Just("uri"),
        Just("topic"),
        Just("ingest_path"),
        Just("topic_prefix"),
        Just("max_payload"),
        Just("exchange_lifetime"),
        Just("max_exchanges"),
        Just("format"),
        Just("store"),
        Just("dead_letter_max_bytes"),
        Just("metadata"),
        Just("refused_max_records"),
        Just("refused_max_bytes")
    ];
    prop::collection::vec((section, prop::collection::vec((key, value()), 0..5)), 0..6).prop_map(
        |sections| {
            let mut out = String::new();
            for (name, pairs) in sections {
                out.push_str(&format!("[{name}]\n"));
                for (k, v) in pairs {
                    out.push_str(&format!("{k} = {v}\n"));
                }
            }
            out
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        let _ = load(&text);
    }

    #[test]
    fn structured_documents_never_panic(text in document()) {
        match load(&text) {
            // Every reported problem says where it is (a syntax error has an empty path but says
            // "TOML error at line ...").
            Err(errors) => {
                for e in errors.iter() {
                    prop_assert!(!e.message.is_empty());
                }
            }
            Ok(config) => {
                for w in config.warnings() {
                    prop_assert!(!w.path.is_empty() && !w.message.is_empty());
                }
            }
        }
    }
}
