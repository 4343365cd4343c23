//! The gateway's own messages upstream: birth, will, clean shutdown and heartbeat.
//!
//! Topics (under the upstream's prefix and the node name, so one wildcard subscription per fleet
//! sees them all; the `$gateway` level keeps them apart from sensor topics):
//!
//! | topic | retained | when | payload (JSON) |
//! | --- | --- | --- | --- |
//! | `<prefix>/<node>/$gateway/status` | yes | on every connect | [`Birth`]: `state: "online"`, identity, labels, capabilities, version, start time |
//! | same | yes | connection lost (the broker publishes our will) | [`Offline`]: `state: "offline"`, `reason: "connection-lost"` |
//! | same | yes | clean shutdown | [`Offline`]: `state: "offline"`, `reason: "shutdown"` |
//! | `<prefix>/<node>/$gateway/heartbeat` | no | every `health.heartbeat_interval` while connected | [`Heartbeat`] |
//!
//! Birth, will and heartbeat describe the connection *now*, so they are published directly and
//! not stored: a heartbeat from an hour ago is noise. Resource samples and check changes are data
//! and go through the store (see `health`).

use std::collections::BTreeMap;

use serde::Serialize;

/// Reserved first level of the gateway's own streams and topics.
pub const GATEWAY_LEVEL: &str = "$gateway";

/// Who this gateway is; fixed for the life of the process.
#[derive(Debug, Clone, Serialize)]
pub struct NodeIdentity {
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub capabilities: Vec<String>,
    pub version: String,
    pub started_at_ms: u64,
}

/// Retained on the status topic when the gateway connects.
#[derive(Debug, Serialize)]
pub struct Birth<'a> {
    pub state: &'static str,
    #[serde(flatten)]
    pub identity: &'a NodeIdentity,
    pub connected_at_ms: u64,
}

/// Retained on the status topic when the gateway goes away.
#[derive(Debug, Serialize)]
pub struct Offline<'a> {
    pub state: &'static str,
    pub node: &'a str,
    pub reason: &'static str,
    /// Absent in the will (it is composed at connect time and published later by the broker).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at_ms: Option<u64>,
}

/// The periodic heartbeat: the figures an operator of a hundred gateways looks at first.
#[derive(Debug, Clone, Serialize)]
pub struct Heartbeat {
    pub node: String,
    pub at_ms: u64,
    pub uptime_s: u64,
    pub backlog_records: u64,
    pub backlog_bytes: u64,
    pub oldest_unsynced_age_ms: Option<u64>,
    pub drain_eta_s: Option<f64>,
    pub uplink_rtt_ms: Option<f64>,
    pub reconnects: u64,
    pub ingested: u64,
    pub synced: u64,
    pub store_poisoned: bool,
    pub checks: BTreeMap<String, String>,
    pub cpu_percent: Option<f32>,
    pub memory_used: Option<u64>,
    pub disk_available: Option<u64>,
}

/// Topics of one node under one upstream prefix.
#[derive(Debug, Clone)]
pub struct Topics {
    pub status: String,
    pub heartbeat: String,
}

impl Topics {
    pub fn new(prefix: &str, node: &str) -> Self {
        Self {
            status: format!("{prefix}/{node}/{GATEWAY_LEVEL}/status"),
            heartbeat: format!("{prefix}/{node}/{GATEWAY_LEVEL}/heartbeat"),
        }
    }
}

pub fn birth(identity: &NodeIdentity, now_ms: u64) -> Vec<u8> {
    to_json(&Birth {
        state: "online",
        identity,
        connected_at_ms: now_ms,
    })
}

pub fn will(node: &str) -> Vec<u8> {
    to_json(&Offline {
        state: "offline",
        node,
        reason: "connection-lost",
        at_ms: None,
    })
}

pub fn shutdown(node: &str, now_ms: u64) -> Vec<u8> {
    to_json(&Offline {
        state: "offline",
        node,
        reason: "shutdown",
        at_ms: Some(now_ms),
    })
}

/// Serialising these plain structs cannot fail (string keys, no maps with non-string keys); an
/// empty object is the harmless fallback should it ever.
pub fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn birth_and_will_carry_identity_and_state() {
        let id = NodeIdentity {
            node: "gw1".into(),
            labels: BTreeMap::from([("site".into(), "hall-3".into())]),
            capabilities: vec!["mqtt".into()],
            version: "0.1.0".into(),
            started_at_ms: 5,
        };
        let b: serde_json::Value = serde_json::from_slice(&birth(&id, 7)).unwrap();
        assert_eq!(b["state"], "online");
        assert_eq!(b["node"], "gw1");
        assert_eq!(b["labels"]["site"], "hall-3");
        assert_eq!(b["connected_at_ms"], 7);
        let w: serde_json::Value = serde_json::from_slice(&will("gw1")).unwrap();
        assert_eq!(w["state"], "offline");
        assert_eq!(w["reason"], "connection-lost");
        assert!(w.get("at_ms").is_none());
        let t = Topics::new("outpost", "gw1");
        assert_eq!(t.status, "outpost/gw1/$gateway/status");
    }
}
