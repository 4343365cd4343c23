//! Validated MQTT topic names and topic filters, and the matching rule between them.
//!
//! A [`TopicName`] is what a PUBLISH carries: non-empty, no wildcards, no NUL, at most
//! 65,535 bytes of UTF-8. A [`TopicFilter`] is what a SUBSCRIBE carries: the same limits, and
//! `+` / `#` only as whole levels, `#` only last. [`matches()`] implements MQTT 3.1.1 §4.7 / 5.0 §4.7,
//! including the `$` rule: a filter whose first level is a wildcard never matches a topic that
//! starts with `$` (`$SYS/...`), so `#` does not leak broker-internal topics.

use std::fmt;

/// The longest topic or filter MQTT can encode (a two-byte length prefix).
pub const MAX_TOPIC_LEN: usize = 65_535;

/// Why a topic name or filter was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Zero-length topics and filters are forbidden by the spec.
    #[error("topic is empty")]
    Empty,
    /// Longer than the two-byte length prefix can carry.
    #[error("topic is {0} bytes, longer than 65535")]
    TooLong(usize),
    /// U+0000 is forbidden in MQTT strings.
    #[error("topic contains a NUL character")]
    Nul,
    /// `+` or `#` in a topic name (only filters may hold wildcards).
    #[error("topic name contains a wildcard (+ or #)")]
    Wildcard,
    /// `#` somewhere other than alone in the last level.
    #[error("'#' must be alone in the last level of a filter")]
    MisplacedMultiLevel,
    /// `+` sharing a level with other characters.
    #[error("'+' must occupy a whole level of a filter")]
    MisplacedSingleLevel,
}

fn check_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong(s.len()));
    }
    if s.contains('\0') {
        return Err(TopicError::Nul);
    }
    Ok(())
}

/// A topic name a message can be published to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicName(String);

impl TopicName {
    /// Validates `name` as a PUBLISH topic.
    pub fn new(name: impl Into<String>) -> Result<Self, TopicError> {
        let name = name.into();
        check_common(&name)?;
        if name.contains(['+', '#']) {
            return Err(TopicError::Wildcard);
        }
        Ok(Self(name))
    }

    /// The topic as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Gives back the owned string.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for TopicName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A subscription filter, possibly with `+` and `#` wildcards.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicFilter(String);

impl TopicFilter {
    /// Validates `filter` as a SUBSCRIBE filter.
    pub fn new(filter: impl Into<String>) -> Result<Self, TopicError> {
        let filter = filter.into();
        check_common(&filter)?;
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            let last = levels.peek().is_none();
            if level.contains('#') && (level.len() != 1 || !last) {
                return Err(TopicError::MisplacedMultiLevel);
            }
            if level.contains('+') && level.len() != 1 {
                return Err(TopicError::MisplacedSingleLevel);
            }
        }
        Ok(Self(filter))
    }

    /// The filter as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when the filter holds `+` or `#`.
    pub fn has_wildcards(&self) -> bool {
        self.0.contains(['+', '#'])
    }

    /// Whether this filter selects `topic` (see [`matches()`]).
    pub fn matches(&self, topic: &str) -> bool {
        matches_str(&self.0, topic)
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for TopicFilter {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Whether `filter` selects `topic`, with the `$` rule (MQTT 3.1.1 §4.7.2): filters whose first
/// level is `+` or `#` do not match topics starting with `$`.
pub fn matches(filter: &TopicFilter, topic: &TopicName) -> bool {
    matches_str(filter.as_str(), topic.as_str())
}

/// [`matches()`] on already-validated strings. Behaviour on unvalidated input is unspecified
/// but never panics.
pub(crate) fn matches_str(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            // `a/#` also matches the parent `a` (§4.7.1.2).
            return true;
        }
        match topic_levels.next() {
            None => return false,
            Some(_) if f == "+" => {}
            Some(t) if t == f => {}
            Some(_) => return false,
        }
    }
    topic_levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(filter: &str, topic: &str) -> bool {
        let f = TopicFilter::new(filter).expect("valid filter in test");
        let t = TopicName::new(topic).expect("valid topic in test");
        matches(&f, &t)
    }

    #[test]
    fn exact_levels() {
        assert!(m("a/b/c", "a/b/c"));
        assert!(!m("a/b/c", "a/b"));
        assert!(!m("a/b", "a/b/c"));
        assert!(!m("a/b/c", "a/b/C"));
    }

    #[test]
    fn single_level_wildcard() {
        assert!(m("a/+/c", "a/b/c"));
        assert!(m("a/+", "a/b"));
        assert!(!m("a/+", "a/b/c"));
        assert!(!m("a/+", "a"));
        assert!(m("a/+", "a/"), "+ matches an empty level");
        assert!(m("+/+", "/a"));
        assert!(m("+", "a"));
        assert!(!m("+", "a/b"));
        assert!(m("/+", "/x"));
    }

    #[test]
    fn multi_level_wildcard() {
        assert!(m("#", "a"));
        assert!(m("#", "a/b/c"));
        assert!(m("#", "/"));
        assert!(m("a/#", "a"), "a/# matches its parent");
        assert!(m("a/#", "a/b/c"));
        assert!(!m("a/#", "b/a"));
        assert!(m("a/+/#", "a/b"));
        assert!(!m("a/+/#", "a"));
    }

    #[test]
    fn dollar_topics_hidden_from_leading_wildcards() {
        assert!(!m("#", "$SYS/broker/load"));
        assert!(!m("+/broker/load", "$SYS/broker/load"));
        assert!(m("$SYS/#", "$SYS/broker/load"));
        assert!(m("$SYS/+/load", "$SYS/broker/load"));
        assert!(m("a/#", "a/$b"), "only the first level is special");
    }

    #[test]
    fn topic_name_validation() {
        assert_eq!(TopicName::new(""), Err(TopicError::Empty));
        assert_eq!(TopicName::new("a/+"), Err(TopicError::Wildcard));
        assert_eq!(TopicName::new("a/#"), Err(TopicError::Wildcard));
        assert_eq!(TopicName::new("a\0b"), Err(TopicError::Nul));
        assert_eq!(
            TopicName::new("x".repeat(MAX_TOPIC_LEN + 1)),
            Err(TopicError::TooLong(MAX_TOPIC_LEN + 1))
        );
        assert!(TopicName::new("x".repeat(MAX_TOPIC_LEN)).is_ok());
        assert!(TopicName::new("/").is_ok());
        assert!(TopicName::new("a b/ü").is_ok());
    }

    #[test]
    fn topic_filter_validation() {
        assert_eq!(TopicFilter::new(""), Err(TopicError::Empty));
        assert_eq!(
            TopicFilter::new("a/#/b"),
            Err(TopicError::MisplacedMultiLevel)
        );
        assert_eq!(TopicFilter::new("a#"), Err(TopicError::MisplacedMultiLevel));
        assert_eq!(
            TopicFilter::new("a/b#"),
            Err(TopicError::MisplacedMultiLevel)
        );
        assert_eq!(
            TopicFilter::new("a+/b"),
            Err(TopicError::MisplacedSingleLevel)
        );
        assert_eq!(
            TopicFilter::new("a/++"),
            Err(TopicError::MisplacedSingleLevel)
        );
        assert_eq!(TopicFilter::new("a\0"), Err(TopicError::Nul));
        for ok in ["#", "+", "+/+", "a/+/#", "/#", "//", "$SYS/#", "+/#"] {
            assert!(TopicFilter::new(ok).is_ok(), "{ok} should be valid");
        }
    }
}
