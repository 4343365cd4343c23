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
//! outside `[A-Za-z0-9._:-]`) is logged (rate-limited) and counted, and changes nothing.
//!
//! # Bounds
//!
//! Every device costs memory, a state row and a retained record upstream, and devices come from
//! the network, so:
//!
//! - **At most `max_devices`.** A new device beyond is refused and counted
//!   (`outpost_devices_refused_total`, one per refused message or discovery); devices already
//!   registered are unaffected (also those loaded beyond a lowered bound). Each device's lists
//!   are bounded too ([`MAX_ITEMS`] topics, addresses, resources; texts cut).
//! - **Changes are coalesced per device**, not queued: a change marks the device pending (at
//!   most one entry per device), and the writer persists each pending device's *latest* state.
//!   So the queue is bounded by the number of devices, and a device that flaps a thousand
//!   times between two writes costs one record upstream, with its last state (which is what a
//!   retained message shows anyway).
//! - **CoAP clients are not registered by default** (`implicit_coap = false`): a CoAP request's
//!   source is a UDP address, which anyone can forge, so every forged address would become a
//!   device. MQTT clients (a TCP connection, a login on network listeners) and devices the
//!   gateway chose to observe are registered implicitly with `implicit = true`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use outpost_protocols::{Inbound, Source};
use outpost_storage::{NewRecord, Priority, StateOp, Store};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::lifecycle::{GATEWAY_LEVEL, to_json};
use crate::metrics::{LogLimiter, Metrics, get, inc, now_ms};

/// Key prefix of registry entries in the store's state table.
pub const STATE_PREFIX: &str = "device/";
/// Longest device id, in bytes.
pub const MAX_ID_LEN: usize = 64;
/// Longest kind/firmware string kept; longer ones are cut.
const MAX_TEXT_LEN: usize = 128;
/// At most this many topics, addresses or resources are kept per device.
const MAX_ITEMS: usize = 64;
/// Longest topic kept in a device's topic list; longer ones are cut.
const MAX_TOPIC_LEN: usize = 256;
/// At most this many pending devices are written per store round trip.
const WRITE_BATCH: usize = 256;
/// How often message counters and last-seen times are written back (status changes are written
/// at once).
const FLUSH_EVERY: Duration = Duration::from_secs(30);

/// Log lines caused by messages: one per [`LogLimiter::EVERY`] per kind.
static BAD_ANNOUNCEMENT_LOG: LogLimiter = LogLimiter::new(LogLimiter::EVERY);
static REFUSED_LOG: LogLimiter = LogLimiter::new(LogLimiter::EVERY);
static WRITE_FAILED_LOG: LogLimiter = LogLimiter::new(LogLimiter::EVERY);

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
    /// Whether devices that send data without announcing are registered (MQTT clients, and
    /// devices whose resources the gateway observes).
    pub implicit: bool,
    /// Whether CoAP clients that POST/PUT readings are registered too, by source host (only
    /// with `implicit`; a UDP source can be forged).
    pub implicit_coap: bool,
    /// New devices beyond this many are refused.
    pub max_devices: usize,
}

/// Counters of the registry.
#[derive(Debug, Default)]
pub struct RegistryMetrics {
    pub announcements: AtomicU64,
    pub bad_announcements: AtomicU64,
    pub bad_ids: AtomicU64,
    pub changes: AtomicU64,
    /// Changes of a device whose previous change was not written yet (folded into it).
    pub changes_coalesced: AtomicU64,
    pub change_write_failures: AtomicU64,
    /// New devices refused because `max_devices` are registered (one per attempt).
    pub refused: AtomicU64,
}

/// Devices whose change waits to be written: each at most once, in the order of their first
/// pending change. Bounded by the number of devices.
#[derive(Debug, Default)]
struct Pending {
    order: VecDeque<DeviceId>,
    set: BTreeSet<DeviceId>,
}

impl Pending {
    /// Marks `id` pending; false if it already was (the change is folded into that one).
    fn insert(&mut self, id: &DeviceId) -> bool {
        if self.set.insert(id.clone()) {
            self.order.push_back(id.clone());
            true
        } else {
            false
        }
    }

    /// Takes up to `max` pending devices, oldest first.
    fn take(&mut self, max: usize) -> Vec<DeviceId> {
        let n = max.min(self.order.len());
        let ids: Vec<DeviceId> = self.order.drain(..n).collect();
        for id in &ids {
            self.set.remove(id);
        }
        ids
    }

    fn len(&self) -> usize {
        self.order.len()
    }
}

/// The registry. Cheap to call from ingest: one mutex, no I/O on the hot path (changed devices
/// are marked pending and written by [`Registry::run`]).
#[derive(Debug)]
pub struct Registry {
    settings: RegistrySettings,
    devices: Mutex<BTreeMap<DeviceId, Device>>,
    /// Devices whose counters changed since the last flush.
    dirty: Mutex<BTreeSet<DeviceId>>,
    /// Devices whose change waits to be written and published (coalesced per device).
    pending: Mutex<Pending>,
    /// Wakes the writer when a device becomes pending.
    wake: tokio::sync::Notify,
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
        info!(
            devices = devices.len(),
            max = settings.max_devices,
            "device registry loaded"
        );
        if devices.len() >= settings.max_devices {
            warn!(
                devices = devices.len(),
                max = settings.max_devices,
                "the device registry is full: new devices are refused (discovery.max_devices)"
            );
        }
        Ok(Self::with_devices(settings, devices))
    }

    /// A registry holding `devices` (what [`Registry::load`] read).
    fn with_devices(settings: RegistrySettings, devices: BTreeMap<DeviceId, Device>) -> Self {
        Self {
            settings,
            devices: Mutex::new(devices),
            dirty: Mutex::new(BTreeSet::new()),
            pending: Mutex::new(Pending::default()),
            wake: tokio::sync::Notify::new(),
            metrics: RegistryMetrics::default(),
        }
    }

    /// Marks `id` as changed: the writer persists and publishes its state as it is then.
    fn changed(&self, id: &DeviceId) {
        inc(&self.metrics.changes);
        let fresh = self
            .pending
            .lock()
            .map(|mut p| p.insert(id))
            .unwrap_or(false);
        if fresh {
            self.wake.notify_one();
        } else {
            inc(&self.metrics.changes_coalesced);
        }
    }

    /// Devices whose change waits to be written.
    pub fn pending_changes(&self) -> usize {
        self.pending.lock().map(|p| p.len()).unwrap_or(0)
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

    /// Applies `update` to the device `id` (creating it, unless `max_devices` are registered:
    /// then it is refused and counted), and marks a change when anything but the counters
    /// changed.
    fn update(&self, id: DeviceId, how: FoundBy, now: u64, update: impl FnOnce(&mut Device)) {
        let Ok(mut devices) = self.devices.lock() else {
            return;
        };
        if !devices.contains_key(&id) && devices.len() >= self.settings.max_devices {
            inc(&self.metrics.refused);
            if let Some(held_back) = REFUSED_LOG.allow() {
                warn!(device = id.as_str(), found_by = ?how, max = self.settings.max_devices,
                    refused_total = get(&self.metrics.refused), held_back,
                    "new device refused: the registry is full (discovery.max_devices; one line per 10 s)");
            }
            return;
        }
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
        drop(devices);
        if changed {
            self.changed(&id);
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
            // A request's UDP source can be forged: only registered when asked for. A device the
            // gateway observes was chosen by the gateway (configured or discovered).
            Source::Coap
                if !self.settings.implicit_coap && !msg.client_id.starts_with("coap-observe:") =>
            {
                return;
            }
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
        let topic = truncate(&msg.topic, MAX_TOPIC_LEN);
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
        let topic = truncate(topic, MAX_TOPIC_LEN);
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
                    if let Some(held_back) = BAD_ANNOUNCEMENT_LOG.allow() {
                        warn!(topic_id = %truncate(id_level, 80), error = %e, held_back,
                            "announcement ignored: not a JSON or CBOR descriptor (one line per 10 s)");
                    }
                    return;
                }
            }
        };
        let raw_id = descriptor.id.as_deref().unwrap_or(id_level);
        let id = match DeviceId::new(raw_id) {
            Ok(id) => id,
            Err(e) => {
                inc(&self.metrics.bad_ids);
                if let Some(held_back) = BAD_ANNOUNCEMENT_LOG.allow() {
                    warn!(id = %truncate(raw_id, 80), error = %e, held_back,
                        "announcement ignored: bad device id (one line per 10 s)");
                }
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
                    .map(|t| truncate(t, MAX_TOPIC_LEN))
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
        let went_offline = match self.devices.lock() {
            Ok(mut devices) => match devices.get_mut(&id) {
                Some(d) if d.status != DeviceStatus::Offline => {
                    d.status = DeviceStatus::Offline;
                    true
                }
                _ => false,
            },
            Err(_) => false,
        };
        if went_offline {
            self.changed(&id);
        }
    }

    /// Re-evaluates every device's status against the thresholds.
    fn age(&self, now: u64) {
        let mut changed = Vec::new();
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
                changed.push(d.id.clone());
            }
        }
        drop(devices);
        for id in &changed {
            self.changed(id);
        }
    }

    /// Writes changes to the state table and appends them upstream; ages statuses; flushes
    /// counters now and then. Runs until `stop`, then writes what is left.
    pub async fn run(&self, store: Store, metrics: Arc<Metrics>, stop: CancellationToken) {
        let tick_every = (self.settings.stale_after / 4)
            .clamp(Duration::from_millis(200), Duration::from_secs(1));
        let mut tick = tokio::time::interval(tick_every);
        let mut last_flush = tokio::time::Instant::now();
        metrics
            .devices_max
            .store(self.settings.max_devices as u64, Ordering::Relaxed);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                () = self.wake.notified() => self.write_pending(&store).await,
                _ = tick.tick() => {
                    self.age(now_ms());
                    self.publish_counts(&metrics);
                    if last_flush.elapsed() >= FLUSH_EVERY {
                        self.flush(&store).await;
                        last_flush = tokio::time::Instant::now();
                    }
                }
            }
        }
        self.write_pending(&store).await;
        self.flush(&store).await;
        self.publish_counts(&metrics);
    }

    /// Copies the registry's figures into the shared metrics (status, /metrics).
    fn publish_counts(&self, metrics: &Metrics) {
        let (online, stale, offline) = self.counts();
        for (gauge, n) in metrics.devices.iter().zip([online, stale, offline]) {
            gauge.store(n, Ordering::Relaxed);
        }
        metrics
            .devices_refused
            .store(get(&self.metrics.refused), Ordering::Relaxed);
        metrics
            .devices_pending_changes
            .store(self.pending_changes() as u64, Ordering::Relaxed);
    }

    /// Persists and publishes every pending device's current state, [`WRITE_BATCH`] devices
    /// per store round trip, until none is pending.
    async fn write_pending(&self, store: &Store) {
        loop {
            let ids = self
                .pending
                .lock()
                .map(|mut p| p.take(WRITE_BATCH))
                .unwrap_or_default();
            if ids.is_empty() {
                return;
            }
            let devices = self.snapshot(&ids);
            if let Ok(mut dirty) = self.dirty.lock() {
                for d in &devices {
                    // Written in full now: its counters need no separate flush.
                    dirty.remove(&d.id);
                }
            }
            self.persist(store, &devices, true).await;
        }
    }

    /// The current state of each of `ids` that exists.
    fn snapshot(&self, ids: &[DeviceId]) -> Vec<Device> {
        self.devices
            .lock()
            .map(|d| ids.iter().filter_map(|id| d.get(id).cloned()).collect())
            .unwrap_or_default()
    }

    async fn flush(&self, store: &Store) {
        let dirty: Vec<DeviceId> = self
            .dirty
            .lock()
            .map(|mut d| std::mem::take(&mut *d).into_iter().collect())
            .unwrap_or_default();
        for ids in dirty.chunks(WRITE_BATCH) {
            let devices = self.snapshot(ids);
            self.persist(store, &devices, false).await;
        }
    }

    /// Saves `devices` in the state table (one transaction) and, for changes, appends them
    /// upstream (one append).
    async fn persist(&self, store: &Store, devices: &[Device], publish: bool) {
        if devices.is_empty() {
            return;
        }
        let mut ops = Vec::with_capacity(devices.len());
        let mut records = Vec::new();
        for device in devices {
            let json = to_json(device);
            if publish {
                records.push(NewRecord {
                    stream: device_stream(&device.id),
                    priority: Priority::Normal,
                    payload: Bytes::from(json.clone()),
                    ingested_at_ms: now_ms(),
                });
            }
            ops.push(StateOp::Put {
                key: format!("{STATE_PREFIX}{}", device.id.as_str()).into(),
                value: json.into(),
            });
        }
        let saved = match store.submit_states(ops).await {
            Ok(pending) => pending.await,
            Err(e) => Err(e),
        };
        if let Err(e) = saved {
            inc(&self.metrics.change_write_failures);
            if let Some(held_back) = WRITE_FAILED_LOG.allow() {
                warn!(devices = devices.len(), error = %e, held_back, "registry entries not saved (one line per 10 s)");
            }
        }
        if let Err(e) = store.append(records).await {
            inc(&self.metrics.change_write_failures);
            if let Some(held_back) = WRITE_FAILED_LOG.allow() {
                warn!(devices = devices.len(), error = %e, held_back,
                    "registry changes not stored for upstream (one line per 10 s)");
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
    use outpost_protocols::QoS;

    use super::*;

    fn settings(max_devices: usize, implicit_coap: bool) -> RegistrySettings {
        RegistrySettings {
            announce_prefix: "devices/announce".into(),
            stale_after: Duration::from_secs(300),
            offline_after: Duration::from_secs(1800),
            implicit: true,
            implicit_coap,
            max_devices,
        }
    }

    fn registry(max_devices: usize, implicit_coap: bool) -> Registry {
        Registry::with_devices(settings(max_devices, implicit_coap), BTreeMap::new())
    }

    fn inbound(source: Source, client_id: &str, topic: &str, payload: &'static [u8]) -> Inbound {
        Inbound {
            client_id: Arc::from(client_id),
            topic: topic.to_owned(),
            payload: Bytes::from_static(payload),
            qos: QoS::AtMostOnce,
            retain: false,
            source,
            content_format: None,
            reply: None,
        }
    }

    fn mqtt(client_id: &str) -> Inbound {
        inbound(Source::Mqtt, client_id, "sensors/t", b"1")
    }

    fn device(r: &Registry, id: &str) -> Option<Device> {
        r.devices().into_iter().find(|d| d.id.as_str() == id)
    }

    fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(outpost_storage::StoreSettings {
            path: dir.path().join("outpost.db"),
            ..crate::app::store_settings(&outpost_config::Config::default())
        })
        .unwrap();
        (dir, store)
    }

    #[test]
    fn a_full_registry_refuses_new_devices_and_keeps_serving_known_ones() {
        let r = registry(2, false);
        r.observe(&mqtt("a"));
        r.observe(&mqtt("b"));
        r.observe(&mqtt("c"));
        r.observe(&mqtt("c"));
        r.observe(&inbound(
            Source::Mqtt,
            "d",
            "devices/announce/d",
            br#"{"kind":"thermo"}"#,
        ));
        r.found("e", FoundBy::Mdns, vec!["10.0.0.5:5683".into()], Vec::new());
        assert_eq!(r.devices().len(), 2, "at most max_devices");
        assert_eq!(get(&r.metrics.refused), 4, "one per refused attempt");
        r.observe(&mqtt("a"));
        let a = device(&r, "a").unwrap();
        assert_eq!(a.messages, 2, "a known device is still counted");
        r.observe(&inbound(
            Source::Mqtt,
            "b",
            "devices/announce/b",
            br#"{"status":"offline"}"#,
        ));
        assert_eq!(
            device(&r, "b").unwrap().status,
            DeviceStatus::Offline,
            "and still updated"
        );
        assert_eq!(get(&r.metrics.refused), 4);
    }

    #[test]
    fn devices_loaded_beyond_a_lowered_bound_are_kept() {
        let full = registry(10, false);
        for id in ["a", "b", "c"] {
            full.observe(&mqtt(id));
        }
        let loaded = full
            .devices()
            .into_iter()
            .map(|d| (d.id.clone(), d))
            .collect();
        let r = Registry::with_devices(settings(2, false), loaded);
        r.observe(&mqtt("c"));
        r.observe(&mqtt("z"));
        assert_eq!(r.devices().len(), 3);
        assert_eq!(device(&r, "c").unwrap().messages, 2);
        assert_eq!(get(&r.metrics.refused), 1, "only the new one");
    }

    #[test]
    fn coap_clients_are_registered_only_with_implicit_coap() {
        let coap = inbound(Source::Coap, "coap:192.0.2.7:40001", "sensors/x", b"1");
        let off = registry(1000, false);
        off.observe(&coap);
        assert!(off.devices().is_empty(), "a UDP source is not a device");
        // Devices the gateway observes were chosen by it, not by a packet's source address.
        off.observe(&inbound(
            Source::Coap,
            "coap-observe:192.0.2.9:5683",
            "sensors/y",
            b"1",
        ));
        assert_eq!(
            device(&off, "192.0.2.9").map(|d| d.found_by),
            Some(BTreeSet::from([FoundBy::CoapImplicit]))
        );
        // MQTT clients stay implicit.
        off.observe(&mqtt("m1"));
        assert!(device(&off, "m1").is_some());
        let on = registry(1000, true);
        on.observe(&coap);
        assert!(device(&on, "192.0.2.7").is_some(), "the host is the device");
    }

    #[test]
    fn spoofed_coap_sources_cannot_grow_the_registry_even_when_allowed() {
        let r = registry(100, true);
        for i in 0..5000u32 {
            let peer = format!("coap:10.{}.{}.{}:5683", i >> 16, (i >> 8) & 255, i & 255);
            r.observe(&inbound(Source::Coap, &peer, "sensors/x", b"1"));
        }
        assert_eq!(r.devices().len(), 100);
        assert_eq!(get(&r.metrics.refused), 4900);
        assert!(r.pending_changes() <= 100, "one pending change per device");
    }

    #[test]
    fn changes_of_one_device_are_coalesced_until_written() {
        let r = registry(1000, false);
        for i in 0..1000 {
            let payload: &'static [u8] = if i % 2 == 0 {
                br#"{"status":"offline"}"#
            } else {
                br#"{"kind":"thermo"}"#
            };
            r.observe(&inbound(Source::Mqtt, "d1", "devices/announce/d1", payload));
        }
        assert_eq!(
            r.pending_changes(),
            1,
            "one entry per device, not per change"
        );
        assert_eq!(get(&r.metrics.changes), 1000);
        assert_eq!(get(&r.metrics.changes_coalesced), 999);
    }

    #[test]
    fn implicit_topics_are_cut_to_a_bounded_length() {
        let r = registry(10, false);
        let long = format!("sensors/{}", "x".repeat(10_000));
        let mut msg = mqtt("a");
        msg.topic = long;
        r.observe(&msg);
        let a = device(&r, "a").unwrap();
        assert_eq!(a.topics[0].len(), MAX_TOPIC_LEN);
    }

    #[tokio::test]
    async fn the_writer_publishes_the_latest_state_of_a_flapping_device_once() {
        let (_dir, store) = temp_store();
        let r = registry(1000, false);
        for payload in [
            br#"{"status":"offline"}"#.as_slice(),
            br#"{"kind":"a"}"#,
            br#"{"status":"offline"}"#,
        ] {
            r.observe(&inbound(Source::Mqtt, "d1", "devices/announce/d1", payload));
        }
        r.observe(&mqtt("d2"));
        r.write_pending(&store).await;
        assert_eq!(r.pending_changes(), 0);
        let records = store.read_after(Priority::Normal, 0, 100).await.unwrap();
        let streams: Vec<&str> = records.iter().map(|r| r.stream.as_str()).collect();
        assert_eq!(
            streams,
            ["$gateway/devices/d1", "$gateway/devices/d2"],
            "one record per device, in the order they first changed"
        );
        let d1: Device = serde_json::from_slice(&records[0].payload).unwrap();
        assert_eq!(d1.status, DeviceStatus::Offline, "its latest state");
        assert_eq!(d1.kind.as_deref(), Some("a"));
        let saved = store.states_with_prefix(STATE_PREFIX).await.unwrap();
        assert_eq!(saved.len(), 2);
    }

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
