//! A full disk: the store's filesystem (a small tmpfs the test mounts) fills up while a sensor
//! publishes QoS 1 readings and the uplink is down. The gateway keeps running, refuses what it
//! cannot store (no PUBACK: the publisher's connection is closed), reports the store as failing
//! (since when, why), and loses nothing it acknowledged. When the filesystem grows, without a
//! restart, the store heals by itself within seconds and acks readings again; when the uplink
//! comes back, every acked reading (before and after) arrives upstream.
//!
//! Needs permission to mount a tmpfs (root here); where that is refused the test says SKIP, and
//! fails under CI=true.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use outpost_tests::{
    GatewayConfig, Mosquitto, Outpost, Publisher, PublisherSpec, SeqSource, Subscriber,
    SubscriberSpec, TestDir, check_upstream_delivery, json_u64, wait_for_readings,
};

const NODE: &str = "gw1";

/// A tmpfs mounted for the test, unmounted (lazily) when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Result<Option<Self>> {
        std::fs::create_dir_all(at)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .context("running mount")?;
        if !out.status.success() {
            return outpost_tests::skip_unless_ci(&format!(
                "cannot mount a tmpfs here: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Some(Self(at.to_path_buf())))
    }

    fn resize(&self, size: &str) -> Result<()> {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .output()?;
        if !out.status.success() {
            bail!("remount: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn full_disk_refuses_new_readings_and_keeps_every_acked_one() -> Result<()> {
    let dir = TestDir::new("full-disk")?;
    let data = dir.join("data");
    let Some(fs) = Tmpfs::mount(&data, "2m")? else {
        return Ok(());
    };
    // The uplink is down while the disk fills: everything acked stays in the store. The cloud
    // consumer's persistent session is in mosquitto's database before it stops, so it is
    // subscribed again before the gateway can reconnect (no restart of the gateway this time).
    let mut cloud = Mosquitto::start_on(&dir, Mosquitto::reserve_port()?, true)?;
    let mut sub_spec = SubscriberSpec::new(cloud.port(), &format!("outpost/{NODE}/#"));
    sub_spec.client_id = "cloud-consumer".to_owned();
    sub_spec.session_expiry = Some(3600);
    let consumer = Subscriber::spawn(&dir, "cloud", &sub_spec)?;
    cloud.wait_saved()?;
    cloud.stop()?;
    let mut cfg = GatewayConfig::new(&dir, NODE, Some(cloud.port()))?;
    cfg.data_dir = data.clone();
    cfg.durability = "full".to_owned();
    let mut gw = Outpost::start(&dir, &cfg)?;

    let topic = "line/1/temp";
    let publisher = Publisher::spawn(
        &dir,
        "sensor",
        &PublisherSpec::new(gw.port(), &[topic], 200_000),
    )?;
    // The publisher ends when the gateway refuses it (3.1.1: connection closed, no PUBACK).
    let acked = publisher.finish(Duration::from_secs(300))?;
    assert!(
        !acked.is_empty() && acked.len() < 200_000,
        "the disk filled part-way: {} of 200000 acked",
        acked.len()
    );
    eprintln!("{} readings acked before the disk was full", acked.len());

    // Still running, and honest about it.
    gw.check_alive()?;
    let s = gw.status_json()?;
    // A small write (the store's retry) can still commit on a full disk while a batch of
    // readings cannot, so the store may be between "failing" and "healed" here: the counters
    // say what happened either way.
    assert!(
        s["store"]["commit_failures_total"].as_u64() >= Some(1),
        "the store counts the failed commits: {s:#}"
    );
    if s["store"]["poisoned"] == true {
        assert!(
            s["store"]["failing_since_ms"].is_u64() && s["store"]["failing_error"].is_string(),
            "while failing, the status says since when and why: {s:#}"
        );
    }
    let refused = json_u64(&s, &["runtime", "ingest_refused"]).unwrap_or(0);
    assert!(refused > 0, "refusals are counted: {s:#}");

    // More room, no restart: the store heals by itself within seconds and takes readings again.
    fs.resize("64m")?;
    gw.wait_status(
        "the store to heal by itself after space came back",
        Duration::from_secs(20),
        |s| s["store"]["poisoned"] == false && s["store"]["recoveries_total"].as_u64() >= Some(1),
    )?;
    let more = Publisher::spawn(
        &dir,
        "sensor-after",
        &PublisherSpec::new(gw.port(), &["line/2/temp"], 1_000),
    )?
    .finish(Duration::from_secs(120))?;
    assert_eq!(
        more.len(),
        1_000,
        "readings are acked again once the disk has room"
    );

    // The uplink back, still no restart: every acked reading, before and after, arrives.
    cloud.restart()?;
    let all: Vec<(String, u64)> = acked.iter().chain(more.iter()).cloned().collect();
    let msgs = wait_for_readings(&consumer, &mut gw, &all, Duration::from_secs(300))?;
    let d = check_upstream_delivery(
        &msgs,
        NODE,
        &[topic.to_owned(), "line/2/temp".to_owned()],
        100,
        &all,
        SeqSource::UserProperty,
    )?;
    eprintln!("delivery after the disk grew: {d:?}");
    Ok(())
}
