//! The device registry: which devices this gateway has, how they were found, and whether they
//! are alive.
//!
//! Devices are found four ways: an MQTT announcement (a descriptor published on the announce
//! topic, JSON or CBOR), implicitly (an MQTT client or CoAP endpoint that sends data without
//! announcing), mDNS, and CoAP discovery (`/.well-known/core`). Each device is kept in the store's
//! state table under `device/<id>` (the same database, so the registry survives restarts), and
//! every *change* (new device, new status, new metadata; not every message) is appended as a
//! record on the stream `$gateway/devices/<id>`, which the sync engine publishes **retained**:
//! changes made while offline reach the cloud later, and a cloud subscriber always sees the last
//! state of every device.
//!
//! Status: `online` while messages keep coming, `stale` after `stale_after` without one,
//! `offline` after `offline_after` or when the device says so: an announcement with
//! `"status": "offline"` (what a device sets as its MQTT last will) or an empty payload on its
//! announce topic.
//!
//! Bad input (a descriptor that does not parse, an id that is empty, too long or has characters
//! outside `[A-Za-z0-9._:-]`) is logged and counted, and changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use outpost_protocols::{Inbound, Source};
use outpost_storage::{NewRecord, Priority, Store};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::lifecycle::{GATEWAY_LEVEL, to_json};
use crate::metrics::{Metrics, inc, now_ms};

/// Key prefix of registry entries in the store's state table.
pub const STATE_PREFIX: &str = "device/";
/// Longest device id, in bytes.
pub const MAX_ID_LEN: usize = 64;
/// Longest kind/firmware string kept; longer ones are cut.
const MAX_TEXT_LEN: usize = 128;
/// At most this many topics or resources are kept per device.
const MAX_ITEMS: usize = 64;
/// How often message counters and last-seen times are written back (status changes are written
/// at once).
const FLUSH_EVERY: Duration = Duration::from_secs(30);

/// A validated device id: 1..=64 bytes of `[A-Za-z0-9._:-]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeviceId(String);

impl DeviceId {
    pub fn new(id: &str) -> Result<Self, String> {
        if id.is_empty() {
            return Err("device id is empty".into());
        }
        if id.len() > MAX_ID_LEN {
            return Err(format!(
                "device id is {} bytes; at most {MAX_ID_LEN}",
                id.len()
            ));
        }
        if let Some(c) = id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
        {
            return Err(format!("device id contains {c:?}"));
        }
        Ok(Self(id.to_owned()))
    }

    /// An id made from arbitrary text (an MQTT client id, a peer address): characters outside
    /// the allowed set become `_`, and it is cut to the maximum length.
    pub fn sanitised(text: &str) -> Option<Self> {
        let cleaned: String = text
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .take(MAX_ID_LEN)
            .collect();
        Self::new(&cleaned).ok()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How a device was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FoundBy {
    MqttAnnounce,
    MqttImplicit,
    CoapImplicit,
    Mdns,
    CoapDiscovery,
}

/// Whether a device is alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceStatus {
    Online,
    Stale,
    Offline,
}

/// A CoAP resource a device offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceResource {
    pub path: String,
    pub attrs: BTreeMap<String, String>,
    pub observable: bool,
}

/// One registry entry: what is stored under `device/<id>` and published upstream on change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    pub id: DeviceId,
    pub found_by: BTreeSet<FoundBy>,
    pub status: DeviceStatus,
    pub kind: Option<String>,
    pub firmware: Option<String>,
    pub addresses: Vec<String>,
    pub topics: Vec<String>,
    pub resources: Vec<DeviceResource>,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    pub messages: u64,
}

/// A device's self-description on the announce topic (JSON or CBOR map).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Descriptor {
    id: Option<String>,
    kind: Option<String>,
    firmware: Option<String>,
    topics: Vec<String>,
    status: Option<String>,
}

/// Settings of the registry.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    /// Announcements are published on `<prefix>/<device id>`.
    pub announce_prefix: String,
    pub stale_after: Duration,
    pub offline_after: Duration,
    /// Whether devices that send data without announcing are registered.
    pub implicit: bool,
}

/// Counters of the registry.
#[derive(Debug, Default)]
pub struct RegistryMetrics {
    pub announcements: AtomicU64,
    pub bad_announcements: AtomicU64,
    pub bad_ids: AtomicU64,
    pub changes: AtomicU64,
    pub change_write_failures: AtomicU64,
}

/// What happened to a device, to be persisted and published.
#[derive(Debug)]
struct Change(Device);

/// The registry. Cheap to call from ingest: one mutex, no I/O on the hot path (changes are
/// queued and written by [`Registry::run`]).
#[derive(Debug)]
pub struct Registry {
    settings: RegistrySettings,
    devices: Mutex<BTreeMap<DeviceId, Device>>,
    /// Devices whose counters changed since the last flush.
    dirty: Mutex<BTreeSet<DeviceId>>,
    changes: tokio::sync::mpsc::UnboundedSender<Change>,
    changes_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Change>>>,
    pub metrics: RegistryMetrics,
}

/// The upstream stream of a device's changes (published retained by sync).
pub fn device_stream(id: &DeviceId) -> String {
    format!("{GATEWAY_LEVEL}/devices/{}", id.as_str())
}

/// Whether records of `stream` are published retained upstream.
pub fn is_retained_stream(stream: &str) -> bool {
    stream
        .strip_prefix(GATEWAY_LEVEL)
        .is_some_and(|rest| rest.starts_with("/devices/"))
}

impl Registry {
    /// Loads the registry from the store.
    pub async fn load(settings: RegistrySettings, store: &Store) -> anyhow::Result<Self> {
        let mut devices = BTreeMap::new();
        for (key, value) in store.states_with_prefix(STATE_PREFIX).await? {
            match serde_json::from_slice::<Device>(&value) {
                Ok(d) => {
                    devices.insert(d.id.clone(), d);
                }
                Err(e) => warn!(%key, error = %e, "unreadable registry entry skipped"),
            }
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        info!(devices = devices.len(), "device registry loaded");
        Ok(Self {
            settings,
            devices: Mutex::new(devices),
            dirty: Mutex::new(BTreeSet::new()),
            changes: tx,
            changes_rx: Mutex::new(Some(rx)),
            metrics: RegistryMetrics::default(),
        })
    }

    /// A snapshot of every device.
    pub fn devices(&self) -> Vec<Device> {
        self.devices
            .lock()
            .map(|d| d.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Counts by status: (online, stale, offline).
    pub fn counts(&self) -> (u64, u64, u64) {
        let mut c = (0, 0, 0);
        for d in self.devices() {
            match d.status {
                DeviceStatus::Online => c.0 += 1,
                DeviceStatus::Stale => c.1 += 1,
                DeviceStatus::Offline => c.2 += 1,
            }
        }
        c
    }

    /// Applies `update` to the device `id` (creating it), and queues a change when anything but
    /// the counters changed.
    fn update(&self, id: DeviceId, how: FoundBy, now: u64, update: impl FnOnce(&mut Device)) {
        let Ok(mut devices) = self.devices.lock() else {
            return;
        };
        let device = devices.entry(id.clone()).or_insert_with(|| Device {
            id: id.clone(),
            found_by: BTreeSet::new(),
            status: DeviceStatus::Online,
            kind: None,
            firmware: None,
            addresses: Vec::new(),
            topics: Vec::new(),
            resources: Vec::new(),
            first_seen_ms: now,
            last_seen_ms: now,
            messages: 0,
        });
        let before = device.clone();
        let is_new = before.messages == 0 && before.found_by.is_empty();
        device.found_by.insert(how);
        device.last_seen_ms = now;
        update(device);
        let changed = is_new || !same_except_counters(&before, device);
        if changed {
            inc(&self.metrics.changes);
            let _ = self.changes.send(Change(device.clone()));
        } else if let Ok(mut dirty) = self.dirty.lock() {
            dirty.insert(id);
        }
    }

    /// Looks at every message ingest receives: announcements update the registry; other data
    /// registers its sender implicitly and counts it.
    pub fn observe(&self, msg: &Inbound) {
        let now = now_ms();
        if let Some(rest) = msg
            .topic
            .strip_prefix(self.settings.announce_prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
        {
            self.announcement(rest, &msg.payload, now);
            return;
        }
        if !self.settings.implicit || msg.topic.starts_with(GATEWAY_LEVEL) {
            return;
        }
        // A notification of a resource the gateway observes: credited to the device discovery
        // found at that address, if any (not to a second, implicit entry for the same device).
        if let Some(target) = msg.client_id.strip_prefix("coap-observe:")
            && self.credit_by_address(target, &msg.topic, now)
        {
            return;
        }
        let (raw, how) = match msg.source {
            Source::Mqtt => (msg.client_id.as_ref(), FoundBy::MqttImplicit),
            // A CoAP client's source port changes between requests: the host is the device.
            Source::Coap => {
                let peer = msg
                    .client_id
                    .strip_prefix("coap-observe:")
                    .or_else(|| msg.client_id.strip_prefix("coap:"))
                    .unwrap_or(&msg.client_id);
                let host = peer.rsplit_once(':').map_or(peer, |(host, _port)| host);
                (host, FoundBy::CoapImplicit)
            }
        };
        // A client id is only an id if it is one; generated ids of clean sessions are not devices.
        if raw.starts_with("outpost-auto-") {
            return;
        }
        let Some(id) = DeviceId::sanitised(raw) else {
            inc(&self.metrics.bad_ids);
            return;
        };
        let topic = msg.topic.clone();
        self.update(id, how, now, |d| {
            d.messages += 1;
            if d.status != DeviceStatus::Online {
                d.status = DeviceStatus::Online;
            }
            if d.topics.len() < MAX_ITEMS && !d.topics.contains(&topic) {
                d.topics.push(topic);
            }
        });
    }

    /// Counts a message for the device that has `address` among its addresses; false if none.
    fn credit_by_address(&self, address: &str, topic: &str, now: u64) -> bool {
        let Some(id) = self.devices.lock().ok().and_then(|d| {
            d.values()
                .find(|dev| dev.addresses.iter().any(|a| a == address))
                .map(|dev| dev.id.clone())
        }) else {
            return false;
        };
        let how = self
            .devices
            .lock()
            .ok()
            .and_then(|d| {
                d.get(&id)
                    .and_then(|dev| dev.found_by.iter().next().copied())
            })
            .unwrap_or(FoundBy::CoapDiscovery);
        let topic = topic.to_owned();
        self.update(id, how, now, |d| {
            d.messages += 1;
            d.status = DeviceStatus::Online;
            if d.topics.len() < MAX_ITEMS && !d.topics.contains(&topic) {
                d.topics.push(topic);
            }
        });
        true
    }

    fn announcement(&self, id_level: &str, payload: &Bytes, now: u64) {
        inc(&self.metrics.announcements);
        let descriptor = if payload.is_empty() {
            Descriptor {
                status: Some("offline".into()),
                ..Descriptor::default()
            }
        } else {
            match parse_descriptor(payload) {
                Ok(d) => d,
                Err(e) => {
                    inc(&self.metrics.bad_announcements);
                    warn!(topic_id = id_level, error = %e, "announcement ignored: not a JSON or CBOR descriptor");
                    return;
                }
            }
        };
        let raw_id = descriptor.id.as_deref().unwrap_or(id_level);
        let id = match DeviceId::new(raw_id) {
            Ok(id) => id,
            Err(e) => {
                inc(&self.metrics.bad_ids);
                warn!(id = %truncate(raw_id, 80), error = %e, "announcement ignored: bad device id");
                return;
            }
        };
        let offline = descriptor
            .status
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("offline"));
        self.update(id, FoundBy::MqttAnnounce, now, |d| {
            d.status = if offline {
                DeviceStatus::Offline
            } else {
                DeviceStatus::Online
            };
            if let Some(kind) = descriptor.kind {
                d.kind = Some(truncate(&kind, MAX_TEXT_LEN));
            }
            if let Some(fw) = descriptor.firmware {
                d.firmware = Some(truncate(&fw, MAX_TEXT_LEN));
            }
            if !descriptor.topics.is_empty() {
                d.topics = descriptor
                    .topics
                    .iter()
                    .take(MAX_ITEMS)
                    .map(|t| truncate(t, 256))
                    .collect();
            }
        });
    }

    /// A device found on the network (mDNS or CoAP discovery).
    pub fn found(
        &self,
        id: &str,
        how: FoundBy,
        addresses: Vec<String>,
        resources: Vec<DeviceResource>,
    ) {
        let Some(id) = DeviceId::sanitised(id) else {
            inc(&self.metrics.bad_ids);
            return;
        };
        self.update(id, how, now_ms(), |d| {
            for a in addresses.into_iter().take(MAX_ITEMS) {
                if !d.addresses.contains(&a) {
                    d.addresses.push(a);
                }
            }
            if !resources.is_empty() {
                d.resources = resources.into_iter().take(MAX_ITEMS).collect();
            }
            d.status = DeviceStatus::Online;
        });
    }

    /// A device's mDNS service said goodbye: it is offline until it is heard from again.
    pub fn gone(&self, id: &str) {
        let Some(id) = DeviceId::sanitised(id) else {
            return;
        };
        let Ok(mut devices) = self.devices.lock() else {
            return;
        };
        if let Some(d) = devices.get_mut(&id)
            && d.status != DeviceStatus::Offline
        {
            d.status = DeviceStatus::Offline;
            inc(&self.metrics.changes);
            let _ = self.changes.send(Change(d.clone()));
        }
    }

    /// Re-evaluates every device's status against the thresholds.
    fn age(&self, now: u64) {
        let Ok(mut devices) = self.devices.lock() else {
            return;
        };
        for d in devices.values_mut() {
            let silent = Duration::from_millis(now.saturating_sub(d.last_seen_ms));
            let next = if silent >= self.settings.offline_after {
                DeviceStatus::Offline
            } else if silent >= self.settings.stale_after && d.status == DeviceStatus::Online {
                DeviceStatus::Stale
            } else {
                d.status
            };
            if next != d.status {
                debug!(device = d.id.as_str(), from = ?d.status, to = ?next, "device status changed");
                d.status = next;
                inc(&self.metrics.changes);
                let _ = self.changes.send(Change(d.clone()));
            }
        }
    }

    /// Writes changes to the state table and appends them upstream; ages statuses; flushes
    /// counters now and then. Runs until `stop`, then writes what is left.
    pub async fn run(&self, store: Store, metrics: Arc<Metrics>, stop: CancellationToken) {
        let Some(mut rx) = self.changes_rx.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        let tick_every = (self.settings.stale_after / 4)
            .clamp(Duration::from_millis(200), Duration::from_secs(1));
        let mut tick = tokio::time::interval(tick_every);
        let mut last_flush = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                change = rx.recv() => match change {
                    Some(Change(device)) => self.persist(&store, &device, true).await,
                    None => break,
                },
                _ = tick.tick() => {
                    self.age(now_ms());
                    let (online, stale, offline) = self.counts();
                    for (gauge, n) in metrics.devices.iter().zip([online, stale, offline]) {
                        gauge.store(n, std::sync::atomic::Ordering::Relaxed);
                    }
                    if last_flush.elapsed() >= FLUSH_EVERY {
                        self.flush(&store).await;
                        last_flush = tokio::time::Instant::now();
                    }
                }
            }
        }
        while let Ok(Change(device)) = rx.try_recv() {
            self.persist(&store, &device, true).await;
        }
        self.flush(&store).await;
    }

    async fn flush(&self, store: &Store) {
        let dirty: Vec<DeviceId> = self
            .dirty
            .lock()
            .map(|mut d| std::mem::take(&mut *d).into_iter().collect())
            .unwrap_or_default();
        for id in dirty {
            let device = self.devices.lock().ok().and_then(|d| d.get(&id).cloned());
            if let Some(device) = device {
                self.persist(store, &device, false).await;
            }
        }
    }

    /// Saves `device` in the state table and, for a change, appends it upstream.
    async fn persist(&self, store: &Store, device: &Device, publish: bool) {
        let json = to_json(device);
        let key = format!("{STATE_PREFIX}{}", device.id.as_str());
        if let Err(e) = store.put_state(&key, json.clone()).await {
            inc(&self.metrics.change_write_failures);
            warn!(device = device.id.as_str(), error = %e, "registry entry not saved");
        }
        if publish {
            let record = NewRecord {
                stream: device_stream(&device.id),
                priority: Priority::Normal,
                payload: Bytes::from(json),
                ingested_at_ms: now_ms(),
            };
            if let Err(e) = store.append(vec![record]).await {
                inc(&self.metrics.change_write_failures);
                warn!(device = device.id.as_str(), error = %e, "registry change not stored for upstream");
            }
        }
    }
}

fn same_except_counters(a: &Device, b: &Device) -> bool {
    a.found_by == b.found_by
        && a.status == b.status
        && a.kind == b.kind
        && a.firmware == b.firmware
        && a.addresses == b.addresses
        && a.topics == b.topics
        && a.resources == b.resources
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// A descriptor in JSON, or in CBOR (a map with the same text keys).
fn parse_descriptor(payload: &[u8]) -> Result<Descriptor, String> {
    if let Ok(d) = serde_json::from_slice::<Descriptor>(payload) {
        return Ok(d);
    }
    cbor_descriptor(payload)
}

fn cbor_descriptor(payload: &[u8]) -> Result<Descriptor, String> {
    use minicbor::data::Type;
    let mut d = minicbor::Decoder::new(payload);
    let err = |e: minicbor::decode::Error| format!("CBOR: {e}");
    let len = d
        .map()
        .map_err(err)?
        .ok_or("CBOR: indefinite-length maps are not accepted")?;
    let mut out = Descriptor::default();
    for _ in 0..len.min(64) {
        let key = d.str().map_err(err)?.to_owned();
        match (key.as_str(), d.datatype().map_err(err)?) {
            ("id", Type::String) => out.id = Some(d.str().map_err(err)?.to_owned()),
            ("kind", Type::String) => out.kind = Some(d.str().map_err(err)?.to_owned()),
            ("firmware", Type::String) => out.firmware = Some(d.str().map_err(err)?.to_owned()),
            ("status", Type::String) => out.status = Some(d.str().map_err(err)?.to_owned()),
            ("topics", Type::Array) => {
                let n = d
                    .array()
                    .map_err(err)?
                    .ok_or("CBOR: indefinite-length arrays are not accepted")?;
                for _ in 0..n.min(1024) {
                    out.topics.push(d.str().map_err(err)?.to_owned());
                }
            }
            _ => d.skip().map_err(err)?,
        }
    }
    if d.position() != payload.len() {
        return Err("CBOR: trailing bytes after the descriptor".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated_and_sanitised() {
        assert!(DeviceId::new("dev-1.a_b:c").is_ok());
        assert!(DeviceId::new("").is_err());
        assert!(DeviceId::new("a/b").is_err());
        assert!(DeviceId::new(&"x".repeat(65)).is_err());
        assert_eq!(
            DeviceId::sanitised("sensor #4/ü").map(|d| d.0),
            Some("sensor__4__".to_owned())
        );
        assert_eq!(
            DeviceId::sanitised(&"y".repeat(200)).map(|d| d.0.len()),
            Some(64)
        );
    }

    #[test]
    fn descriptors_parse_from_json_and_cbor_and_garbage_is_refused() {
        let j = parse_descriptor(br#"{"id":"d1","kind":"thermo","topics":["a/b"],"x":1}"#).unwrap();
        assert_eq!(j.id.as_deref(), Some("d1"));
        assert_eq!(j.topics, ["a/b"]);
        // {"id": "d2", "firmware": "1.2", "topics": ["t"]}
        let mut buf = Vec::new();
        let mut e = minicbor::Encoder::new(&mut buf);
        e.map(3).unwrap();
        e.str("id").unwrap().str("d2").unwrap();
        e.str("firmware").unwrap().str("1.2").unwrap();
        e.str("topics").unwrap().array(1).unwrap().str("t").unwrap();
        let c = parse_descriptor(&buf).unwrap();
        assert_eq!(c.id.as_deref(), Some("d2"));
        assert_eq!(c.firmware.as_deref(), Some("1.2"));
        assert!(parse_descriptor(b"\xff\x00garbage").is_err());
        let mut trailing = buf.clone();
        trailing.push(0);
        assert!(parse_descriptor(&trailing).is_err());
    }

    #[test]
    fn only_device_streams_are_retained() {
        assert!(is_retained_stream("$gateway/devices/d1"));
        assert!(!is_retained_stream("$gateway/resources"));
        assert!(!is_retained_stream("devices/d1"));
    }
}
