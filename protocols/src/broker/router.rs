//! The broker-wide state: sessions by client id, which connection owns each, and retained
//! messages. One mutex guards it all; it is held only for in-memory work (never across an
//! `.await`), and routing is a scan over sessions — right for a gateway's tens to hundreds of
//! local clients; a filter trie is the upgrade path if that changes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::QoS;
use super::auth::{Access, Auth};
use super::codec::PublishProps;
use super::session::{Enqueue, Message, Send, Session, Subscription};

/// How the router reaches the connection currently serving a session.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    /// Identifies the connection, so a replaced connection cannot touch its successor's state.
    pub conn_id: u64,
    /// Woken when the session has something new to send.
    pub notify: Arc<Notify>,
    /// Cancelled to take the session over (the old connection closes, publishing its will).
    pub kick: CancellationToken,
}

#[derive(Debug)]
struct Entry {
    session: Session,
    link: Option<Link>,
    /// The verified username of the last connection (ACL checks on delivery, also while the
    /// session is offline); `None` for an anonymous client.
    username: Option<Arc<str>>,
    /// How long the session outlives its connection: `None` until restart (3.1.1 persistent,
    /// MQTT 5 0xFFFFFFFF), `Some(ZERO)` not at all. Set by CONNECT, changed by DISCONNECT.
    session_expiry: Option<Duration>,
    /// While offline: when the session is discarded (`None`: never).
    expires_at: Option<Instant>,
    /// While offline: an MQTT 5 will waiting for its delay, published at the instant given
    /// (never after the session ends) unless the client reconnects first.
    delayed_will: Option<(Instant, Publication)>,
}

/// A message as published, before it is fitted to each subscriber.
#[derive(Debug, Clone)]
pub(crate) struct Publication {
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// MQTT 5 properties passed through to v5 subscribers.
    pub props: Arc<PublishProps>,
    /// From the publisher's message expiry interval, counted from receipt.
    pub expires_at: Option<Instant>,
}

impl Publication {
    /// A message without MQTT 5 properties (3.1.1 publishers, the gateway's own).
    pub(crate) fn plain(topic: Arc<str>, payload: Bytes, qos: QoS, retain: bool) -> Self {
        Self {
            topic,
            payload,
            qos,
            retain,
            props: Arc::default(),
            expires_at: None,
        }
    }
}

/// A retained message (MQTT 3.1.1 §3.3.1.3), with its MQTT 5 properties; it is forgotten once
/// its expiry interval runs out (MQTT 5 §3.3.2.3.3).
#[derive(Debug, Clone)]
struct Retained {
    payload: Bytes,
    qos: QoS,
    props: Arc<PublishProps>,
    expires_at: Option<Instant>,
}

/// Outcome of attaching a connection to a client id.
#[derive(Debug)]
pub(crate) struct Attached {
    /// Whether an existing session was resumed (CONNACK's session-present flag).
    pub session_present: bool,
    /// What to retransmit first (in-flight QoS 1/2 from before).
    pub resend: Vec<Send>,
    /// A delayed will of the previous session, due now because a clean start ended that
    /// session (MQTT 5 §3.1.3.2.2: the will goes when the delay passes or the session ends).
    pub ended_will: Option<Publication>,
}

/// What `Router::expire` found due.
#[derive(Debug, Default)]
pub(crate) struct Expired {
    /// Delayed wills to publish now, with their client ids.
    pub wills: Vec<(Arc<str>, Publication)>,
    /// Offline sessions discarded because their expiry interval passed.
    pub sessions: u64,
}

/// Totals of one routing pass, for the counters.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Routed {
    /// Messages dropped because a subscriber's queue was full.
    pub dropped: u64,
    /// Subscribers whose filter matched but who may not read the topic (not delivered).
    pub denied: u64,
    /// Messages dropped because their expiry interval ran out before delivery.
    pub expired: u64,
}

/// A session whose shared subscription selects a message being routed.
#[derive(Debug)]
struct ShareMember {
    client_id: Arc<str>,
    /// Connected now: connected members are preferred.
    online: bool,
    /// Delivery QoS (the subscription's, capped by the published QoS).
    qos: QoS,
    /// Retain flag as forwarded (retain-as-published).
    retain: bool,
    /// The subscription's identifier.
    sub_id: Option<u32>,
}

/// Queues `msg` for one session (shedding an offline queue's expired messages first) and
/// wakes its connection.
fn deliver(entry: &mut Entry, msg: Message, now: Instant, routed: &mut Routed) {
    if entry.link.is_none() {
        // An offline queue is where messages wait longest: shed the expired ones before
        // counting it full.
        entry.session.outbound.drop_expired(now);
        routed.expired += entry.session.outbound.take_expired();
    }
    match entry.session.outbound.enqueue(msg, entry.link.is_some()) {
        Enqueue::Queued => {}
        Enqueue::QueuedDroppingQos0 | Enqueue::DroppedFull => routed.dropped += 1,
        Enqueue::SkippedOffline => return,
    }
    if let Some(link) = &entry.link {
        link.notify.notify_one();
    }
}

/// Sessions and retained messages.
#[derive(Debug)]
pub(crate) struct Router {
    sessions: HashMap<Arc<str>, Entry>,
    retained: BTreeMap<String, Retained>,
    max_queued: usize,
    max_inflight: u16,
    /// Round-robin position of each shared subscription (`$share/{group}/{filter}`); entries
    /// no session holds any more are pruned by `expire`.
    share_cursor: HashMap<String, usize>,
}

impl Router {
    pub(crate) fn new(max_queued: usize, max_inflight: u16) -> Self {
        Self {
            sessions: HashMap::new(),
            retained: BTreeMap::new(),
            share_cursor: HashMap::new(),
            max_queued,
            max_inflight,
        }
    }

    /// Binds `link` to `client_id`, taking over from any connection that holds it (its `kick`
    /// is cancelled). `clean` discards an old session; `persistent` says whether the session
    /// outlives this connection. `inflight_limit` is this connection's window. `username` is
    /// the verified login (`None`: anonymous), for ACL checks.
    pub(crate) fn attach(
        &mut self,
        client_id: &Arc<str>,
        clean: bool,
        persistent: bool,
        inflight_limit: u16,
        link: Link,
        username: Option<Arc<str>>,
    ) -> Attached {
        let (max_queued, max_inflight) = (self.max_queued, self.max_inflight);
        let fresh = || Entry {
            session: Session::new(persistent, max_queued, max_inflight),
            link: None,
            username: None,
            session_expiry: None,
            expires_at: None,
            delayed_will: None,
        };
        let existed = self.sessions.contains_key(client_id);
        let entry = self.sessions.entry(client_id.clone()).or_insert_with(fresh);
        if let Some(old) = entry.link.take() {
            old.kick.cancel();
        }
        // Reconnecting in time cancels a delayed will; a clean start ends the old session, so
        // its will is due now.
        let pending_will = entry.delayed_will.take().map(|(_, w)| w);
        entry.expires_at = None;
        let mut ended_will = None;
        let session_present = if clean {
            ended_will = pending_will;
            *entry = fresh();
            false
        } else {
            // A resumed session exists only if it was persistent; a non-persistent one whose
            // connection has not yet detached is replaced like a clean one.
            if existed && entry.session.persistent {
                true
            } else {
                *entry = fresh();
                false
            }
        };
        entry.session.persistent = persistent;
        entry.username = username;
        entry
            .session
            .outbound
            .set_max_inflight(inflight_limit.min(max_inflight));
        entry.link = Some(link);
        let resend = entry.session.outbound.resend();
        if let Some(l) = &entry.link {
            l.notify.notify_one();
        }
        Attached {
            session_present,
            resend,
            ended_will,
        }
    }

    /// Sets how long the session of `conn_id` outlives its connection (CONNECT, or an MQTT 5
    /// DISCONNECT that changes it): `None` until restart, `Some(ZERO)` not at all.
    pub(crate) fn set_session_expiry(
        &mut self,
        client_id: &str,
        conn_id: u64,
        expiry: Option<Duration>,
    ) {
        if let Some(entry) = self.sessions.get_mut(client_id)
            && entry.link.as_ref().map(|l| l.conn_id) == Some(conn_id)
        {
            entry.session_expiry = expiry;
            entry.session.persistent = expiry != Some(Duration::ZERO);
        }
    }

    /// The connection `conn_id` ends at `now`. Its session stays (offline) if persistent,
    /// until its expiry interval passes. `will` is the will to publish and its delay; what is
    /// due now is returned: a will without delay, or one whose session ends here. A delayed
    /// will of a persistent session waits in the router (see `expire`); one whose session was
    /// taken over by a new connection is never sent (MQTT 5 §3.1.2.5).
    pub(crate) fn detach(
        &mut self,
        client_id: &str,
        conn_id: u64,
        now: Instant,
        will: Option<(Publication, Duration)>,
    ) -> Option<Publication> {
        let immediate = |will: Option<(Publication, Duration)>| {
            will.and_then(|(w, delay)| delay.is_zero().then_some(w))
        };
        let Some(entry) = self.sessions.get_mut(client_id) else {
            return will.map(|(w, _)| w);
        };
        if entry.link.as_ref().map(|l| l.conn_id) != Some(conn_id) {
            return immediate(will);
        }
        entry.link = None;
        if !entry.session.persistent {
            self.sessions.remove(client_id);
            return will.map(|(w, _)| w);
        }
        entry.expires_at = entry.session_expiry.map(|e| now + e);
        match will {
            Some((w, delay)) if !delay.is_zero() => {
                let at = now + delay;
                let at = entry.expires_at.map_or(at, |end| at.min(end));
                entry.delayed_will = Some((at, w));
                None
            }
            other => immediate(other),
        }
    }

    /// Publishes nothing itself: takes the delayed wills due by `now` and discards offline
    /// sessions whose expiry passed (their pending will is due with them).
    pub(crate) fn expire(&mut self, now: Instant) -> Expired {
        let mut out = Expired::default();
        self.sessions.retain(|id, e| {
            if e.link.is_some() {
                return true;
            }
            let ended = e.expires_at.is_some_and(|t| t <= now);
            if (ended || e.delayed_will.as_ref().is_some_and(|(t, _)| *t <= now))
                && let Some((_, w)) = e.delayed_will.take()
            {
                out.wills.push((id.clone(), w));
            }
            if ended {
                out.sessions += 1;
            }
            !ended
        });
        if !self.share_cursor.is_empty() {
            let sessions = &self.sessions;
            self.share_cursor.retain(|key, _| {
                sessions
                    .values()
                    .any(|e| e.session.subscriptions.contains_key(key))
            });
        }
        out
    }

    /// Runs `f` on the session if `conn_id` still owns it.
    pub(crate) fn with_session<R>(
        &mut self,
        client_id: &str,
        conn_id: u64,
        f: impl FnOnce(&mut Session) -> R,
    ) -> Option<R> {
        let entry = self.sessions.get_mut(client_id)?;
        if entry.link.as_ref().map(|l| l.conn_id) != Some(conn_id) {
            return None;
        }
        Some(f(&mut entry.session))
    }

    /// Delivers a message to every matching session that `auth` lets read it, and updates the
    /// retained store. `origin` is the publishing client (for MQTT 5 no-local), `None` for the
    /// gateway itself.
    pub(crate) fn route(
        &mut self,
        p: &Publication,
        origin: Option<&str>,
        auth: Option<&Auth>,
        now: Instant,
    ) -> Routed {
        let topic = &p.topic;
        if p.retain {
            if p.payload.is_empty() {
                self.retained.remove(topic.as_ref());
            } else {
                self.retained.insert(
                    topic.to_string(),
                    Retained {
                        payload: p.payload.clone(),
                        qos: p.qos,
                        props: p.props.clone(),
                        expires_at: p.expires_at,
                    },
                );
            }
        }
        let mut routed = Routed::default();
        if p.expires_at.is_some_and(|e| e <= now) {
            routed.expired += 1;
            return routed;
        }
        // Shared subscriptions matching the topic, by `$share/{group}/{filter}`: the members
        // that may read it.
        let mut groups: BTreeMap<String, Vec<ShareMember>> = BTreeMap::new();
        for (id, entry) in &mut self.sessions {
            // Checked once per session, and only for a session some filter selects.
            let mut allowed_cache = None;
            let mut allowed = || {
                *allowed_cache.get_or_insert_with(|| {
                    auth.is_none_or(|a| {
                        a.allows(id, entry.username.as_deref(), topic, Access::Read)
                    })
                })
            };
            for sub in entry.session.subscriptions.values() {
                if sub.share.is_some() && sub.filter.matches(topic) {
                    if !allowed() {
                        routed.denied += 1;
                        continue;
                    }
                    groups.entry(sub.key()).or_default().push(ShareMember {
                        client_id: id.clone(),
                        online: entry.link.is_some(),
                        qos: sub.qos.min(p.qos),
                        retain: p.retain && sub.retain_as_published,
                        sub_id: sub.id,
                    });
                }
            }
            let from_self = origin == Some(id.as_ref());
            let Some((q, r)) = entry.session.delivery(topic, p.qos, p.retain, from_self) else {
                continue;
            };
            if !allowed() {
                routed.denied += 1;
                continue;
            }
            let msg = Message {
                topic: topic.clone(),
                payload: p.payload.clone(),
                qos: q,
                retain: r,
                props: p.props.clone(),
                expires_at: p.expires_at,
                subscription_ids: entry.session.subscription_ids(topic, from_self),
            };
            deliver(entry, msg, now, &mut routed);
        }
        for (key, mut members) in groups {
            // Round robin over the group's connected members (all members if none is), in
            // client id order so the rotation is stable.
            if members.iter().any(|m| m.online) {
                members.retain(|m| m.online);
            }
            members.sort_by(|a, b| a.client_id.cmp(&b.client_id));
            let cursor = self.share_cursor.entry(key).or_insert(0);
            let Some(m) = members.get(*cursor % members.len().max(1)) else {
                continue;
            };
            *cursor = cursor.wrapping_add(1);
            if let Some(entry) = self.sessions.get_mut(&m.client_id) {
                let msg = Message {
                    topic: topic.clone(),
                    payload: p.payload.clone(),
                    qos: m.qos,
                    retain: m.retain,
                    props: p.props.clone(),
                    expires_at: p.expires_at,
                    subscription_ids: m.sub_id.into_iter().collect(),
                };
                deliver(entry, msg, now, &mut routed);
            }
        }
        routed
    }

    /// Adds subscriptions for a connected client and queues the retained messages they select
    /// (with the retain flag set) and `auth` lets it read. Returns whether each filter was new,
    /// and the drop and refusal counts.
    pub(crate) fn subscribe(
        &mut self,
        client_id: &str,
        conn_id: u64,
        subs: Vec<(Subscription, u8)>,
        auth: Option<&Auth>,
        now: Instant,
    ) -> (Vec<bool>, Routed) {
        let mut routed = Routed::default();
        let Some(entry) = self.sessions.get_mut(client_id) else {
            return (Vec::new(), routed);
        };
        if entry.link.as_ref().map(|l| l.conn_id) != Some(conn_id) {
            return (Vec::new(), routed);
        }
        self.retained
            .retain(|_, r| r.expires_at.is_none_or(|e| e > now));
        let mut existed = Vec::with_capacity(subs.len());
        for (sub, retain_handling) in subs {
            let filter = sub.filter.clone();
            let granted = sub.qos;
            let sub_id = sub.id;
            // Retained messages are not sent on a shared subscribe (MQTT 5 §4.8.2).
            let shared = sub.share.is_some();
            let was = entry.session.subscribe(sub);
            existed.push(was);
            let send_retained = !shared
                && match retain_handling {
                    0 => true,
                    1 => !was,
                    _ => false,
                };
            if !send_retained {
                continue;
            }
            for (topic, r) in &self.retained {
                if !filter.matches(topic) {
                    continue;
                }
                if let Some(auth) = auth
                    && !auth.allows(client_id, entry.username.as_deref(), topic, Access::Read)
                {
                    routed.denied += 1;
                    continue;
                }
                let msg = Message {
                    topic: Arc::from(topic.as_str()),
                    payload: r.payload.clone(),
                    qos: r.qos.min(granted),
                    retain: true,
                    props: r.props.clone(),
                    expires_at: r.expires_at,
                    subscription_ids: sub_id.into_iter().collect(),
                };
                match entry.session.outbound.enqueue(msg, true) {
                    Enqueue::Queued | Enqueue::SkippedOffline => {}
                    Enqueue::QueuedDroppingQos0 | Enqueue::DroppedFull => routed.dropped += 1,
                }
            }
        }
        if let Some(link) = &entry.link {
            link.notify.notify_one();
        }
        (existed, routed)
    }

    /// Number of sessions held (connected or not).
    #[cfg(test)]
    pub(crate) fn session_count(&self) -> usize {
        self.sessions.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::topic::TopicFilter;

    fn link(id: u64) -> Link {
        Link {
            conn_id: id,
            notify: Arc::new(Notify::new()),
            kick: CancellationToken::new(),
        }
    }

    fn plain(topic: &Arc<str>, payload: &'static [u8], qos: QoS, retain: bool) -> Publication {
        Publication::plain(topic.clone(), Bytes::from_static(payload), qos, retain)
    }

    fn sub(filter: &str, qos: QoS) -> (Subscription, u8) {
        (
            Subscription {
                filter: TopicFilter::new(filter).expect("valid"),
                qos,
                no_local: false,
                retain_as_published: false,
                id: None,
                share: None,
            },
            0,
        )
    }

    #[test]
    fn takeover_kicks_old_connection_and_old_detach_is_ignored() {
        let mut r = Router::new(10, 10);
        let id: Arc<str> = Arc::from("c");
        let old = link(1);
        let kick = old.kick.clone();
        r.attach(&id, false, true, 10, old, None);
        let a = r.attach(&id, false, true, 10, link(2), None);
        assert!(kick.is_cancelled());
        assert!(a.session_present);
        r.detach("c", 1, Instant::now(), None);
        assert!(
            r.with_session("c", 2, |_| ()).is_some(),
            "new owner unaffected"
        );
    }

    #[test]
    fn persistent_session_queues_qos1_while_offline() {
        let mut r = Router::new(10, 10);
        let id: Arc<str> = Arc::from("p");
        r.attach(&id, false, true, 10, link(1), None);
        r.subscribe(
            "p",
            1,
            vec![sub("s/#", QoS::AtLeastOnce)],
            None,
            Instant::now(),
        );
        r.detach("p", 1, Instant::now(), None);
        let topic: Arc<str> = Arc::from("s/1");
        let now = Instant::now();
        r.route(
            &plain(&topic, b"q1", QoS::AtLeastOnce, false),
            None,
            None,
            now,
        );
        r.route(
            &plain(&topic, b"q0", QoS::AtMostOnce, false),
            None,
            None,
            now,
        );
        let a = r.attach(&id, false, true, 10, link(2), None);
        assert!(a.session_present);
        let sent = r
            .with_session("p", 2, |s| s.outbound.next_send(Instant::now()))
            .flatten();
        match sent {
            Some(Send::Publish { msg, .. }) => assert_eq!(&msg.payload[..], b"q1"),
            other => panic!("expected the queued QoS 1 message, got {other:?}"),
        }
        assert_eq!(
            r.with_session("p", 2, |s| s.outbound.next_send(Instant::now()))
                .flatten(),
            None
        );
    }

    #[test]
    fn clean_session_is_dropped_on_detach() {
        let mut r = Router::new(10, 10);
        let id: Arc<str> = Arc::from("c");
        r.attach(&id, true, false, 10, link(1), None);
        r.detach("c", 1, Instant::now(), None);
        assert_eq!(r.session_count(), 0);
        let a = r.attach(&id, false, true, 10, link(2), None);
        assert!(!a.session_present);
    }

    #[test]
    fn retained_set_cleared_and_sent_on_subscribe() {
        let mut r = Router::new(10, 10);
        let t: Arc<str> = Arc::from("r/1");
        r.route(
            &plain(&t, b"v", QoS::AtLeastOnce, true),
            None,
            None,
            Instant::now(),
        );
        let id: Arc<str> = Arc::from("s");
        r.attach(&id, true, false, 10, link(1), None);
        r.subscribe(
            "s",
            1,
            vec![sub("r/+", QoS::ExactlyOnce)],
            None,
            Instant::now(),
        );
        match r
            .with_session("s", 1, |s| s.outbound.next_send(Instant::now()))
            .flatten()
        {
            Some(Send::Publish { msg, .. }) => {
                assert!(msg.retain);
                assert_eq!(msg.qos, QoS::AtLeastOnce);
            }
            other => panic!("expected retained, got {other:?}"),
        }
        r.route(
            &plain(&t, b"", QoS::AtMostOnce, true),
            None,
            None,
            Instant::now(),
        );
        let id2: Arc<str> = Arc::from("s2");
        r.attach(&id2, true, false, 10, link(2), None);
        r.subscribe(
            "s2",
            2,
            vec![sub("r/+", QoS::ExactlyOnce)],
            None,
            Instant::now(),
        );
        assert_eq!(
            r.with_session("s2", 2, |s| s.outbound.next_send(Instant::now()))
                .flatten(),
            None
        );
    }

    fn will(topic: &str) -> Publication {
        Publication::plain(
            Arc::from(topic),
            Bytes::from_static(b"w"),
            QoS::AtMostOnce,
            false,
        )
    }

    #[test]
    fn offline_session_is_discarded_when_its_expiry_passes() {
        let mut r = Router::new(10, 10);
        let id: Arc<str> = Arc::from("e");
        let t0 = Instant::now();
        r.attach(&id, true, true, 10, link(1), None);
        r.set_session_expiry("e", 1, Some(Duration::from_secs(10)));
        r.detach("e", 1, t0, None);
        assert_eq!(r.expire(t0 + Duration::from_secs(9)).sessions, 0);
        assert_eq!(r.session_count(), 1);
        assert_eq!(r.expire(t0 + Duration::from_secs(10)).sessions, 1);
        assert_eq!(r.session_count(), 0);
    }

    #[test]
    fn delayed_will_waits_and_reconnect_cancels_it() {
        let mut r = Router::new(10, 10);
        let id: Arc<str> = Arc::from("w");
        let t0 = Instant::now();
        r.attach(&id, true, true, 10, link(1), None);
        r.set_session_expiry("w", 1, Some(Duration::from_secs(60)));
        let now = r.detach("w", 1, t0, Some((will("a"), Duration::from_secs(5))));
        assert!(now.is_none(), "delayed");
        assert!(r.expire(t0 + Duration::from_secs(4)).wills.is_empty());
        let a = r.attach(&id, false, true, 10, link(2), None);
        assert!(a.session_present && a.ended_will.is_none());
        assert!(
            r.expire(t0 + Duration::from_secs(6)).wills.is_empty(),
            "cancelled"
        );
    }

    #[test]
    fn delayed_will_is_published_no_later_than_the_session_ends() {
        let mut r = Router::new(10, 10);
        let id: Arc<str> = Arc::from("w");
        let t0 = Instant::now();
        r.attach(&id, true, true, 10, link(1), None);
        r.set_session_expiry("w", 1, Some(Duration::from_secs(2)));
        r.detach("w", 1, t0, Some((will("a"), Duration::from_secs(100))));
        let due = r.expire(t0 + Duration::from_secs(2));
        assert_eq!((due.wills.len(), due.sessions), (1, 1));
    }

    #[test]
    fn takeover_cancels_a_delayed_will_and_clean_start_releases_it() {
        let mut r = Router::new(10, 10);
        let id: Arc<str> = Arc::from("w");
        let t0 = Instant::now();
        r.attach(&id, true, true, 10, link(1), None);
        r.set_session_expiry("w", 1, None);
        r.attach(&id, false, true, 10, link(2), None);
        assert!(
            r.detach("w", 1, t0, Some((will("a"), Duration::from_secs(5))))
                .is_none()
        );
        r.detach("w", 2, t0, Some((will("b"), Duration::from_secs(5))));
        let a = r.attach(&id, true, true, 10, link(3), None);
        assert_eq!(a.ended_will.map(|w| w.topic.to_string()), Some("b".into()));
    }

    fn shared(filter: &str) -> (Subscription, u8) {
        let (mut s, rh) = sub(filter, QoS::AtLeastOnce);
        s.share = Some(Arc::from("g"));
        (s, rh)
    }

    fn queued(r: &mut Router, id: &str, conn: u64) -> usize {
        let mut n = 0;
        while r
            .with_session(id, conn, |s| s.outbound.next_send(Instant::now()))
            .flatten()
            .is_some()
        {
            n += 1;
        }
        n
    }

    #[test]
    fn shared_group_rotates_over_connected_members_and_skips_offline_ones() {
        let mut r = Router::new(10, 10);
        for (n, id) in ["a", "b", "c"].iter().enumerate() {
            let conn = u64::try_from(n).expect("small") + 1;
            r.attach(&Arc::from(*id), true, true, 10, link(conn), None);
            r.set_session_expiry(id, conn, None);
            r.subscribe(id, conn, vec![shared("s/#")], None, Instant::now());
        }
        r.detach("c", 3, Instant::now(), None);
        let t: Arc<str> = Arc::from("s/1");
        for _ in 0..4 {
            r.route(
                &plain(&t, b"m", QoS::AtLeastOnce, false),
                None,
                None,
                Instant::now(),
            );
        }
        assert_eq!((queued(&mut r, "a", 1), queued(&mut r, "b", 2)), (2, 2));
        // With nobody connected, one offline member's session queues it.
        r.detach("a", 1, Instant::now(), None);
        r.detach("b", 2, Instant::now(), None);
        r.route(
            &plain(&t, b"m", QoS::AtLeastOnce, false),
            None,
            None,
            Instant::now(),
        );
        let mut total = 0;
        for (n, id) in ["a", "b", "c"].iter().enumerate() {
            let conn = u64::try_from(n).expect("small") + 10;
            r.attach(&Arc::from(*id), false, true, 10, link(conn), None);
            total += queued(&mut r, id, conn);
        }
        assert_eq!(total, 1, "exactly one member got it");
    }
}
