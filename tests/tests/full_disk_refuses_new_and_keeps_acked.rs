//! A full disk: the store's filesystem (a small tmpfs the test mounts) fills up while a sensor
//! publishes QoS 1 readings and the uplink is down. The gateway keeps running, refuses what it
//! cannot store (no PUBACK: the publisher's connection is closed), reports the store as poisoned,
//! and loses nothing it acknowledged: after the filesystem grows and the gateway restarts, every
//! acked reading arrives upstream.
//!
//! Needs permission to mount a tmpfs (root here); where that is refused the test says SKIP.

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
    // The uplink is down while the disk fills: everything acked stays in the store.
    let mut cloud = Mosquitto::start(&dir)?;
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
    assert_eq!(
        s["store"]["poisoned"], true,
        "the store reports the failed commit: {s:#}"
    );
    let refused = json_u64(&s, &["runtime", "ingest_refused"]).unwrap_or(0);
    assert!(refused > 0, "refusals are counted: {s:#}");

    // More room, a restart, the uplink back: every acked reading arrives.
    let _ = gw.sigterm()?;
    fs.resize("64m")?;
    cloud.restart()?;
    let consumer = Subscriber::spawn(
        &dir,
        "cloud",
        &SubscriberSpec::new(cloud.port(), &format!("outpost/{NODE}/#")),
    )?;
    gw.restart()?;
    let msgs = wait_for_readings(&consumer, &mut gw, &acked, Duration::from_secs(300))?;
    let d = check_upstream_delivery(
        &msgs,
        NODE,
        &[topic.to_owned()],
        100,
        &acked,
        SeqSource::UserProperty,
    )?;
    eprintln!("delivery after the disk grew: {d:?}");
    Ok(())
}
