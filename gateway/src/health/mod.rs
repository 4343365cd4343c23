//! Gateway health: health checks of the services around the gateway, resource sampling, and what
//! both contribute to `/metrics`, `/status` and the heartbeat.
//!
//! Resource samples and check state changes are *data*: they are appended to the store as the
//! gateway's own streams (`$gateway/resources`, `$gateway/checks/<name>`) and synced like sensor
//! readings, so an outage does not lose them. The first resource sample is taken one interval
//! after start (a gateway that restarts in a loop does not flood its own backlog).

pub mod checks;
pub mod resources;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use outpost_config::HealthConfig;
use outpost_storage::{NewRecord, Priority, Store};
use prometheus_client::metrics::MetricType;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::http::{ExtraMetrics, Families, label};
use crate::lifecycle::{GATEWAY_LEVEL, to_json};
use crate::metrics::now_ms;
use checks::{CheckChange, CheckState, Checks};

use resources::{ResourceSample, ResourceSampler};

/// What the health components share with the endpoint and the heartbeat.
#[derive(Debug, Default)]
pub struct HealthState {
    /// The configured checks (empty when none).
    pub checks: Checks,
    /// The latest resource sample.
    pub resources: Mutex<Option<ResourceSample>>,
}

impl HealthState {
    pub fn latest_resources(&self) -> Option<ResourceSample> {
        self.resources.lock().ok().and_then(|s| s.clone())
    }
}

/// Stream names of the gateway's own data.
pub fn resources_stream() -> String {
    format!("{GATEWAY_LEVEL}/resources")
}
pub fn check_stream(name: &str) -> String {
    format!("{GATEWAY_LEVEL}/checks/{name}")
}

/// Samples resources every `interval` until `stop`, keeps the latest for the endpoint and the
/// heartbeat, and stores each sample as a record.
pub async fn sample_resources(
    data_dir: PathBuf,
    config: HealthConfig,
    priority: Priority,
    store: Store,
    state: Arc<HealthState>,
    stop: CancellationToken,
) {
    let Some(interval) = config.resource_interval else {
        return;
    };
    let sampler = match tokio::task::spawn_blocking(move || ResourceSampler::new(&data_dir)).await {
        Ok(Ok(sampler)) => sampler,
        Ok(Err(e)) => {
            warn!(error = %e, "resource monitoring unavailable on this platform; it stays off");
            return;
        }
        Err(e) => {
            warn!(error = %e, "resource sampler could not start");
            return;
        }
    };
    let sampler = Arc::new(Mutex::new(sampler));
    let start = tokio::time::Instant::now() + interval;
    let mut tick = tokio::time::interval_at(start, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let s = Arc::clone(&sampler);
        // sysinfo reads /proc: cheap (well under a millisecond) but blocking.
        let sample = match tokio::task::spawn_blocking(move || {
            s.lock().map(|mut sampler| sampler.sample()).ok()
        })
        .await
        {
            Ok(Some(sample)) => sample,
            _ => continue,
        };
        let payload = Bytes::from(to_json(&sample));
        if let Ok(mut slot) = state.resources.lock() {
            *slot = Some(sample);
        }
        let record = NewRecord {
            stream: resources_stream(),
            priority,
            payload,
            ingested_at_ms: now_ms(),
        };
        if let Err(e) = store.append(vec![record]).await {
            warn!(error = %e, "resource sample not stored");
        }
    }
}

/// Stores every check state change as a record (high priority: an operator wants to know
/// first). The check task has logged it already.
pub async fn record_check_changes(store: Store, mut changes: mpsc::Receiver<CheckChange>) {
    while let Some(change) = changes.recv().await {
        let record = NewRecord {
            stream: check_stream(&change.name),
            priority: Priority::High,
            payload: Bytes::from(to_json(&change.status)),
            ingested_at_ms: now_ms(),
        };
        if let Err(e) = store.append(vec![record]).await {
            warn!(error = %e, check = %change.name, "check change not stored");
        }
    }
}

impl ExtraMetrics for HealthState {
    fn encode(&self, f: &mut Families<'_, '_>) -> Result<(), std::fmt::Error> {
        let checks = self.checks.snapshot();
        if !checks.is_empty() {
            f.labelled(
                "outpost_check_state",
                "Health check state (1 for the current state of each check).",
                MetricType::Gauge,
                checks
                    .iter()
                    .flat_map(|c| {
                        CheckState::ALL.iter().map(move |s| {
                            (
                                vec![label("check", c.name.clone()), label("state", s.as_str())],
                                f64::from(u8::from(c.state == *s)),
                            )
                        })
                    })
                    .collect(),
            )?;
            f.labelled(
                "outpost_check_runs",
                "Health check runs.",
                MetricType::Counter,
                checks
                    .iter()
                    .map(|c| (vec![label("check", c.name.clone())], c.runs_total as f64))
                    .collect(),
            )?;
            f.labelled(
                "outpost_check_failures",
                "Health check runs that failed.",
                MetricType::Counter,
                checks
                    .iter()
                    .map(|c| {
                        (
                            vec![label("check", c.name.clone())],
                            c.failures_total as f64,
                        )
                    })
                    .collect(),
            )?;
            f.labelled(
                "outpost_check_duration_seconds",
                "Duration of the last run of each check.",
                MetricType::Gauge,
                checks
                    .iter()
                    .filter_map(|c| {
                        c.last_duration
                            .map(|d| (vec![label("check", c.name.clone())], d.as_secs_f64()))
                    })
                    .collect(),
            )?;
        }
        if let Some(r) = self.latest_resources() {
            f.gauge(
                "outpost_resource_cpu_percent",
                "System CPU usage, percent, at the last sample.",
                f64::from(r.cpu_percent),
            )?;
            f.labelled(
                "outpost_resource_load_average",
                "System load average.",
                MetricType::Gauge,
                ["1m", "5m", "15m"]
                    .iter()
                    .zip(r.load_avg)
                    .map(|(w, v)| (vec![label("window", *w)], v))
                    .collect(),
            )?;
            f.gauge(
                "outpost_resource_memory_total_bytes",
                "System memory.",
                r.memory_total as f64,
            )?;
            f.gauge(
                "outpost_resource_memory_used_bytes",
                "System memory in use.",
                r.memory_used as f64,
            )?;
            f.gauge(
                "outpost_resource_memory_available_bytes",
                "System memory available.",
                r.memory_available as f64,
            )?;
            f.gauge(
                "outpost_resource_swap_used_bytes",
                "Swap in use.",
                r.swap_used as f64,
            )?;
            if let Some(d) = &r.disk {
                f.gauge(
                    "outpost_resource_disk_total_bytes",
                    "Size of the filesystem holding the data directory.",
                    d.total as f64,
                )?;
                f.gauge(
                    "outpost_resource_disk_available_bytes",
                    "Free space on the filesystem holding the data directory.",
                    d.available as f64,
                )?;
            }
            f.labelled(
                "outpost_resource_network_received_bytes",
                "Bytes received per interface (since boot).",
                MetricType::Counter,
                r.networks
                    .iter()
                    .map(|n| {
                        (
                            vec![label("interface", n.interface.clone())],
                            n.rx_bytes_total as f64,
                        )
                    })
                    .collect(),
            )?;
            f.labelled(
                "outpost_resource_network_transmitted_bytes",
                "Bytes sent per interface (since boot).",
                MetricType::Counter,
                r.networks
                    .iter()
                    .map(|n| {
                        (
                            vec![label("interface", n.interface.clone())],
                            n.tx_bytes_total as f64,
                        )
                    })
                    .collect(),
            )?;
            f.gauge(
                "outpost_process_resident_memory_bytes",
                "Resident memory of the gateway process.",
                r.process_rss as f64,
            )?;
            f.gauge(
                "outpost_process_virtual_memory_bytes",
                "Virtual memory of the gateway process.",
                r.process_virtual as f64,
            )?;
            if let Some(fds) = r.open_fds {
                f.gauge(
                    "outpost_process_open_fds",
                    "Open file descriptors of the gateway process.",
                    fds as f64,
                )?;
            }
        }
        Ok(())
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "checks": self.checks.snapshot(),
            "resources": self.latest_resources(),
        })
    }
}

/// How long shutdown waits for check tasks (a running command is killed on drop).
pub const CHECK_STOP_GRACE: Duration = Duration::from_secs(2);
