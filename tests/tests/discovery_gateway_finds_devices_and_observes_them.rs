//! Discovery end to end, against the real binary: the gateway runs in a network namespace `gw`
//! with `[discovery] interfaces = ["lan0"]` (mDNS advertising and browsing, CoAP multicast
//! discovery every 2 s, observing what it discovers), its upstream mosquitto on the namespace's
//! own loopback; the devices are python peers in a namespace behind `lan0` (see
//! `NetnsTopology` in the harness: root only, `SKIP` elsewhere; nothing touches the machine's
//! real interfaces).
//!
//! 1. python-zeroconf in the peer namespace finds the gateway's `_mqtt._tcp` and `_coap._udp`
//!    (TXT node=<name>, the gateway's LAN address, the listeners' ports).
//! 2. A service zeroconf registers (`_outpost-sensor._tcp.local.`, instance "sensor-a") is in
//!    the registry (`outpost devices --json`) found by mdns, and its retained state arrives
//!    upstream on `outpost/<node>/$gateway/devices/sensor-a`.
//! 3. An aiocoap device joined to 224.0.1.187 answers multicast discovery: the registry lists
//!    its resources (`/sensors/temp` observable); the gateway observes it, and its readings
//!    arrive upstream on `outpost/<node>/sensors/<device id>/sensors/temp` with a `seq`.
//! 4. On SIGTERM the gateway exits 0 and zeroconf sees the goodbye of `_mqtt._tcp`.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use outpost_tests::{
    GatewayConfig, Mosquitto, NetnsTopology, NsPeer, Outpost, Subscriber, SubscriberSpec, TestDir,
    first_message, json_str, outpost_devices, tail, wait_for,
};
use serde_json::Value;

const TEST: &str = "gateway_finds_devices_and_observes_them";
const NODE: &str = "gw-disc";
const ZC: &str = "discovery_zeroconf.py";
const DEVICE: &str = "discovery_observable_device.py";
const WAIT: Duration = Duration::from_secs(30);
const MQTT_TYPE: &str = "_mqtt._tcp.local.";
const COAP_TYPE: &str = "_coap._udp.local.";
const SENSOR_TYPE: &str = "_outpost-sensor._tcp.local.";

fn has_addr(v: &Value, addr: &str) -> bool {
    v["addresses"]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x == addr))
}

fn found_by(d: &Value, how: &str) -> bool {
    d["found_by"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x == how))
}

fn temp_resource(d: &Value) -> Option<&Value> {
    d["resources"]
        .as_array()?
        .iter()
        .find(|r| r["path"] == "/sensors/temp")
}

#[test]
fn gateway_finds_devices_and_observes_them() -> Result<()> {
    let Some(t) = NetnsTopology::enter(
        TEST,
        1,
        &[
            ("zeroconf", "zeroconf"),
            ("aiocoap", "aiocoap"),
            ("paho.mqtt", "paho-mqtt"),
        ],
        Duration::from_secs(300),
    )?
    else {
        return Ok(());
    };
    // Inner run: we are in the gateway namespace.
    let peer_ns = t.peers[0].clone();
    let lan = NetnsTopology::lan(0);
    let gw_ip = NetnsTopology::gw_addr(0).to_string();
    let peer_ip = NetnsTopology::peer_addr(0).to_string();
    let dir = TestDir::new("discovery-e2e")?;

    // The peers come first, so the gateway finds them as it starts.
    let mut browse = NsPeer::spawn(
        &dir,
        "zc-browse",
        &peer_ns,
        ZC,
        &["browse", MQTT_TYPE, COAP_TYPE],
    )?;
    browse.until("zeroconf browsing", WAIT, |v| v["event"] == "ready")?;
    let mut sensor = NsPeer::spawn(
        &dir,
        "zc-sensor-a",
        &peer_ns,
        ZC,
        &[
            "register",
            "--type",
            SENSOR_TYPE,
            "--name",
            "sensor-a",
            "--port",
            "7777",
            "--address",
            &peer_ip,
            "--txt",
            "kind=temp",
        ],
    )?;
    sensor.until("sensor-a registered", WAIT, |v| v["event"] == "registered")?;
    let mut device = NsPeer::spawn(
        &dir,
        "coap-device",
        &peer_ns,
        DEVICE,
        &["--interface", "eth0", "--interval", "0.3"],
    )?;
    device.until("the CoAP device listening", WAIT, |v| {
        v["event"] == "listening"
    })?;

    // Upstream: mosquitto on this namespace's loopback, and a cloud-side subscriber (MQTT 5,
    // so the `seq` user property is visible).
    let cloud = Mosquitto::start(&dir)?;
    let sub = Subscriber::spawn(
        &dir,
        "cloud",
        &SubscriberSpec::new(cloud.port(), &format!("outpost/{NODE}/#")),
    )?;

    let mut cfg = GatewayConfig::new(&dir, NODE, Some(cloud.port()))?;
    cfg.extra = format!(
        "[coap]\nlisteners = [\"0.0.0.0:5683\"]\ntopic_prefix = \"sensors\"\n\n\
         [discovery]\ninterfaces = [\"{lan}\"]\nmdns_browse = [\"{COAP_TYPE}\", \"{SENSOR_TYPE}\"]\n\
         coap_interval = \"2s\"\nobserve_discovered = true\n\n"
    );
    // The MQTT listener on every address of the namespace, so the advertised `_mqtt._tcp`
    // (lan0's address, this port) is one a device can connect to, without a login (a network
    // listener requires one unless the configuration says otherwise).
    let broker_line = format!("listeners = [\"127.0.0.1:{}\"]", cfg.port);
    let toml = cfg.to_toml();
    ensure!(
        toml.contains(&broker_line),
        "unexpected broker table:\n{toml}"
    );
    let toml = toml.replace(
        &broker_line,
        &format!(
            "listeners = [\"0.0.0.0:{}\"]\nallow_anonymous = true",
            cfg.port
        ),
    );
    let mut gw = Outpost::start_raw(&dir, &toml, cfg.port)?;
    let gw_log = gw.log().to_path_buf();
    let with_log = |e: anyhow::Error| e.context(format!("outpost log:\n{}", tail(&gw_log, 60)));
    gw.wait_status("uplink connected", WAIT, |s| {
        json_str(s, &["runtime", "uplink_state"]) == Some("connected")
    })
    .map_err(with_log)?;

    // 1. zeroconf resolves both services: TXT node, our LAN address, the listeners' ports.
    let mqtt_port = u64::from(cfg.port);
    for (ty, port) in [(MQTT_TYPE, mqtt_port), (COAP_TYPE, 5683)] {
        let name = format!("{NODE}.{ty}");
        let v = browse
            .until(
                &format!("{name} resolved with TXT node={NODE}"),
                WAIT,
                |v| {
                    (v["event"] == "added" || v["event"] == "updated")
                        && v["name"] == name.as_str()
                        && v["txt"]["node"] == NODE
                        && has_addr(v, &gw_ip)
                },
            )
            .map_err(with_log)?;
        assert_eq!(v["port"], port, "{ty} advertises its listener's port: {v}");
        assert_eq!(v["txt"]["version"], env!("CARGO_PKG_VERSION"), "{v}");
        assert!(
            v["addresses"]
                .as_array()
                .is_some_and(|a| a.iter().all(|x| x == gw_ip.as_str()
                    || x.as_str()
                        .is_some_and(|s| s.starts_with("fd77:") || s.starts_with("fe80:")))),
            "only lan0's addresses are advertised (never loopback): {v}"
        );
        browse.read_from_start();
    }

    // 2. The zeroconf service is in the registry, found by mDNS, and its state reaches the
    //    cloud retained.
    let sensor_addr = format!("{peer_ip}:7777");
    let d = wait_for("sensor-a in the registry, found by mdns", WAIT, || {
        outpost_devices(gw.config_path())
            .ok()?
            .into_iter()
            .find(|d| d["id"] == "sensor-a" && found_by(d, "mdns"))
    })
    .map_err(with_log)?;
    assert_eq!(d["status"], "online", "{d}");
    assert!(
        d["addresses"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == sensor_addr.as_str())),
        "sensor-a's address and port from its SRV/A records: {d}"
    );
    let sensor_topic = format!("outpost/{NODE}/$gateway/devices/sensor-a");
    wait_for("sensor-a's state upstream", WAIT, || {
        sub.messages()
            .ok()?
            .into_iter()
            .find(|m| m.topic == sensor_topic)
    })
    .map_err(with_log)?;
    let late = first_message(&dir, "late-sensor-a", cloud.port(), &sensor_topic, WAIT)?;
    assert!(
        late.retain,
        "a late subscriber gets sensor-a's state retained"
    );
    let state: Value = serde_json::from_slice(&late.payload).context("sensor-a state")?;
    assert_eq!(state["id"], "sensor-a", "{state}");
    assert!(found_by(&state, "mdns"), "{state}");

    // 3. The CoAP device answers multicast discovery: registered with its resources, its
    //    observable resource observed, its readings upstream with a seq.
    let coap_id = format!("coap-{peer_ip}-5683");
    let d = wait_for(
        &format!("{coap_id} in the registry with /sensors/temp"),
        WAIT,
        || {
            outpost_devices(gw.config_path())
                .ok()?
                .into_iter()
                .find(|d| d["id"] == coap_id.as_str() && temp_resource(d).is_some())
        },
    )
    .map_err(|e| with_log(e).context(format!("device peer:\n{}", tail(device.log(), 20))))?;
    assert!(found_by(&d, "coap-discovery"), "{d}");
    let r = temp_resource(&d).context("temp resource")?;
    assert_eq!(
        r["observable"], true,
        "/sensors/temp is listed with obs: {d}"
    );
    assert!(
        d["resources"]
            .as_array()
            .is_some_and(|a| a.iter().any(|r| r["path"] == "/info"
                && r["observable"] == false
                && r["attrs"]["rt"] == "outpost.test.info")),
        "/info with its rt, not observable: {d}"
    );
    assert!(
        d["addresses"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == format!("{peer_ip}:5683").as_str())),
        "{d}"
    );
    device
        .until("the gateway observing /sensors/temp", WAIT, |v| {
            v["event"] == "observers" && v["count"].as_u64().is_some_and(|c| c >= 1)
        })
        .map_err(with_log)?;
    // The device answers both the IPv4 and the IPv6 group; it is one device, observed once,
    // under whichever id answered first: exactly one reading topic, never two.
    let reading_prefix = format!("outpost/{NODE}/sensors/coap-");
    let is_reading = |t: &str| t.starts_with(&reading_prefix) && t.ends_with("/sensors/temp");
    let readings = wait_for("5 readings of /sensors/temp upstream", WAIT, || {
        let r: Vec<_> = sub
            .messages()
            .ok()?
            .into_iter()
            .filter(|m| is_reading(&m.topic))
            .collect();
        (r.len() >= 5).then_some(r)
    })
    .map_err(|e| {
        let topics: std::collections::BTreeSet<String> = sub
            .messages()
            .unwrap_or_default()
            .into_iter()
            .map(|m| m.topic)
            .collect();
        with_log(e).context(format!("topics upstream so far: {topics:?}"))
    })?;
    let reading_topics: std::collections::BTreeSet<&str> =
        readings.iter().map(|m| m.topic.as_str()).collect();
    assert_eq!(
        reading_topics.len(),
        1,
        "one device, one observation, one topic: {reading_topics:?}"
    );
    let expected = format!("outpost/{NODE}/sensors/{coap_id}/sensors/temp");
    assert!(
        reading_topics.contains(expected.as_str()),
        "the readings are under the IPv4 id: {reading_topics:?}"
    );
    // The readings are credited to the discovered device, not to a second, implicit entry.
    let all = outpost_devices(gw.config_path())?;
    let implicit: Vec<&Value> = all
        .iter()
        .filter(|d| {
            d["found_by"]
                .as_array()
                .is_some_and(|f| f.contains(&Value::from("coap-implicit")))
        })
        .collect();
    assert!(implicit.is_empty(), "no implicit duplicates: {implicit:?}");
    let mut ns = Vec::new();
    let mut seqs = Vec::new();
    for m in &readings {
        let v: Value = serde_json::from_slice(&m.payload).with_context(|| {
            format!("reading payload {:?}", String::from_utf8_lossy(&m.payload))
        })?;
        ns.push(v["n"].as_u64().with_context(|| format!("reading {v}"))?);
        let seq = m
            .props
            .get("seq")
            .with_context(|| format!("reading {v} has no seq: {:?}", m.props))?;
        seqs.push(seq.parse::<u64>().with_context(|| format!("seq {seq:?}"))?);
    }
    assert!(
        ns.windows(2).all(|w| w[0] < w[1]),
        "the device's values in order: {ns:?}"
    );
    assert!(
        seqs.windows(2).all(|w| w[0] != w[1]),
        "distinct seqs: {seqs:?}"
    );
    // The CoAP device's registry state reaches the cloud too.
    let coap_topic = format!("outpost/{NODE}/$gateway/devices/{coap_id}");
    wait_for("the CoAP device's state upstream", WAIT, || {
        sub.messages().ok()?.into_iter().find(|m| {
            m.topic == coap_topic
                && temp_resource(&serde_json::from_slice(&m.payload).unwrap_or_default()).is_some()
        })
    })
    .map_err(with_log)?;

    // 4. SIGTERM: exit 0, and the goodbye reaches zeroconf long before any TTL would expire.
    browse.skip_seen();
    let st = gw.sigterm()?;
    ensure!(
        st.success(),
        "outpost exits 0 on SIGTERM, got {st}:\n{}",
        tail(&gw_log, 40)
    );
    browse
        .until("the goodbye of _mqtt._tcp", Duration::from_secs(10), |v| {
            v["event"] == "removed"
                && v["type"] == MQTT_TYPE
                && v["name"] == format!("{NODE}.{MQTT_TYPE}").as_str()
        })
        .map_err(with_log)?;

    let log = std::fs::read_to_string(&gw_log).unwrap_or_default();
    if log.contains("panicked") {
        bail!("the gateway panicked:\n{}", tail(&gw_log, 60));
    }
    println!(
        "registry at the end:\n{:#}",
        Value::from(outpost_devices(gw.config_path())?)
    );
    Ok(())
}
