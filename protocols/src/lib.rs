//! Outpost's wire adapters. For now: the embedded MQTT broker that local sensors publish to.
//!
//! # Invariants
//!
//! - **Acknowledged means stored.** The broker never touches storage. It hands every accepted
//!   PUBLISH to the gateway as an [`Inbound`] over a bounded channel and, for QoS 1/2, writes
//!   PUBACK / PUBREC only after the gateway replied `Ok` (committed). A refusal is never acked:
//!   MQTT 5 gets the reason code, MQTT 3.1.1 gets its connection closed so the client resends.
//! - **Backpressure, not loss.** A connection keeps reading while replies are outstanding, acks
//!   in arrival order, and stops reading at `max_inbound_pending` unanswered messages; a slow
//!   store slows publishers through their in-flight windows.
//! - **One client cannot hurt another.** Malformed, oversized or refused traffic closes only its
//!   own connection; a slow subscriber's bounded queue drops (QoS 0 first, counted) instead of
//!   blocking publishers.
//! - **No panics on input.** Nothing from the network is unwrapped; parsing is rumqttc's codec.
//!
//! # Layout
//!
//! - [`topic`]: validated [`topic::TopicName`] / [`topic::TopicFilter`] and matching.
//! - [`broker`]: the public API ([`Broker`], [`BrokerHandle`], [`Inbound`]) and, inside it,
//!   `codec` (rumqttc v4/v5 adapters to one internal packet set), `session` (sans-IO per-client
//!   state), `router` (sessions and retained messages), `connection` (the per-socket task).

#![forbid(unsafe_code)]

pub mod broker;
pub mod topic;

pub use broker::{
    Broker, BrokerError, BrokerHandle, BrokerSettings, BrokerStats, Inbound, IngestRefusal,
    IngestReply, QoS,
};
