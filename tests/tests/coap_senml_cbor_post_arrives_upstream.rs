//! A sensor that POSTs a SenML CBOR pack (Content-Format 112) to the gateway over CoAP with
//! libcoap's `coap-client-notls` gets 2.01 Created once it is stored, and the cloud broker
//! receives the very same bytes on `outpost/<node>/sensors/<path>` with an MQTT 5 `seq`. A PUT
//! gets 2.04 Changed and arrives after it, with a larger seq.

use std::time::Duration;

use outpost_tests::{
    Mosquitto, Received, Subscriber, SubscriberSpec, TestDir, coap_client_notls,
    coap_gateway_config, format_route, json_str, start_coap_gateway, wait_for,
};

const NODE: &str = "gw1";

/// A minimal CBOR writer: just what a SenML pack needs.
struct Cbor(Vec<u8>);

impl Cbor {
    fn head(&mut self, major: u8, n: u64) {
        let m = major << 5;
        match n {
            0..=23 => self.0.push(m | n as u8),
            24..=0xff => self.0.extend([m | 24, n as u8]),
            0x100..=0xffff => {
                self.0.push(m | 25);
                self.0.extend((n as u16).to_be_bytes());
            }
            _ => {
                self.0.push(m | 26);
                self.0.extend((n as u32).to_be_bytes());
            }
        }
    }
    fn int(&mut self, v: i64) {
        if v >= 0 {
            self.head(0, v as u64);
        } else {
            self.head(1, (-1 - v) as u64);
        }
    }
    fn text(&mut self, s: &str) {
        self.head(3, s.len() as u64);
        self.0.extend(s.as_bytes());
    }
    fn f64(&mut self, v: f64) {
        self.0.push(0xfb);
        self.0.extend(v.to_be_bytes());
    }
}

/// RFC 8428 labels.
const BN: i64 = -2;
const BT: i64 = -3;
const N: i64 = 0;
const U: i64 = 1;
const V: i64 = 2;
const T: i64 = 6;

/// `[{bn, bt, n:"temp", u:"Cel", v:23.1}, {n:"hum", u:"%RH", v:45, t:1}]` in CBOR.
fn senml_pack(bt: f64) -> Vec<u8> {
    let mut c = Cbor(Vec::new());
    c.head(4, 2);
    c.head(5, 5);
    c.int(BN);
    c.text("urn:dev:ow:10e2073a01080063:");
    c.int(BT);
    c.f64(bt);
    c.int(N);
    c.text("temp");
    c.int(U);
    c.text("Cel");
    c.int(V);
    c.f64(23.1);
    c.head(5, 4);
    c.int(N);
    c.text("hum");
    c.int(U);
    c.text("%RH");
    c.int(V);
    c.int(45);
    c.int(T);
    c.int(1);
    c.0
}

fn upstream_on(sub: &Subscriber, topic: &str, n: usize) -> anyhow::Result<Vec<Received>> {
    wait_for(
        &format!("{n} message(s) on {topic} upstream"),
        Duration::from_secs(30),
        || {
            let m: Vec<Received> = sub
                .messages()
                .ok()?
                .into_iter()
                .filter(|m| m.topic == topic)
                .collect();
            (m.len() >= n).then_some(m)
        },
    )
}

#[test]
fn coap_senml_cbor_post_arrives_upstream_with_seq() -> anyhow::Result<()> {
    let dir = TestDir::new("coap-senml-cbor")?;
    let cloud = Mosquitto::start(&dir)?;
    let sub = Subscriber::spawn(
        &dir,
        "cloud",
        &SubscriberSpec::new(cloud.port(), &format!("outpost/{NODE}/#")),
    )?;
    let (mut cfg, coap) = coap_gateway_config(&dir, NODE, Some(cloud.port()))?;
    cfg.extra
        .push_str(&format_route("sensors/#", "senml+cbor", "original"));
    let gw = start_coap_gateway(&dir, &cfg, coap)?;
    gw.wait_status("uplink connected", Duration::from_secs(30), |s| {
        json_str(s, &["runtime", "uplink_state"]) == Some("connected")
    })?;

    let pack = senml_pack(1.320e9);
    let file = dir.join("pack.cbor");
    std::fs::write(&file, &pack)?;
    let uri = format!("coap://127.0.0.1:{coap}/t/room-1/env");
    let r = coap_client_notls(
        &[
            "-m",
            "post",
            "-t",
            "112",
            "-f",
            &file.display().to_string(),
            &uri,
        ],
        Duration::from_secs(30),
    )?;
    assert_eq!(
        r.code.as_deref(),
        Some("2.01"),
        "POST of a SenML CBOR pack is answered 2.01 Created:\n{}",
        r.output
    );

    let topic = format!("outpost/{NODE}/sensors/room-1/env");
    let got = upstream_on(&sub, &topic, 1)?;
    assert_eq!(
        got[0].payload, pack,
        "the pack arrives upstream byte for byte (store = original)"
    );
    let seq1: u64 = got[0]
        .props
        .get("seq")
        .unwrap_or_else(|| panic!("no seq user property: {:?}", got[0].props))
        .parse()?;

    // PUT: 2.04 Changed, same path, a new reading with a later seq.
    let pack2 = senml_pack(1.320e9 + 60.0);
    let file2 = dir.join("pack2.cbor");
    std::fs::write(&file2, &pack2)?;
    let r = coap_client_notls(
        &[
            "-m",
            "put",
            "-t",
            "112",
            "-f",
            &file2.display().to_string(),
            &uri,
        ],
        Duration::from_secs(30),
    )?;
    assert_eq!(
        r.code.as_deref(),
        Some("2.04"),
        "PUT is answered 2.04 Changed:\n{}",
        r.output
    );
    let got = upstream_on(&sub, &topic, 2)?;
    assert_eq!(got[1].payload, pack2, "the PUT pack arrives unchanged");
    let seq2: u64 = got[1]
        .props
        .get("seq")
        .unwrap_or_else(|| panic!("no seq user property: {:?}", got[1].props))
        .parse()?;
    assert!(
        seq2 > seq1,
        "seq increases in store order: {seq1} then {seq2}"
    );
    assert_eq!(got.len(), 2, "each reading arrives once: {got:?}");
    Ok(())
}
