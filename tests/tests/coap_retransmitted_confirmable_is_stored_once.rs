//! A confirmable POST whose ACK is lost is retransmitted by the sensor with the same message id
//! (RFC 7252 section 4.2). The gateway must recognise the duplicate: the reading is stored once
//! (`store.appended_total` grows by one), arrives upstream once, and both datagrams get the same
//! response. Done on a raw UDP socket, so the "lost ACK" is simply a second send 200 ms later.
//! A new message id with the same payload is a new reading (duplicates are by id, not content).

use std::time::{Duration, Instant};

use outpost_tests::{
    CoapMessage, Mosquitto, RawCoap, Subscriber, SubscriberSpec, TestDir, coap_gateway_config,
    coap_opt, coap_type, json_str, json_u64, start_coap_gateway, wait_for,
};

const NODE: &str = "gw1";

/// Everything the gateway sends to `raw` within `window` (CON messages from it are ACKed).
fn collect(raw: &RawCoap, window: Duration) -> anyhow::Result<Vec<(CoapMessage, Vec<u8>)>> {
    let end = Instant::now() + window;
    let mut got = Vec::new();
    while Instant::now() < end {
        if let Some((m, bytes)) = raw.recv(Duration::from_millis(50))? {
            if m.mtype == coap_type::CON {
                raw.send(&CoapMessage::empty_ack(m.mid).encode())?;
            }
            got.push((m, bytes));
        }
    }
    Ok(got)
}

#[test]
fn coap_retransmitted_confirmable_post_is_stored_once() -> anyhow::Result<()> {
    let dir = TestDir::new("coap-dup")?;
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
    let before = json_u64(&gw.status_json()?, &["store", "appended_total"]).unwrap_or(0);

    let raw = RawCoap::new(coap)?;
    let mut req = CoapMessage::request(coap_type::CON, 2, 0x4a17, b"dup1", "t/dup/temp")
        .with_uint(coap_opt::CONTENT_FORMAT, 0);
    req.payload = b"21.5 Cel".to_vec();
    let datagram = req.encode();
    raw.send(&datagram)?;
    std::thread::sleep(Duration::from_millis(200));
    raw.send(&datagram)?; // the retransmission: same message id, same token, same bytes
    let got = collect(&raw, Duration::from_millis(2500))?;

    let acks: Vec<&(CoapMessage, Vec<u8>)> = got
        .iter()
        .filter(|(m, _)| m.mtype == coap_type::ACK && m.mid == 0x4a17)
        .collect();
    assert_eq!(
        acks.len(),
        2,
        "both transmissions of the CON are acknowledged: {got:#?}"
    );
    assert_eq!(
        acks[0].0.code_str(),
        "2.01",
        "piggy-backed 2.01 Created: {got:#?}"
    );
    assert_eq!(acks[0].0.token, b"dup1", "the response echoes the token");
    assert_eq!(
        acks[0].1, acks[1].1,
        "the duplicate gets the same response, byte for byte"
    );

    // Stored once: appended_total grew by exactly one, and stays so.
    gw.wait_status("the reading appended", Duration::from_secs(10), |s| {
        json_u64(s, &["store", "appended_total"]).is_some_and(|n| n > before)
    })?;
    let topic = format!("outpost/{NODE}/sensors/dup/temp");
    wait_for("the reading upstream", Duration::from_secs(30), || {
        sub.messages()
            .ok()?
            .iter()
            .any(|m| m.topic == topic)
            .then_some(())
    })?;
    std::thread::sleep(Duration::from_millis(1500));
    let s = gw.status_json()?;
    assert_eq!(
        json_u64(&s, &["store", "appended_total"]),
        Some(before + 1),
        "a retransmitted CON is appended once: {s:#}"
    );
    let up: Vec<_> = sub
        .messages()?
        .into_iter()
        .filter(|m| m.topic == topic)
        .collect();
    assert_eq!(up.len(), 1, "the reading arrives upstream once: {up:?}");
    assert_eq!(up[0].payload, b"21.5 Cel");

    // Same payload, new message id: a new reading.
    let mut again = req.clone();
    again.mid = 0x4a18;
    again.token = b"dup2".to_vec();
    raw.send(&again.encode())?;
    let got = collect(&raw, Duration::from_millis(1500))?;
    assert!(
        got.iter()
            .any(|(m, _)| m.mid == 0x4a18 && m.code_str() == "2.01"),
        "a new message id is a new request, answered 2.01: {got:#?}"
    );
    gw.wait_status(
        "the second reading appended",
        Duration::from_secs(10),
        |s| json_u64(s, &["store", "appended_total"]) == Some(before + 2),
    )?;
    wait_for(
        "the second reading upstream",
        Duration::from_secs(30),
        || {
            let n = sub
                .messages()
                .ok()?
                .iter()
                .filter(|m| m.topic == topic)
                .count();
            (n >= 2).then_some(())
        },
    )?;
    Ok(())
}
