//! A payload that does not decode as the Content-Format it claims (here SenML JSON, 110, with a
//! string where a number must be) is answered 4.00 Bad Request with a diagnostic that names the
//! problem; it is not forwarded upstream but kept in the dead-letter table, visible in
//! `outpost status --json` (`dead_letters`, `store.dead_lettered_total`) and listed by
//! `outpost dead-letters --json` with its topic, source, reason, content format, size and time.
//! A valid pack afterwards is stored and forwarded as usual.
//!
//! Also: an unknown Content-Format number is 4.15, a body over `max_payload` is 4.13, and
//! without a Content-Format the route's declared format decides.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outpost_tests::{
    Mosquitto, Subscriber, SubscriberSpec, TestDir, coap_client_notls, coap_gateway_config,
    format_route, json_str, json_u64, outpost_dead_letters, start_coap_gateway, wait_for,
};
use serde_json::Value;

const NODE: &str = "gw1";

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0))
}

/// The entries of a dead-letter listing: the document itself if it is an array, else the first
/// array found under a key.
fn entries(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a.clone(),
        Value::Object(m) => m
            .values()
            .find_map(|x| x.as_array().cloned())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn post(
    coap: u16,
    path: &str,
    cf: &str,
    file: &std::path::Path,
) -> anyhow::Result<outpost_tests::CoapCli> {
    let mut args = vec!["-m", "post"];
    if !cf.is_empty() {
        args.extend(["-t", cf]);
    }
    let f = file.display().to_string();
    let uri = format!("coap://127.0.0.1:{coap}/{path}");
    args.extend(["-f", &f, &uri]);
    coap_client_notls(&args, Duration::from_secs(30))
}

#[test]
fn coap_invalid_senml_gets_400_and_is_dead_lettered() -> anyhow::Result<()> {
    let dir = TestDir::new("coap-dead-letter")?;
    let cloud = Mosquitto::start(&dir)?;
    let sub = Subscriber::spawn(
        &dir,
        "cloud",
        &SubscriberSpec::new(cloud.port(), &format!("outpost/{NODE}/#")),
    )?;
    let (cfg, coap) = coap_gateway_config(&dir, NODE, Some(cloud.port()))?;
    let gw = start_coap_gateway(&dir, &cfg, coap)?;
    gw.wait_status("uplink connected", Duration::from_secs(30), |s| {
        json_str(s, &["runtime", "uplink_state"]) == Some("connected")
    })?;
    let t0 = unix_ms();

    let bad = br#"[{"bn":"urn:dev:ow:10e2073a01080063:","n":"temp","u":"Cel","v":"warm"}]"#;
    let bad_file = dir.join("bad.json");
    std::fs::write(&bad_file, bad)?;
    let r = post(coap, "t/room-2/temp", "110", &bad_file)?;
    assert_eq!(
        r.code.as_deref(),
        Some("4.00"),
        "an undecodable SenML JSON pack is answered 4.00:\n{}",
        r.output
    );
    let diag = r.payload.clone().unwrap_or_default();
    assert!(
        diag.contains("\"v\"") || diag.contains(" v "),
        "the diagnostic names the offending field v: {diag:?}"
    );
    assert!(
        diag.to_lowercase().contains("number"),
        "the diagnostic says what v must be (a number): {diag:?}"
    );

    // Dead-lettered, counted, listed.
    let s = gw.wait_status("one dead letter in status", Duration::from_secs(10), |s| {
        json_u64(s, &["dead_letters"]) == Some(1)
    })?;
    assert_eq!(
        json_u64(&s, &["store", "dead_lettered_total"]),
        Some(1),
        "store.dead_lettered_total counts it: {s:#}"
    );
    let listing = outpost_dead_letters(gw.config_path())?;
    let list = entries(&listing);
    assert_eq!(list.len(), 1, "one dead letter listed: {listing:#}");
    let e = &list[0];
    assert_eq!(e["topic"], "sensors/room-2/temp", "its topic: {e:#}");
    let reason = e["reason"].as_str().unwrap_or_default();
    assert!(
        reason.to_lowercase().contains("number"),
        "the reason is the decode error: {e:#}"
    );
    let source = e["source"].to_string().to_lowercase();
    assert!(source.contains("coap"), "its source says CoAP: {e:#}");
    assert_eq!(
        e["content_format"].to_string().trim_matches('"'),
        "110",
        "{e:#}"
    );
    let size = [
        "payload_size",
        "payload_len",
        "payload_bytes",
        "size",
        "bytes",
        "len",
    ]
    .iter()
    .find_map(|k| e.get(*k).and_then(Value::as_u64));
    assert_eq!(size, Some(bad.len() as u64), "its payload size: {e:#}");
    let at = e["at_ms"].as_u64().unwrap_or(0);
    assert!(
        at + 1000 >= t0 && at <= unix_ms() + 1000,
        "at_ms {at} is unix ms of the test run (from {t0}): {e:#}"
    );

    // A valid pack afterwards still works, and is the only thing upstream on that topic.
    let good = br#"[{"bn":"urn:dev:ow:10e2073a01080063:","n":"temp","u":"Cel","v":23.5}]"#;
    let good_file = dir.join("good.json");
    std::fs::write(&good_file, good)?;
    let r = post(coap, "t/room-2/temp", "110", &good_file)?;
    assert_eq!(r.code.as_deref(), Some("2.01"), "{}", r.output);
    let topic = format!("outpost/{NODE}/sensors/room-2/temp");
    wait_for("the valid pack upstream", Duration::from_secs(30), || {
        sub.messages()
            .ok()?
            .iter()
            .any(|m| m.topic == topic)
            .then_some(())
    })?;
    std::thread::sleep(Duration::from_millis(1000));
    let up: Vec<_> = sub
        .messages()?
        .into_iter()
        .filter(|m| m.topic == topic)
        .collect();
    assert_eq!(up.len(), 1, "only the valid pack is forwarded: {up:?}");
    assert_eq!(up[0].payload, good.to_vec());
    let s = gw.status_json()?;
    assert_eq!(json_u64(&s, &["dead_letters"]), Some(1), "{s:#}");
    // Dead letters are not synced data: nothing of them is buffered for the uplink.
    gw.wait_status("the backlog drained", Duration::from_secs(30), |s| {
        json_u64(s, &["buffered_records"]) == Some(0)
    })?;
    Ok(())
}

#[test]
fn coap_content_format_and_size_are_enforced() -> anyhow::Result<()> {
    let dir = TestDir::new("coap-refusals")?;
    let (mut cfg, coap) = coap_gateway_config(&dir, NODE, None)?;
    cfg.extra
        .push_str(&format_route("sensors/typed/#", "senml+json", "original"));
    let gw = start_coap_gateway(&dir, &cfg, coap)?;

    // Unknown Content-Format number: 4.15.
    let f = dir.join("p.txt");
    std::fs::write(&f, b"21.5")?;
    let r = post(coap, "t/any/x", "9999", &f)?;
    assert_eq!(
        r.code.as_deref(),
        Some("4.15"),
        "unknown Content-Format 9999 is 4.15:\n{}",
        r.output
    );

    // Beyond max_payload (64 KiB), uploaded block-wise: 4.13.
    let big = dir.join("big.txt");
    std::fs::write(&big, vec![b'x'; 70 * 1024])?;
    let r = post(coap, "t/any/big", "0", &big)?;
    assert_eq!(
        r.code.as_deref(),
        Some("4.13"),
        "a 70 KiB body over max_payload 64KiB is 4.13:\n{}",
        r.output
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );

    // No Content-Format: the route's declared format (senml+json) decides...
    let r = post(coap, "t/typed/x", "", &f)?;
    assert_eq!(
        r.code.as_deref(),
        Some("4.00"),
        "without Content-Format, `21.5` is checked against the route's senml+json:\n{}",
        r.output
    );
    // ...and where no format is declared, anything is accepted as is.
    let r = post(coap, "t/untyped/x", "", &f)?;
    assert_eq!(r.code.as_deref(), Some("2.01"), "{}", r.output);
    gw.wait_status("one record stored", Duration::from_secs(10), |s| {
        json_u64(s, &["store", "appended_total"]) == Some(1)
    })?;
    let listing = outpost_dead_letters(gw.config_path())?;
    assert!(
        entries(&listing)
            .iter()
            .any(|e| e["topic"] == "sensors/typed/x"),
        "the payload that failed the route's declared format is dead-lettered: {listing:#}"
    );
    Ok(())
}
