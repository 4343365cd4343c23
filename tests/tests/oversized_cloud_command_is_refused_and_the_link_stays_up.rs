//! A cloud command larger than the local broker's packet limit is refused and counted, and
//! neither stops the uplink nor comes back.
//!
//! The gateway's local broker takes packets up to `[broker] max_packet_size = "1KiB"`; its
//! upstream session is persistent (the shipped `clean_session = false`), so a command it neither
//! delivers nor acknowledges would be redelivered by the cloud broker on every reconnect. A cloud
//! client publishes QoS 1 on `outpost/<node>/cmd/x` a 4 KB command (over the local limit, under
//! rumqttc's 10 KiB default) and a 20 KB one (over both). Each is refused
//! (`runtime.commands_refused` goes up by one for each), no local subscriber of `x` receives
//! it, the link stays connected without reconnecting over a few seconds, and a normal-size
//! command afterwards is delivered. After a restart of the gateway (same persistent session) the
//! refused commands are not delivered again: they were acknowledged upstream.

use std::time::{Duration, Instant};

use outpost_tests::{
    Client, GatewayConfig, Mosquitto, Outpost, TestDir, UplinkReport, json_u64, mosquitto_pub_ok,
    wait_for,
};

const NODE: &str = "gw1";

/// The payloads the local subscriber `device` received on `x`, in order.
fn received(device: &Client) -> Vec<String> {
    device
        .lines()
        .iter()
        .filter_map(|l| l.strip_prefix("message "))
        .filter_map(|l| {
            let mut p = l.splitn(4, ' ');
            let (_qos, _retain, topic, body) = (p.next()?, p.next()?, p.next()?, p.next());
            (topic == "x").then(|| body.unwrap_or_default().to_owned())
        })
        .collect()
}

fn command(cloud: &Mosquitto, dir: &TestDir, name: &str, body: &str) -> anyhow::Result<()> {
    let file = dir.join(&format!("{name}.cmd"));
    std::fs::write(&file, body)?;
    mosquitto_pub_ok(
        cloud.port(),
        &[
            "-q",
            "1",
            "-t",
            &format!("outpost/{NODE}/cmd/x"),
            "-f",
            &file.display().to_string(),
        ],
    )
}

/// Sends `body` until the local subscriber has it (the gateway subscribes to its command topic
/// after connecting: a command before that is not what this test is about).
fn command_delivered(
    cloud: &Mosquitto,
    dir: &TestDir,
    device: &Client,
    body: &str,
) -> anyhow::Result<()> {
    wait_for(
        &format!("command {body:?} on the local broker"),
        Duration::from_secs(30),
        || {
            command(cloud, dir, body, body).ok()?;
            std::thread::sleep(Duration::from_millis(300));
            received(device).iter().any(|b| b == body).then_some(())
        },
    )
}

#[test]
fn oversized_cloud_command_is_refused_counted_and_the_link_stays_up() -> anyhow::Result<()> {
    let dir = TestDir::new("oversized-command")?;
    let cloud = Mosquitto::start(&dir)?;
    let mut cfg = GatewayConfig::new(&dir, NODE, Some(cloud.port()))?;
    cfg.broker_max_packet_size = "1KiB".to_owned();
    let mut gw = Outpost::start(&dir, &cfg)?;
    gw.wait_uplink_connected()?;
    let device = Client::spawn(
        &dir,
        "device",
        gw.port(),
        &["--subscribe", "x:1", "--client-id", "actuator"],
    )?;
    device.wait_line("subscribed", Duration::from_secs(30))?;
    command_delivered(&cloud, &dir, &device, "warm-up")?;

    let mut refused = 0;
    for (name, size) in [("big-4k", 4_000), ("big-20k", 20_000)] {
        let body = format!("{name}:{}", "A".repeat(size - name.len() - 1));
        command(&cloud, &dir, name, &body)?;
        let s = gw.wait_status(
            &format!("the {name} command counted as refused"),
            Duration::from_secs(30),
            |s| json_u64(s, &["runtime", "commands_refused"]).is_some_and(|n| n > refused),
        )?;
        refused = json_u64(&s, &["runtime", "commands_refused"]).unwrap_or(0);
    }

    // A few seconds: the link stays up and does not reconnect (status written every second).
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        gw.check_alive()?;
        let s = gw.status_json()?;
        let r = UplinkReport::from_status(&s);
        assert_eq!(
            (r.state.as_deref(), r.reconnects),
            (Some("connected"), Some(0)),
            "after refused commands the link must stay up: {s:#}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    command_delivered(&cloud, &dir, &device, "after")?;
    let got = received(&device);
    assert!(
        got.iter().all(|b| b.len() < 1024),
        "a command over the local limit reached a local subscriber: {:?}",
        got.iter().map(String::len).collect::<Vec<_>>()
    );
    let s = gw.status_json()?;
    let r = UplinkReport::from_status(&s);
    assert!(
        r.commands_refused.is_some_and(|n| n >= 2),
        "commands_refused: {s:#}"
    );
    assert_eq!(r.births_published, Some(1), "one connection: {s:#}");

    // Restart on the same persistent session: the refused commands were acknowledged upstream,
    // so the cloud broker has nothing to redeliver.
    let st = gw.sigterm()?;
    assert!(st.success(), "SIGTERM exit {st}");
    gw.restart()?;
    gw.wait_uplink_connected()?;
    // The first device lost its connection with the gateway: a new one.
    let device = Client::spawn(
        &dir,
        "device-2",
        gw.port(),
        &["--subscribe", "x:1", "--client-id", "actuator-2"],
    )?;
    device.wait_line("subscribed", Duration::from_secs(30))?;
    command_delivered(&cloud, &dir, &device, "after-restart")?;
    std::thread::sleep(Duration::from_secs(2));
    let s = gw.status_json()?;
    assert_eq!(
        json_u64(&s, &["runtime", "commands_refused"]),
        Some(0),
        "refused commands came back after a reconnect on the persistent session: {s:#}"
    );
    let got = received(&device);
    assert!(
        got.iter().all(|b| b.len() < 1024),
        "after the restart a command over the local limit reached a local subscriber"
    );
    Ok(())
}
