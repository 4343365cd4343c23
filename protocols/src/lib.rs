//! Outpost's wire adapters: the embedded MQTT broker and the CoAP endpoint that local sensors
//! send readings to, and the payload codecs (text, JSON, CBOR, SenML) the gateway checks them with.
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
//! - **No panics on input.** Nothing from the network is unwrapped; parsing is rumqttc's codec
//!   (MQTT), coap-lite's (CoAP messages), serde_json and minicbor (payloads), each behind bounds.
//! - **Access control is the broker's.** With an [`Auth`] in force, a client that failed to log
//!   in never gets past CONNECT, a publish the ACL refuses never reaches the gateway, and no
//!   client is sent a message on a topic it may not read (checked per message, per subscriber,
//!   for the gateway's own publishes too). No password is logged or printed.
//! - **CoAP gets the same guarantee.** The CoAP endpoint hands readings over as the same
//!   [`Inbound`] (`source: Coap`) and sends 2.01/2.04 only after the gateway's `Ok`.
//!
//! # Layout
//!
//! - [`topic`]: validated [`topic::TopicName`] / [`topic::TopicFilter`] and matching.
//! - [`broker`]: the public API ([`Broker`], [`BrokerHandle`], [`Inbound`], [`Auth`]) and,
//!   inside it, `auth` (password and ACL checks, mosquitto's semantics), `codec` (rumqttc v4/v5 adapters to one internal packet set), `session` (sans-IO per-client
//!   state), `router` (sessions and retained messages), `retained` (the retained store and its
//!   bounds), `connection` (the per-socket task).
//! - [`coap`]: [`coap::CoapServer`] (ingest resource, `/.well-known/core`, observable
//!   `/status`) and [`coap::CoapObserver`] (observes a device resource).
//! - [`payload`]: [`payload::ContentFormat`] and [`payload::validate`] (SenML per RFC 8428).
//! - [`upstream`]: the upstream MQTT client (rumqttc, 3.1.1 and 5) behind the [`upstream::Upstream`]
//!   trait; it carries packets, the gateway's sync core decides.

#![forbid(unsafe_code)]

pub mod broker;
pub mod coap;
pub mod discovery;
pub mod payload;
pub mod topic;
pub mod upstream;

pub use broker::{
    Access, Auth, Broker, BrokerError, BrokerHandle, BrokerSettings, BrokerStats, Inbound,
    IngestRefusal, IngestReply, QoS, Source,
};
