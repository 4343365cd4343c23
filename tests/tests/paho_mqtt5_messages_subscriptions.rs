//! MQTT 5 message and subscription rules of outpost's broker, checked with a third-party client:
//! paho-mqtt with `protocol=MQTTv5` (tests/py/paho_rules.py, one function per test below, named
//! alike). Message properties passed through, subscription options (no-local,
//! retain-as-published, retain handling), subscription identifiers, shared subscriptions, and
//! the delivered QoS. Each test has a gateway of its own.

use outpost_tests::{GatewayConfig, TestDir, check_paho_rule};

/// Runs `rule` against a fresh gateway with the harness defaults.
fn check(rule: &str) -> anyhow::Result<()> {
    let dir = TestDir::new(rule)?;
    let cfg = GatewayConfig::new(&dir, "gw-paho5", None)?;
    check_paho_rule(&dir, &cfg, rule, &[])?;
    Ok(())
}

#[test]
fn mqtt5_message_properties_pass_through_to_v5_subscriber() -> anyhow::Result<()> {
    check("mqtt5_message_properties_pass_through_to_v5_subscriber")
}

#[test]
fn mqtt5_no_local_skips_own_publications() -> anyhow::Result<()> {
    check("mqtt5_no_local_skips_own_publications")
}

#[test]
fn mqtt5_retain_as_published_keeps_retain_flag() -> anyhow::Result<()> {
    check("mqtt5_retain_as_published_keeps_retain_flag")
}

#[test]
fn mqtt5_retain_handling_0_1_2() -> anyhow::Result<()> {
    check("mqtt5_retain_handling_0_1_2")
}

#[test]
fn mqtt5_subscription_identifiers_on_delivery() -> anyhow::Result<()> {
    check("mqtt5_subscription_identifiers_on_delivery")
}

#[test]
fn mqtt5_shared_subscription_splits_messages_across_group() -> anyhow::Result<()> {
    check("mqtt5_shared_subscription_splits_messages_across_group")
}

#[test]
fn mqtt5_delivered_qos_is_min_of_published_and_granted() -> anyhow::Result<()> {
    check("mqtt5_delivered_qos_is_min_of_published_and_granted")
}
