//! A power-cut style crash loop: 50 times, the gateway (shipped storage defaults: durability
//! "full") is SIGKILLed at a random moment while a sensor publishes QoS 1 readings, and started
//! again on the same data directory. The uplink is down the whole time, so every acked reading
//! must be in the store. After each kill, before the restart:
//! - SQLite's `PRAGMA integrity_check` on the database (and its WAL) says "ok";
//! - every reading any publisher saw PUBACKed so far is in the `records` table, by payload.
//!
//! At the end the uplink comes back and every acked reading arrives upstream, in order per topic.
//!
//! What could be injected here: process kills at random moments (SIGKILL, the closest a test can
//! get to a power cut without a VM: the page cache survives, so this proves SQLite's commit
//! protocol as the gateway drives it, not the disk's flush). Real I/O errors (device-mapper
//! `error`/`flakey` targets on a loop device) need dm kernel modules that these machines do not
//! load; the full-disk scenario covers failed writes with a real filesystem.
//!
//! The kill moment is drawn from a seeded generator (the seed is printed), between 50 ms and
//! 600 ms after the publisher's first ack, so kills land during ingest commits, TTL passes and
//! status writes alike.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use outpost_tests::{
    GatewayConfig, Mosquitto, Outpost, Publisher, PublisherSpec, SeqSource, Subscriber,
    SubscriberSpec, TestDir, check_upstream_delivery, payload, wait_for, wait_for_readings,
};

const NODE: &str = "gw1";
const ITERATIONS: usize = 50;

/// xorshift64*: a reproducible "random" kill moment without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// `PRAGMA integrity_check` and the payloads of every stored record, read with Python's sqlite3
/// (a second, independent SQLite reader) in read-only mode.
fn inspect_db(db: &std::path::Path) -> Result<(String, BTreeSet<Vec<u8>>)> {
    let script = r#"
import sqlite3, sys
con = sqlite3.connect("file:" + sys.argv[1] + "?mode=ro", uri=True)
print(con.execute("PRAGMA integrity_check").fetchone()[0])
for (p,) in con.execute("SELECT payload FROM records"):
    print(bytes(p).hex())
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(db)
        .output()
        .context("running python3 sqlite3")?;
    if !out.status.success() {
        bail!(
            "reading {}: {}",
            db.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8(out.stdout)?;
    let mut lines = text.lines();
    let integrity = lines.next().unwrap_or_default().to_owned();
    let mut payloads = BTreeSet::new();
    for l in lines {
        let bytes = (0..l.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&l[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()?;
        payloads.insert(bytes);
    }
    Ok((integrity, payloads))
}

#[test]
fn fifty_sigkills_under_load_keep_the_database_sound_and_every_acked_reading() -> Result<()> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64
        | 1;
    eprintln!("crash loop seed {seed}");
    let mut rng = Rng(seed);
    let dir = TestDir::new("crash-loop")?;
    let mut cloud = Mosquitto::start(&dir)?;
    cloud.stop()?;
    let mut cfg = GatewayConfig::new(&dir, NODE, Some(cloud.port()))?;
    cfg.shipped_storage = true;
    let db = cfg.data_dir.join("outpost.db");
    let mut gw = Outpost::start(&dir, &cfg)?;

    let mut acked: Vec<(String, u64)> = Vec::new();
    let mut topics = Vec::new();
    for i in 0..ITERATIONS {
        if i > 0 {
            gw.restart()?;
        }
        let topic = format!("loop/{i}");
        let publisher = Publisher::spawn(
            &dir,
            &format!("pub{i}"),
            &PublisherSpec::new(gw.port(), &[topic.as_str()], 1_000_000),
        )?;
        wait_for("the publisher's first ack", Duration::from_secs(60), || {
            (publisher.acked().map_or(0, |a| a.len()) > 0).then_some(())
        })?;
        std::thread::sleep(Duration::from_millis(50 + rng.next() % 550));
        gw.sigkill()?;
        let got = publisher.finish(Duration::from_secs(60))?;
        assert!(!got.is_empty(), "iteration {i}: nothing acked");
        acked.extend(got);
        topics.push(topic);

        let (integrity, stored) = inspect_db(&db)?;
        assert_eq!(integrity, "ok", "iteration {i}: integrity_check");
        let missing: Vec<&(String, u64)> = acked
            .iter()
            .filter(|(t, n)| !stored.contains(&payload(t, *n, 100)))
            .collect();
        assert!(
            missing.is_empty(),
            "iteration {i}: {} acked readings missing from the store after SIGKILL, e.g. {:?}",
            missing.len(),
            missing.iter().take(5).collect::<Vec<_>>()
        );
    }
    eprintln!(
        "{} readings acked over {ITERATIONS} kills, all in the store after each",
        acked.len()
    );

    // The consumer is subscribed (Subscriber::spawn waits for its SUBACK) before the gateway
    // starts again.
    cloud.restart()?;
    let consumer = Subscriber::spawn(
        &dir,
        "cloud",
        &SubscriberSpec::new(cloud.port(), &format!("outpost/{NODE}/#")),
    )?;
    gw.restart()?;
    let msgs = wait_for_readings(&consumer, &mut gw, &acked, Duration::from_secs(600))?;
    let d = check_upstream_delivery(&msgs, NODE, &topics, 100, &acked, SeqSource::UserProperty)?;
    eprintln!("delivery after the crash loop: {d:?}");
    Ok(())
}
