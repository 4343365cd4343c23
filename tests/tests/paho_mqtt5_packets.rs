//! MQTT 5 packet rules of outpost's broker, checked with a third-party client: paho-mqtt with
//! `protocol=MQTTv5` (tests/py/paho_rules.py, one function per test below, named alike). Reason
//! codes on PUBACK/SUBACK/UNSUBACK and on the server's DISCONNECT, receive maximum, maximum
//! packet size both ways, and topic aliases from clients. Each test has a gateway of its own
//! (start-up takes well under a second), so rules and their counters do not mix.

use std::time::Duration;

use outpost_tests::{
    GatewayConfig, Outpost, PahoRule, TestDir, check_paho_rule, format_route, poll, scrape_metrics,
};

/// Runs `rule` against a fresh gateway with the harness defaults plus `extra` configuration.
fn check(rule: &str, extra: &str) -> anyhow::Result<()> {
    let dir = TestDir::new(rule)?;
    let mut cfg = GatewayConfig::new(&dir, "gw-paho5", None)?;
    cfg.extra = extra.to_owned();
    check_paho_rule(&dir, &cfg, rule, &[])?;
    Ok(())
}

#[test]
fn mqtt5_acks_carry_reason_codes() -> anyhow::Result<()> {
    // A route that declares JSON payloads: one that does not decode is refused with 0x99.
    check(
        "mqtt5_acks_carry_reason_codes",
        &format_route("acks/json/#", "json", "original"),
    )
}

#[test]
fn mqtt5_server_disconnect_carries_reason_code() -> anyhow::Result<()> {
    let rule = "mqtt5_server_disconnect_carries_reason_code";
    let dir = TestDir::new(rule)?;
    let cfg = GatewayConfig::new(&dir, "gw-paho5", None)?;
    let mut gw = Outpost::start(&dir, &cfg)?;
    poll(
        "the gateway's /metrics",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || Ok(Some(scrape_metrics(cfg.health_port)?)),
    )?;
    let mut paho = PahoRule::spawn(
        &dir,
        rule,
        cfg.port,
        &["--health-port".to_owned(), cfg.health_port.to_string()],
    )?;
    // The rule's last check is the DISCONNECT a stopping gateway sends its clients.
    paho.wait_line("await shutdown", Duration::from_secs(90))?;
    let status = gw.sigterm()?;
    assert!(status.success(), "the gateway stopped with {status}");
    paho.finish(Duration::from_secs(60))?;
    Ok(())
}

#[test]
fn mqtt5_receive_maximum_bounds_unacked_qos1_and_qos2_in_flight() -> anyhow::Result<()> {
    check(
        "mqtt5_receive_maximum_bounds_unacked_qos1_and_qos2_in_flight",
        "",
    )
}

#[test]
fn mqtt5_receive_maximum_applies_to_messages_resent_on_reconnect() -> anyhow::Result<()> {
    check(
        "mqtt5_receive_maximum_applies_to_messages_resent_on_reconnect",
        "",
    )
}

#[test]
fn mqtt5_maximum_packet_size_of_client_is_respected() -> anyhow::Result<()> {
    check("mqtt5_maximum_packet_size_of_client_is_respected", "")
}

#[test]
fn mqtt5_maximum_packet_size_of_broker_is_enforced() -> anyhow::Result<()> {
    check("mqtt5_maximum_packet_size_of_broker_is_enforced", "")
}

#[test]
fn mqtt5_topic_alias_from_client_resolves_to_topic() -> anyhow::Result<()> {
    check("mqtt5_topic_alias_from_client_resolves_to_topic", "")
}
