//! Issue 12, flood 1: 200,000 QoS 0 publishes of a payload that is not JSON, as fast as one
//! connection takes them, on a route with `format = "json"`: every one is a dead-letter
//! candidate, and nobody waits for an ack, so nothing but the gateway's own bounds stops them
//! piling up in memory. The gateway runs with the shipped defaults (storage, broker, discovery,
//! dead-letter and QoS 0 budgets), loopback only.
//!
//! While the flood runs and after it, until every message is accounted for:
//! - **Memory.** The gateway's RSS (VmRSS, sampled every 50 ms) stays under its baseline + 32 MiB.
//!   The baseline is the highest RSS before the flood, with the probe below running (measured
//!   here: ~18 MiB idle, ~21 MiB after a burst of 20,000 QoS 1 readings, debug build). The
//!   shipped budgets for what this flood can fill are `storage.qos0_inflight_bytes` (4 MiB) and
//!   `storage.dead_letter_queue_bytes` (1 MiB); 32 MiB is six times their sum, room for
//!   allocator overhead and the normal load, and still far below what a per-message leak costs:
//!   without those bounds (plain main) the gateway held a task and a copy per invalid payload
//!   and went from 21 MiB to ~108 MiB during this flood.
//! - **Latency.** A QoS 1 probe publishing every 50 ms on another topic gets its PUBACKs with a
//!   p99 under 2 s, and every probe reading is acked.
//! - **Accounting.** Every flood message is a dead letter written, a dead letter dropped
//!   (`outpost_dead_letters_dropped_total`), or a QoS 0 reading dropped
//!   (`outpost_qos0_dropped_total`): written + both drops == 200,000, none stored as a reading.
//!   The dead-letter table keeps at most `storage.dead_letter_max_records` of them.
//! - **Delivery.** Every probe reading acked arrives upstream (mosquitto), in order, with its seq.
//!
//! Every violation is collected, so one run reports all of them.

use std::time::Duration;

use anyhow::Result;
use outpost_tests::{
    ByteCount, FLOOD_NODE, FloodStage, PublishFlood, check_violations, format_route, health_json,
    json_u64, required_counter, scrape_metrics, settle, shipped_limit,
};

const SENT: u64 = 200_000;
const PAYLOAD_SIZE: usize = 512;
/// See the module docs.
const RSS_ALLOWANCE: ByteCount = ByteCount::mib(32);
const P99_LIMIT: Duration = Duration::from_secs(2);

/// Dead letters the store has written, from `/status`.
fn dead_letters_written(health_port: u16) -> Result<u64> {
    let s = health_json(health_port, "/status")?;
    json_u64(&s, &["store", "dead_lettered_total"])
        .ok_or_else(|| anyhow::anyhow!("no store.dead_lettered_total in /status: {s:#}"))
}

/// (dead letters written since `written_before`, dead letters dropped, QoS 0 dropped); a
/// counter the gateway lacks reads as 0 (the final check reports it).
fn accounted(health_port: u16, written_before: u64) -> Result<(u64, u64, u64)> {
    let written = dead_letters_written(health_port)? - written_before;
    let m = scrape_metrics(health_port)?;
    let dropped = |name: &str| m.value(name, &[]).unwrap_or(0.0) as u64;
    Ok((
        written,
        dropped("outpost_dead_letters_dropped_total"),
        dropped("outpost_qos0_dropped_total"),
    ))
}

#[test]
fn two_hundred_thousand_invalid_qos0_payloads_stay_within_bounds_and_are_all_counted() -> Result<()>
{
    let started = std::time::Instant::now();
    let mut stage = FloodStage::start("flood-dead-letters", |cfg| {
        cfg.extra = format_route("flood/#", "json", "original");
    })?;
    let health = stage.cfg.health_port;
    let watch = stage.watch()?;
    let written_before = dead_letters_written(health)?;
    let flood = PublishFlood {
        topic: "flood/line/1".to_owned(),
        count: SENT,
        qos: 0,
        retain: false,
        // A JSON reading cut off, padded with '.' to 512 bytes: not JSON.
        payload: "{\"temp\": 21.".to_owned(),
        size: PAYLOAD_SIZE,
        client_id: "flooder".to_owned(),
    }
    .run(
        &stage.dir,
        "flood",
        stage.gw.port(),
        Duration::from_secs(300),
    )?;
    eprintln!("flood: {flood:?}");
    let mut violations = Vec::new();
    if flood.sent != SENT || flood.closed_early {
        violations.push(format!(
            "the gateway did not read the whole flood: {flood:?}"
        ));
    }

    // Settle: every flood message accounted for (deadline 60 s), the RSS still sampled.
    settle(&mut violations, "every flood message accounted for", || {
        let (w, d, q) = accounted(health, written_before)?;
        Ok(w + d + q >= SENT)
    });
    stage.gw.check_alive()?;
    let report = watch.finish()?;
    eprintln!("{}", report.describe());
    violations.extend(report.violations(RSS_ALLOWANCE, P99_LIMIT));

    let (written, _, _) = accounted(health, written_before)?;
    let m = scrape_metrics(health)?;
    let dl_dropped = required_counter(&m, "outpost_dead_letters_dropped_total", &mut violations);
    let q0_dropped = required_counter(&m, "outpost_qos0_dropped_total", &mut violations);
    eprintln!(
        "accounting: {written} dead letters written + {dl_dropped} dead letters dropped + {q0_dropped} QoS 0 dropped, of {SENT} sent"
    );
    if written + dl_dropped + q0_dropped != SENT {
        violations.push(format!(
            "{written} dead letters written + {dl_dropped} dropped + {q0_dropped} QoS 0 dropped = {}, not the {SENT} sent",
            written + dl_dropped + q0_dropped
        ));
    }
    // The dead-letter table itself stays within its shipped bound.
    let max_kept = shipped_limit(&["storage", "dead_letter_max_records"])?.unwrap_or(0);
    let kept = json_u64(&health_json(health, "/status")?, &["dead_letters"]).unwrap_or(0);
    if kept > max_kept {
        violations.push(format!(
            "{kept} dead letters kept, over storage.dead_letter_max_records {max_kept}"
        ));
    }

    let (msgs, delivery) = stage.check_delivered(&report, &[])?;
    let flood_prefix = format!("outpost/{FLOOD_NODE}/flood/");
    if msgs.iter().any(|m| m.topic.starts_with(&flood_prefix)) {
        violations.push("an invalid flood payload was synced upstream as a reading".to_owned());
    }
    eprintln!(
        "probe delivery upstream: {delivery:?}; test took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    check_violations("invalid QoS 0 flood", &violations)
}
