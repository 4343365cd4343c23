//! Issue 12, flood 3: 100,000 retained messages on 100,000 distinct topics, half of them at
//! QoS 0 and half at QoS 1 (two connections at once, each as fast as the gateway takes it).
//! Every retained message is state the broker keeps (in memory and in the store's `state`
//! table) for as long as nobody clears it, so without a bound a publisher that walks through
//! topic names grows the gateway for ever. The gateway runs with the shipped defaults,
//! loopback only; each retained publish is also an ordinary reading (routed to the cloud).
//!
//! While the flood runs and after it, until every topic is accounted for:
//! - **Memory.** The gateway's RSS (VmRSS, sampled every 50 ms) stays under its baseline + 32 MiB.
//!   The baseline is the highest RSS before the flood, with the probe below running (measured
//!   here: ~18 MiB idle, ~21 MiB after a burst of 20,000 QoS 1 readings, debug build). The
//!   shipped bound on retained messages is `broker.max_retained_bytes` (16 MiB of payload and
//!   topic); 32 MiB is twice that, room for the per-message bookkeeping and the normal load.
//!   The 100,000 messages of 256 bytes carry ~27 MiB of payload and topic: a gateway that
//!   keeps them all went to 83-96 MiB; with the shipped bounds (10,000 kept) ~29 MiB.
//! - **Latency.** A QoS 1 probe publishing every 50 ms on another topic gets its PUBACKs with a
//!   p99 under 2 s, and every probe reading is acked.
//! - **Accounting.** Every topic's retained message is kept (a `mqtt/r/` row in the store's
//!   `state` table, as many as the broker holds: `outpost_broker_retained_messages`) or refused
//!   (`outpost_broker_retained_refused_total`): kept + refused == 100,000, and at most the
//!   shipped `broker.max_retained` are kept.
//! - **Delivery.** Every acked reading (the probe's, and every QoS 1 flood message the gateway
//!   acked: refusing to *retain* a message does not refuse the reading) arrives upstream.
//!
//! Run time: ~45 s when every topic is kept; with the bounds 75-170 s on two loaded cores,
//! because refusing a retained message costs more than keeping one: each refusal sweeps the
//! whole retained store for expired messages (`RetainedStore::put` -> `remove_expired`, under
//! the router's lock). The count is the issue's; a gateway that refuses in constant time runs
//! it in well under a minute.
//!
//! Every violation is collected, so one run reports all of them.

use std::time::Duration;

use anyhow::{Result, anyhow};
use outpost_tests::{
    AckedReadings, ByteCount, FloodStage, PublishFlood, check_violations, required_metric,
    scrape_metrics, settle, shipped_limit, state_rows,
};

/// Topics per QoS (0 and 1): 100,000 in all.
const PER_QOS: u64 = 50_000;
const TOPICS: u64 = 2 * PER_QOS;
/// Payload bytes of each retained message.
const SIZE: usize = 256;
const RETAINED_PREFIX: &str = "mqtt/r/";
const REFUSED: &str = "outpost_broker_retained_refused_total";
/// See the module docs.
const RSS_ALLOWANCE: ByteCount = ByteCount::mib(32);
const P99_LIMIT: Duration = Duration::from_secs(2);

fn flood(qos: u8) -> PublishFlood {
    PublishFlood {
        topic: format!("retained/q{qos}/{{i}}"),
        count: PER_QOS,
        qos,
        retain: true,
        // outpost_tests::payload(topic, 0, SIZE): one reading per topic.
        payload: "{topic}|0|".to_owned(),
        size: SIZE,
        client_id: format!("retainer-q{qos}"),
    }
}

#[test]
fn one_hundred_thousand_retained_topics_stay_within_bounds_and_are_all_counted() -> Result<()> {
    let started = std::time::Instant::now();
    let mut stage = FloodStage::start("flood-retained", |_| {})?;
    let (db, health, port) = (stage.db(), stage.cfg.health_port, stage.gw.port());
    let watch = stage.watch()?;
    let dir = &stage.dir;
    let (q0, q1) = std::thread::scope(|s| {
        let q0 = s.spawn(|| flood(0).run(dir, "flood-q0", port, Duration::from_secs(300)));
        let q1 = flood(1).run(dir, "flood-q1", port, Duration::from_secs(300));
        let q0 = q0.join().map_err(|_| anyhow!("the QoS 0 flood panicked"));
        (q0, q1)
    });
    let (q0, q1) = (q0??, q1?);
    eprintln!("QoS 0 flood: {q0:?}\nQoS 1 flood: {q1:?}");
    let mut violations = Vec::new();
    if q0.sent != PER_QOS || q0.closed_early {
        violations.push(format!("the QoS 0 flood did not get through: {q0:?}"));
    }
    if q1.acked != PER_QOS || q1.closed_early {
        violations.push(format!(
            "the QoS 1 flood was not acknowledged in full: {q1:?}"
        ));
    }

    // Settle: every topic kept or refused (deadline 60 s), the RSS still sampled.
    settle(
        &mut violations,
        "every retained topic accounted for",
        || {
            let kept = state_rows(&db, RETAINED_PREFIX)?;
            let refused = scrape_metrics(health)?.value(REFUSED, &[]).unwrap_or(0.0) as u64;
            Ok(kept + refused >= TOPICS)
        },
    );
    stage.gw.check_alive()?;
    let report = watch.finish()?;
    eprintln!("{}", report.describe());
    violations.extend(report.violations(RSS_ALLOWANCE, P99_LIMIT));

    let kept = state_rows(&db, RETAINED_PREFIX)?;
    let m = scrape_metrics(health)?;
    let refused = required_metric(&m, REFUSED, &mut violations);
    let held = required_metric(&m, "outpost_broker_retained_messages", &mut violations);
    if held != kept {
        violations.push(format!(
            "the broker holds {held} retained messages, the store keeps {kept}"
        ));
    }
    eprintln!("accounting: {kept} retained kept + {refused} refused, of {TOPICS} topics");
    if kept + refused != TOPICS {
        violations.push(format!(
            "{kept} retained kept + {refused} refused = {}, not the {TOPICS} topics",
            kept + refused
        ));
    }
    match shipped_limit(&["broker", "max_retained"])? {
        Some(max) if kept > max => violations.push(format!(
            "{kept} retained messages kept, over the shipped broker.max_retained {max}"
        )),
        Some(_) => {}
        None => violations.push(format!(
            "the shipped configuration has no broker.max_retained: nothing bounds retained messages ({kept} kept)"
        )),
    }

    // Every acked reading upstream: the probe's and the QoS 1 flood's (acked in order).
    let topics: Vec<String> = (0..q1.acked).map(|i| format!("retained/q1/{i}")).collect();
    let acked = topics.iter().map(|t| (t.clone(), 0)).collect();
    let flooded = AckedReadings {
        topics,
        size: SIZE,
        acked,
    };
    let (_, delivery) = stage.check_delivered(&report, &[flooded])?;
    eprintln!(
        "delivery upstream (probe, QoS 1 flood): {delivery:?}; test took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    check_violations("retained flood", &violations)
}
