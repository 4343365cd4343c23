//! Who may connect, and what each client may publish and receive: mosquitto's semantics over
//! the files `outpost-config` parses ([`PasswordFile`], [`AclFile`]).
//!
//! # Authentication
//!
//! - No username (or an empty one): anonymous, admitted only on listeners that allow it
//!   (CONNACK 0x05 / MQTT 5 0x87 "not authorised" elsewhere).
//! - A username with a password file: the user must exist and the password must match its hash
//!   (`$7$` PBKDF2-HMAC-SHA512 or `$6$` SHA-512, compared in constant time), else CONNACK 0x04
//!   / MQTT 5 0x86 "bad username or password" — the same answer, and about the same work, for
//!   an unknown user as for a wrong password, so names cannot be probed.
//! - A username without a password file cannot be verified: the client counts as anonymous (for
//!   admission and for the ACL), so nobody gets another user's rights by claiming the name.
//!
//! # Authorisation (as mosquitto's `acl_file`)
//!
//! Without an ACL file everything is allowed. With one, nothing is unless a rule grants it:
//! 1. the client's own rules — its `user` section, or the anonymous rules before the first
//!    `user` line for a client without a (verified) username: a matching `deny` refuses,
//!    else a matching grant allows;
//! 2. otherwise the `pattern` rules, with `%c` -> client id and `%u` -> username (a pattern
//!    with `%u` never matches an anonymous client; a client id or username holding `+` or `#`
//!    gets no pattern access at all, so it cannot widen a pattern), deny first again;
//! 3. otherwise refused.
//!
//! Read = receive (checked per message on delivery, because a permitted wildcard filter can
//! match forbidden topics) and subscribe; write = publish. A subscription is granted when a
//! rule grants reading some topic the filter matches and no `deny` covers the whole filter;
//! delivery then filters each message (mosquitto only checks per message; the SUBACK failure
//! is what the issue asks for).

use std::borrow::Cow;
use std::sync::Arc;

use outpost_config::{
    AclAccess, AclFile, AclRule, AuthFileError, BrokerConfig, PasswordFile, PasswordHash,
};
use ring::digest;
use subtle::ConstantTimeEq;

use crate::topic::matches_str;

/// The broker's access policy: which listeners admit anonymous clients, the users, the ACL.
/// Shared as `Arc<Auth>` and swapped whole on reload ([`super::BrokerHandle::reload_auth`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// Per listener, by index into [`super::BrokerSettings::listeners`]: whether clients
    /// without a username are admitted. A listener past the end admits none (fail closed).
    anonymous: Vec<bool>,
    /// `None`: usernames are not checked (and not trusted).
    passwords: Option<PasswordFile>,
    /// `None`: everything is allowed.
    acl: Option<AclFile>,
    /// Per listener: the configuration it came from serves it over TLS. Only a guard:
    /// [`super::Broker::bind`] refuses to serve such a listener in plain text.
    tls: Vec<bool>,
}

/// What a client wants to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Receive messages published to it (and subscribe).
    Read,
    /// Publish to it.
    Write,
}

/// Why a CONNECT's credentials are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LoginRefusal {
    /// Unknown user, wrong or missing password: 3.1.1 0x04, MQTT 5 0x86.
    BadCredentials,
    /// No username where anonymous clients are not admitted: 3.1.1 0x05, MQTT 5 0x87.
    NotAuthorized,
}

/// Verified against on unknown users, so they cost what a known one does.
const DUMMY_SALT: &[u8] = b"outpost-dummy-salt";

impl Auth {
    /// A policy from its parts. `anonymous[i]` says whether listener `i` (the index in
    /// `BrokerSettings::listeners`) admits clients without a username.
    pub fn new(
        anonymous: Vec<bool>,
        passwords: Option<PasswordFile>,
        acl: Option<AclFile>,
    ) -> Self {
        Self {
            anonymous,
            passwords,
            acl,
            tls: Vec::new(),
        }
    }

    /// The policy of a validated `[broker]` section, for listeners in the order of
    /// `broker.listeners` (build `BrokerSettings::listeners` from that same list).
    pub fn from_config(broker: &BrokerConfig) -> Self {
        Self {
            tls: broker
                .listener_settings
                .iter()
                .map(|l| l.tls.is_some())
                .collect(),
            ..Self::new(
                broker
                    .listener_settings
                    .iter()
                    .map(|l| l.allow_anonymous)
                    .collect(),
                broker.password_file.clone(),
                broker.acl_file.clone(),
            )
        }
    }

    /// The same policy with the password and ACL files read again from their paths (SIGHUP).
    /// On error nothing changes: keep using `self`.
    pub fn reloaded(&self) -> Result<Self, AuthFileError> {
        let passwords = match &self.passwords {
            Some(p) => Some(PasswordFile::load(p.path())?),
            None => None,
        };
        let acl = match &self.acl {
            Some(a) => Some(AclFile::load(a.path())?),
            None => None,
        };
        Ok(Self {
            tls: self.tls.clone(),
            ..Self::new(self.anonymous.clone(), passwords, acl)
        })
    }

    /// Whether the configuration this policy came from serves listener `index` over TLS.
    pub(crate) fn expects_tls(&self, index: usize) -> bool {
        self.tls.get(index).copied().unwrap_or(false)
    }

    /// Whether listener `index` admits clients without a username.
    pub fn allows_anonymous(&self, index: usize) -> bool {
        self.anonymous.get(index).copied().unwrap_or(false)
    }

    /// The users, if a password file is in force.
    pub fn password_file(&self) -> Option<&PasswordFile> {
        self.passwords.as_ref()
    }

    /// The ACL, if one is in force.
    pub fn acl_file(&self) -> Option<&AclFile> {
        self.acl.as_ref()
    }

    /// Checks a CONNECT's credentials on listener `listener`. `Ok(Some(name))`: logged in as
    /// `name`; `Ok(None)`: admitted as anonymous. Costs a PBKDF2 run when a password is
    /// checked: call it off the async workers.
    pub(crate) fn login(
        &self,
        listener: usize,
        username: Option<&str>,
        password: Option<&str>,
    ) -> Result<Option<Arc<str>>, LoginRefusal> {
        let anonymous = || {
            if self.allows_anonymous(listener) {
                Ok(None)
            } else {
                Err(LoginRefusal::NotAuthorized)
            }
        };
        let Some(user) = username.filter(|u| !u.is_empty()) else {
            return anonymous();
        };
        let Some(passwords) = &self.passwords else {
            return anonymous();
        };
        let given = password.unwrap_or("").as_bytes();
        match (passwords.get(user), password) {
            (Some(hash), Some(_)) if verify(hash, given) => Ok(Some(Arc::from(user))),
            (Some(_), Some(_)) => Err(LoginRefusal::BadCredentials),
            (found, _) => {
                // Unknown user or no password: do the work a real check would, then refuse.
                let iterations = match found {
                    Some(PasswordHash::Pbkdf2Sha512 { iterations, .. }) => *iterations,
                    _ => std::num::NonZeroU32::MIN.saturating_add(100),
                };
                let mut out = [0u8; outpost_config::PASSWORD_HASH_LEN];
                ring::pbkdf2::derive(
                    ring::pbkdf2::PBKDF2_HMAC_SHA512,
                    iterations,
                    DUMMY_SALT,
                    given,
                    &mut out,
                );
                Err(LoginRefusal::BadCredentials)
            }
        }
    }

    /// Whether the client may publish to / receive from the topic name `topic`.
    pub fn allows(
        &self,
        client_id: &str,
        username: Option<&str>,
        topic: &str,
        access: Access,
    ) -> bool {
        self.decide(client_id, username, access, |filter| {
            matches_str(filter, topic)
        })
    }

    /// Whether the client may subscribe to `filter`: some topic it matches is readable, and no
    /// `deny` covers all of it. What it delivers is still checked per message.
    pub fn allows_subscribe(&self, client_id: &str, username: Option<&str>, filter: &str) -> bool {
        self.decide_with(
            client_id,
            username,
            |rule| covers(rule, filter),
            |rule| overlaps(rule, filter),
            Access::Read,
        )
    }

    fn decide(
        &self,
        client_id: &str,
        username: Option<&str>,
        access: Access,
        matches: impl Fn(&str) -> bool,
    ) -> bool {
        self.decide_with(client_id, username, &matches, &matches, access)
    }

    /// The evaluation order of the module doc: own rules, then patterns, deny first in each.
    /// `denied(rule)`: a `deny` rule with this filter refuses; `granted(rule)`: a granting rule
    /// with this filter allows.
    fn decide_with(
        &self,
        client_id: &str,
        username: Option<&str>,
        denied: impl Fn(&str) -> bool,
        granted: impl Fn(&str) -> bool,
        access: Access,
    ) -> bool {
        let Some(acl) = &self.acl else {
            return true;
        };
        let own = match username {
            None => acl.anonymous_rules(),
            Some(user) => acl.user_rules(user).unwrap_or(&[]),
        };
        let plain = own.iter().map(|r| (r, Cow::Borrowed(r.filter.as_str())));
        if let Some(decision) = first_decision(plain, &denied, &granted, access) {
            return decision;
        }
        if acl.patterns().is_empty()
            || client_id.contains(['+', '#'])
            || username.is_some_and(|u| u.contains(['+', '#']))
        {
            return false;
        }
        let substituted = acl.patterns().iter().filter_map(|r| {
            substitute(r.filter.as_str(), client_id, username).map(|f| (r, Cow::Owned(f)))
        });
        first_decision(substituted, &denied, &granted, access).unwrap_or(false)
    }
}

/// Deny rules first, then grants; `None` when no rule of the group matches.
fn first_decision<'a>(
    rules: impl Iterator<Item = (&'a AclRule, Cow<'a, str>)> + Clone,
    denied: &impl Fn(&str) -> bool,
    granted: &impl Fn(&str) -> bool,
    access: Access,
) -> Option<bool> {
    if rules
        .clone()
        .any(|(r, f)| r.access == AclAccess::Deny && denied(&f))
    {
        return Some(false);
    }
    let grants = |a: AclAccess| match access {
        Access::Read => a.reads(),
        Access::Write => a.writes(),
    };
    rules
        .into_iter()
        .any(|(r, f)| grants(r.access) && granted(&f))
        .then_some(true)
}

/// `%c` -> client id, `%u` -> username in one pass (a client id holding `%u` stays literal).
/// `None` when the pattern needs a username the client does not have.
fn substitute(pattern: &str, client_id: &str, username: Option<&str>) -> Option<String> {
    let mut out = String::with_capacity(pattern.len() + client_id.len());
    let mut rest = pattern;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('c') {
            out.push_str(client_id);
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('u') {
            out.push_str(username?);
            rest = tail;
        } else {
            out.push('%');
            rest = after;
        }
    }
    out.push_str(rest);
    Some(out)
}

fn is_dollar(level: Option<&str>) -> bool {
    level.is_some_and(|l| l.starts_with('$'))
}

fn is_wild(level: Option<&str>) -> bool {
    matches!(level, Some("+" | "#"))
}

/// Whether some topic name matches both filters (MQTT's `$` rule included).
fn overlaps(a: &str, b: &str) -> bool {
    let (a0, b0) = (a.split('/').next(), b.split('/').next());
    if (is_dollar(a0) && is_wild(b0)) || (is_dollar(b0) && is_wild(a0)) {
        return false;
    }
    let mut a = a.split('/');
    let mut b = b.split('/');
    loop {
        match (a.next(), b.next()) {
            (Some("#"), _) | (_, Some("#")) | (None, None) => return true,
            (Some(x), Some(y)) if x == "+" || y == "+" || x == y => {}
            _ => return false,
        }
    }
}

/// Whether every topic name `inner` matches is also matched by `outer`.
fn covers(outer: &str, inner: &str) -> bool {
    let (o0, i0) = (outer.split('/').next(), inner.split('/').next());
    if is_wild(o0) && is_dollar(i0) {
        return false;
    }
    let mut o = outer.split('/');
    let mut i = inner.split('/');
    loop {
        match (o.next(), i.next()) {
            (Some("#"), _) | (None, None) => return true,
            (Some("+"), Some(x)) if x != "#" => {}
            (Some(x), Some(y)) if x == y && x != "+" && x != "#" => {}
            _ => return false,
        }
    }
}

/// Checks `password` against a stored hash, in constant time for the comparison.
fn verify(hash: &PasswordHash, password: &[u8]) -> bool {
    match hash {
        PasswordHash::Pbkdf2Sha512 {
            iterations,
            salt,
            hash,
        } => ring::pbkdf2::verify(
            ring::pbkdf2::PBKDF2_HMAC_SHA512,
            *iterations,
            salt,
            password,
            hash,
        )
        .is_ok(),
        PasswordHash::Sha512 { salt, hash } => {
            let mut ctx = digest::Context::new(&digest::SHA512);
            ctx.update(password);
            ctx.update(salt);
            bool::from(ctx.finish().as_ref().ct_eq(hash))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use super::*;

    /// `mosquitto_passwd -b FILE alice secret` and `-H sha512 -b FILE carol legacy`, run here.
    const PASSWD: &str = "\
alice:$7$101$OGHa2DYnj9xUSOMu$VTsrTPra1zIlZKNn+f7lTNk6fOXrI2/zkYLtqxOuG7JyQMCZWUHM4zTixl8csq0sqDq0tXHqBBFWnV4v9LjT2w==
carol:$6$0HOvr5dtfqVyFVOB$aTMi2HLLar4hAGiRlFLfCcdCZiC6f2wCQ6vOhCbIrOccSM5ei9o3Ur6qUQY8C0OrDJzuBkRM8JpyWyDkW3Bfew==
";

    fn auth(anonymous: Vec<bool>, acl: Option<&str>) -> Auth {
        Auth::new(
            anonymous,
            Some(PasswordFile::parse(Path::new("p"), PASSWD).unwrap()),
            acl.map(|t| AclFile::parse(Path::new("a"), t).unwrap()),
        )
    }

    #[test]
    fn login_outcomes() {
        let a = auth(vec![true, false], None);
        let ok = |l, u, p| a.login(l, u, p);
        assert_eq!(
            ok(0, Some("alice"), Some("secret")).unwrap().as_deref(),
            Some("alice")
        );
        assert_eq!(
            ok(1, Some("carol"), Some("legacy")).unwrap().as_deref(),
            Some("carol")
        );
        assert_eq!(
            ok(0, Some("alice"), Some("Secret")),
            Err(LoginRefusal::BadCredentials)
        );
        assert_eq!(
            ok(0, Some("alice"), None),
            Err(LoginRefusal::BadCredentials)
        );
        assert_eq!(
            ok(0, Some("mallory"), Some("secret")),
            Err(LoginRefusal::BadCredentials)
        );
        assert_eq!(
            ok(0, Some("carol"), Some("legacyx")),
            Err(LoginRefusal::BadCredentials)
        );
        assert_eq!(ok(0, None, None), Ok(None));
        assert_eq!(ok(0, Some(""), Some("x")), Ok(None));
        assert_eq!(ok(1, None, None), Err(LoginRefusal::NotAuthorized));
        assert_eq!(
            ok(7, None, None),
            Err(LoginRefusal::NotAuthorized),
            "unknown listener: closed"
        );
        // Without a password file a claimed name is not trusted: anonymous.
        let open = Auth::new(vec![true], None, None);
        assert_eq!(open.login(0, Some("alice"), Some("x")), Ok(None));
    }

    #[test]
    fn no_acl_allows_everything() {
        let a = auth(vec![true], None);
        assert!(a.allows("c", None, "any/topic", Access::Write));
        assert!(a.allows_subscribe("c", None, "#"));
    }

    #[test]
    fn acl_semantics_match_mosquitto() {
        let a = auth(
            vec![true],
            Some(
                "\
topic read public/#
user alice
topic readwrite alice/#
topic deny alice/secret/#
topic write shared/in
pattern readwrite devices/%c/#
pattern read users/%u/inbox
pattern deny devices/%c/locked
",
            ),
        );
        let can = |c: &str, u: Option<&str>, t: &str, x| a.allows(c, u, t, x);
        use Access::*;
        // Anonymous: its own rules, then patterns without %u.
        assert!(can("d1", None, "public/x", Read));
        assert!(!can("d1", None, "public/x", Write));
        assert!(can("d1", None, "devices/d1/t", Write));
        assert!(!can("d1", None, "devices/d2/t", Read));
        assert!(
            !can("d1", None, "devices/d1/locked", Write),
            "pattern deny first"
        );
        assert!(
            !can("d1", None, "users//inbox", Read),
            "%u never matches anonymous"
        );
        // alice: user rules; deny wins in the group; patterns after.
        assert!(can("x", Some("alice"), "alice/a", Write));
        assert!(!can("x", Some("alice"), "alice/secret/k", Read));
        assert!(can("x", Some("alice"), "shared/in", Write));
        assert!(!can("x", Some("alice"), "shared/in", Read));
        assert!(
            !can("x", Some("alice"), "public/x", Read),
            "anonymous rules are not alice's"
        );
        assert!(can("x", Some("alice"), "users/alice/inbox", Read));
        assert!(can("x", Some("alice"), "devices/x/1", Read));
        // A user without a section gets patterns only.
        assert!(can("x", Some("carol"), "users/carol/inbox", Read));
        assert!(!can("x", Some("carol"), "alice/a", Read));
        // Wildcards in the client id or username: no pattern access.
        assert!(!can("+", None, "devices/+/x", Read));
        assert!(!can("d#", None, "devices/d#", Write));
        assert!(
            can("x", Some("alice"), "alice/b", Read),
            "own rules still apply"
        );
        // A client id with %u stays literal.
        assert!(can("%u", Some("bob"), "devices/%u/x", Write));
        assert!(!can("%u", Some("bob"), "devices/bob/x", Write));
    }

    #[test]
    fn subscriptions_need_some_readable_topic_and_no_covering_deny() {
        let a = auth(
            vec![true],
            Some(
                "user alice\ntopic readwrite alice/#\ntopic deny alice/secret/#\npattern read devices/%c/#\n",
            ),
        );
        let sub = |u: Option<&str>, f: &str| a.allows_subscribe("d1", u, f);
        assert!(sub(Some("alice"), "alice/x"));
        assert!(
            sub(Some("alice"), "#"),
            "overlaps alice/#; delivery filters the rest"
        );
        assert!(
            sub(Some("alice"), "+/secret/x"),
            "alice/secret/x is denied, other/secret/x not matched, but the filter overlaps alice/#"
        );
        assert!(!sub(Some("alice"), "alice/secret/#"), "covered by the deny");
        assert!(!sub(Some("alice"), "alice/secret/+/y"));
        assert!(!sub(Some("alice"), "bob/#"));
        assert!(sub(None, "devices/d1/#"));
        assert!(sub(None, "devices/+/temp"));
        assert!(!sub(None, "devices/d2/#"));
        assert!(!sub(None, "$SYS/#"));
    }

    #[test]
    fn filter_relations() {
        assert!(overlaps("a/#", "a"));
        assert!(overlaps("+/b", "a/+"));
        assert!(!overlaps("a/b", "a/c"));
        assert!(!overlaps("a/+", "a/b/c"));
        assert!(!overlaps("#", "$SYS/x"));
        assert!(overlaps("$SYS/#", "$SYS/+"));
        assert!(covers("a/#", "a"));
        assert!(covers("a/#", "a/+/c"));
        assert!(covers("+/+", "a/+"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("#", "$SYS/x"));
        assert!(covers("#", "+/x"));
    }

    #[test]
    fn reload_reads_the_files_again() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("passwd");
        let acl = dir.path().join("acl");
        std::fs::write(&pw, PASSWD).unwrap();
        std::fs::write(&acl, "topic read a\n").unwrap();
        let a = Auth::new(
            vec![false],
            Some(PasswordFile::load(&pw).unwrap()),
            Some(AclFile::load(&acl).unwrap()),
        );
        std::fs::write(&acl, "topic read b\n").unwrap();
        let b = a.reloaded().unwrap();
        assert!(!b.allows("c", None, "a", Access::Read) && b.allows("c", None, "b", Access::Read));
        assert!(!b.allows_anonymous(0));
        std::fs::write(&pw, "bad line\n").unwrap();
        assert!(matches!(a.reloaded(), Err(AuthFileError::Invalid { .. })));
    }
}
