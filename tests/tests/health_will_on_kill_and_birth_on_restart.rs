//! Lifecycle on the upstream status topic `outpost/<node>/$gateway/status`: on connect the
//! gateway publishes a retained birth (`state: "online"`, node, labels, capabilities, version,
//! start and connect times). SIGKILL it: mosquitto publishes its will, retained
//! (`state: "offline"`, `reason: "connection-lost"`). Start it again: a new birth replaces the
//! will as the retained message (a subscriber arriving after the restart gets `online`, with
//! the new start time). SIGTERM: a retained `reason: "shutdown"` replaces it, and no will follows.

use std::time::Duration;

use outpost_tests::{
    GatewayConfig, Mosquitto, Outpost, Received, Subscriber, SubscriberSpec, TestDir,
    first_message, gateway_topic, json_str, payload_json, wait_for,
};
use serde_json::Value;

const NODE: &str = "gw-life";
const WAIT: Duration = Duration::from_secs(30);

/// Waits until `sub` has received more than `seen` messages and returns the next one.
fn next_message(sub: &Subscriber, seen: usize, what: &str) -> anyhow::Result<(Received, Value)> {
    let m = wait_for(what, WAIT, || sub.messages().ok()?.into_iter().nth(seen))?;
    let v = payload_json(&m.payload);
    Ok((m, v))
}

fn assert_birth(v: &Value, started_after_ms: u64) {
    assert_eq!(v["state"], "online", "birth: {v}");
    assert_eq!(v["node"], NODE, "birth: {v}");
    assert_eq!(v["labels"]["site"], "test", "birth carries the labels: {v}");
    assert!(
        v["capabilities"].as_array().is_some_and(|c| !c.is_empty()),
        "birth carries capabilities: {v}"
    );
    assert!(
        v["version"].as_str().is_some_and(|s| !s.is_empty()),
        "birth: {v}"
    );
    let started = v["started_at_ms"].as_u64().unwrap_or(0);
    let connected = v["connected_at_ms"].as_u64().unwrap_or(0);
    assert!(
        started >= started_after_ms,
        "started_at_ms {started} is before the process was started ({started_after_ms}): {v}"
    );
    assert!(connected >= started, "connected before started: {v}");
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0))
}

#[test]
fn will_on_kill_birth_retained_again_on_restart_shutdown_on_sigterm() -> anyhow::Result<()> {
    let dir = TestDir::new("health-lifecycle")?;
    let cloud = Mosquitto::start(&dir)?;
    let topic = gateway_topic(NODE, "status");
    let watcher = Subscriber::spawn(&dir, "watcher", &SubscriberSpec::new(cloud.port(), &topic))?;

    // Birth.
    let t0 = unix_ms();
    let mut gw = Outpost::start(&dir, &GatewayConfig::new(&dir, NODE, Some(cloud.port()))?)?;
    let (live, birth1) = next_message(&watcher, 0, "the birth")?;
    assert_birth(&birth1, t0.saturating_sub(1000));
    assert_eq!(live.qos, 1, "birth at QoS 1");
    let late = first_message(&dir, "after-birth", cloud.port(), &topic, WAIT)?;
    assert!(late.retain, "the birth is retained: {late:?}");
    assert_eq!(
        payload_json(&late.payload),
        birth1,
        "the retained message is the birth"
    );

    // SIGKILL: mosquitto publishes the will.
    gw.sigkill()?;
    let (_, will) = next_message(&watcher, 1, "the will after SIGKILL")?;
    assert_eq!(will["state"], "offline", "will: {will}");
    assert_eq!(will["reason"], "connection-lost", "will: {will}");
    assert_eq!(will["node"], NODE, "will: {will}");
    let late = first_message(&dir, "after-kill", cloud.port(), &topic, WAIT)?;
    assert!(late.retain, "the will is retained: {late:?}");
    assert_eq!(
        payload_json(&late.payload),
        will,
        "the retained message is the will"
    );

    // Restart: a new birth, retained again.
    let t1 = unix_ms();
    gw.restart()?;
    let (_, birth2) = next_message(&watcher, 2, "the birth after restart")?;
    assert_birth(&birth2, t1.saturating_sub(1000));
    assert!(
        birth2["started_at_ms"].as_u64() > birth1["started_at_ms"].as_u64(),
        "the second birth has the new start time: {birth1} then {birth2}"
    );
    let late = first_message(&dir, "after-restart", cloud.port(), &topic, WAIT)?;
    assert!(late.retain, "the new birth is retained: {late:?}");
    let retained = payload_json(&late.payload);
    assert_eq!(
        json_str(&retained, &["state"]),
        Some("online"),
        "{retained}"
    );
    assert_eq!(retained, birth2, "the retained message is the new birth");

    // SIGTERM: a retained clean-shutdown message, and no will after it.
    let st = gw.sigterm()?;
    assert!(st.success(), "outpost exits 0 on SIGTERM: {st}");
    let (_, bye) = next_message(&watcher, 3, "the shutdown message")?;
    assert_eq!(bye["state"], "offline", "shutdown: {bye}");
    assert_eq!(bye["reason"], "shutdown", "shutdown: {bye}");
    assert!(bye["at_ms"].as_u64().is_some_and(|t| t >= t1), "{bye}");
    // A will would come right after the connection closed; leave it a moment to show up.
    std::thread::sleep(Duration::from_millis(1000));
    let late = first_message(&dir, "after-sigterm", cloud.port(), &topic, WAIT)?;
    assert!(late.retain, "{late:?}");
    assert_eq!(
        payload_json(&late.payload),
        bye,
        "the retained message is the shutdown"
    );
    let all: Vec<Value> = watcher
        .messages()?
        .iter()
        .map(|m| payload_json(&m.payload))
        .collect();
    assert_eq!(
        all.len(),
        4,
        "birth, will, birth, shutdown and nothing else: {all:#?}"
    );
    Ok(())
}
