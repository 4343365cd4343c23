//! Issue 12, flood 4: 10,000 MQTT 3.1.1 clients, each with a persistent session (clean
//! session 0) subscribed to a topic of its own, that connect once, disconnect, and never come
//! back. MQTT 3.1.1 has no session expiry: unless the gateway bounds them, every such session
//! is kept (in memory and in the store's `state` table) for ever. The clients connect 32 at a
//! time, so the file descriptors they use stay few on both sides. The gateway runs with the
//! shipped defaults, loopback only.
//!
//! While the flood runs and after it:
//! - **Memory.** The gateway's RSS (VmRSS, sampled every 50 ms) stays under its baseline + 32 MiB.
//!   The baseline is the highest RSS before the flood, with the probe below running (measured
//!   here: ~18 MiB idle, ~21 MiB after a burst of 20,000 QoS 1 readings, debug build). The
//!   shipped `broker.max_sessions` keeps 1,000 sessions at most, a few MiB; 32 MiB is room for
//!   them several times over and the normal load. Plain main kept all 10,000 and grew by ~20 MiB
//!   (~2 KiB a session): under this bound, so the memory check alone does not catch them at
//!   this count; the accounting does.
//! - **Latency.** A QoS 1 probe publishing every 50 ms on another topic gets its PUBACKs with a
//!   p99 under 2 s, and every probe reading is acked.
//! - **Accounting.** Every client's session is kept (a `mqtt/s/` row in the store's `state`
//!   table, as many as the broker holds: `outpost_broker_persistent_sessions`), refused at
//!   CONNECT (`outpost_broker_sessions_refused_total`, as many as the clients saw refusing
//!   CONNACKs) or expired (`outpost_broker_sessions_expired_total`): kept + refused + expired
//!   == 10,000; at most the shipped `broker.max_sessions` are kept, and a 3.1.1 session has a
//!   shipped expiry (`broker.session_expiry_311`).
//! - **Delivery.** Every probe reading acked arrives upstream (mosquitto), in order, with its seq.
//!
//! Every violation is collected, so one run reports all of them.

use std::time::Duration;

use anyhow::Result;
use outpost_tests::{
    ByteCount, FloodStage, SessionFlood, check_violations, required_metric, scrape_metrics,
    shipped_config, shipped_limit, state_rows,
};

const CLIENTS: u64 = 10_000;
const SESSION_PREFIX: &str = "mqtt/s/";
/// See the module docs.
const RSS_ALLOWANCE: ByteCount = ByteCount::mib(32);
const P99_LIMIT: Duration = Duration::from_secs(2);

#[test]
fn ten_thousand_abandoned_persistent_sessions_stay_within_bounds_and_are_all_counted() -> Result<()>
{
    let started = std::time::Instant::now();
    let mut stage = FloodStage::start("flood-sessions", |_| {})?;
    let db = stage.db();
    let sessions_before = state_rows(&db, SESSION_PREFIX)?;
    let watch = stage.watch()?;
    let flood = SessionFlood {
        count: CLIENTS,
        client_prefix: "abandoned-".to_owned(),
        subscribe: "devices/abandoned-{i}/cmd".to_owned(),
        concurrency: 32,
    }
    .run(
        &stage.dir,
        "sessions",
        stage.gw.port(),
        Duration::from_secs(300),
    )?;
    eprintln!("session flood: {flood:?}");
    let mut violations = Vec::new();
    let refused_seen: u64 = flood.refused.values().sum();
    if flood.accepted + refused_seen != CLIENTS
        || flood.subscribed != flood.accepted
        || flood.closed_without_answer + flood.connect_failed > 0
    {
        violations.push(format!(
            "not every client was answered (accepted and subscribed, or refused): {flood:?}"
        ));
    }

    stage.gw.check_alive()?;
    let report = watch.finish()?;
    eprintln!("{}", report.describe());
    violations.extend(report.violations(RSS_ALLOWANCE, P99_LIMIT));

    let kept = state_rows(&db, SESSION_PREFIX)? - sessions_before;
    let m = scrape_metrics(stage.cfg.health_port)?;
    let refused = required_metric(&m, "outpost_broker_sessions_refused_total", &mut violations);
    let expired = required_metric(&m, "outpost_broker_sessions_expired_total", &mut violations);
    let held = required_metric(&m, "outpost_broker_persistent_sessions", &mut violations);
    if held != kept {
        violations.push(format!(
            "the broker holds {held} persistent sessions, the store keeps {kept}"
        ));
    }
    eprintln!(
        "accounting: {kept} sessions kept + {refused} refused + {expired} expired, of {CLIENTS} clients"
    );
    if kept + refused + expired != CLIENTS {
        violations.push(format!(
            "{kept} sessions kept + {refused} refused + {expired} expired = {}, not the {CLIENTS} clients",
            kept + refused + expired
        ));
    }
    if refused != refused_seen {
        violations.push(format!(
            "the gateway counted {refused} sessions refused, the clients saw {refused_seen} refusing CONNACKs"
        ));
    }
    match shipped_limit(&["broker", "max_sessions"])? {
        Some(max) if kept > max => violations.push(format!(
            "{kept} persistent sessions kept, over the shipped broker.max_sessions {max}"
        )),
        Some(_) => {}
        None => violations.push(format!(
            "the shipped configuration has no broker.max_sessions: nothing bounds persistent sessions ({kept} kept)"
        )),
    }
    if shipped_config()?
        .get("broker")
        .and_then(|b| b.get("session_expiry_311"))
        .is_none()
    {
        violations.push(
            "the shipped configuration has no broker.session_expiry_311: an abandoned 3.1.1 session is kept for ever"
                .to_owned(),
        );
    }

    let (_, delivery) = stage.check_delivered(&report, &[])?;
    eprintln!(
        "probe delivery upstream: {delivery:?}; test took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    check_violations("abandoned session flood", &violations)
}
