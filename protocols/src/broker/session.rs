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
    /// Names the message in the persisted session (`persist::message_key`); 0 for a message
    /// that is not persisted (QoS 0, or a session that ends with its connection).
    pub id: u64,
}

impl Message {
    /// Whether the message expired by `now` (never, without an expiry interval).
    pub(crate) fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|e| e <= now)
    }

    /// The expiry interval left at `now`, in whole seconds rounded up (so a message sent with
    /// a little time left does not arrive as "0", which would mean "no expiry" nowhere but
    /// could confuse a client).
    /// What the message costs against a queue's byte bound.
    pub(crate) fn size(&self) -> usize {
        self.topic.len() + self.payload.len()
    }

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

/// A change to a persisted message (`Message::id` != 0), for the router to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MessageChange {
    /// Queued, or its handshake moved on: (re)write it.
    Put {
        msg: Message,
        inflight: Option<(u16, Awaiting)>,
    },
    /// Delivered, dropped or expired: forget it.
    Delete(u64),
}

#[derive(Debug, Clone)]
struct Inflight {
    pkid: u16,
    msg: Message,
    state: Awaiting,
    /// Sent on an earlier connection and not yet again on this one (see `resume`).
    resend: bool,
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
    /// Bound of the bytes (topic + payload) in `queue`, with the same policy.
    max_queued_bytes: usize,
    /// Bytes (topic + payload) in `queue`.
    queued_bytes: usize,
    /// In-flight window: min(broker setting, the client's MQTT 5 receive maximum).
    max_inflight: u16,
    /// Queued messages dropped because their expiry interval ran out before they could be
    /// sent, not yet reported to the counters (see `take_expired`).
    expired: u64,
    /// Changes to persisted messages not yet taken by the router (`take_changes`).
    changes: Vec<MessageChange>,
}

impl Outbound {
    pub(crate) fn new(max_queued: usize, max_inflight: u16) -> Self {
        Self {
            queue: VecDeque::new(),
            inflight: VecDeque::new(),
            last_pkid: 0,
            max_queued: max_queued.max(1),
            max_queued_bytes: usize::MAX,
            queued_bytes: 0,
            max_inflight: max_inflight.max(1),
            expired: 0,
            changes: Vec::new(),
        }
    }

    /// Bounds the bytes of the queue (default: no bound but the message count).
    pub(crate) fn set_max_queued_bytes(&mut self, bytes: usize) {
        self.max_queued_bytes = bytes.max(1);
    }

    /// Changes to persisted messages since the last call, in order.
    pub(crate) fn take_changes(&mut self) -> Vec<MessageChange> {
        std::mem::take(&mut self.changes)
    }

    /// The ids of every persisted message held (queued or in flight).
    pub(crate) fn persisted_ids(&self) -> Vec<u64> {
        self.inflight
            .iter()
            .map(|i| i.msg.id)
            .chain(self.queue.iter().map(|m| m.id))
            .filter(|id| *id != 0)
            .collect()
    }

    /// Puts back a message read from the persisted session, after the ones restored before
    /// it: in flight with its packet id and state, or queued.
    pub(crate) fn restore(&mut self, msg: Message, inflight: Option<(u16, Awaiting)>) {
        match inflight {
            Some((pkid, state)) => {
                self.last_pkid = self.last_pkid.max(pkid);
                self.inflight.push_back(Inflight {
                    pkid,
                    msg,
                    state,
                    resend: true,
                });
            }
            None => {
                self.queued_bytes += msg.size();
                self.queue.push_back(msg);
            }
        }
    }

    fn persist(&mut self, msg: &Message, inflight: Option<(u16, Awaiting)>) {
        if msg.id != 0 {
            self.changes.push(MessageChange::Put {
                msg: msg.clone(),
                inflight,
            });
        }
    }

    fn forget(&mut self, msg: &Message) {
        if msg.id != 0 {
            self.changes.push(MessageChange::Delete(msg.id));
        }
    }

    fn pop_queued(&mut self) -> Option<Message> {
        let msg = self.queue.pop_front()?;
        self.queued_bytes -= msg.size();
        Some(msg)
    }

    fn has_room(&self, bytes: usize) -> bool {
        self.queue.len() < self.max_queued
            && self.queued_bytes.saturating_add(bytes) <= self.max_queued_bytes
    }

    /// Expired messages dropped since the last call (for the broker's counters).
    pub(crate) fn take_expired(&mut self) -> u64 {
        std::mem::take(&mut self.expired)
    }

    /// Drops every queued message whose expiry passed by `now`, also while offline.
    pub(crate) fn drop_expired(&mut self, now: Instant) {
        if !self.queue.iter().any(|m| m.expired(now)) {
            return;
        }
        let (expired, kept): (VecDeque<Message>, VecDeque<Message>) =
            std::mem::take(&mut self.queue)
                .into_iter()
                .partition(|m| m.expired(now));
        self.queue = kept;
        for m in &expired {
            self.queued_bytes -= m.size();
            self.forget(m);
        }
        self.expired += u64::try_from(expired.len()).unwrap_or(u64::MAX);
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
        let size = msg.size();
        let mut outcome = Enqueue::Queued;
        if !self.has_room(size) {
            if msg.qos == QoS::AtMostOnce {
                return Enqueue::DroppedFull;
            }
            // The oldest QoS 0 message makes room, if dropping it is enough.
            let victim = self
                .queue
                .iter()
                .position(|m| m.qos == QoS::AtMostOnce)
                .filter(|&i| {
                    let freed = self.queue[i].size();
                    self.queue.len() - 1 < self.max_queued
                        && (self.queued_bytes - freed).saturating_add(size) <= self.max_queued_bytes
                });
            let Some(i) = victim else {
                return Enqueue::DroppedFull;
            };
            if let Some(dropped) = self.queue.remove(i) {
                self.queued_bytes -= dropped.size();
            }
            outcome = Enqueue::QueuedDroppingQos0;
        }
        self.persist(&msg, None);
        self.queued_bytes += size;
        self.queue.push_back(msg);
        outcome
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
            if let Some(m) = self.pop_queued() {
                self.forget(&m);
            }
            self.expired += 1;
        }
        // Messages in flight on an earlier connection go again first, oldest first, within
        // this connection's window (MQTT 5 §4.9: the quota starts afresh on each connection).
        if let Some(pos) = self.inflight.iter().position(|i| i.resend) {
            let sent = self.inflight.iter().filter(|i| !i.resend).count();
            if sent >= usize::from(self.max_inflight) {
                return None;
            }
            let i = &mut self.inflight[pos];
            i.resend = false;
            return Some(match i.state {
                Awaiting::Ack | Awaiting::Rec => Send::Publish {
                    msg: i.msg.clone(),
                    pkid: i.pkid,
                    dup: true,
                },
                Awaiting::Comp => Send::PubRel(i.pkid),
            });
        }
        let front = self.queue.front()?;
        if front.qos == QoS::AtMostOnce {
            let msg = self.pop_queued()?;
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
        let msg = self.pop_queued()?;
        let state = if msg.qos == QoS::AtLeastOnce {
            Awaiting::Ack
        } else {
            Awaiting::Rec
        };
        self.persist(&msg, Some((pkid, state)));
        self.inflight.push_back(Inflight {
            pkid,
            msg: msg.clone(),
            state,
            resend: false,
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
        let Some(i) = self
            .inflight
            .iter_mut()
            .find(|i| i.pkid == pkid && i.state == Awaiting::Rec)
        else {
            return false;
        };
        i.state = Awaiting::Comp;
        let msg = i.msg.clone();
        self.persist(&msg, Some((pkid, Awaiting::Comp)));
        true
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
                if let Some(done) = self.inflight.remove(pos) {
                    self.forget(&done.msg);
                }
                true
            }
            None => false,
        }
    }

    /// On resuming a session: everything in flight is to be sent again, oldest first, PUBLISH
    /// with DUP or PUBREL depending on how far each got (MQTT 3.1.1 §4.4), by `next_send` and
    /// within the new connection's window.
    pub(crate) fn resume(&mut self) {
        for i in &mut self.inflight {
            i.resend = true;
        }
    }

    /// Forgets a QoS 1/2 message that can never be written (larger than the client accepts).
    pub(crate) fn abandon(&mut self, pkid: u16) {
        if let Some(pos) = self.inflight.iter().position(|i| i.pkid == pkid)
            && let Some(gone) = self.inflight.remove(pos)
        {
            self.forget(&gone.msg);
        }
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
    /// expiry > 0).
    pub persistent: bool,
    /// Whether its persisted fields (subscriptions, QoS 2 ids) changed since the router last
    /// wrote them.
    pub changed: bool,
}

impl Session {
    pub(crate) fn new(persistent: bool, max_queued: usize, max_inflight: u16) -> Self {
        Self {
            subscriptions: BTreeMap::new(),
            outbound: Outbound::new(max_queued, max_inflight),
            awaiting_rel: BTreeSet::new(),
            persistent,
            changed: false,
        }
    }

    /// Adds or replaces a subscription; returns whether one existed for the filter.
    pub(crate) fn subscribe(&mut self, sub: Subscription) -> bool {
        self.changed = true;
        self.subscriptions.insert(sub.key(), sub).is_some()
    }

    /// Removes a subscription; returns whether it existed.
    pub(crate) fn unsubscribe(&mut self, filter: &str) -> bool {
        let existed = self.subscriptions.remove(filter).is_some();
        self.changed |= existed;
        existed
    }

    /// An inbound QoS 2 message was stored and PUBREC'd: its id awaits PUBREL.
    pub(crate) fn await_rel(&mut self, pkid: u16) {
        self.changed |= self.awaiting_rel.insert(pkid);
    }

    /// PUBREL received for `pkid`.
    pub(crate) fn released(&mut self, pkid: u16) {
        self.changed |= self.awaiting_rel.remove(&pkid);
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
            id: 0,
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
    fn byte_bound_drops_like_the_count_bound_and_frees_on_send() {
        // msg() is topic "t" + one payload byte: 2 bytes each; room for 3.
        let mut o = Outbound::new(100, 1);
        o.set_max_queued_bytes(6);
        assert_eq!(o.enqueue(msg(QoS::AtMostOnce, 0), true), Enqueue::Queued);
        assert_eq!(o.enqueue(msg(QoS::AtLeastOnce, 1), true), Enqueue::Queued);
        assert_eq!(o.enqueue(msg(QoS::AtLeastOnce, 2), true), Enqueue::Queued);
        assert_eq!(
            o.enqueue(msg(QoS::AtMostOnce, 3), true),
            Enqueue::DroppedFull
        );
        assert_eq!(
            o.enqueue(msg(QoS::AtLeastOnce, 4), true),
            Enqueue::QueuedDroppingQos0
        );
        assert_eq!(
            o.enqueue(msg(QoS::AtLeastOnce, 5), true),
            Enqueue::DroppedFull
        );
        // A bigger message than dropping one QoS 0 message makes room for is refused whole.
        let payloads: Vec<u8> = o.queue.iter().map(|m| m.payload[0]).collect();
        assert_eq!(payloads, vec![1, 2, 4]);
        assert_eq!(o.queued_bytes, 6);
        // Sending frees the bytes.
        assert!(o.next_send(Instant::now()).is_some());
        assert_eq!(o.queued_bytes, 4);
        assert_eq!(o.enqueue(msg(QoS::AtLeastOnce, 6), true), Enqueue::Queued);
    }

    #[test]
    fn persisted_messages_report_every_change_in_order() {
        let mut o = Outbound::new(10, 1);
        let mut m = msg(QoS::ExactlyOnce, 1);
        m.id = 41;
        let mut n = msg(QoS::AtLeastOnce, 2);
        n.id = 42;
        o.enqueue(m.clone(), true);
        o.enqueue(n.clone(), true);
        // QoS 0 (never persisted) makes no change.
        o.enqueue(msg(QoS::AtMostOnce, 3), true);
        let Some(Send::Publish { pkid, .. }) = o.next_send(Instant::now()) else {
            panic!("expected a publish");
        };
        assert!(o.on_pubrec(pkid));
        assert!(o.on_pubcomp(pkid));
        let changes = o.take_changes();
        let kinds: Vec<_> = changes
            .iter()
            .map(|c| match c {
                MessageChange::Put { msg, inflight } => (msg.id, *inflight, false),
                MessageChange::Delete(id) => (*id, None, true),
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                (41, None, false),
                (42, None, false),
                (41, Some((pkid, Awaiting::Rec)), false),
                (41, Some((pkid, Awaiting::Comp)), false),
                (41, None, true),
            ]
        );
        assert_eq!(o.persisted_ids(), vec![42]);
        assert!(o.take_changes().is_empty());
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
        o.resume();
        let resend: Vec<Send> = std::iter::from_fn(|| o.next_send(Instant::now())).collect();
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
    fn resumed_messages_are_resent_within_the_new_window() {
        let mut o = Outbound::new(10, 3);
        for n in 0..4 {
            o.enqueue(msg(QoS::AtLeastOnce, n), true);
        }
        let first: Vec<Send> = std::iter::from_fn(|| o.next_send(Instant::now())).collect();
        assert_eq!(first.len(), 3, "window of 3");
        // Reconnected with a receive maximum of 1: one resend at a time, then the queue.
        o.set_max_inflight(1);
        o.resume();
        let pkids = |sends: Vec<Send>| -> Vec<(u16, bool)> {
            sends
                .into_iter()
                .filter_map(|s| match s {
                    Send::Publish { pkid, dup, .. } => Some((pkid, dup)),
                    Send::PubRel(_) => None,
                })
                .collect()
        };
        let again: Vec<Send> = std::iter::from_fn(|| o.next_send(Instant::now())).collect();
        assert_eq!(pkids(again), vec![(1, true)]);
        assert!(o.on_puback(1));
        let again: Vec<Send> = std::iter::from_fn(|| o.next_send(Instant::now())).collect();
        assert_eq!(pkids(again), vec![(2, true)]);
        assert!(o.on_puback(2));
        let again: Vec<Send> = std::iter::from_fn(|| o.next_send(Instant::now())).collect();
        assert_eq!(pkids(again), vec![(3, true)]);
        assert!(o.on_puback(3));
        let rest: Vec<Send> = std::iter::from_fn(|| o.next_send(Instant::now())).collect();
        assert_eq!(
            pkids(rest),
            vec![(4, false)],
            "then the queued message, new"
        );
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
