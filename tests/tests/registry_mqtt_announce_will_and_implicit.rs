//! MQTT discovery and the device registry, against the real binary, mosquitto and paho: a device
//! that announces itself is registered online with its descriptor; its last will (an offline
//! announcement) marks it offline; a device that only publishes data is registered implicitly;
//! every change reaches the cloud as a retained message on `outpost/<node>/$gateway/devices/<id>`,
//! and bad announcements change nothing.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use outpost_tests::{
    Client, GatewayConfig, Mosquitto, Outpost, TestDir, mosquitto_pub_ok, outpost_command,
    spawn_mosquitto_sub, wait_for,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

fn devices(gw: &Outpost) -> Result<Vec<Value>> {
    let out = outpost_command()?
        .args(["devices", "--json", "--config"])
        .arg(gw.config_path())
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "outpost devices failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("devices --json")?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn device(gw: &Outpost, id: &str) -> Result<Option<Value>> {
    Ok(devices(gw)?.into_iter().find(|d| d["id"] == id))
}

/// The upstream messages on a device topic, parsed, in arrival order.
fn upstream_states(log: &std::path::Path, id: &str) -> Vec<Value> {
    let topic = format!("outpost/gw1/$gateway/devices/{id} ");
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix(topic.as_str()))
        .filter_map(|json| serde_json::from_str(json).ok())
        .collect()
}

#[test]
fn announced_device_goes_online_then_offline_by_will_and_the_cloud_sees_it_retained() -> Result<()>
{
    let dir = TestDir::new("registry")?;
    let mut cloud = Mosquitto::start(&dir)?;
    let mut cfg = GatewayConfig::new(&dir, "gw1", Some(cloud.port()))?;
    cfg.extra.push_str("[discovery]\nimplicit = true\n");
    let gw = Outpost::start(&dir, &cfg)?;
    let watch = spawn_mosquitto_sub(
        &dir,
        "cloud-devices",
        cloud.port(),
        &["-t", "outpost/+/$gateway/devices/#", "-v", "-q", "1"],
    )?;
    let watch_log = dir.join("cloud-devices.log");

    // A device that announces itself, with its will set to an offline announcement.
    let mut dev = Client::spawn(
        &dir,
        "therm-1",
        gw.port(),
        &[
            "--client-id",
            "therm-1",
            "--will-topic",
            "devices/announce/therm-1",
            "--will-payload",
            r#"{"status":"offline"}"#,
        ],
    )?;
    dev.wait_line("connected rc=Success", WAIT)?;
    mosquitto_pub_ok(
        gw.port(),
        &[
            "-q",
            "1",
            "-t",
            "devices/announce/therm-1",
            "-m",
            r#"{"kind":"thermometer","firmware":"1.4.2","topics":["sensors/therm-1/t"]}"#,
        ],
    )?;
    let d = wait_for("therm-1 in the registry", WAIT, || {
        device(&gw, "therm-1").ok().flatten()
    })?;
    assert_eq!(d["status"], "online", "{d}");
    assert_eq!(d["kind"], "thermometer", "{d}");
    assert_eq!(d["firmware"], "1.4.2", "{d}");
    assert_eq!(d["topics"], serde_json::json!(["sensors/therm-1/t"]), "{d}");
    assert!(
        d["found_by"]
            .as_array()
            .is_some_and(|f| f.contains(&Value::from("mqtt-announce"))),
        "{d}"
    );
    wait_for("the online state upstream", WAIT, || {
        upstream_states(&watch_log, "therm-1")
            .iter()
            .any(|s| s["status"] == "online" && s["kind"] == "thermometer")
            .then_some(())
    })?;

    // The device's socket dies: the broker publishes its will, the registry marks it offline.
    dev.proc().kill()?;
    wait_for("therm-1 offline in the registry", WAIT, || {
        device(&gw, "therm-1")
            .ok()
            .flatten()
            .filter(|d| d["status"] == "offline")
    })?;
    wait_for("the offline state upstream", WAIT, || {
        upstream_states(&watch_log, "therm-1")
            .last()
            .filter(|s| s["status"] == "offline")
            .map(|_| ())
    })?;

    // Retained: a subscriber that comes later gets the device's last state.
    let late = std::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &cloud.port().to_string()])
        .args([
            "-t",
            "outpost/gw1/$gateway/devices/therm-1",
            "-C",
            "1",
            "-W",
            "10",
        ])
        .output()?;
    let retained: Value = serde_json::from_slice(&late.stdout)
        .with_context(|| format!("retained device state: {:?}", late))?;
    assert_eq!(retained["status"], "offline", "{retained}");
    assert_eq!(retained["id"], "therm-1", "{retained}");

    // A device that only publishes data is registered implicitly, and its messages are counted.
    for i in 0..3 {
        mosquitto_pub_ok(
            gw.port(),
            &[
                "-q",
                "1",
                "-i",
                "sensor-9",
                "-t",
                "sensors/9/t",
                "-m",
                &i.to_string(),
            ],
        )?;
    }
    let s9 = wait_for("sensor-9 registered implicitly", WAIT, || {
        device(&gw, "sensor-9")
            .ok()
            .flatten()
            .filter(|d| d["messages"].as_u64().unwrap_or(0) >= 1)
    })?;
    assert!(
        s9["found_by"]
            .as_array()
            .is_some_and(|f| f.contains(&Value::from("mqtt-implicit"))),
        "{s9}"
    );
    assert_eq!(s9["topics"], serde_json::json!(["sensors/9/t"]), "{s9}");

    // Bad announcements change nothing: not a descriptor, and an id with a '/'.
    mosquitto_pub_ok(
        gw.port(),
        &["-q", "1", "-t", "devices/announce/bad", "-m", "not json"],
    )?;
    mosquitto_pub_ok(
        gw.port(),
        &[
            "-q",
            "1",
            "-t",
            "devices/announce/x",
            "-m",
            r#"{"id":"a/b"}"#,
        ],
    )?;
    // An announcement after them is handled, so they were processed (and ignored) before it.
    mosquitto_pub_ok(
        gw.port(),
        &[
            "-q",
            "1",
            "-t",
            "devices/announce/late-1",
            "-m",
            r#"{"kind":"k"}"#,
        ],
    )?;
    wait_for("late-1 registered", WAIT, || {
        device(&gw, "late-1").ok().flatten()
    })?;
    let ids: Vec<String> = devices(&gw)?
        .iter()
        .filter_map(|d| d["id"].as_str().map(str::to_owned))
        .collect();
    assert!(
        !ids.iter()
            .any(|i| i == "bad" || i == "x" || i.contains('/')),
        "bad announcements registered something: {ids:?}"
    );
    // The status counts the devices.
    let status = wait_for("device counts in the status", WAIT, || {
        gw.status_json()
            .ok()
            .filter(|s| s["runtime"]["devices_offline"].as_u64() == Some(1))
    })?;
    assert!(
        status["runtime"]["devices_online"].as_u64().unwrap_or(0) >= 2,
        "{status}"
    );
    drop(watch);
    cloud.stop()?;
    Ok(())
}

#[test]
fn a_silent_device_goes_stale_then_offline_and_back_online_when_it_speaks() -> Result<()> {
    let dir = TestDir::new("registry-aging")?;
    let mut cloud = Mosquitto::start(&dir)?;
    let mut cfg = GatewayConfig::new(&dir, "gw1", Some(cloud.port()))?;
    cfg.extra
        .push_str("[discovery]\nstale_after = \"2s\"\noffline_after = \"4s\"\n");
    let gw = Outpost::start(&dir, &cfg)?;
    let watch = spawn_mosquitto_sub(
        &dir,
        "cloud-aging",
        cloud.port(),
        &["-t", "outpost/+/$gateway/devices/#", "-v", "-q", "1"],
    )?;
    let log = dir.join("cloud-aging.log");
    mosquitto_pub_ok(
        gw.port(),
        &["-q", "1", "-i", "quiet-1", "-t", "sensors/q", "-m", "1"],
    )?;
    let states = |want: &[&str]| {
        let got: Vec<String> = upstream_states(&log, "quiet-1")
            .iter()
            .filter_map(|s| s["status"].as_str().map(str::to_owned))
            .collect();
        (got == want).then_some(())
    };
    wait_for(
        "online, stale, offline upstream in that order",
        WAIT,
        || states(&["online", "stale", "offline"]),
    )?;
    let d = device(&gw, "quiet-1")?.context("quiet-1 registered")?;
    assert_eq!(d["status"], "offline", "{d}");
    mosquitto_pub_ok(
        gw.port(),
        &["-q", "1", "-i", "quiet-1", "-t", "sensors/q", "-m", "2"],
    )?;
    wait_for("back online upstream", WAIT, || {
        states(&["online", "stale", "offline", "online"])
    })?;
    drop(watch);
    cloud.stop()?;
    Ok(())
}
