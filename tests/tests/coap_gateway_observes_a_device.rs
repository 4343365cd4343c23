//! The gateway as a CoAP client: an aiocoap server (tests/py/coap_device.py) plays a sensor
//! whose observable `/temp` changes every 200 ms; the gateway's `[[observe]]` registers with
//! it and ingests every notification on the configured topic, which arrives upstream. Then the
//! device dies (SIGKILL) and comes back on the same port with a new boot number: its
//! representations carry Max-Age 1 s, so the gateway sees the observation lapse, registers
//! again, and the new boot's values arrive upstream too.

use std::time::Duration;

use outpost_tests::{
    CoapDevice, Mosquitto, Received, Subscriber, SubscriberSpec, TestDir, coap_gateway_config,
    free_udp_port, json_str, start_coap_gateway, wait_for,
};
use serde_json::Value;

const NODE: &str = "gw1";
const TOPIC: &str = "sensors/dev1/temp";

/// (boot, n) of each reading received upstream on the device's topic, in arrival order.
fn readings(sub: &Subscriber) -> Vec<(u64, u64, Received)> {
    sub.messages()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.topic == format!("outpost/{NODE}/{TOPIC}"))
        .filter_map(|m| {
            let v: Value = serde_json::from_slice(&m.payload).ok()?;
            Some((v["boot"].as_u64()?, v["n"].as_u64()?, m))
        })
        .collect()
}

#[test]
fn coap_gateway_observes_a_device_and_reregisters_after_restart() -> anyhow::Result<()> {
    let dir = TestDir::new("coap-observe-device")?;
    let cloud = Mosquitto::start(&dir)?;
    let sub = Subscriber::spawn(
        &dir,
        "cloud",
        &SubscriberSpec::new(cloud.port(), &format!("outpost/{NODE}/#")),
    )?;
    let dev_port = free_udp_port()?;
    let mut device = CoapDevice::spawn(&dir, "device", dev_port, "temp", 1, 200, 1)?;

    let (mut cfg, coap) = coap_gateway_config(&dir, NODE, Some(cloud.port()))?;
    cfg.extra.push_str(&format!(
        "[[observe]]\nuri = \"coap://127.0.0.1:{dev_port}/temp\"\ntopic = \"{TOPIC}\"\n\n"
    ));
    let gw = start_coap_gateway(&dir, &cfg, coap)?;
    gw.wait_status("uplink connected", Duration::from_secs(30), |s| {
        json_str(s, &["runtime", "uplink_state"]) == Some("connected")
    })?;

    // Boot 1: notifications arrive, in order, unchanged JSON from the device.
    let first = wait_for(
        "5 notifications of boot 1 upstream",
        Duration::from_secs(30),
        || {
            let r: Vec<_> = readings(&sub).into_iter().filter(|r| r.0 == 1).collect();
            (r.len() >= 5).then_some(r)
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}; device observers now {}", device.observers()))?;
    let ns: Vec<u64> = first.iter().map(|r| r.1).collect();
    assert!(
        ns.windows(2).all(|w| w[0] < w[1]),
        "the device's values arrive in order: {ns:?}"
    );
    assert!(
        first.iter().all(|r| r.2.props.contains_key("seq")),
        "ingested readings carry a seq upstream"
    );
    assert_eq!(
        device.observers(),
        1,
        "the gateway is the device's one observer"
    );

    // The device restarts on the same port.
    device.kill()?;
    let mut device = CoapDevice::spawn(&dir, "device-boot2", dev_port, "temp", 2, 200, 1)?;
    let second = wait_for(
        "3 notifications of boot 2 upstream (the gateway registered again)",
        Duration::from_secs(40),
        || {
            let r: Vec<_> = readings(&sub).into_iter().filter(|r| r.0 == 2).collect();
            (r.len() >= 3).then_some(r)
        },
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}; the restarted device has {} observer(s)",
            device.observers()
        )
    })?;
    let ns: Vec<u64> = second.iter().map(|r| r.1).collect();
    assert!(ns.windows(2).all(|w| w[0] < w[1]), "in order: {ns:?}");
    assert_eq!(
        device.observers(),
        1,
        "one registration with the restarted device"
    );
    device.kill()?;
    Ok(())
}
