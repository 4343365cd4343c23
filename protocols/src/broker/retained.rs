//! The retained store (MQTT 3.1.1 §3.3.1.3), bounded by a count and a byte total.
//!
//! The bounds keep what any client can make the broker hold (in memory, and on disk in the
//! store's state table, which is outside `storage.quota`) to what the configuration says:
//! - a retained message on a topic not held yet is refused when the store already holds
//!   `max_count` messages, or when its size would take the total past `max_bytes`;
//! - replacing the message of a topic already held never meets the count bound, and meets the
//!   byte bound only past [`REPLACE_SLACK`]: a replacement may take the total up to an eighth
//!   over `max_bytes`, so that a full store does not freeze the values it holds because one
//!   grew by a few bytes. A replacement that does not grow the total always fits;
//! - clearing (an empty retained payload) always works.
//!
//! A message's size is its topic, its payload and its MQTT 5 properties, in bytes. Expired
//! messages (MQTT 5 message expiry) are swept before a message is refused, so they never hold
//! a place a live one could take.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use tokio::time::Instant;

use super::QoS;
use super::codec::PublishProps;

/// How far over `max_bytes` replacements of topics already held may take the total: one
/// eighth of it.
pub(crate) const REPLACE_SLACK: usize = 8;

/// A retained message, with its MQTT 5 properties; it is forgotten once its expiry interval
/// runs out (MQTT 5 §3.3.2.3.3).
#[derive(Debug, Clone)]
pub(crate) struct Retained {
    pub payload: Bytes,
    pub qos: QoS,
    pub props: Arc<PublishProps>,
    pub expires_at: Option<Instant>,
}

impl Retained {
    fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|e| e <= now)
    }
}

/// What a retained message on `topic` costs against the byte bound: topic, payload and MQTT 5
/// properties.
pub(crate) fn size(topic: &str, payload: &[u8], props: &PublishProps) -> usize {
    let props = usize::from(props.payload_format_indicator.is_some())
        + props.content_type.as_ref().map_or(0, String::len)
        + props.response_topic.as_ref().map_or(0, String::len)
        + props.correlation_data.as_ref().map_or(0, Bytes::len)
        + props
            .user_properties
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>();
    topic.len() + payload.len() + props
}

/// The outcome of offering a retained message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Put {
    /// Kept (new, or replacing the topic's message).
    Stored,
    /// Not kept: a bound was reached. `cleared`: the topic's previous message was removed
    /// (see [`RetainedStore::put`]).
    Refused { cleared: bool },
}

/// Retained messages by topic, with their total size and bounds.
#[derive(Debug)]
pub(crate) struct RetainedStore {
    map: BTreeMap<String, Retained>,
    /// Sum of `size` over `map`.
    bytes: usize,
    max_count: usize,
    max_bytes: usize,
}

impl RetainedStore {
    /// An empty store with no bound.
    pub(crate) fn new() -> Self {
        Self {
            map: BTreeMap::new(),
            bytes: 0,
            max_count: usize::MAX,
            max_bytes: usize::MAX,
        }
    }

    /// Sets the bounds for what comes next; what is held already stays, even over them.
    pub(crate) fn set_limits(&mut self, max_count: usize, max_bytes: usize) {
        self.max_count = max_count;
        self.max_bytes = max_bytes;
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Over a bound (after a restore with lower bounds).
    pub(crate) fn over_limits(&self) -> bool {
        self.map.len() > self.max_count || self.bytes > self.max_bytes
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&String, &Retained)> {
        self.map.iter()
    }

    /// Whether a message of `size` bytes on `topic` fits now, without sweeping expired
    /// messages first (a hint for refusing a publish before it is stored; [`put`] decides).
    ///
    /// [`put`]: RetainedStore::put
    pub(crate) fn fits(&self, topic: &str, size: usize) -> bool {
        match self.map.get(topic) {
            Some(old) => {
                let old = size_of(topic, old);
                size <= old
                    || self.bytes - old + size
                        <= self
                            .max_bytes
                            .saturating_add(self.max_bytes / REPLACE_SLACK)
            }
            None => {
                self.map.len() < self.max_count && self.bytes.saturating_add(size) <= self.max_bytes
            }
        }
    }

    /// Keeps `r` as the retained message of `topic` if it fits (see the module's rules),
    /// after sweeping expired messages when it would not (`expired` gets each one's topic).
    /// A refused replacement removes the topic's previous message (`cleared`): the store
    /// never holds a message on a topic older than the last one published there. (An MQTT 5
    /// QoS 1/2 publish that `fits` refused never gets here: its publisher was told.)
    pub(crate) fn put(
        &mut self,
        topic: &str,
        r: Retained,
        now: Instant,
        expired: &mut impl FnMut(&str),
    ) -> Put {
        let size = size_of(topic, &r);
        if !self.fits(topic, size) {
            self.remove_expired(now, expired);
        }
        if !self.fits(topic, size) {
            let cleared = self.remove(topic);
            return Put::Refused { cleared };
        }
        self.insert(topic, r);
        Put::Stored
    }

    /// Inserts or replaces without checking the bounds (restoring what was kept before).
    pub(crate) fn insert(&mut self, topic: &str, r: Retained) {
        self.bytes += size_of(topic, &r);
        if let Some(old) = self.map.insert(topic.to_owned(), r) {
            self.bytes -= size_of(topic, &old);
        }
    }

    /// Removes the topic's message; whether there was one.
    pub(crate) fn remove(&mut self, topic: &str) -> bool {
        match self.map.remove(topic) {
            Some(old) => {
                self.bytes -= size_of(topic, &old);
                true
            }
            None => false,
        }
    }

    /// Removes every message expired by `now`, calling `removed` with each topic; how many.
    pub(crate) fn remove_expired(&mut self, now: Instant, removed: &mut impl FnMut(&str)) -> u64 {
        let mut n = 0;
        let bytes = &mut self.bytes;
        self.map.retain(|topic, r| {
            if !r.expired(now) {
                return true;
            }
            *bytes -= size_of(topic, r);
            removed(topic);
            n += 1;
            false
        });
        n
    }
}

fn size_of(topic: &str, r: &Retained) -> usize {
    size(topic, &r.payload, &r.props)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn msg(payload: &'static [u8]) -> Retained {
        Retained {
            payload: Bytes::from_static(payload),
            qos: QoS::AtLeastOnce,
            props: Arc::default(),
            expires_at: None,
        }
    }

    fn put(s: &mut RetainedStore, topic: &str, r: Retained) -> Put {
        s.put(topic, r, Instant::now(), &mut |_| {})
    }

    #[test]
    fn a_new_topic_beyond_the_count_is_refused_and_replacing_one_held_still_works() {
        let mut s = RetainedStore::new();
        s.set_limits(2, usize::MAX);
        assert_eq!(put(&mut s, "a", msg(b"1")), Put::Stored);
        assert_eq!(put(&mut s, "b", msg(b"1")), Put::Stored);
        assert_eq!(put(&mut s, "c", msg(b"1")), Put::Refused { cleared: false });
        assert_eq!(put(&mut s, "a", msg(b"2")), Put::Stored, "replacing works");
        assert!(s.remove("b"), "clearing works");
        assert_eq!(put(&mut s, "c", msg(b"1")), Put::Stored, "room again");
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn a_new_topic_beyond_the_bytes_is_refused_counting_topic_payload_and_properties() {
        let mut s = RetainedStore::new();
        s.set_limits(100, 10);
        assert_eq!(put(&mut s, "ab", msg(b"123456")), Put::Stored); // 8 bytes
        assert_eq!(
            put(&mut s, "c", msg(b"12")),
            Put::Refused { cleared: false },
            "1 + 2 more would be 11"
        );
        assert_eq!(put(&mut s, "c", msg(b"1")), Put::Stored, "exactly 10 fits");
        assert_eq!(s.bytes(), 10);
        let props = PublishProps {
            content_type: Some("text/plain".into()),
            user_properties: vec![("k".into(), "vv".into())],
            ..PublishProps::default()
        };
        assert_eq!(size("t", b"x", &props), 1 + 1 + 10 + 3);
    }

    #[test]
    fn a_replacement_may_grow_the_total_an_eighth_past_the_bytes_and_no_further() {
        let mut s = RetainedStore::new();
        s.set_limits(100, 80);
        // 8 topics of 10 bytes: full.
        for t in ["t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7"] {
            assert_eq!(put(&mut s, t, msg(b"12345678")), Put::Stored);
        }
        assert_eq!(s.bytes(), 80);
        assert_eq!(
            put(&mut s, "t8", msg(b"1")),
            Put::Refused { cleared: false }
        );
        // Growing by 10 (to 90, the ceiling: 80 + 80/8) works; one more byte does not, and
        // the old value is not left behind.
        assert_eq!(put(&mut s, "t0", msg(b"123456789012345678")), Put::Stored);
        assert_eq!(s.bytes(), 90);
        assert_eq!(
            put(&mut s, "t1", msg(b"123456789")),
            Put::Refused { cleared: true }
        );
        assert_eq!(s.len(), 7);
        // Shrinking or keeping the size always works.
        assert_eq!(put(&mut s, "t0", msg(b"1")), Put::Stored);
        assert_eq!(s.bytes(), 60 + 3);
    }

    #[test]
    fn expired_messages_are_swept_before_a_new_topic_is_refused() {
        let now = Instant::now();
        let mut s = RetainedStore::new();
        s.set_limits(1, usize::MAX);
        let mut old = msg(b"old");
        old.expires_at = Some(now + Duration::from_millis(5));
        s.insert("gone", old);
        let mut swept = Vec::new();
        let later = now + Duration::from_millis(10);
        assert_eq!(
            s.put("new", msg(b"n"), later, &mut |t| swept.push(t.to_owned())),
            Put::Stored
        );
        assert_eq!(swept, vec!["gone".to_owned()]);
        assert_eq!((s.len(), s.bytes()), (1, 4));
    }

    #[test]
    fn restored_messages_over_lower_bounds_stay_and_new_topics_wait_below_them() {
        let mut s = RetainedStore::new();
        for t in ["a", "b", "c"] {
            s.insert(t, msg(b"1"));
        }
        s.set_limits(2, usize::MAX);
        assert!(s.over_limits());
        assert_eq!(put(&mut s, "d", msg(b"1")), Put::Refused { cleared: false });
        assert_eq!(put(&mut s, "a", msg(b"2")), Put::Stored);
        s.remove("a");
        s.remove("b");
        assert!(!s.over_limits());
        assert_eq!(put(&mut s, "d", msg(b"1")), Put::Stored);
    }
}
