//! Per-client session state, free of I/O: subscriptions, the outbound queue and in-flight window,
//! packet-id allocation, and inbound QoS 2 ids awaiting PUBREL.
//!
//! Everything here is plain data so that a later change can persist it (sessions across restarts)
//! without touching the connection code: a session is a value, the connection task only drives it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use tokio::time::Instant;

use super::QoS;
use super::codec::PublishProps;
use crate::topic::TopicFilter;

/// One message as a given subscriber receives it: `qos` is the delivery QoS (already
/// downgraded), `retain` the flag as forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Message {
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// The publisher's MQTT 5 properties, shared by every copy of the message.
    pub props: Arc<PublishProps>,
    /// When the publisher's message expiry interval runs out: a queued message past it is
    /// dropped instead of sent, and a sent one carries the time left.
    pub expires_at: Option<Instant>,
    /// MQTT 5 subscription identifiers of this subscriber's matching subscriptions.
    pub subscription_ids: Vec<u32>,
}

impl Message {
    /// Whether the message expired by `now` (never, without an expiry interval).
    pub(crate) fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|e| e <= now)
    }

    /// The expiry interval left at `now`, in whole seconds rounded up (so a message sent with
    /// a little time left does not arrive as "0", which would mean "no expiry" nowhere but
    /// could confuse a client).
    pub(crate) fn expiry_left(&self, now: Instant) -> Option<u32> {
        self.expires_at.map(|e| {
            let left = e.saturating_duration_since(now);
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            u32::try_from(secs).unwrap_or(u32::MAX).max(1)
        })
    }
}

/// A granted subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Subscription {
    pub filter: TopicFilter,
    /// Granted maximum QoS.
    pub qos: QoS,
    /// MQTT 5: do not deliver this client's own publishes back to it.
    pub no_local: bool,
    /// MQTT 5: keep the retain flag when forwarding (otherwise cleared, as in 3.1.1).
    pub retain_as_published: bool,
    /// MQTT 5 subscription identifier, sent back with every message this subscription
    /// selects (§3.8.2.1.2).
    pub id: Option<u32>,
    /// MQTT 5 shared subscription (`$share/{group}/{filter}`): the group name. Such a
    /// subscription gets a message only when the router picks this session for the group.
    pub share: Option<Arc<str>>,
}

impl Subscription {
    /// The text the client subscribed with, which names the subscription (UNSUBSCRIBE).
    pub(crate) fn key(&self) -> String {
        match &self.share {
            Some(group) => format!("$share/{group}/{}", self.filter.as_str()),
            None => self.filter.as_str().to_owned(),
        }
    }
}

/// Splits a shared subscription `$share/{group}/{filter}` (MQTT 5 §4.8.2) into its group
/// and filter. `Ok(None)`: not a shared subscription. `Err`: `$share` with a bad group
/// (empty, or holding a wildcard) or no filter.
pub(crate) fn split_shared(filter: &str) -> Result<Option<(&str, &str)>, &'static str> {
    let Some(rest) = filter.strip_prefix("$share/") else {
        return Ok(None);
    };
    let Some((group, filter)) = rest.split_once('/') else {
        return Err("shared subscription without a filter");
    };
    if group.is_empty() || group.contains(['+', '#']) {
        return Err("invalid share name");
    }
    if filter.is_empty() {
        return Err("shared subscription without a filter");
    }
    Ok(Some((group, filter)))
}

/// Where an outbound QoS 1/2 message is in its handshake: the packet it awaits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Awaiting {
    /// QoS 1 sent, waiting for PUBACK.
    Ack,
    /// QoS 2 sent, waiting for PUBREC.
    Rec,
    /// QoS 2 PUBREL sent, waiting for PUBCOMP.
    Comp,
}

#[derive(Debug, Clone)]
struct Inflight {
    pkid: u16,
    msg: Message,
    state: Awaiting,
}

/// What the connection must write next for this session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Send {
    /// A PUBLISH (`pkid` 0 for QoS 0).
    Publish { msg: Message, pkid: u16, dup: bool },
    /// A PUBREL retransmitted on session resume.
    PubRel(u16),
}

/// The result of offering a message to a session's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Enqueue {
    /// Queued for delivery.
    Queued,
    /// Queued, but an older QoS 0 message was dropped to make room (counted as a drop).
    QueuedDroppingQos0,
    /// Not queued: the queue is full (counted as a drop).
    DroppedFull,
    /// Not queued: QoS 0 to an offline session is not kept (mosquitto's default), not a drop.
    SkippedOffline,
}

/// Outbound delivery state: a bounded queue behind an in-flight window.
#[derive(Debug, Clone)]
pub(crate) struct Outbound {
    /// Waiting to be sent (beyond the in-flight window, or while offline). Bounded by `max_queued`.
    queue: VecDeque<Message>,
    /// Sent QoS 1/2 messages not yet fully acknowledged, oldest first (resent in this order).
    inflight: VecDeque<Inflight>,
    /// Last packet id handed out; allocation continues after it, skipping ids in use.
    last_pkid: u16,
    /// Bound of `queue`; policy when full: drop QoS 0 first, then refuse the new message.
    max_queued: usize,
    /// In-flight window: min(broker setting, the client's MQTT 5 receive maximum).
    max_inflight: u16,
    /// Queued messages dropped because their expiry interval ran out before they could be
    /// sent, not yet reported to the counters (see `take_expired`).
    expired: u64,
}

impl Outbound {
    pub(crate) fn new(max_queued: usize, max_inflight: u16) -> Self {
        Self {
            queue: VecDeque::new(),
            inflight: VecDeque::new(),
            last_pkid: 0,
            max_queued: max_queued.max(1),
            max_inflight: max_inflight.max(1),
            expired: 0,
        }
    }

    /// Expired messages dropped since the last call (for the broker's counters).
    pub(crate) fn take_expired(&mut self) -> u64 {
        std::mem::take(&mut self.expired)
    }

    /// Drops every queued message whose expiry passed by `now`, also while offline.
    pub(crate) fn drop_expired(&mut self, now: Instant) {
        let before = self.queue.len();
        self.queue.retain(|m| !m.expired(now));
        self.expired += u64::try_from(before - self.queue.len()).unwrap_or(u64::MAX);
    }

    /// Sets the in-flight window for the current connection.
    pub(crate) fn set_max_inflight(&mut self, n: u16) {
        self.max_inflight = n.max(1);
    }

    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.queue.len()
    }

    #[cfg(test)]
    pub(crate) fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Offers `msg` for delivery.
    pub(crate) fn enqueue(&mut self, msg: Message, online: bool) -> Enqueue {
        if !online && msg.qos == QoS::AtMostOnce {
            return Enqueue::SkippedOffline;
        }
        if self.queue.len() < self.max_queued {
            self.queue.push_back(msg);
            return Enqueue::Queued;
        }
        if msg.qos == QoS::AtMostOnce {
            return Enqueue::DroppedFull;
        }
        match self.queue.iter().position(|m| m.qos == QoS::AtMostOnce) {
            Some(i) => {
                self.queue.remove(i);
                self.queue.push_back(msg);
                Enqueue::QueuedDroppingQos0
            }
            None => Enqueue::DroppedFull,
        }
    }

    fn pkid_in_use(&self, pkid: u16) -> bool {
        self.inflight.iter().any(|i| i.pkid == pkid)
    }

    fn allocate_pkid(&mut self) -> Option<u16> {
        let mut candidate = self.last_pkid;
        for _ in 0..u16::MAX {
            candidate = if candidate == u16::MAX {
                1
            } else {
                candidate + 1
            };
            if !self.pkid_in_use(candidate) {
                self.last_pkid = candidate;
                return Some(candidate);
            }
        }
        None
    }

    /// The next PUBLISH to write at `now`, if the window allows. Messages leave the queue in
    /// order: a QoS 1/2 message blocked by a full window also holds back the QoS 0 ones behind
    /// it. Expired messages at the front are dropped (counted) instead of sent.
    pub(crate) fn next_send(&mut self, now: Instant) -> Option<Send> {
        while self.queue.front().is_some_and(|m| m.expired(now)) {
            self.queue.pop_front();
            self.expired += 1;
        }
        let front = self.queue.front()?;
        if front.qos == QoS::AtMostOnce {
            let msg = self.queue.pop_front()?;
            return Some(Send::Publish {
                msg,
                pkid: 0,
                dup: false,
            });
        }
        if self.inflight.len() >= usize::from(self.max_inflight) {
            return None;
        }
        let pkid = self.allocate_pkid()?;
        let msg = self.queue.pop_front()?;
        self.inflight.push_back(Inflight {
            pkid,
            msg: msg.clone(),
            state: if msg.qos == QoS::AtLeastOnce {
                Awaiting::Ack
            } else {
                Awaiting::Rec
            },
        });
        Some(Send::Publish {
            msg,
            pkid,
            dup: false,
        })
    }

    /// PUBACK received. Returns whether it matched a QoS 1 message in flight.
    pub(crate) fn on_puback(&mut self, pkid: u16) -> bool {
        self.remove_if(pkid, Awaiting::Ack)
    }

    /// PUBREC received. Returns whether it matched; either way the caller answers PUBREL.
    pub(crate) fn on_pubrec(&mut self, pkid: u16) -> bool {
        match self
            .inflight
            .iter_mut()
            .find(|i| i.pkid == pkid && i.state == Awaiting::Rec)
        {
            Some(i) => {
                i.state = Awaiting::Comp;
                true
            }
            None => false,
        }
    }

    /// PUBCOMP received. Returns whether it matched.
    pub(crate) fn on_pubcomp(&mut self, pkid: u16) -> bool {
        self.remove_if(pkid, Awaiting::Comp)
    }

    fn remove_if(&mut self, pkid: u16, state: Awaiting) -> bool {
        match self
            .inflight
            .iter()
            .position(|i| i.pkid == pkid && i.state == state)
        {
            Some(pos) => {
                self.inflight.remove(pos);
                true
            }
            None => false,
        }
    }

    /// On resuming a session: everything in flight again, oldest first, PUBLISH with DUP or
    /// PUBREL depending on how far each got (MQTT 3.1.1 §4.4).
    pub(crate) fn resend(&self) -> Vec<Send> {
        self.inflight
            .iter()
            .map(|i| match i.state {
                Awaiting::Ack | Awaiting::Rec => Send::Publish {
                    msg: i.msg.clone(),
                    pkid: i.pkid,
                    dup: true,
                },
                Awaiting::Comp => Send::PubRel(i.pkid),
            })
            .collect()
    }

    /// Forgets a QoS 1/2 message that can never be written (larger than the client accepts).
    pub(crate) fn abandon(&mut self, pkid: u16) {
        self.inflight.retain(|i| i.pkid != pkid);
    }
}

/// Everything the broker remembers about one client id.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    /// Subscriptions by filter text (a re-subscribe replaces).
    pub subscriptions: BTreeMap<String, Subscription>,
    pub outbound: Outbound,
    /// Inbound QoS 2 packet ids PUBREC'd and awaiting PUBREL: a duplicate PUBLISH with one of
    /// these ids is not handed over again (exactly once).
    pub awaiting_rel: BTreeSet<u16>,
    /// Whether the session outlives the connection (3.1.1 clean session 0; MQTT 5 session
    /// expiry > 0, kept until restart for now).
    pub persistent: bool,
}

impl Session {
    pub(crate) fn new(persistent: bool, max_queued: usize, max_inflight: u16) -> Self {
        Self {
            subscriptions: BTreeMap::new(),
            outbound: Outbound::new(max_queued, max_inflight),
            awaiting_rel: BTreeSet::new(),
            persistent,
        }
    }

    /// Adds or replaces a subscription; returns whether one existed for the filter.
    pub(crate) fn subscribe(&mut self, sub: Subscription) -> bool {
        self.subscriptions.insert(sub.key(), sub).is_some()
    }

    /// Removes a subscription; returns whether it existed.
    pub(crate) fn unsubscribe(&mut self, filter: &str) -> bool {
        self.subscriptions.remove(filter).is_some()
    }

    /// How this session should receive a message on `topic` published at `qos`: overlapping
    /// subscriptions give one delivery at the highest matching QoS (mosquitto), capped at the
    /// published QoS. `from_self` applies MQTT 5 no-local.
    pub(crate) fn delivery(
        &self,
        topic: &str,
        qos: QoS,
        retain: bool,
        from_self: bool,
    ) -> Option<(QoS, bool)> {
        let mut best: Option<(QoS, bool)> = None;
        for sub in self.subscriptions.values() {
            if sub.share.is_some() || (from_self && sub.no_local) || !sub.filter.matches(topic) {
                continue;
            }
            let q = sub.qos.min(qos);
            let r = retain && sub.retain_as_published;
            best = Some(match best {
                None => (q, r),
                Some((bq, br)) => (bq.max(q), br || r),
            });
        }
        best
    }

    /// The identifiers of the subscriptions that select a message on `topic` (the one delivery
    /// carries them all, MQTT 5 §3.3.4), in filter order, without duplicates.
    pub(crate) fn subscription_ids(&self, topic: &str, from_self: bool) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .subscriptions
            .values()
            .filter(|s| s.share.is_none() && !(from_self && s.no_local) && s.filter.matches(topic))
            .filter_map(|s| s.id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(qos: QoS, n: u8) -> Message {
        Message {
            topic: Arc::from("t"),
            payload: Bytes::from(vec![n]),
            qos,
            retain: false,
            props: Arc::default(),
            expires_at: None,
            subscription_ids: Vec::new(),
        }
    }

    fn sub(filter: &str, qos: QoS) -> Subscription {
        Subscription {
            filter: TopicFilter::new(filter).expect("valid"),
            qos,
            no_local: false,
            retain_as_published: false,
            id: None,
            share: None,
        }
    }

    fn pkid_of(s: &Send) -> u16 {
        match s {
            Send::Publish { pkid, .. } | Send::PubRel(pkid) => *pkid,
        }
    }

    #[test]
    fn window_limits_inflight_and_ack_opens_it() {
        let mut o = Outbound::new(10, 2);
        for n in 0..3 {
            assert_eq!(o.enqueue(msg(QoS::AtLeastOnce, n), true), Enqueue::Queued);
        }
        let a = o.next_send(Instant::now()).expect("first");
        let b = o.next_send(Instant::now()).expect("second");
        assert!(o.next_send(Instant::now()).is_none(), "window of 2 is full");
        assert_eq!((pkid_of(&a), pkid_of(&b)), (1, 2));
        assert!(o.on_puback(1));
        assert!(!o.on_puback(1), "a second PUBACK matches nothing");
        assert_eq!(pkid_of(&o.next_send(Instant::now()).expect("third")), 3);
    }

    #[test]
    fn qos0_goes_without_window() {
        let mut o = Outbound::new(10, 1);
        o.enqueue(msg(QoS::AtLeastOnce, 0), true);
        o.enqueue(msg(QoS::AtLeastOnce, 1), true);
        o.next_send(Instant::now());
        assert!(o.next_send(Instant::now()).is_none());
        assert_eq!(o.queued(), 1);
        let mut o = Outbound::new(10, 1);
        o.enqueue(msg(QoS::AtMostOnce, 0), true);
        o.enqueue(msg(QoS::AtMostOnce, 1), true);
        assert!(matches!(
            o.next_send(Instant::now()),
            Some(Send::Publish { pkid: 0, .. })
        ));
        assert!(matches!(
            o.next_send(Instant::now()),
            Some(Send::Publish { pkid: 0, .. })
        ));
    }

    #[test]
    fn full_queue_drops_qos0_first() {
        let mut o = Outbound::new(2, 1);
        assert_eq!(o.enqueue(msg(QoS::AtMostOnce, 0), true), Enqueue::Queued);
        assert_eq!(o.enqueue(msg(QoS::AtLeastOnce, 1), true), Enqueue::Queued);
        assert_eq!(
            o.enqueue(msg(QoS::AtMostOnce, 2), true),
            Enqueue::DroppedFull
        );
        assert_eq!(
            o.enqueue(msg(QoS::AtLeastOnce, 3), true),
            Enqueue::QueuedDroppingQos0
        );
        assert_eq!(
            o.enqueue(msg(QoS::ExactlyOnce, 4), true),
            Enqueue::DroppedFull
        );
        let payloads: Vec<u8> = o.queue.iter().map(|m| m.payload[0]).collect();
        assert_eq!(payloads, vec![1, 3]);
    }

    #[test]
    fn offline_session_keeps_only_qos1_and_2() {
        let mut o = Outbound::new(5, 1);
        assert_eq!(
            o.enqueue(msg(QoS::AtMostOnce, 0), false),
            Enqueue::SkippedOffline
        );
        assert_eq!(o.enqueue(msg(QoS::ExactlyOnce, 1), false), Enqueue::Queued);
    }

    #[test]
    fn pkid_allocation_wraps_and_skips_ids_in_use() {
        let mut o = Outbound::new(10, 5);
        o.last_pkid = u16::MAX - 1;
        o.enqueue(msg(QoS::AtLeastOnce, 0), true);
        o.enqueue(msg(QoS::AtLeastOnce, 1), true);
        o.enqueue(msg(QoS::AtLeastOnce, 2), true);
        assert_eq!(pkid_of(&o.next_send(Instant::now()).expect("a")), u16::MAX);
        assert_eq!(
            pkid_of(&o.next_send(Instant::now()).expect("b")),
            1,
            "0 is never used"
        );
        o.last_pkid = u16::MAX - 1; // force a collision with the ids in flight
        assert_eq!(pkid_of(&o.next_send(Instant::now()).expect("c")), 2);
    }

    #[test]
    fn qos2_handshake_and_resume() {
        let mut o = Outbound::new(10, 5);
        o.enqueue(msg(QoS::ExactlyOnce, 0), true);
        o.enqueue(msg(QoS::ExactlyOnce, 1), true);
        o.enqueue(msg(QoS::AtLeastOnce, 2), true);
        o.next_send(Instant::now());
        o.next_send(Instant::now());
        o.next_send(Instant::now());
        assert!(!o.on_puback(1), "PUBACK does not complete a QoS 2 message");
        assert!(o.on_pubrec(1));
        let resend = o.resend();
        assert_eq!(resend.len(), 3);
        assert_eq!(resend[0], Send::PubRel(1));
        assert!(matches!(
            &resend[1],
            Send::Publish {
                pkid: 2,
                dup: true,
                ..
            }
        ));
        assert!(matches!(
            &resend[2],
            Send::Publish {
                pkid: 3,
                dup: true,
                ..
            }
        ));
        assert!(o.on_pubcomp(1));
        assert!(!o.on_pubcomp(2), "still awaiting PUBREC");
        assert_eq!(o.inflight(), 2);
    }

    #[test]
    fn overlapping_subscriptions_deliver_once_at_max_qos_capped_by_publish() {
        let mut s = Session::new(false, 10, 10);
        s.subscribe(sub("a/+", QoS::AtMostOnce));
        s.subscribe(sub("a/#", QoS::ExactlyOnce));
        assert_eq!(
            s.delivery("a/b", QoS::AtLeastOnce, false, false),
            Some((QoS::AtLeastOnce, false))
        );
        assert_eq!(
            s.delivery("a/b", QoS::ExactlyOnce, true, false),
            Some((QoS::ExactlyOnce, false)),
            "retain flag cleared when forwarding"
        );
        assert_eq!(s.delivery("b", QoS::ExactlyOnce, false, false), None);
        assert!(s.unsubscribe("a/#"));
        assert!(!s.unsubscribe("a/#"));
        assert_eq!(
            s.delivery("a/b", QoS::ExactlyOnce, false, false),
            Some((QoS::AtMostOnce, false))
        );
    }

    #[test]
    fn expired_queued_messages_are_dropped_and_counted_not_sent() {
        let now = Instant::now();
        let mut o = Outbound::new(10, 10);
        let mut stale = msg(QoS::AtLeastOnce, 0);
        stale.expires_at = Some(now + std::time::Duration::from_secs(1));
        let mut fresh = msg(QoS::AtLeastOnce, 1);
        fresh.expires_at = Some(now + std::time::Duration::from_secs(60));
        o.enqueue(stale, false);
        o.enqueue(fresh, false);
        o.enqueue(msg(QoS::AtLeastOnce, 2), false);
        let later = now + std::time::Duration::from_secs(2);
        match o.next_send(later) {
            Some(Send::Publish { msg, .. }) => {
                assert_eq!(msg.payload[0], 1);
                assert_eq!(
                    msg.expiry_left(later),
                    Some(58),
                    "the time it waited is taken off"
                );
            }
            other => panic!("expected the unexpired message, got {other:?}"),
        }
        assert_eq!(o.take_expired(), 1);
        assert_eq!(o.take_expired(), 0, "reported once");
    }

    #[test]
    fn offline_queue_sheds_expired_messages() {
        let now = Instant::now();
        let mut o = Outbound::new(10, 10);
        let mut m = msg(QoS::AtLeastOnce, 0);
        m.expires_at = Some(now);
        o.enqueue(m, false);
        o.drop_expired(now);
        assert_eq!(o.queued(), 0);
        assert_eq!(o.take_expired(), 1);
    }

    #[test]
    fn every_matching_subscription_identifier_is_carried() {
        let mut s = Session::new(false, 10, 10);
        let mut a = sub("a/+", QoS::AtMostOnce);
        a.id = Some(7);
        let mut b = sub("a/#", QoS::AtMostOnce);
        b.id = Some(3);
        s.subscribe(a);
        s.subscribe(b);
        s.subscribe(sub("#", QoS::AtMostOnce));
        assert_eq!(s.subscription_ids("a/b", false), vec![3, 7]);
        assert_eq!(s.subscription_ids("a", false), vec![3]);
    }

    #[test]
    fn shared_subscription_text_splits_into_group_and_filter() {
        assert_eq!(split_shared("a/b"), Ok(None));
        assert_eq!(split_shared("$share/g/a/#"), Ok(Some(("g", "a/#"))));
        assert!(split_shared("$share/g").is_err());
        assert!(split_shared("$share//a").is_err());
        assert!(split_shared("$share/g+/a").is_err());
        assert!(split_shared("$share/g/").is_err());
    }

    #[test]
    fn shared_subscription_is_not_an_ordinary_delivery() {
        let mut s = Session::new(false, 10, 10);
        let mut shared = sub("a/#", QoS::AtLeastOnce);
        shared.share = Some(Arc::from("g"));
        assert!(!s.subscribe(shared));
        assert_eq!(s.delivery("a/b", QoS::AtLeastOnce, false, false), None);
        assert!(s.unsubscribe("$share/g/a/#"));
    }

    #[test]
    fn no_local_skips_own_messages() {
        let mut s = Session::new(false, 10, 10);
        let mut nl = sub("x", QoS::AtLeastOnce);
        nl.no_local = true;
        s.subscribe(nl);
        assert_eq!(s.delivery("x", QoS::AtLeastOnce, false, true), None);
        assert!(s.delivery("x", QoS::AtLeastOnce, false, false).is_some());
    }
}
