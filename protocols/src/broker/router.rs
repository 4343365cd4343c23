//! The broker-wide state: sessions by client id, which connection owns each, and retained
//! messages. One mutex guards it all; it is held only for in-memory work (never across an
//! `.await`), and routing is a scan over sessions — right for a gateway's tens to hundreds of
//! local clients; a filter trie is the upgrade path if that changes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::QoS;
use super::auth::{Access, Auth};
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
}

/// A retained message (MQTT 3.1.1 §3.3.1.3).
#[derive(Debug, Clone)]
struct Retained {
    payload: Bytes,
    qos: QoS,
}

/// Outcome of attaching a connection to a client id.
#[derive(Debug)]
pub(crate) struct Attached {
    /// Whether an existing session was resumed (CONNACK's session-present flag).
    pub session_present: bool,
    /// What to retransmit first (in-flight QoS 1/2 from before).
    pub resend: Vec<Send>,
}

/// Totals of one routing pass, for the counters.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Routed {
    /// Messages dropped because a subscriber's queue was full.
    pub dropped: u64,
    /// Subscribers whose filter matched but who may not read the topic (not delivered).
    pub denied: u64,
}

/// Sessions and retained messages.
#[derive(Debug)]
pub(crate) struct Router {
    sessions: HashMap<Arc<str>, Entry>,
    retained: BTreeMap<String, Retained>,
    max_queued: usize,
    max_inflight: u16,
}

impl Router {
    pub(crate) fn new(max_queued: usize, max_inflight: u16) -> Self {
        Self {
            sessions: HashMap::new(),
            retained: BTreeMap::new(),
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
        };
        let existed = self.sessions.contains_key(client_id);
        let entry = self.sessions.entry(client_id.clone()).or_insert_with(fresh);
        if let Some(old) = entry.link.take() {
            old.kick.cancel();
        }
        let session_present = if clean {
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
        }
    }

    /// The connection `conn_id` ends. Its session stays (offline) if persistent.
    pub(crate) fn detach(&mut self, client_id: &str, conn_id: u64) {
        let Some(entry) = self.sessions.get_mut(client_id) else {
            return;
        };
        if entry.link.as_ref().map(|l| l.conn_id) != Some(conn_id) {
            return;
        }
        entry.link = None;
        if !entry.session.persistent {
            self.sessions.remove(client_id);
        }
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
        topic: &Arc<str>,
        payload: &Bytes,
        qos: QoS,
        retain: bool,
        origin: Option<&str>,
        auth: Option<&Auth>,
    ) -> Routed {
        if retain {
            if payload.is_empty() {
                self.retained.remove(topic.as_ref());
            } else {
                self.retained.insert(
                    topic.to_string(),
                    Retained {
                        payload: payload.clone(),
                        qos,
                    },
                );
            }
        }
        let mut routed = Routed::default();
        for (id, entry) in &mut self.sessions {
            let from_self = origin == Some(id.as_ref());
            let Some((q, r)) = entry.session.delivery(topic, qos, retain, from_self) else {
                continue;
            };
            if let Some(auth) = auth
                && !auth.allows(id, entry.username.as_deref(), topic, Access::Read)
            {
                routed.denied += 1;
                continue;
            }
            let msg = Message {
                topic: topic.clone(),
                payload: payload.clone(),
                qos: q,
                retain: r,
            };
            match entry.session.outbound.enqueue(msg, entry.link.is_some()) {
                Enqueue::Queued => {}
                Enqueue::QueuedDroppingQos0 | Enqueue::DroppedFull => routed.dropped += 1,
                Enqueue::SkippedOffline => continue,
            }
            if let Some(link) = &entry.link {
                link.notify.notify_one();
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
    ) -> (Vec<bool>, Routed) {
        let mut routed = Routed::default();
        let Some(entry) = self.sessions.get_mut(client_id) else {
            return (Vec::new(), routed);
        };
        if entry.link.as_ref().map(|l| l.conn_id) != Some(conn_id) {
            return (Vec::new(), routed);
        }
        let mut existed = Vec::with_capacity(subs.len());
        for (sub, retain_handling) in subs {
            let filter = sub.filter.clone();
            let granted = sub.qos;
            let was = entry.session.subscribe(sub);
            existed.push(was);
            let send_retained = match retain_handling {
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
    use super::*;
    use crate::topic::TopicFilter;

    fn link(id: u64) -> Link {
        Link {
            conn_id: id,
            notify: Arc::new(Notify::new()),
            kick: CancellationToken::new(),
        }
    }

    fn sub(filter: &str, qos: QoS) -> (Subscription, u8) {
        (
            Subscription {
                filter: TopicFilter::new(filter).expect("valid"),
                qos,
                no_local: false,
                retain_as_published: false,
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
        r.detach("c", 1);
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
        r.subscribe("p", 1, vec![sub("s/#", QoS::AtLeastOnce)], None);
        r.detach("p", 1);
        let topic: Arc<str> = Arc::from("s/1");
        r.route(
            &topic,
            &Bytes::from_static(b"q1"),
            QoS::AtLeastOnce,
            false,
            None,
            None,
        );
        r.route(
            &topic,
            &Bytes::from_static(b"q0"),
            QoS::AtMostOnce,
            false,
            None,
            None,
        );
        let a = r.attach(&id, false, true, 10, link(2), None);
        assert!(a.session_present);
        let sent = r.with_session("p", 2, |s| s.outbound.next_send()).flatten();
        match sent {
            Some(Send::Publish { msg, .. }) => assert_eq!(&msg.payload[..], b"q1"),
            other => panic!("expected the queued QoS 1 message, got {other:?}"),
        }
        assert_eq!(
            r.with_session("p", 2, |s| s.outbound.next_send()).flatten(),
            None
        );
    }

    #[test]
    fn clean_session_is_dropped_on_detach() {
        let mut r = Router::new(10, 10);
        let id: Arc<str> = Arc::from("c");
        r.attach(&id, true, false, 10, link(1), None);
        r.detach("c", 1);
        assert_eq!(r.session_count(), 0);
        let a = r.attach(&id, false, true, 10, link(2), None);
        assert!(!a.session_present);
    }

    #[test]
    fn retained_set_cleared_and_sent_on_subscribe() {
        let mut r = Router::new(10, 10);
        let t: Arc<str> = Arc::from("r/1");
        r.route(
            &t,
            &Bytes::from_static(b"v"),
            QoS::AtLeastOnce,
            true,
            None,
            None,
        );
        let id: Arc<str> = Arc::from("s");
        r.attach(&id, true, false, 10, link(1), None);
        r.subscribe("s", 1, vec![sub("r/+", QoS::ExactlyOnce)], None);
        match r.with_session("s", 1, |s| s.outbound.next_send()).flatten() {
            Some(Send::Publish { msg, .. }) => {
                assert!(msg.retain);
                assert_eq!(msg.qos, QoS::AtLeastOnce);
            }
            other => panic!("expected retained, got {other:?}"),
        }
        r.route(&t, &Bytes::new(), QoS::AtMostOnce, true, None, None);
        let id2: Arc<str> = Arc::from("s2");
        r.attach(&id2, true, false, 10, link(2), None);
        r.subscribe("s2", 2, vec![sub("r/+", QoS::ExactlyOnce)], None);
        assert_eq!(
            r.with_session("s2", 2, |s| s.outbound.next_send())
                .flatten(),
            None
        );
    }
}
