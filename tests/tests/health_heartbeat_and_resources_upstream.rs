//! With `heartbeat_interval = "1s"` and `resource_interval = "1s"`: a heartbeat arrives upstream
//! on `outpost/<node>/$gateway/heartbeat` every interval (not retained, not stored: no `seq`)
//! with the key health figures (backlog, uplink RTT, the checks' states, counters, CPU, memory,
//! disk); resource samples arrive on `outpost/<node>/$gateway/resources` (stored records, so
//! they carry `seq`), the first one no sooner than one interval after start, each with CPU,
//! memory, load, the data directory's disk, the network interfaces, the gateway's RSS and open
//! fds. `/metrics` and `/status` show the latest sample.

use std::time::Duration;

use outpost_tests::{
    GatewayConfig, Mosquitto, Outpost, Subscriber, SubscriberSpec, TestDir, gateway_messages,
    gateway_topic, health_json, scrape_metrics, wait_for,
};
use serde_json::Value;

const NODE: &str = "gw-beat";
const HEARTBEATS: usize = 4;
const SAMPLES: usize = 3;

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} is not an unsigned integer in {v}"))
}

#[test]
fn heartbeats_and_resource_samples_arrive_upstream() -> anyhow::Result<()> {
    let dir = TestDir::new("health-beat")?;
    let cloud = Mosquitto::start(&dir)?;
    let sub = Subscriber::spawn(
        &dir,
        "cloud",
        &SubscriberSpec::new(cloud.port(), &format!("outpost/{NODE}/$gateway/#")),
    )?;
    let mut cfg = GatewayConfig::new(&dir, NODE, Some(cloud.port()))?;
    cfg.resource_interval = Some("1s".to_owned());
    // The heartbeat carries the checks' states: one that is always healthy.
    cfg.extra = "[[check]]\nname = \"always\"\nkind = \"command\"\ncommand = [\"true\"]\ninterval = \"500ms\"\ntimeout = \"400ms\"\n\n".to_owned();
    // GatewayConfig has no knob for the heartbeat: put it into the [health] table it renders.
    let rendered = cfg.to_toml();
    assert_eq!(rendered.matches("[health]\n").count(), 1, "{rendered}");
    let toml = rendered.replace("[health]\n", "[health]\nheartbeat_interval = \"1s\"\n");
    let hp = cfg.health_port;
    let mut gw = Outpost::start_raw(&dir, &toml, cfg.port)?;

    let (beats, samples) = wait_for(
        "heartbeats and resource samples upstream",
        Duration::from_secs(30),
        || {
            let b = gateway_messages(&sub, NODE, "heartbeat").ok()?;
            let r = gateway_messages(&sub, NODE, "resources").ok()?;
            (b.len() >= HEARTBEATS && r.len() >= SAMPLES).then_some((b, r))
        },
    )?;
    let birth = gateway_messages(&sub, NODE, "status")?;
    let started = birth
        .first()
        .and_then(|(_, v)| v["started_at_ms"].as_u64())
        .ok_or_else(|| anyhow::anyhow!("no birth with started_at_ms: {birth:?}"))?;

    // Heartbeats.
    for (m, hb) in &beats {
        assert!(!m.retain, "heartbeats are not retained");
        assert!(
            !m.props.contains_key("seq"),
            "heartbeats are not stored records: {m:?}"
        );
        assert_eq!(hb["node"], NODE, "{hb}");
        u(hb, "at_ms");
        u(hb, "uptime_s");
        u(hb, "backlog_records");
        u(hb, "backlog_bytes");
        u(hb, "reconnects");
        u(hb, "ingested");
        u(hb, "synced");
        assert_eq!(hb["store_poisoned"], false, "{hb}");
        for k in [
            "uplink_rtt_ms",
            "oldest_unsynced_age_ms",
            "drain_eta_s",
            "cpu_percent",
            "memory_used",
            "disk_available",
        ] {
            assert!(hb.get(k).is_some(), "heartbeat lacks {k}: {hb}");
        }
        assert!(hb["checks"].is_object(), "heartbeat checks map: {hb}");
    }
    // The interval starts with the connection attempt and its first tick waits for the
    // connection, so only the gaps after the first heartbeat are whole intervals.
    let ats: Vec<u64> = beats.iter().map(|(_, v)| u(v, "at_ms")).collect();
    assert!(
        ats[1..].windows(2).all(|w| w[1] >= w[0] + 500),
        "heartbeats follow the interval, not faster: {ats:?}"
    );
    // Later heartbeats have what the gateway learnt since: an RTT (birth and samples were
    // acked), the check's state, resource figures.
    let last = &beats.last().map(|(_, v)| v.clone()).unwrap_or_default();
    assert!(
        last["uplink_rtt_ms"].as_f64().is_some_and(|r| r >= 0.0),
        "{last}"
    );
    assert_eq!(last["checks"]["always"], "healthy", "{last}");
    assert!(last["cpu_percent"].as_f64().is_some(), "{last}");
    assert!(
        last["memory_used"].as_u64().is_some_and(|m| m > 0),
        "{last}"
    );
    assert!(
        last["disk_available"].as_u64().is_some_and(|d| d > 0),
        "{last}"
    );

    // Resource samples.
    for (i, (m, r)) in samples.iter().enumerate() {
        assert!(!m.retain, "{m:?}");
        assert!(
            m.props.contains_key("seq"),
            "samples are stored records (seq): {m:?}"
        );
        assert_eq!(m.qos, 1, "{m:?}");
        let cpu = r["cpu_percent"].as_f64().unwrap_or(-1.0);
        assert!((0.0..=100.0).contains(&cpu), "cpu_percent {cpu}: {r}");
        assert!(u(r, "memory_total") > 0, "{r}");
        assert!(u(r, "memory_used") <= u(r, "memory_total"), "{r}");
        assert!(u(r, "process_rss") > 0, "{r}");
        assert!(u(r, "open_fds") > 0, "{r}");
        assert_eq!(r["load_avg"].as_array().map(Vec::len), Some(3), "{r}");
        let disk = &r["disk"];
        assert!(
            u(disk, "total") > 0 && u(disk, "available") <= u(disk, "total"),
            "{r}"
        );
        assert!(disk["mount_point"].is_string(), "{r}");
        let nets = r["networks"].as_array().cloned().unwrap_or_default();
        assert!(
            nets.iter().any(|n| n["interface"] == "lo"),
            "loopback among the interfaces: {r}"
        );
        if i == 0 {
            assert!(
                u(r, "at_ms") >= started + 900,
                "the first sample comes one interval after start ({started}): {r}"
            );
        }
    }
    let sample_ats: Vec<u64> = samples.iter().map(|(_, r)| u(r, "at_ms")).collect();
    assert!(
        sample_ats.windows(2).all(|w| w[1] >= w[0] + 500),
        "samples follow the interval: {sample_ats:?}"
    );
    let topic = gateway_topic(NODE, "resources");
    assert!(samples.iter().all(|(m, _)| m.topic == topic));

    // The endpoint shows the latest sample.
    let st = health_json(hp, "/status")?;
    let res = &st["health"]["resources"];
    assert!(
        u(res, "process_rss") > 0,
        "/status health.resources: {st:#}"
    );
    let m = scrape_metrics(hp)?;
    assert!(m.get("outpost_process_resident_memory_bytes", &[])? > 0.0);
    assert!(m.get("outpost_resource_memory_total_bytes", &[])? > 0.0);
    assert!(m.get("outpost_resource_disk_total_bytes", &[])? > 0.0);
    assert!(m.get("outpost_process_open_fds", &[])? > 0.0);
    assert!(
        m.value(
            "outpost_resource_network_received_bytes_total",
            &[("interface", "lo")]
        )
        .is_some()
    );
    gw.check_alive()?;
    Ok(())
}
