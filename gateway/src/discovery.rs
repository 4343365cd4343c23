//! Discovery wiring: mDNS (advertise and browse) and CoAP multicast discovery feed the device
//! registry; observable resources of discovered CoAP devices can be observed and ingested.
//!
//! Both run only on the LAN-side interfaces named in `[discovery] interfaces` (never the WAN
//! side); with none named they are off. A device found by mDNS that offers `_coap._udp` is also
//! asked for `/.well-known/core` directly (unicast), so its resources are known even where
//! multicast does not reach.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use outpost_config::Config;
use outpost_protocols::Inbound;
use outpost_protocols::coap::{CoapObserver, ObserveSettings};
use outpost_protocols::discovery::{
    CoapDiscovery, CoapDiscoveryHandle, CoapDiscoverySettings, Found, Mdns, MdnsSettings,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::registry::{DeviceResource, FoundBy, Registry};

/// At most this many discovered resources are observed at once.
const MAX_AUTO_OBSERVED: usize = 64;
/// How long an IPv6 discovery answer waits for the same device's IPv4 answer.
const IPV6_HOLD: std::time::Duration = std::time::Duration::from_millis(1500);
/// At most this many CoAP devices are remembered for matching dual-stack answers.
const MAX_ANSWERED: usize = 4096;
/// Bound of the channel discovery reports on.
const FOUND_CHANNEL: usize = 256;

/// Starts what `[discovery]` asks for as sources in `sources`; they stop with `shutdown` (mDNS
/// sends its goodbyes then). Errors at start (an interface that does not exist, a socket that
/// cannot be bound) are start-up errors.
pub async fn start(
    config: &Config,
    mqtt_port: Option<u16>,
    coap_port: Option<u16>,
    registry: Arc<Registry>,
    ingest: mpsc::Sender<Inbound>,
    sources: &mut JoinSet<()>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let d = &config.discovery;
    if d.interfaces.is_empty() {
        return Ok(());
    }
    let (found_tx, found_rx) = mpsc::channel(FOUND_CHANNEL);
    let mdns = Mdns::start(MdnsSettings {
        interfaces: d.interfaces.clone(),
        instance: config.node.name.as_str().to_owned(),
        hostname: None,
        mqtt_port,
        coap_port,
        txt: vec![
            ("node".to_owned(), config.node.name.as_str().to_owned()),
            ("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
            (
                "coap_ingest".to_owned(),
                format!("/{}", config.coap.ingest_path),
            ),
        ],
        browse: d.mdns_browse.clone(),
    })?;
    info!(interfaces = ?d.interfaces, "mDNS advertising and browsing");
    {
        let tx = found_tx.clone();
        let stop = shutdown.clone();
        sources.spawn(async move {
            if let Err(e) = mdns.run(tx, stop).await {
                warn!(error = %e, "mDNS stopped with an error");
            }
        });
    }
    let coap_handle = match d.coap_interval {
        Some(interval) => {
            let disc = CoapDiscovery::bind(CoapDiscoverySettings {
                interfaces: d.interfaces.clone(),
                interval,
                groups: true,
                unicast: Vec::new(),
            })
            .await?;
            let handle = disc.handle();
            let tx = found_tx.clone();
            let stop = shutdown.clone();
            sources.spawn(async move {
                if let Err(e) = disc.run(tx, stop).await {
                    warn!(error = %e, "CoAP discovery stopped with an error");
                }
            });
            Some(handle)
        }
        None => None,
    };
    drop(found_tx);
    let observe = d.observe_discovered.then(|| AutoObserve {
        topic_prefix: config.coap.topic_prefix.clone(),
        ingest,
        shutdown: shutdown.clone(),
        observed: BTreeSet::new(),
    });
    sources.spawn(consume(found_rx, registry, coap_handle, observe));
    Ok(())
}

/// Observing what discovery found, when `observe_discovered` is on.
struct AutoObserve {
    topic_prefix: String,
    ingest: mpsc::Sender<Inbound>,
    shutdown: CancellationToken,
    /// (device address, path) already observed.
    observed: BTreeSet<(SocketAddr, String)>,
}

impl AutoObserve {
    async fn observe(&mut self, id: &str, address: SocketAddr, path: &str) {
        if self.observed.len() >= MAX_AUTO_OBSERVED
            || !self.observed.insert((address, path.to_owned()))
        {
            return;
        }
        let topic = format!(
            "{}/{}/{}",
            self.topic_prefix,
            id,
            path.trim_start_matches('/')
        );
        let settings = ObserveSettings {
            target: address,
            path: path.to_owned(),
            topic: topic.clone(),
            margin: std::time::Duration::from_secs(10),
        };
        match CoapObserver::bind(settings).await {
            Ok(observer) => {
                info!(device = id, %address, path, %topic, "observing a discovered resource");
                let tx = self.ingest.clone();
                let stop = self.shutdown.clone();
                tokio::spawn(async move {
                    if let Err(e) = observer.run(tx, stop).await {
                        warn!(error = %e, "observation of a discovered resource failed");
                    }
                });
            }
            Err(e) => warn!(error = %e, %address, path, "cannot observe a discovered resource"),
        }
    }
}

async fn consume(
    mut found: mpsc::Receiver<Found>,
    registry: Arc<Registry>,
    coap: Option<CoapDiscoveryHandle>,
    mut observe: Option<AutoObserve>,
) {
    // (resource signature, answered over IPv4, device id) of every CoAP device seen.
    let mut answered: Vec<(String, bool, String)> = Vec::new();
    // IPv6 answers wait a moment, so that a dual-stack device's IPv4 answer from the same round
    // is seen first and its id is the stable one (link-local IPv6 addresses carry an interface
    // index and change with the MAC).
    let mut held: std::collections::VecDeque<(tokio::time::Instant, Found)> =
        std::collections::VecDeque::new();
    loop {
        let next_due = held.front().map(|(due, _)| *due);
        let event = tokio::select! {
            got = found.recv() => match got {
                Some(Found::CoapResources { id, address, resources }) if address.is_ipv6() => {
                    held.push_back((
                        tokio::time::Instant::now() + IPV6_HOLD,
                        Found::CoapResources { id, address, resources },
                    ));
                    continue;
                }
                Some(event) => event,
                None => match held.pop_front() {
                    Some((_, event)) => event,
                    None => break,
                },
            },
            () = async {
                match next_due {
                    Some(due) => tokio::time::sleep_until(due).await,
                    None => std::future::pending().await,
                }
            } => match held.pop_front() {
                Some((_, event)) => event,
                None => continue,
            },
        };
        match event {
            Found::Service {
                id,
                service_type,
                addresses,
                port,
                ..
            } => {
                if service_type.starts_with("_coap._udp")
                    && let Some(handle) = &coap
                {
                    for ip in &addresses {
                        handle.add_unicast(SocketAddr::new(*ip, port));
                    }
                }
                let addresses = addresses
                    .iter()
                    .map(|ip| SocketAddr::new(*ip, port).to_string())
                    .collect();
                registry.found(&id, FoundBy::Mdns, addresses, Vec::new());
            }
            Found::ServiceRemoved { id, .. } => registry.gone(&id),
            Found::CoapResources {
                id,
                address,
                resources,
            } => {
                // Links that are not resources of the device: the discovery document itself and
                // absolute URIs (e.g. a library's "impl-info" link).
                let resources: Vec<_> = resources
                    .into_iter()
                    .filter(|r| r.path.starts_with('/') && r.path != "/.well-known/core")
                    .collect();
                // A device answering the IPv4 and the IPv6 group shows up twice, from two
                // addresses: the same resource set from the other address family is the same
                // device, recorded under the first id and observed once.
                let signature = signature(&resources);
                if let Some(first) = answered.iter().find(|a| {
                    !signature.is_empty()
                        && a.0 == signature
                        && a.1 != address.is_ipv4()
                        && a.2 != id
                }) {
                    registry.found(
                        &first.2,
                        FoundBy::CoapDiscovery,
                        vec![address.to_string()],
                        Vec::new(),
                    );
                    continue;
                }
                if !answered.iter().any(|a| a.2 == id) && answered.len() < MAX_ANSWERED {
                    answered.push((signature, address.is_ipv4(), id.clone()));
                }
                if let Some(o) = &mut observe {
                    for r in resources.iter().filter(|r| r.observable) {
                        o.observe(&id, address, &r.path).await;
                    }
                }
                let resources = resources
                    .into_iter()
                    .map(|r| DeviceResource {
                        path: r.path,
                        attrs: r.attrs,
                        observable: r.observable,
                    })
                    .collect();
                registry.found(
                    &id,
                    FoundBy::CoapDiscovery,
                    vec![address.to_string()],
                    resources,
                );
            }
        }
    }
}

/// The resource set of a device as one comparable string (paths and attributes, sorted).
fn signature(resources: &[outpost_protocols::discovery::Resource]) -> String {
    let mut links: Vec<String> = resources
        .iter()
        .map(|r| format!("{}{:?}{}", r.path, r.attrs, r.observable))
        .collect();
    links.sort();
    links.join("\n")
}
