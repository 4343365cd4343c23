//! GET /status is observable (RFC 7641): aiocoap registers an observation and receives the
//! registration response and at least two more notifications (the status is refreshed about
//! every second), each a valid JSON document with a larger Observe number than the one before.
//! Cancelling the observation deregisters it: where the gateway's status shows its observer
//! count, it drops back to zero; on the wire, an observer that deregisters with GET Observe=1
//! or RSTs a notification gets no further notifications.

use std::time::Duration;

use outpost_tests::{
    CoapMessage, RawCoap, TestDir, coap_gateway_config, coap_opt, coap_py, coap_type, find_key,
    start_coap_gateway, wait_for,
};
use serde_json::Value;

/// The observer count the gateway publishes, if it publishes one: looked for in a plain GET of
/// /status (raw, so it does not register anything) and in `outpost status --json`.
fn observer_count(coap: u16, gw: &outpost_tests::Outpost) -> Option<u64> {
    let raw = RawCoap::new(coap).ok()?;
    let req = CoapMessage::request(coap_type::CON, 1, 0x0b5e, b"g", "status");
    raw.send(&req.encode()).ok()?;
    let (m, _) = raw.recv(Duration::from_secs(3)).ok()??;
    let body: Value = serde_json::from_slice(&m.payload).ok()?;
    find_key(&body, "observers")
        .and_then(Value::as_u64)
        .or_else(|| find_key(&gw.status_json().ok()?, "observers").and_then(Value::as_u64))
}

#[test]
fn coap_observe_status_notifies_and_deregisters() -> anyhow::Result<()> {
    let dir = TestDir::new("coap-observe")?;
    let (cfg, coap) = coap_gateway_config(&dir, "gw1", None)?;
    let gw = start_coap_gateway(&dir, &cfg, coap)?;

    let (rc, lines) = coap_py(
        &dir,
        "observer",
        &[
            "observe",
            "--uri",
            &format!("coap://127.0.0.1:{coap}/status"),
            "--count",
            "4",
            "--linger",
            // Long enough to see a confirmable notification (every 5th, one a second): aiocoap
            // rejects notifications it no longer wants with RST, which deregisters it.
            "7",
        ],
        Duration::from_secs(30),
    )?;
    assert_eq!(rc, 0, "aiocoap observed /status: {lines:#?}");
    let notes: Vec<&Value> = lines.iter().filter(|l| l.get("code").is_some()).collect();
    assert!(
        notes.len() >= 3,
        "at least 3 notifications (registration response included): {lines:#?}"
    );
    let mut last: Option<u64> = None;
    for n in &notes {
        assert_eq!(n["code"], "2.05", "{n}");
        assert_eq!(n["content_format"], 50, "application/json: {n}");
        let body: Value = serde_json::from_str(n["payload"].as_str().unwrap_or_default())
            .unwrap_or_else(|e| panic!("notification payload is not JSON ({e}): {n}"));
        assert!(body.is_object(), "the status is a JSON object: {body}");
        let obs = n["options"]["observe"]
            .as_u64()
            .unwrap_or_else(|| panic!("a notification without Observe: {n}"));
        if let Some(prev) = last {
            assert!(obs > prev, "Observe numbers increase: {prev} then {obs}");
        }
        last = Some(obs);
    }
    assert!(
        lines.iter().any(|l| l["cancelled"] == true),
        "the client cancelled: {lines:#?}"
    );

    // Deregistered: if the gateway shows an observer count, it is back to 0 (the client sent
    // its deregistration or RSTed the next notification before it exited).
    match observer_count(coap, &gw) {
        Some(_) => {
            wait_for(
                "the observer count back to 0",
                Duration::from_secs(15),
                || (observer_count(coap, &gw)? == 0).then_some(()),
            )?;
        }
        None => eprintln!(
            "the gateway's status shows no observer count; deregistration not checked by count"
        ),
    }

    // Deregistration on the wire, whatever the status shows: an observer that deregisters
    // with GET Observe=1 (RFC 7641 section 3.6), or that answers a notification with RST
    // (section 3.5), hears nothing more, although /status changes every second.
    for how in ["get-observe-1", "rst"] {
        let raw = RawCoap::new(coap)?;
        let token = how.as_bytes()[..3].to_vec();
        let reg = CoapMessage::request(coap_type::CON, 1, 0x0c00, &token, "status")
            .with_uint(coap_opt::OBSERVE, 0);
        raw.send(&reg.encode())?;
        let (first, _) = raw
            .recv(Duration::from_secs(5))?
            .ok_or_else(|| anyhow::anyhow!("{how}: no answer to the registration"))?;
        assert_eq!(first.code_str(), "2.05", "{how}: {first:?}");
        assert!(
            first.uint_option(coap_opt::OBSERVE).is_some(),
            "{how}: registered (the response carries Observe): {first:?}"
        );
        // The next notification.
        let (note, _) = raw
            .recv(Duration::from_secs(5))?
            .ok_or_else(|| anyhow::anyhow!("{how}: no notification within 5 s"))?;
        assert_eq!(
            note.token, token,
            "{how}: the notification echoes the token"
        );
        match how {
            "rst" => {
                let rst = CoapMessage {
                    mtype: coap_type::RST,
                    code: 0,
                    mid: note.mid,
                    token: Vec::new(),
                    options: Vec::new(),
                    payload: Vec::new(),
                };
                raw.send(&rst.encode())?;
            }
            _ => {
                if note.mtype == coap_type::CON {
                    raw.send(&CoapMessage::empty_ack(note.mid).encode())?;
                }
                let dereg = CoapMessage::request(coap_type::CON, 1, 0x0c01, &token, "status")
                    .with_uint(coap_opt::OBSERVE, 1);
                raw.send(&dereg.encode())?;
            }
        }
        // Three status periods of silence (the deregistration's own response aside).
        let end = std::time::Instant::now() + Duration::from_secs(3);
        while std::time::Instant::now() < end {
            if let Some((m, _)) = raw.recv(Duration::from_millis(100))? {
                if m.mid == 0x0c01 && m.mtype == coap_type::ACK {
                    assert_eq!(
                        m.code_str(),
                        "2.05",
                        "{how}: the deregistering GET is answered"
                    );
                    assert!(
                        m.uint_option(coap_opt::OBSERVE).is_none(),
                        "{how}: the answer to Observe=1 is not a notification: {m:?}"
                    );
                    continue;
                }
                panic!("{how}: a notification after deregistration: {m:?}");
            }
        }
    }

    // Still serving: a plain GET works and is not an observation.
    let raw = RawCoap::new(coap)?;
    raw.send(&CoapMessage::request(coap_type::CON, 1, 0x0b5f, b"g2", "status").encode())?;
    let (m, _) = raw
        .recv(Duration::from_secs(5))?
        .ok_or_else(|| anyhow::anyhow!("no answer to GET /status"))?;
    assert_eq!(m.code_str(), "2.05");
    assert!(
        m.uint_option(coap_opt::OBSERVE).is_none(),
        "a GET without Observe gets no Observe option"
    );
    Ok(())
}
