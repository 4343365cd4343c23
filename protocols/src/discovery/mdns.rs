//! mDNS / DNS-SD (RFC 6762, 6763) on mdns-sd: advertise the gateway's `_mqtt._tcp` and
//! `_coap._udp` services, browse configured service types, say goodbye on shutdown.
//!
//! # How mdns-sd is used (0.21.7, read from its source and checked in namespaces)
//!
//! - mdns-sd runs its own thread; every call here only enqueues a command (never blocks).
//! - Interfaces: the daemon starts with every interface selected, so [`Mdns::start`] first
//!   sends `disable_interface(IfKind::All)` and then `enable_interface` for each configured
//!   name (selections apply in order, the last match wins). Each [`ServiceInfo`] is also
//!   restricted to those names (`set_interfaces`) with `enable_addr_auto`, so the A/AAAA records
//!   carry only LAN-side addresses, never the WAN side's. Nothing is sent before the selection
//!   is in place: the daemon processes commands in order and registration happens in `run`.
//! - Address changes: the daemon polls the interfaces every 5 s (`IP_CHECK_INTERVAL`). For an
//!   address that appears on a selected interface it adds the address to `addr_auto` services
//!   and announces them there itself. For an address that disappears it only drops it from the
//!   services: nothing is announced, so peers keep the stale A record until its TTL (120 s).
//!   We therefore listen on the daemon's monitor channel and, after an `IpAdd` or `IpDel`
//!   (debounced by [`REANNOUNCE_DEBOUNCE`]), register our services again: the daemon then sends
//!   a fresh announcement with the cache-flush bit, which replaces the peers' address records.
//! - Browse channels hold 1000 events and are dropped silently when full; each is drained by
//!   its own task, and one that disconnects while we run is browsed again (counted).
//! - Goodbyes: `unregister` sends a goodbye (TTL 0) at once and repeats it 120 ms later from
//!   a timer; stopping the daemon earlier would lose the repetition. Shutdown therefore waits
//!   for the daemon's `unregister-resend` counter (bounded by [`GOODBYE_WAIT`]) before it stops
//!   the daemon.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mdns_sd::{DaemonEvent, IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{DiscoveryError, Found, MAX_TXT_ENTRIES, device_id};

/// How long after the last address change our services are announced again (changes come in
/// bursts: an interface coming up gets IPv4 and IPv6 addresses within a second or two).
pub const REANNOUNCE_DEBOUNCE: Duration = Duration::from_secs(1);

/// Upper bound on waiting for goodbyes to go out at shutdown.
pub const GOODBYE_WAIT: Duration = Duration::from_secs(2);

/// How long to wait before browsing again after the daemon dropped a browse channel.
const REBROWSE_DELAY: Duration = Duration::from_secs(1);

/// The DNS-SD service types the gateway advertises.
const MQTT_SERVICE: &str = "_mqtt._tcp.local.";
const COAP_SERVICE: &str = "_coap._udp.local.";

/// What to advertise, where, and what to look for.
#[derive(Debug, Clone)]
pub struct MdnsSettings {
    /// Names of the LAN-side interfaces (`eth1`, `br-lan`). mDNS is used on these and never on
    /// another; must not be empty.
    pub interfaces: Vec<String>,
    /// The DNS-SD instance name (the node name), at most 63 bytes (one DNS label).
    pub instance: String,
    /// The host name of the A/AAAA records (`outpost-1` or `outpost-1.local.`); default: the
    /// instance name made DNS-safe.
    pub hostname: Option<String>,
    /// Advertise `_mqtt._tcp` on this port.
    pub mqtt_port: Option<u16>,
    /// Advertise `_coap._udp` on this port.
    pub coap_port: Option<u16>,
    /// TXT entries of both services (node, version, paths...). Keys are printable ASCII
    /// without `=`; each `key=value` is at most 255 bytes (RFC 6763 section 6).
    pub txt: Vec<(String, String)>,
    /// Service types to browse, with domain: `_coap._udp.local.`, `_outpost-sensor._tcp.local.`.
    pub browse: Vec<String>,
}

/// A snapshot of the mDNS counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MdnsStats {
    /// Our services registered with the daemon (at start and at every re-announcement).
    pub registrations: u64,
    /// Re-announcements after an address change on a configured interface.
    pub reannouncements: u64,
    /// Address changes the daemon reported on configured interfaces.
    pub address_changes: u64,
    /// `Found::Service` sent.
    pub services_found: u64,
    /// `Found::ServiceRemoved` sent.
    pub services_removed: u64,
    /// Records refused: instance names that make no valid device id, names that do not belong
    /// to the browsed type, resolved services without an address.
    pub bad_records: u64,
    /// TXT entries dropped: non-UTF-8 values, beyond [`MAX_TXT_ENTRIES`].
    pub bad_txt: u64,
    /// Browse channels the daemon dropped (a consumer fell behind) and we re-opened.
    pub browse_restarts: u64,
    /// Errors the daemon reported (socket errors, refused registrations).
    pub daemon_errors: u64,
    /// Our names the daemon renamed after a conflict on the network.
    pub name_conflicts: u64,
    /// Goodbyes sent at shutdown (one per service).
    pub goodbyes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    registrations: AtomicU64,
    reannouncements: AtomicU64,
    address_changes: AtomicU64,
    services_found: AtomicU64,
    services_removed: AtomicU64,
    bad_records: AtomicU64,
    bad_txt: AtomicU64,
    browse_restarts: AtomicU64,
    daemon_errors: AtomicU64,
    name_conflicts: AtomicU64,
    goodbyes: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> MdnsStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MdnsStats {
            registrations: g(&self.registrations),
            reannouncements: g(&self.reannouncements),
            address_changes: g(&self.address_changes),
            services_found: g(&self.services_found),
            services_removed: g(&self.services_removed),
            bad_records: g(&self.bad_records),
            bad_txt: g(&self.bad_txt),
            browse_restarts: g(&self.browse_restarts),
            daemon_errors: g(&self.daemon_errors),
            name_conflicts: g(&self.name_conflicts),
            goodbyes: g(&self.goodbyes),
        }
    }
}

/// The mDNS responder and browser, started (daemon running, interfaces selected) but not yet
/// advertising: [`Mdns::run`] does that.
pub struct Mdns {
    daemon: ServiceDaemon,
    /// Our services, ready to register (addresses filled in by the daemon).
    services: Vec<ServiceInfo>,
    /// Our own instances' full names, lower case: browsing our own types must not report us.
    own: Arc<HashSet<String>>,
    /// Service types to browse.
    browse: Vec<String>,
    /// The daemon's notable events (address changes, errors, renames).
    monitor: mdns_sd::Receiver<DaemonEvent>,
    /// Addresses of the configured interfaces at start: the daemon reports each as `IpAdd`
    /// when it first binds it, which is not a change.
    known: HashSet<IpAddr>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Mdns {
    // mdns-sd's daemon handle has no Debug.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mdns")
            .field("services", &self.own)
            .field("browse", &self.browse)
            .finish_non_exhaustive()
    }
}

/// Reads the counters while [`Mdns::run`] goes on.
#[derive(Debug, Clone)]
pub struct MdnsHandle {
    counters: Arc<Counters>,
}

impl MdnsHandle {
    /// A snapshot of the counters.
    pub fn stats(&self) -> MdnsStats {
        self.counters.snapshot()
    }
}

fn invalid(field: &'static str, why: impl Into<String>) -> DiscoveryError {
    DiscoveryError::InvalidSetting {
        field,
        why: why.into(),
    }
}

/// `name.local.` from a host name given with or without the domain; None if it is not a
/// valid DNS label of letters, digits and `-`.
fn host_name(raw: &str) -> Option<String> {
    let label = raw
        .strip_suffix(".local.")
        .or_else(|| raw.strip_suffix(".local"))
        .unwrap_or(raw);
    let ok = !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-');
    ok.then(|| format!("{label}.local."))
}

/// A DNS-safe host label from the instance name: runs of other characters become one `-`.
fn default_host(instance: &str) -> Option<String> {
    let mut label = String::new();
    for c in instance.chars() {
        if c.is_ascii_alphanumeric() {
            label.push(c.to_ascii_lowercase());
        } else if !label.ends_with('-') && !label.is_empty() {
            label.push('-');
        }
    }
    host_name(label.trim_end_matches('-'))
}

fn browsable(ty: &str) -> bool {
    let Some(name) = ty
        .strip_suffix("._tcp.local.")
        .or_else(|| ty.strip_suffix("._udp.local."))
    else {
        return false;
    };
    // RFC 6763 section 7.2: `_` plus 1-15 letters, digits and hyphens.
    name.strip_prefix('_').is_some_and(|n| {
        !n.is_empty() && n.len() <= 15 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    })
}

impl Mdns {
    /// Validates the settings, starts the daemon and selects the configured interfaces.
    /// Interfaces that do not exist yet are only warned about: they are used when they appear.
    pub fn start(settings: MdnsSettings) -> Result<Mdns, DiscoveryError> {
        if settings.interfaces.is_empty() {
            return Err(invalid(
                "interfaces",
                "at least one LAN-side interface must be named",
            ));
        }
        if let Some(bad) = settings
            .interfaces
            .iter()
            .find(|n| n.is_empty() || n.len() > 15 || n.contains(['/', ' ']))
        {
            return Err(invalid(
                "interfaces",
                format!("{bad:?} is not an interface name"),
            ));
        }
        if settings.instance.is_empty()
            || settings.instance.len() > 63
            || settings.instance.chars().any(char::is_control)
        {
            return Err(invalid(
                "instance",
                "must be 1-63 bytes without control characters",
            ));
        }
        let host = match &settings.hostname {
            Some(h) => host_name(h).ok_or_else(|| {
                invalid(
                    "hostname",
                    "must be one DNS label of letters, digits and '-'",
                )
            })?,
            None => default_host(&settings.instance).ok_or_else(|| {
                invalid(
                    "hostname",
                    "the instance name has no letters or digits: set a hostname",
                )
            })?,
        };
        for (key, value) in &settings.txt {
            if key.is_empty() || !key.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'=') {
                return Err(invalid(
                    "txt",
                    format!("key {key:?} must be printable ASCII without '='"),
                ));
            }
            if key.len() + value.len() + 1 > 255 {
                return Err(invalid(
                    "txt",
                    format!("entry {key:?} is longer than 255 bytes"),
                ));
            }
        }
        if let Some(bad) = settings.browse.iter().find(|t| !browsable(t)) {
            return Err(invalid(
                "browse",
                format!("{bad:?} is not a service type like \"_coap._udp.local.\""),
            ));
        }
        let known = lan_addresses(&settings.interfaces);

        let daemon = ServiceDaemon::new()?;
        daemon.disable_interface(IfKind::All)?;
        let lan: Vec<IfKind> = settings
            .interfaces
            .iter()
            .map(|n| IfKind::Name(n.clone()))
            .collect();
        daemon.enable_interface(lan.clone())?;
        // After the selection (the daemon runs commands in order): its IpDel/IpAdd events for
        // the selection itself are not address changes.
        let monitor = daemon.monitor()?;

        let mut services = Vec::new();
        let advertised = [
            (MQTT_SERVICE, settings.mqtt_port),
            (COAP_SERVICE, settings.coap_port),
        ];
        for (ty, port) in advertised {
            let Some(port) = port else { continue };
            let mut info = ServiceInfo::new(
                ty,
                &settings.instance,
                &host,
                &[] as &[IpAddr],
                port,
                settings.txt.as_slice(),
            )?
            .enable_addr_auto();
            info.set_interfaces(lan.clone());
            services.push(info);
        }
        let own = services
            .iter()
            .map(|s| s.get_fullname().to_lowercase())
            .collect();
        Ok(Mdns {
            daemon,
            services,
            own: Arc::new(own),
            browse: settings.browse,
            monitor,
            known,
            counters: Arc::default(),
        })
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> MdnsStats {
        self.counters.snapshot()
    }

    /// A handle for the counters, usable while `run` goes on.
    pub fn handle(&self) -> MdnsHandle {
        MdnsHandle {
            counters: self.counters.clone(),
        }
    }

    /// Advertises and browses until `shutdown`; then unregisters (goodbyes), waits for them to
    /// go out (bounded by [`GOODBYE_WAIT`]), stops the daemon and returns. Found services go to
    /// `found`; while it is full, discovery waits (see the module docs of `discovery`).
    pub async fn run(
        self,
        found: mpsc::Sender<Found>,
        shutdown: CancellationToken,
    ) -> Result<(), DiscoveryError> {
        let Mdns {
            daemon,
            services,
            own,
            browse,
            monitor,
            mut known,
            counters,
        } = self;
        for info in &services {
            daemon.register(info.clone())?;
            bump(&counters.registrations);
            tracing::info!(service = info.get_fullname(), "mDNS: advertising");
        }

        let tracker = TaskTracker::new();
        let browsing = shutdown.child_token();
        for ty in browse {
            let receiver = daemon.browse(&ty)?;
            tracker.spawn(browse_task(
                daemon.clone(),
                ty,
                receiver,
                own.clone(),
                found.clone(),
                counters.clone(),
                browsing.clone(),
            ));
        }
        tracker.close();
        drop(found);

        let mut reannounce_at: Option<tokio::time::Instant> = None;
        loop {
            let debounce = async {
                match reannounce_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = debounce => {
                    reannounce_at = None;
                    for info in &services {
                        match daemon.register(info.clone()) {
                            Ok(()) => bump(&counters.registrations),
                            Err(e) => {
                                bump(&counters.daemon_errors);
                                tracing::warn!(error = %e, "mDNS: re-announcement refused");
                            }
                        }
                    }
                    bump(&counters.reannouncements);
                    tracing::info!("mDNS: re-announced after an address change");
                }
                ev = monitor.recv_async() => match ev {
                    Ok(DaemonEvent::IpAdd(ip)) if !known.insert(ip) => {}
                    Ok(DaemonEvent::IpAdd(ip) | DaemonEvent::IpDel(ip)) => {
                        known.remove(&ip);
                        bump(&counters.address_changes);
                        tracing::info!(%ip, "mDNS: address change on a LAN interface");
                        reannounce_at = Some(tokio::time::Instant::now() + REANNOUNCE_DEBOUNCE);
                    }
                    Ok(DaemonEvent::Error(e)) => {
                        bump(&counters.daemon_errors);
                        tracing::warn!(error = %e, "mDNS daemon error");
                    }
                    Ok(DaemonEvent::NameChange(change)) => {
                        bump(&counters.name_conflicts);
                        tracing::warn!(
                            original = %change.original,
                            new = %change.new_name,
                            "mDNS: name conflict on the network, renamed"
                        );
                    }
                    Ok(_) => {}
                    Err(_) => {
                        bump(&counters.daemon_errors);
                        tracing::error!("mDNS daemon stopped unexpectedly");
                        break;
                    }
                },
            }
        }

        // Sources stop first: no more Found after this point.
        browsing.cancel();
        tracker.wait().await;
        say_goodbye(&daemon, &services, &counters).await;
        match daemon.shutdown() {
            Ok(status) => {
                let _ = tokio::time::timeout(Duration::from_secs(1), status.recv_async()).await;
            }
            Err(e) => tracing::debug!(error = %e, "mDNS daemon already stopped"),
        }
        Ok(())
    }
}

/// Unregisters our services and waits until the daemon has sent each goodbye and its
/// repetition (see the module docs), at most [`GOODBYE_WAIT`].
async fn say_goodbye(daemon: &ServiceDaemon, services: &[ServiceInfo], counters: &Counters) {
    if services.is_empty() {
        return;
    }
    let deadline = tokio::time::Instant::now() + GOODBYE_WAIT;
    for info in services {
        match daemon.unregister(info.get_fullname()) {
            Ok(status) => {
                if let Ok(Ok(mdns_sd::UnregisterStatus::OK)) =
                    tokio::time::timeout_at(deadline, status.recv_async()).await
                {
                    bump(&counters.goodbyes);
                }
            }
            Err(e) => tracing::warn!(error = %e, "mDNS: cannot unregister"),
        }
    }
    // The repetition runs from the daemon's timer 120 ms after the first goodbye.
    while tokio::time::Instant::now() < deadline {
        let resent = match daemon.get_metrics() {
            Ok(rx) => match tokio::time::timeout_at(deadline, rx.recv_async()).await {
                Ok(Ok(m)) => m.get("unregister-resend").copied().unwrap_or(0),
                _ => break,
            },
            Err(_) => break,
        };
        if resent > 0 {
            // Every repetition was scheduled within a few microseconds of the first; one more
            // timer tick covers the ones of later services.
            tokio::time::sleep(Duration::from_millis(50)).await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

/// The instance part of `fullname` (`Sensor 1._outpost-sensor._tcp.local.` -> `Sensor 1`),
/// with DNS escapes (`\.`, `\\`, `\DDD`) undone; None if it does not end in `.{ty}`.
fn instance_of<'a>(fullname: &'a str, ty: &str) -> Option<String> {
    let cut = fullname.len().checked_sub(ty.len() + 1)?;
    let (head, tail): (&'a str, &'a str) = (fullname.get(..cut)?, fullname.get(cut..)?);
    if !tail.starts_with('.') || !tail[1..].eq_ignore_ascii_case(ty) || head.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(head.len());
    let b = head.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            let digits = b.get(i + 1..i + 4);
            if let Some(d) = digits.filter(|d| d.iter().all(u8::is_ascii_digit)) {
                let v = d.iter().fold(0u32, |a, x| a * 10 + u32::from(x - b'0'));
                out.push(u8::try_from(v).ok()?);
                i += 4;
            } else {
                out.push(b[i + 1]);
                i += 2;
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// The device id of `fullname` under `ty`, counting a refusal.
fn id_of(fullname: &str, ty: &str, counters: &Counters) -> Option<String> {
    let id = instance_of(fullname, ty).and_then(|i| device_id(&i));
    if id.is_none() {
        bump(&counters.bad_records);
        tracing::warn!(name = %fullname.escape_debug(), "mDNS: refused a service name (no valid device id)");
    }
    id
}

/// Turns one browse event into a [`Found`], or None (not interesting, ours, or bad).
fn to_found(ty: &str, ev: ServiceEvent, own: &HashSet<String>, c: &Counters) -> Option<Found> {
    match ev {
        ServiceEvent::ServiceResolved(svc) => {
            if own.contains(&svc.fullname.to_lowercase()) {
                return None;
            }
            let id = id_of(&svc.fullname, ty, c)?;
            let mut addresses: Vec<IpAddr> = svc.addresses.iter().map(|a| a.to_ip_addr()).collect();
            addresses.sort();
            addresses.dedup();
            if addresses.is_empty() {
                bump(&c.bad_records);
                return None;
            }
            let mut txt = BTreeMap::new();
            for prop in svc.txt_properties.iter() {
                let value = match prop.val() {
                    None => String::new(),
                    Some(v) => match std::str::from_utf8(v) {
                        Ok(v) => v.to_owned(),
                        Err(_) => {
                            bump(&c.bad_txt);
                            continue;
                        }
                    },
                };
                if txt.len() == MAX_TXT_ENTRIES {
                    bump(&c.bad_txt);
                    continue;
                }
                txt.insert(prop.key().to_owned(), value);
            }
            bump(&c.services_found);
            Some(Found::Service {
                id,
                service_type: ty.to_owned(),
                addresses,
                port: svc.port,
                txt,
            })
        }
        ServiceEvent::ServiceRemoved(_, fullname) => {
            if own.contains(&fullname.to_lowercase()) {
                return None;
            }
            let id = id_of(&fullname, ty, c)?;
            bump(&c.services_removed);
            Some(Found::ServiceRemoved {
                id,
                service_type: ty.to_owned(),
            })
        }
        _ => None,
    }
}

/// Drains one browse channel into `found`; browses again if the daemon drops the channel.
async fn browse_task(
    daemon: ServiceDaemon,
    ty: String,
    mut receiver: mdns_sd::Receiver<ServiceEvent>,
    own: Arc<HashSet<String>>,
    found: mpsc::Sender<Found>,
    counters: Arc<Counters>,
    stop: CancellationToken,
) {
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => break,
            ev = receiver.recv_async() => ev,
        };
        match ev {
            Ok(ev) => {
                let Some(f) = to_found(&ty, ev, &own, &counters) else {
                    continue;
                };
                tokio::select! {
                    _ = stop.cancelled() => break,
                    sent = found.send(f) => if sent.is_err() { break },
                }
            }
            Err(_) => {
                bump(&counters.browse_restarts);
                tracing::warn!(service_type = %ty, "mDNS: browse channel dropped, browsing again");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(REBROWSE_DELAY) => {}
                }
                match daemon.browse(&ty) {
                    Ok(r) => receiver = r,
                    Err(e) => {
                        tracing::warn!(service_type = %ty, error = %e, "mDNS: cannot browse");
                    }
                }
            }
        }
    }
    let _ = daemon.stop_browse(&ty);
}

/// The addresses of the named interfaces now; warns about names that have none (they are
/// used when they get one).
fn lan_addresses(names: &[String]) -> HashSet<IpAddr> {
    let list = match if_addrs::get_if_addrs() {
        Ok(list) => list,
        Err(e) => {
            tracing::debug!(error = %e, "cannot list interfaces");
            return HashSet::new();
        }
    };
    for n in names.iter().filter(|n| !list.iter().any(|i| i.name == **n)) {
        tracing::warn!(
            interface = %n,
            "mDNS: configured interface has no address now; it is used when it gets one"
        );
    }
    list.into_iter()
        .filter(|i| names.contains(&i.name))
        .map(|i| i.ip())
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn instance_names_are_unescaped() {
        let ty = "_coap._udp.local.";
        assert_eq!(
            instance_of("Sensor 1._coap._udp.local.", ty).as_deref(),
            Some("Sensor 1")
        );
        assert_eq!(
            instance_of("a\\.b._COAP._udp.local.", ty).as_deref(),
            Some("a.b")
        );
        assert_eq!(
            instance_of("x\\032y._coap._udp.local.", ty).as_deref(),
            Some("x y")
        );
        assert_eq!(instance_of("x\\999._coap._udp.local.", ty), None);
        assert_eq!(instance_of("._coap._udp.local.", ty), None);
        assert_eq!(instance_of("x._mqtt._tcp.local.", ty), None);
        assert_eq!(instance_of("short", ty), None);
        assert_eq!(instance_of("é._coap._udp.local.", ty).as_deref(), Some("é"));
    }

    #[test]
    fn host_names_and_types_are_checked() {
        assert_eq!(host_name("gw-1").as_deref(), Some("gw-1.local."));
        assert_eq!(host_name("gw-1.local.").as_deref(), Some("gw-1.local."));
        assert_eq!(host_name("gw_1"), None);
        assert_eq!(host_name("-gw"), None);
        assert_eq!(
            default_host("Outpost Node #1").as_deref(),
            Some("outpost-node-1.local.")
        );
        assert_eq!(default_host("ü"), None);
        assert!(browsable("_outpost-sensor._tcp.local."));
        assert!(browsable("_coap._udp.local."));
        assert!(!browsable("_coap._udp.local"));
        assert!(!browsable("coap._udp.local."));
        assert!(!browsable("_this-is-too-long-x._tcp.local."));
    }

    fn settings() -> MdnsSettings {
        MdnsSettings {
            interfaces: vec!["lo".into()],
            instance: "gw".into(),
            hostname: None,
            mqtt_port: Some(1883),
            coap_port: None,
            txt: vec![],
            browse: vec![],
        }
    }

    #[test]
    fn bad_settings_are_refused_before_the_daemon_starts() {
        let check = |f: &dyn Fn(&mut MdnsSettings), field: &str| {
            let mut s = settings();
            f(&mut s);
            match Mdns::start(s) {
                Err(DiscoveryError::InvalidSetting { field: got, .. }) => assert_eq!(got, field),
                other => panic!("{field}: {other:?}"),
            }
        };
        check(&|s| s.interfaces.clear(), "interfaces");
        check(&|s| s.interfaces = vec![String::new()], "interfaces");
        check(&|s| s.instance = "x".repeat(64), "instance");
        check(&|s| s.instance = "a\nb".into(), "instance");
        check(&|s| s.hostname = Some("a b".into()), "hostname");
        check(&|s| s.txt = vec![("a=b".into(), "c".into())], "txt");
        check(&|s| s.txt = vec![("k".into(), "v".repeat(254))], "txt");
        check(&|s| s.browse = vec!["_x._tcp".into()], "browse");
    }
}
