//! MQTT 5 session, expiry and will rules of outpost's broker, checked with a third-party client:
//! paho-mqtt with `protocol=MQTTv5` (tests/py/paho_rules.py, one function per test below, named
//! alike). Session expiry and the session-present flag, the assigned client identifier, message
//! expiry in queues and in the retained store, will delay, DISCONNECT with will. Each test has a
//! gateway of its own. (Sessions across a gateway restart are not covered here.)

use outpost_tests::{GatewayConfig, TestDir, check_paho_rule};

/// Runs `rule` against a fresh gateway with the harness defaults.
fn check(rule: &str) -> anyhow::Result<()> {
    let dir = TestDir::new(rule)?;
    let cfg = GatewayConfig::new(&dir, "gw-paho5", None)?;
    check_paho_rule(&dir, &cfg, rule, &[])?;
    Ok(())
}

#[test]
fn mqtt5_session_kept_for_expiry_interval_then_discarded() -> anyhow::Result<()> {
    check("mqtt5_session_kept_for_expiry_interval_then_discarded")
}

#[test]
fn mqtt5_assigned_client_identifier_for_empty_client_id() -> anyhow::Result<()> {
    check("mqtt5_assigned_client_identifier_for_empty_client_id")
}

#[test]
fn mqtt5_message_expiry_applies_in_offline_queue() -> anyhow::Result<()> {
    check("mqtt5_message_expiry_applies_in_offline_queue")
}

#[test]
fn mqtt5_message_expiry_applies_to_retained_messages() -> anyhow::Result<()> {
    check("mqtt5_message_expiry_applies_to_retained_messages")
}

#[test]
fn mqtt5_will_delay_sends_will_after_delay_not_on_quick_reconnect() -> anyhow::Result<()> {
    check("mqtt5_will_delay_sends_will_after_delay_not_on_quick_reconnect")
}

#[test]
fn mqtt5_disconnect_with_will_message_publishes_will() -> anyhow::Result<()> {
    check("mqtt5_disconnect_with_will_message_publishes_will")
}

#[test]
fn mqtt5_session_gone_once_expiry_interval_passed() -> anyhow::Result<()> {
    check("mqtt5_session_gone_once_expiry_interval_passed")
}

#[test]
fn mqtt5_will_sent_once_delay_passed_even_if_client_reconnects_after() -> anyhow::Result<()> {
    check("mqtt5_will_sent_once_delay_passed_even_if_client_reconnects_after")
}
