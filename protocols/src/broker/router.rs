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
use super::persist::{
    self, Clock, Key, RestoreReport, SessionState, StateBatch, StateChange, StateSink, Ticket,
};
use super::retained::{self, Put, Retained, RetainedStore};
use super::session::{Enqueue, Message, MessageChange, Session, Subscription};

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

#[derive(Debug, Clone)]
struct Entry {
    session: Session,
    link: Option<Link>,
    /// The verified username of the last connection (ACL checks on delivery, also while the
    /// session is offline); `None` for an anonymous client.
    username: Option<Arc<str>>,
    /// How long the session outlives its connection: `Some(ZERO)` not at all; `None` without
    /// end (the connections always give one: 3.1.1 `session_expiry_311`, MQTT 5 capped at
    /// `max_session_expiry`). Set by CONNECT, changed by DISCONNECT.
    session_expiry: Option<Duration>,
    /// While offline: when the session is discarded (`None`: never).
    expires_at: Option<Instant>,
    /// While offline: an MQTT 5 will waiting for its delay, published at the instant given
    /// (never after the session ends) unless the client reconnects first.
    delayed_will: Option<(Instant, Publication)>,
    /// Whether the session's key is in the persisted state.
    persisted: bool,
}

impl Entry {
    fn new(session: Session) -> Entry {
        Entry {
            session,
            link: None,
            username: None,
            session_expiry: None,
            expires_at: None,
            delayed_will: None,
            persisted: false,
        }
    }

    fn state(&self) -> SessionState {
        SessionState {
            subscriptions: self.session.subscriptions.values().cloned().collect(),
            username: self.username.clone(),
            expiry: self.session_expiry,
            ends_at: self.expires_at,
            awaiting_rel: self.session.awaiting_rel.iter().copied().collect(),
            will: self.delayed_will.clone(),
            online: self.link.is_some(),
        }
    }
}

/// Writes what changed in one session since the last call into `out`: its messages' changes,
/// and its own key when `meta` says it changed (or it was never written). A session that no
/// longer outlives its connection is removed from the persisted state instead.
fn persist_entry(
    out: &mut Vec<StateChange>,
    clock: Clock,
    id: &str,
    entry: &mut Entry,
    meta: bool,
) {
    let changes = entry.session.outbound.take_changes();
    if !entry.session.persistent {
        entry.session.changed = false;
        if entry.persisted {
            for c in changes {
                if let MessageChange::Delete(m) = c {
                    out.push(StateChange::Delete {
                        key: persist::message_key(id, m),
                    });
                }
            }
            forget_entry(out, id, entry);
        }
        return;
    }
    for c in changes {
        out.push(match c {
            MessageChange::Put { msg, inflight } => StateChange::Put {
                key: persist::message_key(id, msg.id),
                value: persist::encode_message(&msg, inflight, clock),
            },
            MessageChange::Delete(m) => StateChange::Delete {
                key: persist::message_key(id, m),
            },
        });
    }
    if meta || entry.session.changed || !entry.persisted {
        out.push(StateChange::Put {
            key: persist::session_key(id),
            value: persist::encode_session(&entry.state(), clock),
        });
        entry.persisted = true;
    }
    entry.session.changed = false;
}

/// Removes a session and everything it holds from the persisted state (its in-memory
/// changes are dropped: nothing of it is to be kept).
fn forget_entry(out: &mut Vec<StateChange>, id: &str, entry: &mut Entry) {
    let changes = entry.session.outbound.take_changes();
    if !entry.persisted {
        return;
    }
    for c in changes {
        if let MessageChange::Delete(m) = c {
            out.push(StateChange::Delete {
                key: persist::message_key(id, m),
            });
        }
    }
    for m in entry.session.outbound.persisted_ids() {
        out.push(StateChange::Delete {
            key: persist::message_key(id, m),
        });
    }
    out.push(StateChange::Delete {
        key: persist::session_key(id),
    });
    entry.persisted = false;
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

    /// What the message costs against the retained store's byte bound.
    pub(crate) fn retained_size(&self) -> usize {
        retained::size(&self.topic, &self.payload, &self.props)
    }
}

/// Outcome of attaching a connection to a client id.
#[derive(Debug)]
pub(crate) struct Attached {
    /// Whether an existing session was resumed (CONNACK's session-present flag).
    pub session_present: bool,
    /// Whether the old session had expired (offline past its expiry interval) and was
    /// discarded here rather than by the periodic sweep.
    pub session_expired: bool,
    /// Resolves once the session's persisted state is durable (a persistent session with
    /// persistence on), so that CONNACK's session-present flag holds across a crash.
    pub persisted: Option<Ticket>,
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
    /// Retained messages not kept because the retained store is at a bound (the message was
    /// still delivered).
    pub retained_refused: u64,
}

/// Bounds on the sessions that outlive their connections.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SessionLimits {
    /// Persistent sessions kept at most (connected or not); a new one beyond is refused.
    pub max_sessions: usize,
    /// The expiry given, at restore, to a session persisted without one (by a version that
    /// kept 3.1.1 sessions until restart): the 3.1.1 session expiry. `None`: kept so.
    pub default_expiry: Option<Duration>,
    /// The longest expiry a restored session keeps (the longer of the 3.1.1 expiry and the
    /// MQTT 5 maximum: a persisted session does not say its protocol); deadlines further
    /// away are brought in. `None`: no maximum.
    pub max_expiry: Option<Duration>,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            max_sessions: usize::MAX,
            default_expiry: None,
            max_expiry: None,
        }
    }
}

impl SessionLimits {
    /// The expiry a restored session gets for the one it was persisted with.
    fn restored(&self, persisted: Option<Duration>) -> Option<Duration> {
        let e = persisted.or(self.default_expiry)?;
        Some(self.max_expiry.map_or(e, |max| e.min(max)))
    }
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
    retained: RetainedStore,
    limits: SessionLimits,
    max_queued: usize,
    max_inflight: u16,
    /// Round-robin position of each shared subscription (`$share/{group}/{filter}`); entries
    /// no session holds any more are pruned by `expire`.
    share_cursor: HashMap<String, usize>,
    /// Bound of each session's queued bytes.
    max_queued_bytes: usize,
    /// Where persistent sessions and retained messages are written; `None`: memory only.
    sink: Option<StateSink>,
    /// Changes of the operation in progress, sent (in order) by `flush`.
    pending: Vec<StateChange>,
    /// Last `Message::id` given to a persisted message.
    last_message_id: u64,
}

impl Router {
    pub(crate) fn new(max_queued: usize, max_inflight: u16) -> Self {
        Self {
            sessions: HashMap::new(),
            retained: RetainedStore::new(),
            limits: SessionLimits::default(),
            share_cursor: HashMap::new(),
            max_queued,
            max_inflight,
            max_queued_bytes: usize::MAX,
            sink: None,
            pending: Vec::new(),
            last_message_id: 0,
        }
    }

    /// Bounds the bytes (topic + payload) each session may hold queued.
    pub(crate) fn set_max_queued_bytes(&mut self, bytes: usize) {
        self.max_queued_bytes = bytes.max(1);
        for e in self.sessions.values_mut() {
            e.session
                .outbound
                .set_max_queued_bytes(self.max_queued_bytes);
        }
    }

    /// Bounds the retained store: messages, and bytes (topic + payload + properties).
    pub(crate) fn set_retained_limits(&mut self, max_count: usize, max_bytes: usize) {
        self.retained.set_limits(max_count, max_bytes);
    }

    /// Bounds the persistent sessions (see [`SessionLimits`]); call before `restore`.
    pub(crate) fn set_session_limits(&mut self, limits: SessionLimits) {
        self.limits = limits;
    }

    /// Retained messages held, and their bytes.
    pub(crate) fn retained_usage(&self) -> (usize, usize) {
        (self.retained.len(), self.retained.bytes())
    }

    /// Whether a retained message of `size` bytes on `topic` would be kept now, after
    /// sweeping expired retained messages if it would not (returns how many went). Used to
    /// refuse an MQTT 5 publish before it is stored; routing decides again (another
    /// publisher may take the last place in between: then it is delivered, not retained).
    pub(crate) fn retained_fits(&mut self, topic: &str, size: usize, now: Instant) -> (bool, u64) {
        if self.retained.fits(topic, size) {
            return (true, 0);
        }
        let persisting = self.sink.is_some();
        let pending = &mut self.pending;
        let expired = self.retained.remove_expired(now, &mut |t: &str| {
            if persisting {
                pending.push(StateChange::Delete {
                    key: persist::retained_key(t),
                });
            }
        });
        self.flush(false);
        (self.retained.fits(topic, size), expired)
    }

    /// Sessions that outlive their connections, connected or not, and not yet expired.
    pub(crate) fn persistent_sessions(&self, now: Instant) -> usize {
        self.sessions
            .values()
            .filter(|e| e.session.persistent && !Self::lapsed(e, now))
            .count()
    }

    /// An offline session whose expiry interval has passed (over, even if the periodic sweep
    /// has not got to it yet).
    fn lapsed(e: &Entry, now: Instant) -> bool {
        e.link.is_none() && e.expires_at.is_some_and(|t| t <= now)
    }

    /// Whether `client_id` may attach with `expiry` (see `attach`) under `max_sessions`: a
    /// session that ends with its connection always may, and so may a client id that holds a
    /// persistent session already (resuming it, or starting it again clean); a new persistent
    /// session only while fewer than `max_sessions` are kept.
    pub(crate) fn session_admitted(
        &self,
        client_id: &str,
        expiry: Option<Duration>,
        now: Instant,
    ) -> bool {
        if expiry == Some(Duration::ZERO) {
            return true;
        }
        if self
            .sessions
            .get(client_id)
            .is_some_and(|e| e.session.persistent)
        {
            return true;
        }
        self.persistent_sessions(now) < self.limits.max_sessions
    }

    fn new_session(&self, persistent: bool) -> Session {
        let mut s = Session::new(persistent, self.max_queued, self.max_inflight);
        s.outbound.set_max_queued_bytes(self.max_queued_bytes);
        s
    }

    /// Sends the changes of the operation just done to the sink, in one batch. With `ticket`,
    /// returns what resolves once they are durable (`None`: nothing to wait for).
    pub(crate) fn flush(&mut self, ticket: bool) -> Option<Ticket> {
        if self.pending.is_empty() {
            return None;
        }
        let changes = std::mem::take(&mut self.pending);
        let sink = self.sink.as_ref()?;
        let (committed, rx) = if ticket {
            let (tx, rx) = tokio::sync::oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        if sink.send(StateBatch { changes, committed }).is_err() {
            tracing::error!("MQTT session state not persisted: the state writer is gone");
        }
        rx
    }

    /// Puts back the sessions and retained messages persisted before a restart, and writes
    /// every later change to `sink`. Sessions come back offline; one whose client was
    /// connected at the crash is treated as disconnected now (its expiry counts from here).
    pub(crate) fn restore(
        &mut self,
        sink: StateSink,
        entries: Vec<(String, Vec<u8>)>,
        now: Instant,
    ) -> RestoreReport {
        let clock = Clock::at(now);
        let mut report = RestoreReport::default();
        let bad = |key: &str, why: String, report: &mut RestoreReport| {
            tracing::warn!(%key, %why, "persisted MQTT state unreadable, discarded");
            report.invalid.push((key.to_owned(), why));
        };
        // Sessions first (their keys sort before messages' and retained ones', but do not
        // rely on it), then messages in key order: one client's in id order.
        let mut messages = Vec::new();
        for (key, value) in entries {
            match persist::parse_key(&key) {
                Ok(Key::Session(client)) => match persist::decode_session(&value, clock) {
                    Ok(state) => {
                        let mut entry = Entry::new(self.new_session(true));
                        for sub in state.subscriptions {
                            entry.session.subscribe(sub);
                        }
                        entry.session.awaiting_rel = state.awaiting_rel.into_iter().collect();
                        entry.username = state.username;
                        let expiry = self.limits.restored(state.expiry);
                        let latest = expiry.and_then(|e| now.checked_add(e));
                        entry.session_expiry = expiry;
                        entry.expires_at = if state.online {
                            latest
                        } else {
                            // No later than the expiry in force now allows.
                            match (state.ends_at, latest) {
                                (Some(end), Some(latest)) => Some(end.min(latest)),
                                (end, latest) => end.or(latest),
                            }
                        };
                        entry.delayed_will = state.will;
                        entry.persisted = true;
                        // Rewritten below: it is offline now, with the deadline it has now.
                        entry.session.changed = true;
                        self.sessions.insert(Arc::from(client), entry);
                        report.sessions += 1;
                    }
                    Err(why) => bad(&key, why, &mut report),
                },
                Ok(Key::Message(client, id)) => messages.push((key, client, id, value)),
                Ok(Key::Retained(topic)) => match persist::decode_retained(&value, clock) {
                    Ok(p) if p.expires_at.is_some_and(|e| e <= now) => {
                        self.pending.push(StateChange::Delete { key });
                    }
                    Ok(p) => {
                        self.retained.insert(
                            &topic,
                            Retained {
                                payload: p.payload,
                                qos: p.qos,
                                props: p.props,
                                expires_at: p.expires_at,
                            },
                        );
                        report.retained += 1;
                    }
                    Err(why) => bad(&key, why, &mut report),
                },
                Err(why) => bad(&key, why, &mut report),
            }
        }
        messages.sort_by(|a, b| (&a.1, a.2).cmp(&(&b.1, b.2)));
        for (key, client, id, value) in messages {
            self.last_message_id = self.last_message_id.max(id);
            let Some(entry) = self.sessions.get_mut(client.as_str()) else {
                bad(
                    &key,
                    "message of a session that is not there".into(),
                    &mut report,
                );
                continue;
            };
            match persist::decode_message(&value, id, clock) {
                Ok(m) => {
                    entry.session.outbound.restore(m.msg, m.inflight);
                    report.messages += 1;
                }
                Err(why) => bad(&key, why, &mut report),
            }
        }
        for (key, _) in &report.invalid {
            self.pending.push(StateChange::Delete { key: key.clone() });
        }
        // Kept over lower bounds (nothing is deleted for them): new ones wait below them.
        if self.retained.over_limits() {
            tracing::warn!(
                retained = self.retained.len(),
                bytes = self.retained.bytes(),
                "more retained messages restored than broker.max_retained / \
                 max_retained_bytes allow: new retained topics are refused until they are cleared"
            );
        }
        let persistent = self.persistent_sessions(now);
        if persistent > self.limits.max_sessions {
            tracing::warn!(
                sessions = persistent,
                max = self.limits.max_sessions,
                "more persistent MQTT sessions restored than broker.max_sessions: new ones are \
                 refused until some expire or end"
            );
        }
        self.sink = Some(sink);
        for (id, entry) in &mut self.sessions {
            persist_entry(&mut self.pending, clock, id, entry, true);
        }
        self.flush(false);
        report
    }

    /// A new `Message::id` for a message to a persistent session, 0 when it is not persisted.
    fn message_id(persisting: bool, last: &mut u64, session: &Session, qos: QoS) -> u64 {
        if persisting && session.persistent && qos != QoS::AtMostOnce {
            *last += 1;
            *last
        } else {
            0
        }
    }

    /// Binds `link` to `client_id`, taking over from any connection that holds it (its `kick`
    /// is cancelled). `clean` discards an old session; `expiry` is how long the session
    /// outlives this connection (`None` without end, `Some(ZERO)` not at all); the caller
    /// checks `session_admitted` first, under the same lock. `inflight_limit` is this connection's window. `username` is
    /// the verified login (`None`: anonymous), for ACL checks.
    pub(crate) fn attach(
        &mut self,
        client_id: &Arc<str>,
        clean: bool,
        expiry: Option<Duration>,
        inflight_limit: u16,
        link: Link,
        username: Option<Arc<str>>,
    ) -> Attached {
        let persistent = expiry != Some(Duration::ZERO);
        let max_inflight = self.max_inflight;
        let clock = Clock::at(Instant::now());
        let fresh = Entry::new(self.new_session(persistent));
        let now = Instant::now();
        let existed = self.sessions.contains_key(client_id);
        let entry = self
            .sessions
            .entry(client_id.clone())
            .or_insert_with(|| fresh.clone());
        // An offline session whose expiry interval has passed is over, even if the periodic
        // sweep (`expire`) has not got to it yet.
        let lapsed = existed && Self::lapsed(entry, now);
        if let Some(old) = entry.link.take() {
            old.kick.cancel();
        }
        entry.expires_at = None;
        // A resumed session exists only if it was persistent (and had not lapsed); a
        // non-persistent one whose connection has not yet detached is replaced like a clean one.
        let session_present = !clean && !lapsed && existed && entry.session.persistent;
        // Reconnecting in time cancels a delayed will; one whose delay has passed, or whose
        // session ends here (clean start, lapsed), is due now.
        let ended_will = entry
            .delayed_will
            .take()
            .and_then(|(due, w)| (due <= now || !session_present).then_some(w));
        if !session_present {
            forget_entry(&mut self.pending, client_id, entry);
            *entry = fresh;
        }
        entry.session.persistent = persistent;
        entry.session_expiry = expiry;
        entry.username = username;
        entry
            .session
            .outbound
            .set_max_inflight(inflight_limit.min(max_inflight));
        entry.link = Some(link);
        entry.session.outbound.resume();
        if let Some(l) = &entry.link {
            l.notify.notify_one();
        }
        if self.sink.is_some() {
            persist_entry(&mut self.pending, clock, client_id, entry, true);
        }
        let persisted = self.flush(true);
        Attached {
            session_present,
            session_expired: lapsed,
            ended_will,
            persisted,
        }
    }

    /// Sets how long the session of `conn_id` outlives its connection (CONNECT, or an MQTT 5
    /// DISCONNECT that changes it): `None` without end, `Some(ZERO)` not at all.
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
            if self.sink.is_some() {
                let clock = Clock::at(Instant::now());
                persist_entry(&mut self.pending, clock, client_id, entry, true);
            }
        }
        self.flush(false);
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
            forget_entry(&mut self.pending, client_id, entry);
            self.sessions.remove(client_id);
            self.flush(false);
            return will.map(|(w, _)| w);
        }
        entry.expires_at = entry.session_expiry.and_then(|e| now.checked_add(e));
        let due = match will {
            Some((w, delay)) if !delay.is_zero() => {
                let at = now + delay;
                let at = entry.expires_at.map_or(at, |end| at.min(end));
                entry.delayed_will = Some((at, w));
                None
            }
            other => immediate(other),
        };
        if self.sink.is_some() {
            persist_entry(&mut self.pending, Clock::at(now), client_id, entry, true);
        }
        self.flush(false);
        due
    }

    /// Publishes nothing itself: takes the delayed wills due by `now` and discards offline
    /// sessions whose expiry passed (their pending will is due with them).
    pub(crate) fn expire(&mut self, now: Instant) -> Expired {
        let mut out = Expired::default();
        let persisting = self.sink.is_some();
        let pending = &mut self.pending;
        self.sessions.retain(|id, e| {
            if e.link.is_some() {
                return true;
            }
            let ended = e.expires_at.is_some_and(|t| t <= now);
            let will_due = ended || e.delayed_will.as_ref().is_some_and(|(t, _)| *t <= now);
            if will_due && let Some((_, w)) = e.delayed_will.take() {
                out.wills.push((id.clone(), w));
                if persisting && !ended {
                    persist_entry(pending, Clock::at(now), id, e, true);
                }
            }
            if ended {
                out.sessions += 1;
                forget_entry(pending, id, e);
            }
            !ended
        });
        self.flush(false);
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
        // Nothing waits for what `f` changed: its batch goes without a ticket.
        self.run_on_session(client_id, conn_id, false, f)
            .map(|(r, _)| r)
    }

    /// Like `with_session`, and returns what resolves once the session's changes are durable
    /// (`None` when there is nothing to wait for): an inbound QoS 2 id awaiting PUBREL, the
    /// packet id of a message about to be sent.
    pub(crate) fn with_session_durable<R>(
        &mut self,
        client_id: &str,
        conn_id: u64,
        f: impl FnOnce(&mut Session) -> R,
    ) -> Option<(R, Option<Ticket>)> {
        self.run_on_session(client_id, conn_id, true, f)
    }

    fn run_on_session<R>(
        &mut self,
        client_id: &str,
        conn_id: u64,
        ticket: bool,
        f: impl FnOnce(&mut Session) -> R,
    ) -> Option<(R, Option<Ticket>)> {
        let entry = self.sessions.get_mut(client_id)?;
        if entry.link.as_ref().map(|l| l.conn_id) != Some(conn_id) {
            return None;
        }
        let r = f(&mut entry.session);
        if self.sink.is_some() {
            let clock = Clock::at(Instant::now());
            persist_entry(&mut self.pending, clock, client_id, entry, false);
        }
        Some((r, self.flush(ticket)))
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
    ) -> (Routed, Option<Ticket>) {
        let routed = self.route_inner(p, origin, auth, now);
        (routed, self.flush(true))
    }

    fn route_inner(
        &mut self,
        p: &Publication,
        origin: Option<&str>,
        auth: Option<&Auth>,
        now: Instant,
    ) -> Routed {
        let topic = &p.topic;
        let persisting = self.sink.is_some();
        let clock = Clock::at(now);
        let mut routed = Routed::default();
        if p.retain {
            let pending = &mut self.pending;
            let mut delete = |topic: &str| {
                if persisting {
                    pending.push(StateChange::Delete {
                        key: persist::retained_key(topic),
                    });
                }
            };
            if p.payload.is_empty() {
                if self.retained.remove(topic) {
                    delete(topic);
                }
            } else {
                let r = Retained {
                    payload: p.payload.clone(),
                    qos: p.qos,
                    props: p.props.clone(),
                    expires_at: p.expires_at,
                };
                let mut expired = 0;
                let put = self.retained.put(topic, r, now, &mut |t: &str| {
                    expired += 1;
                    delete(t);
                });
                routed.expired += expired;
                match put {
                    Put::Stored => {
                        if persisting {
                            self.pending.push(StateChange::Put {
                                key: persist::retained_key(topic),
                                value: persist::encode_retained(p, clock),
                            });
                        }
                    }
                    Put::Refused { cleared } => {
                        routed.retained_refused += 1;
                        if cleared && persisting {
                            self.pending.push(StateChange::Delete {
                                key: persist::retained_key(topic),
                            });
                        }
                    }
                }
            }
        }
        if p.expires_at.is_some_and(|e| e <= now) {
            routed.expired += 1;
            return routed;
        }
        let mut last_id = self.last_message_id;
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
                id: Self::message_id(persisting, &mut last_id, &entry.session, q),
            };
            deliver(entry, msg, now, &mut routed);
            if persisting {
                persist_entry(&mut self.pending, clock, id, entry, false);
            }
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
                    id: Self::message_id(persisting, &mut last_id, &entry.session, m.qos),
                };
                deliver(entry, msg, now, &mut routed);
                if persisting {
                    persist_entry(&mut self.pending, clock, &m.client_id, entry, false);
                }
            }
        }
        self.last_message_id = last_id;
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
    ) -> (Vec<bool>, Routed, Option<Ticket>) {
        let mut routed = Routed::default();
        let persisting = self.sink.is_some();
        let clock = Clock::at(now);
        let Some(entry) = self.sessions.get_mut(client_id) else {
            return (Vec::new(), routed, None);
        };
        if entry.link.as_ref().map(|l| l.conn_id) != Some(conn_id) {
            return (Vec::new(), routed, None);
        }
        let pending = &mut self.pending;
        routed.expired += self.retained.remove_expired(now, &mut |topic: &str| {
            if persisting {
                pending.push(StateChange::Delete {
                    key: persist::retained_key(topic),
                });
            }
        });
        let mut last_id = self.last_message_id;
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
            for (topic, r) in self.retained.iter() {
                if !filter.matches(topic) {
                    continue;
                }
                if let Some(auth) = auth
                    && !auth.allows(client_id, entry.username.as_deref(), topic, Access::Read)
                {
                    routed.denied += 1;
                    continue;
                }
                let qos = r.qos.min(granted);
                let msg = Message {
                    topic: Arc::from(topic.as_str()),
                    payload: r.payload.clone(),
                    qos,
                    retain: true,
                    props: r.props.clone(),
                    expires_at: r.expires_at,
                    subscription_ids: sub_id.into_iter().collect(),
                    id: Self::message_id(persisting, &mut last_id, &entry.session, qos),
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
        self.last_message_id = last_id;
        if persisting {
            persist_entry(&mut self.pending, clock, client_id, entry, false);
        }
        let ticket = self.flush(true);
        (existed, routed, ticket)
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
    use crate::broker::session::Send;
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
        r.attach(&id, false, None, 10, old, None);
        let a = r.attach(&id, false, None, 10, link(2), None);
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
        r.attach(&id, false, None, 10, link(1), None);
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
        let a = r.attach(&id, false, None, 10, link(2), None);
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
        r.attach(&id, true, Some(Duration::ZERO), 10, link(1), None);
        r.detach("c", 1, Instant::now(), None);
        assert_eq!(r.session_count(), 0);
        let a = r.attach(&id, false, None, 10, link(2), None);
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
        r.attach(&id, true, Some(Duration::ZERO), 10, link(1), None);
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
        r.attach(&id2, true, Some(Duration::ZERO), 10, link(2), None);
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
        r.attach(&id, true, None, 10, link(1), None);
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
        r.attach(&id, true, None, 10, link(1), None);
        r.set_session_expiry("w", 1, Some(Duration::from_secs(60)));
        let now = r.detach("w", 1, t0, Some((will("a"), Duration::from_secs(5))));
        assert!(now.is_none(), "delayed");
        assert!(r.expire(t0 + Duration::from_secs(4)).wills.is_empty());
        let a = r.attach(&id, false, None, 10, link(2), None);
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
        r.attach(&id, true, None, 10, link(1), None);
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
        r.attach(&id, true, None, 10, link(1), None);
        r.set_session_expiry("w", 1, None);
        r.attach(&id, false, None, 10, link(2), None);
        assert!(
            r.detach("w", 1, t0, Some((will("a"), Duration::from_secs(5))))
                .is_none()
        );
        r.detach("w", 2, t0, Some((will("b"), Duration::from_secs(5))));
        let a = r.attach(&id, true, None, 10, link(3), None);
        assert_eq!(a.ended_will.map(|w| w.topic.to_string()), Some("b".into()));
    }

    fn shared(filter: &str) -> (Subscription, u8) {
        let (mut s, rh) = sub(filter, QoS::AtLeastOnce);
        s.share = Some(Arc::from("g"));
        (s, rh)
    }

    /// New messages sent now (resends of what was in flight before are not counted).
    fn queued(r: &mut Router, id: &str, conn: u64) -> usize {
        let mut n = 0;
        while let Some(s) = r
            .with_session(id, conn, |s| s.outbound.next_send(Instant::now()))
            .flatten()
        {
            n += usize::from(matches!(s, Send::Publish { dup: false, .. }));
        }
        n
    }

    #[test]
    fn shared_group_rotates_over_connected_members_and_skips_offline_ones() {
        let mut r = Router::new(10, 10);
        for (n, id) in ["a", "b", "c"].iter().enumerate() {
            let conn = u64::try_from(n).expect("small") + 1;
            r.attach(&Arc::from(*id), true, None, 10, link(conn), None);
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
            r.attach(&Arc::from(*id), false, None, 10, link(conn), None);
            total += queued(&mut r, id, conn);
        }
        assert_eq!(total, 1, "exactly one member got it");
    }

    /// The persisted state as the gateway's store would hold it.
    struct Disk {
        rx: tokio::sync::mpsc::UnboundedReceiver<StateBatch>,
        map: BTreeMap<String, Vec<u8>>,
    }

    impl Disk {
        fn new() -> (StateSink, Disk) {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            (
                tx,
                Disk {
                    rx,
                    map: BTreeMap::new(),
                },
            )
        }

        /// Applies every batch sent so far, in order, and answers their tickets.
        fn apply(&mut self) -> &BTreeMap<String, Vec<u8>> {
            while let Ok(batch) = self.rx.try_recv() {
                for c in batch.changes {
                    match c {
                        StateChange::Put { key, value } => {
                            self.map.insert(key, value);
                        }
                        StateChange::Delete { key } => {
                            self.map.remove(&key);
                        }
                    }
                }
                if let Some(done) = batch.committed {
                    let _ = done.send(Ok(()));
                }
            }
            &self.map
        }

        fn keys(&mut self) -> Vec<String> {
            self.apply().keys().cloned().collect()
        }

        /// A router restarted on this state ("the gateway was SIGKILLed and started again").
        fn restart(&mut self) -> (Router, RestoreReport) {
            self.restart_with(|_| {})
        }

        /// Restarted with the settings `configure` gives the router before `restore`.
        fn restart_with(&mut self, configure: impl FnOnce(&mut Router)) -> (Router, RestoreReport) {
            let entries: Vec<(String, Vec<u8>)> = self
                .apply()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            self.rx = rx;
            let mut r = Router::new(10, 10);
            configure(&mut r);
            let report = r.restore(tx, entries, Instant::now());
            self.apply();
            (r, report)
        }
    }

    fn persisted_router() -> (Router, Disk) {
        let (tx, mut disk) = Disk::new();
        let mut r = Router::new(10, 10);
        let report = r.restore(tx, Vec::new(), Instant::now());
        assert_eq!(report, RestoreReport::default());
        disk.apply();
        (r, disk)
    }

    fn sends(r: &mut Router, id: &str, conn: u64) -> Vec<Send> {
        let mut out = Vec::new();
        while let Some(s) = r
            .with_session(id, conn, |s| s.outbound.next_send(Instant::now()))
            .flatten()
        {
            out.push(s);
        }
        out
    }

    fn payloads(sends: &[Send]) -> Vec<(Vec<u8>, u16, bool)> {
        sends
            .iter()
            .filter_map(|s| match s {
                Send::Publish { msg, pkid, dup } => Some((msg.payload.to_vec(), *pkid, *dup)),
                Send::PubRel(_) => None,
            })
            .collect()
    }

    #[test]
    fn persistent_session_survives_restart_with_queue_inflight_and_subscriptions() {
        let (mut r, mut disk) = persisted_router();
        let id: Arc<str> = Arc::from("dev");
        let a = r.attach(&id, true, None, 2, link(1), Some(Arc::from("user")));
        assert!(!a.session_present);
        assert!(
            a.persisted.is_some(),
            "CONNACK of a persistent session waits"
        );
        let (_, _, ticket) = r.subscribe(
            "dev",
            1,
            vec![sub("t/#", QoS::ExactlyOnce)],
            None,
            Instant::now(),
        );
        assert!(
            ticket.is_some(),
            "SUBACK waits for the subscription to be durable"
        );
        let t: Arc<str> = Arc::from("t/1");
        for p in [&b"one"[..], b"two", b"three"] {
            let pubn = Publication::plain(
                t.clone(),
                Bytes::copy_from_slice(p),
                QoS::AtLeastOnce,
                false,
            );
            let (_, ticket) = r.route(&pubn, None, None, Instant::now());
            assert!(
                ticket.is_some(),
                "the publisher's ack waits for the queued copy"
            );
        }
        // A QoS 0 message is never persisted, so nothing waits for it.
        let (_, ticket) = r.route(
            &plain(&t, b"zero", QoS::AtMostOnce, false),
            None,
            None,
            Instant::now(),
        );
        assert!(ticket.is_none());
        // Window of 2: "one" and "two" go out; "one" is acked; "two" stays in flight.
        let sent = sends(&mut r, "dev", 1);
        assert_eq!(payloads(&sent).len(), 2);
        let first_pkid = payloads(&sent)[0].1;
        let second_pkid = payloads(&sent)[1].1;
        r.with_session("dev", 1, |s| s.outbound.on_puback(first_pkid));
        r.with_session("dev", 1, |s| s.await_rel(77));
        // Killed here: no detach.
        let keys = disk.keys();
        assert_eq!(
            keys.iter().filter(|k| k.starts_with("mqtt/m/")).count(),
            2,
            "two messages left (one in flight, one queued): {keys:?}"
        );
        let (mut r, report) = disk.restart();
        assert_eq!(
            (report.sessions, report.messages, report.retained),
            (1, 2, 0)
        );
        assert!(report.invalid.is_empty());
        let a = r.attach(&id, false, None, 10, link(5), None);
        assert!(a.session_present, "the session survived the restart");
        assert_eq!(
            payloads(&sends(&mut r, "dev", 5)),
            vec![
                (b"two".to_vec(), second_pkid, true),
                (b"three".to_vec(), second_pkid.wrapping_add(1), false)
            ],
            "the in-flight message is resent with its packet id and DUP, then the queue"
        );
        assert_eq!(
            r.with_session("dev", 5, |s| s.awaiting_rel.contains(&77)),
            Some(true),
            "inbound QoS 2 ids awaiting PUBREL survive"
        );
        // The subscription survived: a new message reaches the session.
        r.route(
            &plain(&t, b"four", QoS::ExactlyOnce, false),
            None,
            None,
            Instant::now(),
        );
        let sent = sends(&mut r, "dev", 5);
        assert_eq!(
            payloads(&sent)
                .iter()
                .map(|p| p.0.clone())
                .collect::<Vec<_>>(),
            vec![b"four".to_vec()]
        );
        match &sent[0] {
            Send::Publish { msg, .. } => assert_eq!(msg.qos, QoS::ExactlyOnce),
            Send::PubRel(_) => panic!("expected a publish"),
        }
    }

    #[test]
    fn acked_messages_and_ended_sessions_leave_nothing_behind() {
        let (mut r, mut disk) = persisted_router();
        let id: Arc<str> = Arc::from("c");
        r.attach(&id, true, None, 10, link(1), None);
        r.subscribe(
            "c",
            1,
            vec![sub("a", QoS::ExactlyOnce)],
            None,
            Instant::now(),
        );
        let a: Arc<str> = Arc::from("a");
        r.route(
            &plain(&a, b"1", QoS::AtLeastOnce, false),
            None,
            None,
            Instant::now(),
        );
        r.route(
            &plain(&a, b"2", QoS::ExactlyOnce, false),
            None,
            None,
            Instant::now(),
        );
        let sent = payloads(&sends(&mut r, "c", 1));
        r.with_session("c", 1, |s| s.outbound.on_puback(sent[0].1));
        r.with_session("c", 1, |s| s.outbound.on_pubrec(sent[1].1));
        assert_eq!(
            disk.keys()
                .iter()
                .filter(|k| k.starts_with("mqtt/m/"))
                .count(),
            1
        );
        r.with_session("c", 1, |s| s.outbound.on_pubcomp(sent[1].1));
        assert_eq!(disk.keys(), vec![persist::session_key("c")]);
        // A clean start ends the session: its key goes.
        r.attach(&id, true, Some(Duration::ZERO), 10, link(2), None);
        assert!(disk.keys().is_empty(), "{:?}", disk.keys());
        // A session that ends with its connection is never written.
        r.subscribe(
            "c",
            2,
            vec![sub("a", QoS::AtLeastOnce)],
            None,
            Instant::now(),
        );
        r.route(
            &plain(&a, b"3", QoS::AtLeastOnce, false),
            None,
            None,
            Instant::now(),
        );
        assert!(disk.keys().is_empty());
        r.detach("c", 2, Instant::now(), None);
        assert!(disk.keys().is_empty());
    }

    #[test]
    fn offline_session_expiry_counts_across_restart() {
        let (mut r, mut disk) = persisted_router();
        let id: Arc<str> = Arc::from("e");
        r.attach(&id, true, Some(Duration::from_secs(60)), 10, link(1), None);
        r.subscribe(
            "e",
            1,
            vec![sub("x", QoS::AtLeastOnce)],
            None,
            Instant::now(),
        );
        let start = Instant::now();
        r.detach("e", 1, start, None);
        let x: Arc<str> = Arc::from("x");
        r.route(&plain(&x, b"q", QoS::AtLeastOnce, false), None, None, start);
        let (mut r, report) = disk.restart();
        assert_eq!((report.sessions, report.messages), (1, 1));
        // Still there within the interval, gone (keys deleted) after it.
        assert_eq!(r.expire(start + Duration::from_secs(30)).sessions, 0);
        assert_eq!(r.expire(start + Duration::from_secs(61)).sessions, 1);
        assert!(disk.keys().is_empty(), "{:?}", disk.keys());
    }

    #[test]
    fn delayed_will_waits_across_restart() {
        let (mut r, mut disk) = persisted_router();
        let id: Arc<str> = Arc::from("w");
        r.attach(&id, true, Some(Duration::from_secs(600)), 10, link(1), None);
        let now = Instant::now();
        let will = plain(&Arc::from("w/status"), b"gone", QoS::AtLeastOnce, true);
        assert!(
            r.detach("w", 1, now, Some((will, Duration::from_secs(20))))
                .is_none()
        );
        let (mut r, _) = disk.restart();
        assert!(r.expire(now + Duration::from_secs(10)).wills.is_empty());
        let due = r.expire(now + Duration::from_secs(21));
        assert_eq!(due.wills.len(), 1, "the will is published after its delay");
        assert_eq!(&*due.wills[0].1.topic, "w/status");
        // Published once: not again after another restart.
        let (mut r, _) = disk.restart();
        assert!(r.expire(now + Duration::from_secs(30)).wills.is_empty());
    }

    #[test]
    fn retained_messages_survive_restart_until_cleared_or_expired() {
        let (mut r, mut disk) = persisted_router();
        let now = Instant::now();
        let keep: Arc<str> = Arc::from("r/keep");
        let cleared: Arc<str> = Arc::from("r/cleared");
        let short: Arc<str> = Arc::from("r/short");
        r.route(&plain(&keep, b"k", QoS::AtLeastOnce, true), None, None, now);
        r.route(
            &plain(&cleared, b"c", QoS::AtLeastOnce, true),
            None,
            None,
            now,
        );
        r.route(
            &plain(&cleared, b"", QoS::AtLeastOnce, true),
            None,
            None,
            now,
        );
        let mut expiring = plain(&short, b"s", QoS::AtLeastOnce, true);
        expiring.expires_at = Some(now + Duration::from_millis(1));
        r.route(&expiring, None, None, now);
        std::thread::sleep(Duration::from_millis(5));
        let (mut r, report) = disk.restart();
        assert_eq!(
            report.retained, 1,
            "only the live retained message comes back"
        );
        assert_eq!(disk.keys(), vec![persist::retained_key("r/keep")]);
        let id: Arc<str> = Arc::from("s");
        r.attach(&id, true, Some(Duration::ZERO), 10, link(1), None);
        r.subscribe(
            "s",
            1,
            vec![sub("r/#", QoS::AtLeastOnce)],
            None,
            Instant::now(),
        );
        let got = payloads(&sends(&mut r, "s", 1));
        assert_eq!(
            got.iter().map(|p| p.0.clone()).collect::<Vec<_>>(),
            vec![b"k".to_vec()]
        );
    }

    #[test]
    fn unreadable_entries_are_reported_skipped_and_deleted() {
        let (mut r, mut disk) = persisted_router();
        let id: Arc<str> = Arc::from("ok");
        r.attach(&id, true, None, 10, link(1), None);
        disk.apply();
        disk.map.insert("mqtt/s/zz".into(), vec![1]);
        disk.map
            .insert(persist::session_key("bad"), b"not cbor".to_vec());
        disk.map
            .insert(persist::message_key("orphan", 3), vec![0x80]);
        disk.map.insert("mqtt/unknown".into(), vec![]);
        let (_, report) = disk.restart();
        assert_eq!(report.sessions, 1);
        assert_eq!(report.invalid.len(), 4, "{:?}", report.invalid);
        assert_eq!(disk.keys(), vec![persist::session_key("ok")]);
    }

    #[test]
    fn reconnecting_after_expiry_finds_no_session_and_a_due_will_is_published() {
        let mut r = Router::new(10, 10);
        let id: Arc<str> = Arc::from("late");
        r.attach(&id, true, Some(Duration::from_millis(1)), 10, link(1), None);
        let will = plain(&Arc::from("w"), b"gone", QoS::AtLeastOnce, false);
        // Will delay 1 ms, session expiry 1 ms: both have passed when the client is back,
        // though no sweep (`expire`) ran in between.
        r.detach(
            "late",
            1,
            Instant::now(),
            Some((will, Duration::from_millis(1))),
        );
        std::thread::sleep(Duration::from_millis(5));
        let a = r.attach(&id, false, Some(Duration::from_secs(60)), 10, link(2), None);
        assert!(!a.session_present, "the session had expired");
        assert!(a.session_expired);
        assert_eq!(
            a.ended_will.map(|w| w.payload),
            Some(Bytes::from_static(b"gone"))
        );
        // Within the delay, reconnecting cancels the will; after it, the will still goes.
        let will = plain(&Arc::from("w"), b"again", QoS::AtLeastOnce, false);
        r.detach(
            "late",
            2,
            Instant::now(),
            Some((will.clone(), Duration::from_secs(30))),
        );
        let a = r.attach(&id, false, Some(Duration::from_secs(60)), 10, link(3), None);
        assert!(a.session_present && !a.session_expired && a.ended_will.is_none());
        r.detach(
            "late",
            3,
            Instant::now(),
            Some((will, Duration::from_millis(1))),
        );
        std::thread::sleep(Duration::from_millis(5));
        let a = r.attach(&id, false, Some(Duration::from_secs(60)), 10, link(4), None);
        assert!(a.session_present, "the session (60 s) is still there");
        assert_eq!(
            a.ended_will.map(|w| w.payload),
            Some(Bytes::from_static(b"again"))
        );
    }

    fn retained_topics(r: &mut Router, conn: u64) -> Vec<String> {
        let id: Arc<str> = Arc::from(format!("probe-{conn}"));
        r.attach(&id, true, Some(Duration::ZERO), 100, link(conn), None);
        r.subscribe(
            &id,
            conn,
            vec![sub("#", QoS::AtLeastOnce)],
            None,
            Instant::now(),
        );
        let topics = sends(r, &id, conn)
            .into_iter()
            .filter_map(|s| match s {
                Send::Publish { msg, .. } => Some(format!(
                    "{}={}",
                    msg.topic,
                    String::from_utf8_lossy(&msg.payload)
                )),
                Send::PubRel(_) => None,
            })
            .collect();
        r.detach(&id, conn, Instant::now(), None);
        topics
    }

    #[test]
    fn new_retained_topic_beyond_max_retained_is_delivered_not_retained_and_counted() {
        let (mut r, mut disk) = persisted_router();
        r.set_retained_limits(2, usize::MAX);
        let live: Arc<str> = Arc::from("live");
        r.attach(&live, true, Some(Duration::ZERO), 10, link(1), None);
        r.subscribe(
            "live",
            1,
            vec![sub("r/#", QoS::AtLeastOnce)],
            None,
            Instant::now(),
        );
        let now = Instant::now();
        for (t, qos) in [("r/a", QoS::AtLeastOnce), ("r/b", QoS::AtMostOnce)] {
            let (routed, _) = r.route(&plain(&Arc::from(t), b"1", qos, true), None, None, now);
            assert_eq!(routed.retained_refused, 0);
        }
        let (routed, _) = r.route(
            &plain(&Arc::from("r/c"), b"1", QoS::AtMostOnce, true),
            None,
            None,
            now,
        );
        assert_eq!(routed.retained_refused, 1, "counted");
        assert_eq!(
            payloads(&sends(&mut r, "live", 1)).len(),
            3,
            "the current subscriber got all three, the refused one too"
        );
        assert_eq!(retained_topics(&mut r, 2), vec!["r/a=1", "r/b=1"]);
        assert_eq!(
            disk.keys(),
            vec![persist::retained_key("r/a"), persist::retained_key("r/b")],
            "nothing written for the refused one"
        );
        // Replacing and clearing topics held still work at the bound.
        let (routed, _) = r.route(
            &plain(&Arc::from("r/a"), b"2", QoS::AtMostOnce, true),
            None,
            None,
            now,
        );
        assert_eq!(routed.retained_refused, 0);
        r.route(
            &plain(&Arc::from("r/b"), b"", QoS::AtMostOnce, true),
            None,
            None,
            now,
        );
        r.route(
            &plain(&Arc::from("r/c"), b"3", QoS::AtMostOnce, true),
            None,
            None,
            now,
        );
        assert_eq!(retained_topics(&mut r, 3), vec!["r/a=2", "r/c=3"]);
        assert_eq!(r.retained_usage(), (2, 8));
    }

    #[test]
    fn new_retained_topic_beyond_max_retained_bytes_is_refused_and_fits_says_so_first() {
        let mut r = Router::new(10, 10);
        // "t/1" + 5 bytes = 8 per message; room for two.
        r.set_retained_limits(100, 16);
        let now = Instant::now();
        for t in ["t/1", "t/2"] {
            r.route(
                &plain(&Arc::from(t), b"12345", QoS::AtLeastOnce, true),
                None,
                None,
                now,
            );
        }
        let third = plain(&Arc::from("t/3"), b"12345", QoS::AtLeastOnce, true);
        assert_eq!(third.retained_size(), 8);
        assert_eq!(r.retained_fits("t/3", 8, now), (false, 0));
        assert_eq!(
            r.retained_fits("t/1", 8, now),
            (true, 0),
            "a replacement fits"
        );
        let (routed, _) = r.route(&third, None, None, now);
        assert_eq!(routed.retained_refused, 1);
        assert_eq!(r.retained_usage(), (2, 16));
    }

    #[test]
    fn expired_retained_messages_make_room_before_a_new_topic_is_refused() {
        let (mut r, mut disk) = persisted_router();
        r.set_retained_limits(1, usize::MAX);
        let now = Instant::now();
        let mut short = plain(&Arc::from("old"), b"1", QoS::AtLeastOnce, true);
        short.expires_at = Some(now + Duration::from_millis(5));
        r.route(&short, None, None, now);
        let later = now + Duration::from_millis(10);
        assert_eq!(r.retained_fits("new", 4, later), (true, 1));
        assert!(disk.keys().is_empty(), "the expired one's key is deleted");
        let (routed, _) = r.route(
            &plain(&Arc::from("new"), b"1", QoS::AtLeastOnce, true),
            None,
            None,
            later,
        );
        assert_eq!(routed.retained_refused, 0);
        assert_eq!(disk.keys(), vec![persist::retained_key("new")]);
    }

    #[test]
    fn a_replacement_past_the_byte_slack_clears_the_old_value_on_disk_too() {
        let (mut r, mut disk) = persisted_router();
        // "a" + 7 = 8 bytes; the ceiling for replacements is 8 + 8/8 = 9.
        r.set_retained_limits(10, 8);
        let now = Instant::now();
        let a: Arc<str> = Arc::from("a");
        r.route(
            &plain(&a, b"1234567", QoS::AtLeastOnce, true),
            None,
            None,
            now,
        );
        let (routed, _) = r.route(
            &plain(&a, b"12345678", QoS::AtLeastOnce, true),
            None,
            None,
            now,
        );
        assert_eq!(
            routed.retained_refused, 0,
            "one byte over: within the slack"
        );
        let (routed, _) = r.route(
            &plain(&a, b"123456789", QoS::AtLeastOnce, true),
            None,
            None,
            now,
        );
        assert_eq!(routed.retained_refused, 1);
        assert!(
            disk.keys().is_empty(),
            "no older value is left to be sent to new subscribers"
        );
        assert_eq!(r.retained_usage(), (0, 0));
    }

    #[test]
    fn restored_retained_messages_over_lowered_bounds_are_kept() {
        let (mut r, mut disk) = persisted_router();
        let now = Instant::now();
        for t in ["x/1", "x/2", "x/3"] {
            r.route(
                &plain(&Arc::from(t), b"v", QoS::AtLeastOnce, true),
                None,
                None,
                now,
            );
        }
        let (mut r, report) = disk.restart_with(|r| r.set_retained_limits(2, usize::MAX));
        assert_eq!(report.retained, 3, "none deleted for the lower bound");
        let (routed, _) = r.route(
            &plain(&Arc::from("x/4"), b"v", QoS::AtLeastOnce, true),
            None,
            None,
            now,
        );
        assert_eq!(
            routed.retained_refused, 1,
            "a new topic waits below the bound"
        );
        assert_eq!(disk.keys().len(), 3);
    }

    #[test]
    fn new_persistent_session_beyond_max_sessions_is_not_admitted_and_clean_ones_are() {
        let mut r = Router::new(10, 10);
        r.set_session_limits(SessionLimits {
            max_sessions: 2,
            ..SessionLimits::default()
        });
        let week = Some(Duration::from_secs(7 * 86_400));
        let now = Instant::now();
        for (n, id) in ["p1", "p2"].into_iter().enumerate() {
            assert!(r.session_admitted(id, week, now));
            let conn = u64::try_from(n).expect("small") + 1;
            r.attach(&Arc::from(id), false, week, 10, link(conn), None);
        }
        r.detach("p2", 2, now, None);
        assert_eq!(r.persistent_sessions(now), 2, "offline ones count");
        assert!(!r.session_admitted("p3", week, now), "a third is refused");
        assert!(
            r.session_admitted("p3", Some(Duration::ZERO), now),
            "a clean session is not"
        );
        assert!(
            r.session_admitted("p2", week, now),
            "resuming its own is not"
        );
        assert!(
            r.session_admitted("p1", week, now),
            "taking over its own is not"
        );
        // A client id connected with a clean session asking for a persistent one is a new one.
        r.attach(
            &Arc::from("c"),
            true,
            Some(Duration::ZERO),
            10,
            link(9),
            None,
        );
        assert!(!r.session_admitted("c", week, now));
        // Ending one (a clean start, here) makes room.
        r.attach(
            &Arc::from("p1"),
            true,
            Some(Duration::ZERO),
            10,
            link(10),
            None,
        );
        assert!(r.session_admitted("p3", week, now));
    }

    #[test]
    fn an_expired_offline_session_does_not_hold_a_place() {
        let mut r = Router::new(10, 10);
        r.set_session_limits(SessionLimits {
            max_sessions: 1,
            ..SessionLimits::default()
        });
        let now = Instant::now();
        r.attach(
            &Arc::from("gone"),
            false,
            Some(Duration::from_secs(1)),
            10,
            link(1),
            None,
        );
        r.detach("gone", 1, now, None);
        let hour = Some(Duration::from_secs(3600));
        assert!(!r.session_admitted("next", hour, now));
        // Lapsed, not yet swept: no longer counted.
        assert!(r.session_admitted("next", hour, now + Duration::from_secs(2)));
    }

    #[test]
    fn a_311_session_expires_like_an_mqtt5_one_and_is_deleted_from_the_store() {
        let (mut r, mut disk) = persisted_router();
        let id: Arc<str> = Arc::from("old311");
        // What the connection gives a 3.1.1 clean-session-0 client: session_expiry_311.
        r.attach(
            &id,
            false,
            Some(Duration::from_secs(7 * 86_400)),
            10,
            link(1),
            None,
        );
        r.subscribe(
            "old311",
            1,
            vec![sub("q", QoS::AtLeastOnce)],
            None,
            Instant::now(),
        );
        let start = Instant::now();
        r.detach("old311", 1, start, None);
        r.route(
            &plain(&Arc::from("q"), b"m", QoS::AtLeastOnce, false),
            None,
            None,
            start,
        );
        assert_eq!(disk.keys().len(), 2, "session and its queued message");
        assert_eq!(
            r.expire(start + Duration::from_secs(6 * 86_400)).sessions,
            0
        );
        assert_eq!(
            r.expire(start + Duration::from_secs(7 * 86_400)).sessions,
            1
        );
        assert!(disk.keys().is_empty(), "{:?}", disk.keys());
    }

    #[test]
    fn restored_sessions_without_expiry_get_the_311_expiry_and_long_deadlines_are_capped() {
        let (mut r, mut disk) = persisted_router();
        // Written by a version that kept 3.1.1 sessions until restart (no expiry), and an
        // MQTT 5 session with a year.
        r.attach(&Arc::from("forever"), false, None, 10, link(1), None);
        r.attach(
            &Arc::from("year"),
            false,
            Some(Duration::from_secs(365 * 86_400)),
            10,
            link(2),
            None,
        );
        let now = Instant::now();
        r.detach("forever", 1, now, None);
        r.detach("year", 2, now, None);
        let (mut r, report) = disk.restart_with(|r| {
            r.set_session_limits(SessionLimits {
                max_sessions: usize::MAX,
                default_expiry: Some(Duration::from_secs(60)),
                max_expiry: Some(Duration::from_secs(120)),
            });
        });
        assert_eq!(report.sessions, 2);
        let start = Instant::now();
        assert_eq!(r.expire(start + Duration::from_secs(59)).sessions, 0);
        assert_eq!(r.expire(start + Duration::from_secs(61)).sessions, 1);
        assert_eq!(r.expire(start + Duration::from_secs(121)).sessions, 1);
        assert!(disk.keys().is_empty(), "{:?}", disk.keys());
    }
}
