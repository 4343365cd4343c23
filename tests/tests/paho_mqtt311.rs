//! MQTT 3.1.1 rules of outpost's broker, checked with third-party clients: paho-mqtt with
//! `protocol=MQTTv311` (tests/py/paho_rules.py, one function per test below, named alike) and
//! mosquitto_pub/mosquitto_sub. Clean versus persistent sessions (QoS 1 queued for an offline
//! client while the gateway stays up), retained messages, the will on an abrupt close, and the
//! QoS downgrade to the granted QoS. Each test has a gateway of its own.

use std::process::{Command, Stdio};

use outpost_tests::{GatewayConfig, TestDir, check_paho_rule, mosquitto_pub_ok};

/// Runs `rule` against a fresh gateway; returns the running gateway for more checks.
fn check(dir: &TestDir, rule: &str) -> anyhow::Result<(outpost_tests::Outpost, GatewayConfig)> {
    let cfg = GatewayConfig::new(dir, "gw-paho311", None)?;
    let (gw, _) = check_paho_rule(dir, &cfg, rule, &[])?;
    Ok((gw, cfg))
}

/// `mosquitto_sub -h 127.0.0.1 -p <port> <args> -W 30` (MQTT 3.1.1) to completion: its stdout,
/// requiring exit 0 (it exits 27 when its 30 s are up without the messages it waited for).
fn mosquitto_sub(port: u16, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv311"])
        .args(args)
        .args(["-W", "30"])
        .stdin(Stdio::null())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "mosquitto_sub {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn mqtt311_persistent_session_queues_qos1_while_offline() -> anyhow::Result<()> {
    let dir = TestDir::new("mqtt311_persistent_session")?;
    let (_gw, cfg) = check(&dir, "mqtt311_persistent_session_queues_qos1_while_offline")?;

    // The same with mosquitto's clients: `-c` is clean session 0; `-E` ends once subscribed.
    let session = ["-c", "-i", "mosq-persistent", "-q", "1", "-t", "mosq/p"];
    mosquitto_sub(cfg.port, &[&session[..], &["-E"]].concat())?;
    mosquitto_pub_ok(cfg.port, &["-q", "1", "-t", "mosq/p", "-m", "while-away"])?;
    let got = mosquitto_sub(
        cfg.port,
        &[&session[..], &["-C", "1", "-F", "%q %t %p"]].concat(),
    )?;
    assert_eq!(
        got.trim(),
        "1 mosq/p while-away",
        "mosquitto_sub -c did not get the QoS 1 message queued while it was offline"
    );
    Ok(())
}

#[test]
fn mqtt311_clean_session_keeps_nothing() -> anyhow::Result<()> {
    let dir = TestDir::new("mqtt311_clean_session")?;
    check(&dir, "mqtt311_clean_session_keeps_nothing")?;
    Ok(())
}

#[test]
fn mqtt311_retained_message_for_new_subscribers_until_cleared() -> anyhow::Result<()> {
    let dir = TestDir::new("mqtt311_retained")?;
    let (_gw, cfg) = check(
        &dir,
        "mqtt311_retained_message_for_new_subscribers_until_cleared",
    )?;

    // mosquitto_pub -r, then a late mosquitto_sub gets it with the retain flag.
    mosquitto_pub_ok(cfg.port, &["-r", "-q", "1", "-t", "mosq/r", "-m", "kept"])?;
    let got = mosquitto_sub(
        cfg.port,
        &["-q", "1", "-t", "mosq/r", "-C", "1", "-F", "%r %q %t %p"],
    )?;
    assert_eq!(
        got.trim(),
        "1 1 mosq/r kept",
        "mosquitto_sub: retained message (retain flag, qos, topic, payload)"
    );
    Ok(())
}

#[test]
fn mqtt311_will_published_on_abrupt_close() -> anyhow::Result<()> {
    let dir = TestDir::new("mqtt311_will")?;
    check(&dir, "mqtt311_will_published_on_abrupt_close")?;
    Ok(())
}

#[test]
fn mqtt311_delivered_qos_is_downgraded_to_granted() -> anyhow::Result<()> {
    let dir = TestDir::new("mqtt311_qos")?;
    check(&dir, "mqtt311_delivered_qos_is_downgraded_to_granted")?;
    Ok(())
}
