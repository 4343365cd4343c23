//! Network discovery: the gateway advertises itself over mDNS / DNS-SD, browses for devices
//! ([`Mdns`]), and asks CoAP devices for their resources with multicast and unicast
//! `GET /.well-known/core` ([`CoapDiscovery`]). Both report what they find as [`Found`] over a
//! bounded channel; the gateway's device registry is the consumer.
//!
//! # Invariants
//!
//! - **LAN side only.** Nothing is advertised, browsed or multicast on an interface that is not
//!   named in the settings. An empty interface list is an error, never "all interfaces": a
//!   gateway has a WAN side, and a default that advertises there would be a leak.
//! - **Device ids are validated and bounded.** Every id in a [`Found`] went through
//!   [`device_id`]: bytes outside `[A-Za-z0-9._-]` become `_`, and an empty result or one longer
//!   than [`MAX_DEVICE_ID`] bytes is refused (logged and counted), never truncated (truncation
//!   would merge two devices into one registry entry).
//! - **No panics on input.** Malformed mDNS records, TXT entries and link-format documents are
//!   logged and counted in the stats ([`MdnsStats`], [`CoapDiscoveryStats`]) and skipped.
//! - **Bounded.** The `found` channel is the gateway's bound: discovery waits for room (it is
//!   not worth dropping a device over); mdns-sd's own browse channels (1000 events) are drained
//!   by a task each, so they do not fall behind while we wait, and a browse channel that the
//!   daemon dropped anyway is re-opened and counted. Per-device TXT entries and link-format
//!   resources are capped ([`MAX_TXT_ENTRIES`], [`MAX_RESOURCES`]).
//! - **Goodbyes go out.** On shutdown [`Mdns`] unregisters its services and waits (bounded)
//!   until the daemon reports the goodbye and its one repetition sent, before stopping it.
//!
//! # Layout
//!
//! - `mdns`: [`Mdns`], [`MdnsSettings`], [`MdnsHandle`], [`MdnsStats`].
//! - `coap`: [`CoapDiscovery`], [`CoapDiscoverySettings`], [`CoapDiscoveryStats`].
//! - `linkformat`: the RFC 6690 parser for `/.well-known/core` answers ([`parse_link_format`]).

mod coap;
mod linkformat;
mod mdns;

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};

pub use coap::{CoapDiscovery, CoapDiscoveryHandle, CoapDiscoverySettings, CoapDiscoveryStats};
pub use linkformat::{LinkFormatError, parse_link_format};
pub use mdns::{Mdns, MdnsHandle, MdnsSettings, MdnsStats};

/// Longest device id, in bytes.
pub const MAX_DEVICE_ID: usize = 64;

/// TXT entries kept per discovered service; further entries are dropped and counted.
pub const MAX_TXT_ENTRIES: usize = 32;

/// Resources kept per `/.well-known/core` answer; further links are dropped and counted.
pub const MAX_RESOURCES: usize = 64;

/// What discovery found (or lost). Sent to the gateway over the `found` channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A DNS-SD service instance was resolved (or resolved again with changed records).
    Service {
        /// The device id: the instance name through [`device_id`].
        id: String,
        /// The service type with domain, e.g. `_coap._udp.local.`.
        service_type: String,
        /// The addresses from its A/AAAA records.
        addresses: Vec<IpAddr>,
        /// The port from its SRV record.
        port: u16,
        /// Its TXT entries (a key without a value maps to ""; at most [`MAX_TXT_ENTRIES`]).
        txt: BTreeMap<String, String>,
    },
    /// A DNS-SD service instance said goodbye (or its records expired).
    ServiceRemoved {
        /// The device id, as in [`Found::Service`].
        id: String,
        /// The service type with domain.
        service_type: String,
    },
    /// A CoAP device answered `GET /.well-known/core`.
    CoapResources {
        /// The device id: `coap-<address>-<port>` through [`device_id`] (CoAP discovery
        /// knows no name; the registry joins it with an mDNS entry by address).
        id: String,
        /// The address the answer came from.
        address: SocketAddr,
        /// The resources it listed (at most [`MAX_RESOURCES`]).
        resources: Vec<Resource>,
    },
}

/// One link of a `/.well-known/core` document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// The link target as sent (`/sensors/temp`); absolute URIs are kept as they are.
    pub path: String,
    /// Its attributes (`rt`, `if`, `ct`, ...), unquoted; a value-less attribute maps to "".
    /// A repeated attribute keeps its values joined by a space (RFC 6690 allows repeats).
    pub attrs: BTreeMap<String, String>,
    /// The link carries `obs` (RFC 7641): the resource can be observed.
    pub observable: bool,
}

/// Errors of discovery's public operations. Bad input from the network is never an error
/// here: it is logged and counted.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The mDNS daemon refused a command or could not start.
    #[error("mDNS daemon")]
    Mdns(#[from] mdns_sd::Error),
    /// A setting that cannot work.
    #[error("invalid discovery setting {field}: {why}")]
    InvalidSetting {
        /// Which field.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A UDP socket could not be bound or set up.
    #[error("cannot set up udp socket {addr}")]
    Socket {
        /// The local address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A device id from an untrusted name: every byte outside `[A-Za-z0-9._-]` (including each byte
/// of a multi-byte UTF-8 character) becomes `_`; None if the result is empty or longer than
/// [`MAX_DEVICE_ID`] bytes. Different names can map to one id (`a b`, `a/b`): the registry
/// keys devices by id and the service type, so two such devices would share an entry; that is
/// the price of ids that are safe in MQTT topics, file names and logs.
pub fn device_id(raw: &str) -> Option<String> {
    if raw.is_empty() || raw.len() > MAX_DEVICE_ID {
        return None;
    }
    let id: String = raw
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
                char::from(b)
            } else {
                '_'
            }
        })
        .collect();
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_are_sanitised_and_bounded() {
        assert_eq!(device_id("Sensor 1").as_deref(), Some("Sensor_1"));
        assert_eq!(device_id("a.b-c_d").as_deref(), Some("a.b-c_d"));
        assert_eq!(device_id("a/b+c#").as_deref(), Some("a_b_c_"));
        assert_eq!(device_id("Küche").as_deref(), Some("K__che"));
        assert_eq!(device_id(""), None);
        assert_eq!(device_id(&"x".repeat(64)).map(|s| s.len()), Some(64));
        assert_eq!(device_id(&"x".repeat(65)), None);
        // 33 two-byte characters are 66 bytes: refused, not cut in the middle of one.
        assert_eq!(device_id(&"é".repeat(33)), None);
    }
}
