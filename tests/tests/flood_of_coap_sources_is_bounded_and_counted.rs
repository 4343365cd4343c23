//! Issue 12, flood 2: 10,000 CoAP sources, each a UDP socket on an address and port of its
//! own, each POSTing one reading (confirmable, raw UDP). A CoAP source address is whatever the
//! datagram says, so anyone on the LAN can be 10,000 sources; what the gateway keeps per source
//! (exchanges, devices in the registry, their state rows and retained records upstream) must be
//! bounded. The gateway runs with the shipped defaults (CoAP on a loopback port), loopback only.
//!
//! The registry keys a CoAP device by its source *host* (a client's port changes between
//! requests), so 10,000 sources spread over the 249 addresses 127.0.0.2..127.0.0.250 would
//! present only 249 device candidates: the sources use 10,000 distinct loopback addresses
//! (127.1.0.1..127.1.39.250, all of 127.0.0.0/8 is loopback on Linux), each with its own
//! ephemeral port. At most 32 requests are in flight (a source retransmits as RFC 7252 says
//! when no answer comes, so a datagram lost in a full socket buffer is not a lost source);
//! the gateway's in-flight bound (`coap.max_exchanges`, 4,096) is not reached, so its 5.03
//! answer is accounted for but not provoked here.
//!
//! Two runs: the shipped defaults (CoAP sources are not registered as devices:
//! `discovery.implicit_coap = false`), and the opt-in for a trusted LAN (`implicit_coap = true`),
//! where `discovery.max_devices` bounds the registry. While the flood runs and after it:
//! - **Memory.** The gateway's RSS (VmRSS, sampled every 50 ms) stays under its baseline + 32 MiB.
//!   The baseline is the highest RSS before the flood, with the probe below running (measured
//!   here: ~18 MiB idle, ~21 MiB after a burst of 20,000 QoS 1 readings, debug build). What a
//!   source can make the gateway keep is bounded by `coap.max_exchanges` (4,096 remembered
//!   exchanges) and `discovery.max_devices` (1,000 devices); 32 MiB is room for both several
//!   times over and the normal load. Measured: 21-23 MiB with the bounds; 31-38 MiB on a
//!   gateway that registered all 10,000 sources as devices (so the device checks, not the
//!   memory bound, catch that at this count).
//! - **Latency.** A QoS 1 MQTT probe publishing every 50 ms gets its PUBACKs with a p99 under
//!   2 s, and every probe reading is acked.
//! - **Accounting.** Every source got one answer (2.01, or a refusal such as 5.03), and the
//!   gateway's counters agree: distinct requests (`outpost_coap_requests_total` -
//!   `outpost_coap_duplicates_total`) == stored + refused + overloaded == 10,000. Devices:
//!   with the shipped defaults no source becomes a device; with `implicit_coap = true`, devices
//!   registered + `outpost_devices_refused_total` == sources + the probe (an MQTT device), and
//!   at most `discovery.max_devices` are registered.
//! - **Delivery.** Every reading acked (each 2.01, and the probe's) arrives upstream.
//!
//! Needs all of 127.0.0.0/8 on the loopback interface (Linux): where a source cannot bind its
//! address the test says SKIP, and fails under CI=true.
//!
//! Every violation is collected, so one run reports all of them.

use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use outpost_tests::{
    AckedReadings, ByteCount, CoapMessage, FloodStage, RawCoap, check_violations, coap_section,
    coap_type, free_udp_port, health_json, json_u64, outpost_devices, payload, required_metric,
    scrape_metrics, settle, shipped_limit, skip_unless_ci, wait_coap,
};

const SOURCES: u64 = 10_000;
/// Requests in flight at once (one thread each).
const IN_FLIGHT: u64 = 32;
/// See the module docs.
const RSS_ALLOWANCE: ByteCount = ByteCount::mib(32);
const P99_LIMIT: Duration = Duration::from_secs(2);
/// RFC 7252 section 4.8: ACK_TIMEOUT, and at most MAX_RETRANSMIT retransmissions.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_RETRANSMIT: u32 = 4;
/// How long a source waits for a separate response after an empty ACK.
const SEPARATE_RESPONSE_WAIT: Duration = Duration::from_secs(60);
/// 2.01 Created.
const CREATED: u8 = 65;

/// The two runs share the machine's two cores: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Source i's address: 127.1.(i / 250).(i % 250 + 1).
fn source_addr(i: u64) -> Ipv4Addr {
    Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn topic(i: u64) -> String {
    format!("sensors/flood/{i}")
}

/// How one source's request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Answer {
    /// This response code ([`CREATED`], 5.03, ...), piggy-backed or separate.
    Code(u8),
    /// Nothing after MAX_RETRANSMIT retransmissions (or a separate response that never came).
    Nothing,
}

/// Source `i`: POSTs its reading (CON) from its own address to the gateway on udp
/// 127.0.0.1:`port`, retransmits on silence, ACKs a separate response; returns the answer and
/// how many retransmissions it took.
fn post_once(i: u64, port: u16) -> Result<(Answer, u32)> {
    let raw = RawCoap::from_addr(source_addr(i), port)?;
    let token = (i as u32).to_be_bytes();
    let mid = (i % 65_536) as u16;
    let mut req = CoapMessage::request(coap_type::CON, 2, mid, &token, &format!("t/flood/{i}"));
    req.payload = payload(&topic(i), 0, 100);
    let datagram = req.encode();
    let mut timeout = ACK_TIMEOUT;
    let mut retransmissions = 0;
    let mut acked_empty = false;
    raw.send(&datagram)?;
    let mut deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            if acked_empty || retransmissions == MAX_RETRANSMIT {
                return Ok((Answer::Nothing, retransmissions));
            }
            retransmissions += 1;
            timeout *= 2;
            deadline = Instant::now() + timeout;
            raw.send(&datagram)?;
            continue;
        }
        let Ok(Some((m, _))) = raw.recv(left) else {
            continue;
        };
        if m.mtype == coap_type::ACK && m.code == 0 && m.mid == mid {
            acked_empty = true;
            deadline = Instant::now() + SEPARATE_RESPONSE_WAIT;
            continue;
        }
        if m.token != token {
            continue;
        }
        if m.mtype == coap_type::CON {
            raw.send(&CoapMessage::empty_ack(m.mid).encode())?;
        }
        return Ok((Answer::Code(m.code), retransmissions));
    }
}

/// Runs every source, `IN_FLIGHT` at a time; returns each source's answer and the
/// retransmissions.
fn flood(port: u16) -> Result<(Vec<Answer>, u32)> {
    let next = AtomicU64::new(0);
    let answers = Mutex::new(vec![Answer::Nothing; SOURCES as usize]);
    let retransmissions = AtomicU32::new(0);
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..IN_FLIGHT)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= SOURCES {
                            return Ok(());
                        }
                        let (answer, r) = post_once(i, port)?;
                        retransmissions.fetch_add(r, Ordering::Relaxed);
                        answers.lock().map_err(|_| anyhow!("answers poisoned"))?[i as usize] =
                            answer;
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow!("a source thread panicked"))??;
        }
        Ok(())
    })?;
    let answers = answers
        .into_inner()
        .map_err(|_| anyhow!("answers poisoned"))?;
    Ok((answers, retransmissions.into_inner()))
}

/// The registry's figures.
#[derive(Debug, Clone, Copy)]
struct Devices {
    /// Devices in the registry (in memory, by `/status`).
    held: u64,
    /// Devices written to the store (`outpost devices`)...
    registered: u64,
    /// ...of which found as CoAP clients.
    coap: u64,
    /// New devices refused (`outpost_devices_refused_total`).
    refused: u64,
}

impl Devices {
    /// Reads them (a counter the gateway lacks is pushed onto `missing` and reads as 0).
    fn read(stage: &FloodStage, missing: &mut Vec<String>) -> Result<Self> {
        let s = health_json(stage.cfg.health_port, "/status")?;
        let held = ["devices_online", "devices_stale", "devices_offline"]
            .iter()
            .filter_map(|k| json_u64(&s, &["runtime", k]))
            .sum();
        let written = outpost_devices(stage.gw.config_path())?;
        let coap = written
            .iter()
            .filter(|d| {
                d["found_by"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|h| h == "coap-implicit"))
            })
            .count() as u64;
        let m = scrape_metrics(stage.cfg.health_port)?;
        Ok(Self {
            held,
            registered: written.len() as u64,
            coap,
            refused: required_metric(&m, "outpost_devices_refused_total", missing),
        })
    }

    /// Devices that are not CoAP clients (the probe, an MQTT client).
    fn mqtt(&self) -> u64 {
        self.registered - self.coap
    }
}

/// The flood against a gateway with the shipped defaults, plus `discovery` (a `[discovery]`
/// table, or nothing for the shipped one). `implicit_coap`: whether sources may become devices.
fn run(name: &str, discovery: &str, implicit_coap: bool) -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // The sources need all of 127.0.0.0/8 on the loopback interface (Linux has it).
    let last = source_addr(SOURCES - 1);
    if let Err(e) = std::net::UdpSocket::bind((last, 0)) {
        return skip_unless_ci(&format!("cannot bind a CoAP source on udp {last}: {e}"))
            .map(|_: Option<()>| ());
    }
    let started = Instant::now();
    let coap_port = free_udp_port()?;
    let mut stage = FloodStage::start(name, |cfg| {
        cfg.extra = format!("{}{discovery}", coap_section(coap_port));
    })?;
    wait_coap(coap_port, Duration::from_secs(30))?;
    let health = stage.cfg.health_port;

    let watch = stage.watch()?;
    let before = scrape_metrics(health)?;
    let flood_started = Instant::now();
    let (answers, retransmissions) = flood(coap_port)?;
    let mut by_answer = std::collections::BTreeMap::new();
    for a in &answers {
        *by_answer.entry(*a).or_insert(0u64) += 1;
    }
    eprintln!(
        "CoAP flood took {:.1}s: answers {by_answer:?}, {retransmissions} retransmissions",
        flood_started.elapsed().as_secs_f64()
    );
    let mut violations = Vec::new();
    if let Some(n) = by_answer.get(&Answer::Nothing) {
        violations.push(format!("{n} sources got no answer at all"));
    }

    // Devices: once the registry has written all it holds (the written ones say how they were
    // found) and, with CoAP registration on, has counted every source (its figures reach
    // /metrics on its next tick); deadline 60 s, the RSS sampled meanwhile.
    settle(&mut violations, "the registry to settle", || {
        let d = Devices::read(&stage, &mut Vec::new())?;
        Ok(d.held > 0
            && d.registered == d.held
            && (!implicit_coap || d.registered + d.refused >= SOURCES + d.mqtt()))
    });
    stage.gw.check_alive()?;
    let report = watch.finish()?;
    eprintln!("{}", report.describe());
    violations.extend(report.violations(RSS_ALLOWANCE, P99_LIMIT));

    // The gateway's counters account for every source.
    let after = scrape_metrics(health)?;
    let mut moved = |name: &str| -> u64 {
        required_metric(&after, name, &mut violations)
            .saturating_sub(before.value(name, &[]).unwrap_or(0.0) as u64)
    };
    let requests = moved("outpost_coap_requests_total");
    let duplicates = moved("outpost_coap_duplicates_total");
    let stored = moved("outpost_coap_stored_total");
    let refused = moved("outpost_coap_refused_total");
    let overloaded = moved("outpost_coap_overloaded_total");
    eprintln!(
        "accounting: {requests} requests - {duplicates} duplicates; {stored} stored + {refused} refused + {overloaded} overloaded, of {SOURCES} sources"
    );
    if requests - duplicates != SOURCES || stored + refused + overloaded != SOURCES {
        violations.push(format!(
            "{requests} requests - {duplicates} duplicates, {stored} stored + {refused} refused + {overloaded} overloaded: not the {SOURCES} sources"
        ));
    }
    let created = by_answer.get(&Answer::Code(CREATED)).copied().unwrap_or(0);
    if created != stored {
        violations.push(format!(
            "{created} sources got 2.01, the gateway counted {stored} stored"
        ));
    }

    let d = Devices::read(&stage, &mut violations)?;
    let max_devices = shipped_limit(&["discovery", "max_devices"])?;
    eprintln!("devices: {d:?}; shipped max_devices {max_devices:?}");
    match max_devices {
        Some(max) if d.registered > max => violations.push(format!(
            "{} devices registered, over the shipped discovery.max_devices {max}",
            d.registered
        )),
        Some(_) => {}
        None => violations.push(format!(
            "the shipped configuration has no discovery.max_devices: nothing bounds the registry ({} devices)",
            d.registered
        )),
    }
    if implicit_coap {
        if d.registered + d.refused != SOURCES + d.mqtt() {
            violations.push(format!(
                "{} devices registered ({} by MQTT) + {} refused: not the {SOURCES} sources + {}",
                d.registered,
                d.mqtt(),
                d.refused,
                d.mqtt()
            ));
        }
    } else if d.coap > 0 || d.refused > 0 {
        violations.push(format!(
            "with the shipped defaults {} CoAP sources became devices ({} refused): a forged UDP source address must not make a device",
            d.coap, d.refused
        ));
    }

    // Every acked reading upstream: each source that got 2.01, and the probe's.
    let acked: Vec<(String, u64)> = answers
        .iter()
        .enumerate()
        .filter(|(_, a)| **a == Answer::Code(CREATED))
        .map(|(i, _)| (topic(i as u64), 0))
        .collect();
    let coap = AckedReadings {
        topics: acked.iter().map(|(t, _)| t.clone()).collect(),
        size: 100,
        acked,
    };
    let (_, delivery) = stage.check_delivered(&report, &[coap])?;
    eprintln!(
        "delivery upstream (probe, CoAP): {delivery:?}; test took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    check_violations(name, &violations)
}

#[test]
fn ten_thousand_coap_sources_with_the_shipped_defaults_stay_within_bounds_and_are_all_counted()
-> Result<()> {
    run("flood-coap", "", false)
}

#[test]
fn ten_thousand_coap_sources_registered_as_devices_stay_within_max_devices() -> Result<()> {
    run(
        "flood-coap-devices",
        "[discovery]\nimplicit_coap = true\n\n",
        true,
    )
}
