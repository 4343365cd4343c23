//! A payload of several KB does not fit one datagram: the sensor uploads it block-wise (Block1,
//! RFC 7959). libcoap with 64-byte blocks (`-b 64`, ~100 blocks) and aiocoap (its own block
//! size) each upload a 6 KB JSON document; each is answered 2.01 once, stored once (one append,
//! not one per block) and arrives upstream complete and byte-identical.

use std::time::Duration;

use outpost_tests::{
    Mosquitto, Subscriber, SubscriberSpec, TestDir, coap_client_notls, coap_gateway_config,
    coap_py, json_str, json_u64, start_coap_gateway, wait_for,
};

const NODE: &str = "gw1";

/// A valid JSON document of at least `size` bytes, distinct per `tag`.
fn document(tag: &str, size: usize) -> Vec<u8> {
    let mut s = format!("{{\"uploader\":\"{tag}\",\"samples\":[");
    let mut i = 0u32;
    while s.len() < size {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!("{{\"i\":{i},\"v\":{}.{}}}", 20 + i % 7, i % 10));
        i += 1;
    }
    s.push_str("]}");
    s.into_bytes()
}

#[test]
fn coap_block1_upload_is_stored_once_and_arrives_complete() -> anyhow::Result<()> {
    let dir = TestDir::new("coap-block1")?;
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

    // libcoap, 64-byte blocks.
    let doc = document("libcoap", 6000);
    let file = dir.join("doc1.json");
    std::fs::write(&file, &doc)?;
    let r = coap_client_notls(
        &[
            "-m",
            "post",
            "-b",
            "64",
            "-t",
            "50",
            "-f",
            &file.display().to_string(),
            &format!("coap://127.0.0.1:{coap}/t/upload/libcoap"),
        ],
        Duration::from_secs(60),
    )?;
    assert_eq!(
        r.code.as_deref(),
        Some("2.01"),
        "the last block is answered 2.01 Created:\n{}",
        r.output
            .lines()
            .rev()
            .take(10)
            .collect::<Vec<_>>()
            .join("\n")
    );
    // libcoap logs the first block it sends and the final response: block 0 of 64 bytes with
    // more to come, and the server's ACK of the last block (number (len-1)/64).
    assert!(
        r.output.contains("Block1:0/M/64"),
        "libcoap uploaded block-wise in 64-byte blocks:\n{}",
        r.output
    );
    let last_block = format!("Block1:{}/_/64", (doc.len() - 1) / 64);
    assert!(
        r.output
            .lines()
            .any(|l| l.contains("c:2.01") && l.contains(&last_block)),
        "the 2.01 acknowledges the last block ({last_block}):\n{}",
        r.output
    );

    // aiocoap, its own block size (1024).
    let doc2 = document("aiocoap", 6000);
    let file2 = dir.join("doc2.json");
    std::fs::write(&file2, &doc2)?;
    let (rc, lines) = coap_py(
        &dir,
        "aiocoap-upload",
        &[
            "request",
            "--method",
            "POST",
            "--uri",
            &format!("coap://127.0.0.1:{coap}/t/upload/aiocoap"),
            "--content-format",
            "50",
            "--payload-file",
            &file2.display().to_string(),
        ],
        Duration::from_secs(60),
    )?;
    assert_eq!(rc, 0, "aiocoap upload succeeded: {lines:?}");
    assert_eq!(
        lines.first().and_then(|l| l["code"].as_str()),
        Some("2.01"),
        "{lines:?}"
    );

    let want = [
        (format!("outpost/{NODE}/sensors/upload/libcoap"), doc),
        (format!("outpost/{NODE}/sensors/upload/aiocoap"), doc2),
    ];
    wait_for("both uploads upstream", Duration::from_secs(30), || {
        let m = sub.messages().ok()?;
        want.iter()
            .all(|(t, _)| m.iter().any(|r| &r.topic == t))
            .then_some(())
    })?;
    std::thread::sleep(Duration::from_millis(1000));
    let msgs = sub.messages()?;
    for (topic, body) in &want {
        let got: Vec<_> = msgs.iter().filter(|m| &m.topic == topic).collect();
        assert_eq!(got.len(), 1, "one upload, one message upstream on {topic}");
        assert_eq!(
            got[0].payload.len(),
            body.len(),
            "the upload on {topic} arrives complete"
        );
        assert!(
            got[0].payload == *body,
            "the upload on {topic} arrives byte-identical"
        );
        assert!(got[0].props.contains_key("seq"), "with a seq");
    }
    let s = gw.status_json()?;
    assert_eq!(
        json_u64(&s, &["store", "appended_total"]),
        Some(before + 2),
        "two uploads, two records (not one per block): {s:#}"
    );
    Ok(())
}
