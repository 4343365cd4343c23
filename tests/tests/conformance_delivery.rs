//! Delivery rules of outpost's local broker, with mosquitto_pub publishing and paho subscribing:
//! messages go out at min(publish QoS, granted QoS) and never above, and a retained message is
//! delivered (retain flag set) to a later subscriber until an empty retained message clears it.

use std::time::Duration;

use outpost_tests::{Client, GatewayConfig, Outpost, TestDir, mosquitto_pub_ok};

fn gateway(dir: &TestDir) -> anyhow::Result<Outpost> {
    Outpost::start(dir, &GatewayConfig::new(dir, "gw1", None)?)
}

#[test]
fn delivery_qos_is_the_minimum_of_publish_and_subscription() -> anyhow::Result<()> {
    let dir = TestDir::new("qos")?;
    let gw = gateway(&dir)?;
    let sub = Client::spawn(
        &dir,
        "sub",
        gw.port(),
        &[
            "--subscribe",
            "q/p2s1:1",
            "--subscribe",
            "q/p1s0:0",
            "--subscribe",
            "q/p0s1:1",
            "--subscribe",
            "q/p2s2:2",
        ],
    )?;
    let granted = sub.wait_line("subscribed", Duration::from_secs(30))?;
    assert_eq!(
        granted, "subscribed granted=1,0,1,2",
        "granted QoS must be the requested QoS"
    );

    mosquitto_pub_ok(gw.port(), &["-t", "q/p2s1", "-q", "2", "-m", "a"])?;
    mosquitto_pub_ok(gw.port(), &["-t", "q/p1s0", "-q", "1", "-m", "b"])?;
    mosquitto_pub_ok(gw.port(), &["-t", "q/p0s1", "-q", "0", "-m", "c"])?;
    mosquitto_pub_ok(gw.port(), &["-t", "q/p2s2", "-q", "2", "-m", "d"])?;

    for (topic, body, qos) in [
        ("q/p2s1", "a", 1),
        ("q/p1s0", "b", 0),
        ("q/p0s1", "c", 0),
        ("q/p2s2", "d", 2),
    ] {
        let line = sub
            .wait_line(
                &format!("message {qos} 0 {topic} "),
                Duration::from_secs(30),
            )
            .map_err(|e| {
                anyhow::anyhow!(
                    "{topic} not delivered at QoS {qos}: {e}; got {:?}",
                    sub.lines()
                )
            })?;
        assert_eq!(line, format!("message {qos} 0 {topic} {body}"));
    }
    let messages: Vec<String> = sub
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("message "))
        .collect();
    assert_eq!(messages.len(), 4, "each message exactly once: {messages:?}");
    Ok(())
}

#[test]
fn retained_message_reaches_a_later_subscriber_until_cleared() -> anyhow::Result<()> {
    let dir = TestDir::new("retained")?;
    let gw = gateway(&dir)?;
    mosquitto_pub_ok(gw.port(), &["-t", "ret/a", "-q", "1", "-r", "-m", "kept"])?;

    let late = Client::spawn(&dir, "late", gw.port(), &["--subscribe", "ret/#:1"])?;
    late.wait_line("subscribed", Duration::from_secs(30))?;
    let line = late.wait_line("message ", Duration::from_secs(30))?;
    assert_eq!(
        line, "message 1 1 ret/a kept",
        "retained message delivered with retain set"
    );

    // A live publish to an existing subscriber is not flagged retained.
    mosquitto_pub_ok(gw.port(), &["-t", "ret/a", "-q", "1", "-r", "-m", "again"])?;
    late.wait_line("message 1 0 ret/a again", Duration::from_secs(30))?;

    // An empty retained message clears it.
    mosquitto_pub_ok(gw.port(), &["-t", "ret/a", "-q", "1", "-r", "-n"])?;
    let later = Client::spawn(&dir, "later", gw.port(), &["--subscribe", "ret/#:1"])?;
    later.wait_line("subscribed", Duration::from_secs(30))?;
    std::thread::sleep(Duration::from_secs(2));
    let got: Vec<String> = later
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("message "))
        .collect();
    assert!(
        got.is_empty(),
        "a cleared retained message was delivered: {got:?}"
    );
    Ok(())
}
