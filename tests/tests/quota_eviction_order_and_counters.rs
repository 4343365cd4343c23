//! Quota and eviction: with the upstream down and a 64 KiB quota, readings routed to high,
//! normal and low priority are published in a known order until the store overflows. Eviction
//! takes the lowest priority first and, within it, the oldest; `status --json` reports exact
//! counters; after a restart with the upstream up, exactly the surviving readings arrive.
//!
//! Accounting (the storage contract): a record costs payload + stream (local topic) bytes + 64.
//! Here every record is 100 + 4 + 64 = 168 bytes, so 390 fit in 65,536 (65,520 bytes).

use std::collections::BTreeSet;
use std::time::Duration;

use outpost_tests::{
    GatewayConfig, Mosquitto, Outpost, Publisher, PublisherSpec, Route, Subscriber, SubscriberSpec,
    TestDir, json_u64, parse_payload, wait_for,
};
use serde_json::Value;

const NODE: &str = "gw1";
const RECORD: u64 = 100 + 4 + 64;
const FIT: u64 = 65_536 / RECORD; // 390

fn publish(
    dir: &TestDir,
    gw: &Outpost,
    name: &str,
    topics: &[&str],
    count: u64,
    start: u64,
) -> anyhow::Result<()> {
    let mut spec = PublisherSpec::new(gw.port(), topics, count);
    spec.start = start;
    spec.interleave = false;
    let acked = Publisher::spawn(dir, name, &spec)?.finish(Duration::from_secs(120))?;
    assert_eq!(
        acked.len(),
        topics.len() * usize::try_from(count)?,
        "evict-lowest-oldest never refuses a reading"
    );
    Ok(())
}

/// The counters a status must show: (buffered high, normal, low), (evicted high, normal, low), appended.
fn expect(s: &Value, buffered: [u64; 3], evicted: [u64; 3], appended: u64, when: &str) {
    let get = |p: &[&str]| json_u64(s, p);
    let b = buffered.iter().sum::<u64>();
    let e = evicted.iter().sum::<u64>();
    let want = [
        (vec!["buffered_by_priority", "high"], buffered[0]),
        (vec!["buffered_by_priority", "normal"], buffered[1]),
        (vec!["buffered_by_priority", "low"], buffered[2]),
        (vec!["buffered_records"], b),
        (vec!["buffered_bytes"], b * RECORD),
        (vec!["store", "evicted_high"], evicted[0]),
        (vec!["store", "evicted_normal"], evicted[1]),
        (vec!["store", "evicted_low"], evicted[2]),
        (vec!["store", "evicted_total"], e),
        (vec!["store", "appended_total"], appended),
        (vec!["store", "acked_total"], 0),
        (vec!["store", "rejected_full_total"], 0),
        (vec!["store", "expired_total"], 0),
    ];
    let wrong: Vec<String> = want
        .iter()
        .filter(|(p, v)| get(p) != Some(*v))
        .map(|(p, v)| format!("{}: want {v}, got {:?}", p.join("."), get(p)))
        .collect();
    assert!(
        wrong.is_empty(),
        "{when}: {}\nstatus: {s:#}",
        wrong.join("; ")
    );
}

#[test]
fn eviction_takes_lowest_priority_oldest_first_and_counts_exactly() -> anyhow::Result<()> {
    assert_eq!(FIT, 390);
    let dir = TestDir::new("quota")?;
    let cloud_port = Mosquitto::reserve_port()?;
    let mut cfg = GatewayConfig::new(&dir, NODE, Some(cloud_port))?;
    cfg.quota = "64KiB".to_owned();
    cfg.when_full = "evict-lowest-oldest".to_owned();
    // The gateway's own resource samples are records too (low priority): keep them out of a
    // scenario that counts records exactly.
    cfg.resource_interval = Some("1h".to_owned());
    cfg.routes = vec![
        Route::cloud("q/hi", "high"),
        Route::cloud("q/no", "normal"),
        Route::cloud("q/lo", "low"),
    ];
    let mut gw = Outpost::start(&dir, &cfg)?;

    // 150 low, then 150 normal, then 150 high: 450 records, 60 too many. The 60 oldest low go.
    publish(&dir, &gw, "phase1", &["q/lo", "q/no", "q/hi"], 150, 0)?;
    let s = gw.wait_status("450 appended", Duration::from_secs(30), |s| {
        json_u64(s, &["store", "appended_total"]) == Some(450)
    })?;
    expect(
        &s,
        [150, 150, 90],
        [0, 0, 60],
        450,
        "after 150 low, 150 normal, 150 high",
    );

    // 100 more high: the remaining 90 low go, then the 10 oldest normal.
    publish(&dir, &gw, "phase2", &["q/hi"], 100, 150)?;
    let s = gw.wait_status("550 appended", Duration::from_secs(30), |s| {
        json_u64(s, &["store", "appended_total"]) == Some(550)
    })?;
    expect(&s, [250, 140, 0], [0, 10, 150], 550, "after 100 more high");

    // The counts survive a clean stop.
    let st = gw.sigterm()?;
    assert!(
        st.success(),
        "SIGTERM must stop outpost with exit 0, got {st}"
    );
    expect(
        &gw.status_json()?,
        [250, 140, 0],
        [0, 10, 150],
        550,
        "after SIGTERM",
    );

    // Upstream up, consumer attached, gateway back: exactly the survivors arrive.
    let _cloud = Mosquitto::start_on(&dir, cloud_port, false)?;
    let consumer = Subscriber::spawn(
        &dir,
        "cloud",
        &SubscriberSpec::new(cloud_port, &format!("outpost/{NODE}/#")),
    )?;
    gw.restart()?;
    gw.wait_status("buffer drained", Duration::from_secs(120), |s| {
        json_u64(s, &["buffered_records"]) == Some(0)
    })?;
    let expected: BTreeSet<(String, u64)> = (0..250)
        .map(|c| ("q/hi".to_owned(), c))
        .chain((10..150).map(|c| ("q/no".to_owned(), c)))
        .collect();
    wait_for(
        "every surviving reading upstream",
        Duration::from_secs(60),
        || {
            let got: BTreeSet<(String, u64)> = consumer
                .messages()
                .ok()?
                .iter()
                .filter_map(|m| parse_payload(&m.payload))
                .collect();
            expected.is_subset(&got).then_some(())
        },
    )?;
    // Let stragglers (which must not exist) arrive before comparing exactly.
    std::thread::sleep(Duration::from_secs(2));
    let msgs = consumer.messages()?;
    let mut got = BTreeSet::new();
    for m in &msgs {
        // The gateway's own lifecycle messages (birth on `$gateway/status`, ...) are not
        // readings; anything on a reading topic or carrying a reading's payload is checked.
        let reading_topic = m.topic.starts_with(&format!("outpost/{NODE}/q/"));
        if !reading_topic && parse_payload(&m.payload).is_none() {
            continue;
        }
        let (t, c) = parse_payload(&m.payload).ok_or_else(|| {
            anyhow::anyhow!(
                "unexpected upstream message on {}: {:?}",
                m.topic,
                String::from_utf8_lossy(&m.payload)
            )
        })?;
        assert_eq!(m.topic, format!("outpost/{NODE}/{t}"));
        got.insert((t, c));
    }
    let evicted_arrived: Vec<&(String, u64)> = got.difference(&expected).collect();
    assert!(
        evicted_arrived.is_empty(),
        "evicted readings arrived upstream: {evicted_arrived:?}"
    );
    assert_eq!(got, expected);
    let s = gw.status_json()?;
    assert_eq!(
        json_u64(&s, &["store", "acked_total"]),
        Some(390),
        "every survivor acked: {s:#}"
    );
    assert_eq!(
        json_u64(&s, &["store", "evicted_total"]),
        Some(160),
        "no eviction after the drain: {s:#}"
    );
    Ok(())
}
