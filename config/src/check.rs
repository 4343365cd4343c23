//! Validated newtypes of the `[[check]]` entries: [`CheckName`], [`HttpUrl`] and [`HostPort`].
//!
//! Like the rest of `types`, each can only be built through its validating constructor, so the
//! health checker never re-parses a url or an address and never meets one it cannot use.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

// ---------------------------------------------------------------------------------------------
// CheckName

/// A health check's name: 1 to 64 characters of `[A-Za-z0-9_-]`, unique among the checks.
///
/// It is a metric label value, a JSON key in the status and a part of the upstream change
/// messages, hence the same plain alphabet as the node name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CheckName(String);

/// Why a string is not a [`CheckName`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CheckNameError {
    /// The name is the empty string.
    #[error("check name must not be empty")]
    Empty,
    /// The name has more than [`CheckName::MAX_LEN`] characters.
    #[error("check name is {0} characters; at most 64 allowed")]
    TooLong(usize),
    /// The name contains a character outside `[A-Za-z0-9_-]`.
    #[error("check name contains {0:?}; only A-Z, a-z, 0-9, '_' and '-' are allowed")]
    InvalidChar(char),
}

impl CheckName {
    /// Longest accepted name, in characters (all accepted characters are one byte).
    pub const MAX_LEN: usize = 64;

    /// Validates `name`.
    pub fn new(name: impl Into<String>) -> Result<Self, CheckNameError> {
        use crate::types::{IdentifierProblem, identifier_problem};
        let name = name.into();
        match identifier_problem(&name, Self::MAX_LEN) {
            None => Ok(Self(name)),
            Some(IdentifierProblem::Empty) => Err(CheckNameError::Empty),
            Some(IdentifierProblem::InvalidChar(c)) => Err(CheckNameError::InvalidChar(c)),
            Some(IdentifierProblem::TooLong(n)) => Err(CheckNameError::TooLong(n)),
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for CheckName {
    type Err = CheckNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for CheckName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for CheckName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

// ---------------------------------------------------------------------------------------------
// Host and port, shared by HttpUrl and HostPort

/// Why an authority (`host[:port]`) is not usable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AuthorityError {
    /// Nothing where the host should be.
    #[error("no host")]
    MissingHost,
    /// The host holds characters no host name or IP address can.
    #[error("invalid host {0:?}")]
    InvalidHost(String),
    /// The port is not a number in 1..=65535.
    #[error("invalid port {0:?}; expected 1-65535")]
    InvalidPort(String),
    /// `host` without `:port` where a port is required.
    #[error("no port in {0:?}; expected host:port, e.g. \"127.0.0.1:502\" or \"[::1]:502\"")]
    MissingPort(String),
}

/// Splits `host[:port]` (IPv6 in brackets) and checks both parts. The host is returned without
/// brackets; `default_port` `None` makes the port required.
pub(crate) fn host_port(
    authority: &str,
    default_port: Option<u16>,
) -> Result<(String, u16), AuthorityError> {
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or_else(|| AuthorityError::InvalidHost(authority.to_owned()))?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(AuthorityError::InvalidHost(host.to_owned()));
        }
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| AuthorityError::InvalidHost(authority.to_owned()))?,
            ),
        };
        (host, port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(AuthorityError::MissingHost);
    }
    // Unbracketed hosts are DNS names or IPv4 addresses; a ':' there would be an unbracketed
    // IPv6 address, ambiguous with the port.
    let bad_host_char = |c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if !authority.starts_with('[') && host.chars().any(bad_host_char) {
        return Err(AuthorityError::InvalidHost(host.to_owned()));
    }
    let port = match (port, default_port) {
        (None, Some(default)) => default,
        (None, None) => return Err(AuthorityError::MissingPort(authority.to_owned())),
        (Some(p), _) => match p.parse::<u16>() {
            Ok(n) if n != 0 && !p.starts_with('+') => n,
            _ => return Err(AuthorityError::InvalidPort(p.to_owned())),
        },
    };
    Ok((host.to_owned(), port))
}

/// `host:port`, with brackets around an IPv6 host.
fn write_host_port(f: &mut fmt::Formatter<'_>, host: &str, port: u16) -> fmt::Result {
    if host.contains(':') {
        write!(f, "[{host}]:{port}")
    } else {
        write!(f, "{host}:{port}")
    }
}

// ---------------------------------------------------------------------------------------------
// HostPort

/// What a TCP check connects to: `host:port`, the host a DNS name, an IPv4 address or a bracketed
/// IPv6 address. The name is resolved at each run, so a service that moves is followed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// Host name or IP address, without brackets for IPv6. `(host.as_str(), port)` is what
    /// `ToSocketAddrs` and `TcpStream::connect` take.
    pub host: String,
    /// TCP port, 1..=65535.
    pub port: u16,
}

impl HostPort {
    /// Parses `host:port`; the port is required.
    pub fn parse(text: &str) -> Result<Self, AuthorityError> {
        let (host, port) = host_port(text.trim(), None)?;
        Ok(Self { host, port })
    }
}

impl FromStr for HostPort {
    type Err = AuthorityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_host_port(f, &self.host, self.port)
    }
}

// ---------------------------------------------------------------------------------------------
// HttpUrl

/// What an HTTP check GETs: `http://host[:port][/path][?query]` (port 80 by default).
///
/// Plain `http` only: the services checked live on the board or its LAN, and a TLS stack for
/// checks alone would cost more than it protects there; `https://` is refused with that reason.
/// The path and query are restricted to the characters a URI may hold unescaped (plus `%XX`
/// escapes), so any HTTP client accepts them as a request target.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HttpUrl {
    /// Host name or IP address, without brackets for IPv6.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// The request target: starts with `/`; `/` when the url has no path.
    pub path_and_query: String,
}

/// Why a string is not an [`HttpUrl`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HttpUrlError {
    /// No `scheme://` at the start.
    #[error("invalid url {0:?}; expected http://host[:port][/path]")]
    NotAUrl(String),
    /// `https://`.
    #[error(
        "https is not supported by health checks (they use plain http to services on the board or its LAN); use http:// or a tcp check of the TLS port"
    )]
    Https,
    /// A scheme other than `http`.
    #[error("unsupported scheme {0:?}; expected http")]
    UnsupportedScheme(String),
    /// `user:password@` in the url.
    #[error("credentials do not belong in the url; send them in `headers` (e.g. Authorization)")]
    Credentials,
    /// `#fragment`: never sent to a server, so it cannot mean anything to a check.
    #[error("url must not have a #fragment (it is never sent to the server)")]
    Fragment,
    /// The host or port is wrong.
    #[error("{0}")]
    Authority(#[from] AuthorityError),
    /// The path or query holds a character that must be percent-encoded.
    #[error("character {0:?} in the path or query must be percent-encoded")]
    InvalidPathChar(char),
    /// `%` not followed by two hex digits.
    #[error("'%' in the path or query must be followed by two hex digits")]
    InvalidEscape,
}

impl HttpUrl {
    /// Default port of `http://`.
    pub const HTTP_PORT: u16 = 80;

    /// Parses `url`.
    pub fn parse(url: &str) -> Result<Self, HttpUrlError> {
        let url = url.trim();
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| HttpUrlError::NotAUrl(url.to_owned()))?;
        match scheme.to_ascii_lowercase().as_str() {
            "http" => {}
            "https" => return Err(HttpUrlError::Https),
            _ => return Err(HttpUrlError::UnsupportedScheme(scheme.to_owned())),
        }
        let split = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, target) = rest.split_at(split);
        if authority.contains('@') {
            return Err(HttpUrlError::Credentials);
        }
        if target.contains('#') {
            return Err(HttpUrlError::Fragment);
        }
        let (host, port) = host_port(authority, Some(Self::HTTP_PORT))?;
        let path_and_query = match target {
            "" => String::from("/"),
            t if t.starts_with('?') => format!("/{t}"),
            t => t.to_owned(),
        };
        check_target(&path_and_query)?;
        Ok(Self {
            host,
            port,
            path_and_query,
        })
    }

    /// The `Host` header value: `host:port` (brackets around IPv6).
    pub fn authority(&self) -> String {
        HostPort {
            host: self.host.clone(),
            port: self.port,
        }
        .to_string()
    }
}

/// RFC 3986 `pchar`s plus `/` and `?`: unreserved, sub-delims, `:`, `@`, and `%XX` escapes.
fn check_target(target: &str) -> Result<(), HttpUrlError> {
    let bytes = target.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = |j: usize| bytes.get(j).is_some_and(u8::is_ascii_hexdigit);
            if !(hex(i + 1) && hex(i + 2)) {
                return Err(HttpUrlError::InvalidEscape);
            }
            i += 3;
            continue;
        }
        let allowed = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?".contains(&b);
        if !allowed {
            let c = target[i..]
                .chars()
                .next()
                .unwrap_or(char::REPLACEMENT_CHARACTER);
            return Err(HttpUrlError::InvalidPathChar(c));
        }
        i += 1;
    }
    Ok(())
}

impl FromStr for HttpUrl {
    type Err = HttpUrlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// The canonical url, always with its port: `http://127.0.0.1:8080/health`.
impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("http://")?;
        write_host_port(f, &self.host, self.port)?;
        f.write_str(&self.path_and_query)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn check_name_rules() {
        assert!(CheckName::new("plc_1-http").is_ok());
        assert!(CheckName::new("a".repeat(64)).is_ok());
        assert_eq!(CheckName::new(""), Err(CheckNameError::Empty));
        assert_eq!(
            CheckName::new("a".repeat(65)),
            Err(CheckNameError::TooLong(65))
        );
        assert_eq!(CheckName::new("a b"), Err(CheckNameError::InvalidChar(' ')));
    }

    #[test]
    fn host_port_rules() {
        let hp = HostPort::parse("plc.local:502").unwrap();
        assert_eq!((hp.host.as_str(), hp.port), ("plc.local", 502));
        let v6 = HostPort::parse("[::1]:80").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 80));
        assert_eq!(v6.to_string(), "[::1]:80");
        assert_eq!(
            HostPort::parse("10.0.0.1:1").unwrap().to_string(),
            "10.0.0.1:1"
        );
        assert!(matches!(
            HostPort::parse("plc"),
            Err(AuthorityError::MissingPort(_))
        ));
        assert!(matches!(
            HostPort::parse("[::1]"),
            Err(AuthorityError::MissingPort(_))
        ));
        assert_eq!(HostPort::parse(":502"), Err(AuthorityError::MissingHost));
        for bad in ["h:0", "h:65536", "h:", "h:x", "h:+1"] {
            assert!(
                matches!(HostPort::parse(bad), Err(AuthorityError::InvalidPort(_))),
                "{bad}"
            );
        }
        for bad in ["::1:80", "a b:1", "[zz]:1", "[::1]x"] {
            assert!(
                matches!(HostPort::parse(bad), Err(AuthorityError::InvalidHost(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn http_url_rules() {
        let u = HttpUrl::parse("http://127.0.0.1:8080/health?full=1").unwrap();
        assert_eq!(
            u,
            HttpUrl {
                host: "127.0.0.1".into(),
                port: 8080,
                path_and_query: "/health?full=1".into()
            }
        );
        assert_eq!(u.to_string(), "http://127.0.0.1:8080/health?full=1");
        assert_eq!(u.authority(), "127.0.0.1:8080");
        let d = HttpUrl::parse("HTTP://plc").unwrap();
        assert_eq!((d.port, d.path_and_query.as_str()), (80, "/"));
        assert_eq!(d.to_string(), "http://plc:80/");
        assert_eq!(
            HttpUrl::parse("http://[::1]:81?x").unwrap().to_string(),
            "http://[::1]:81/?x"
        );
        assert_eq!(
            HttpUrl::parse("http://h/a%20b").unwrap().path_and_query,
            "/a%20b"
        );
        assert_eq!(HttpUrl::parse("https://h"), Err(HttpUrlError::Https));
        assert!(
            HttpUrl::parse("https://h")
                .unwrap_err()
                .to_string()
                .contains("https is not supported")
        );
        assert!(matches!(
            HttpUrl::parse("ftp://h"),
            Err(HttpUrlError::UnsupportedScheme(_))
        ));
        assert!(matches!(
            HttpUrl::parse("127.0.0.1:80"),
            Err(HttpUrlError::NotAUrl(_))
        ));
        assert_eq!(
            HttpUrl::parse("http://u:p@h/"),
            Err(HttpUrlError::Credentials)
        );
        assert_eq!(HttpUrl::parse("http://h/#x"), Err(HttpUrlError::Fragment));
        assert_eq!(
            HttpUrl::parse("http:///x"),
            Err(HttpUrlError::Authority(AuthorityError::MissingHost))
        );
        assert!(matches!(
            HttpUrl::parse("http://h:99999/"),
            Err(HttpUrlError::Authority(AuthorityError::InvalidPort(_)))
        ));
        assert_eq!(
            HttpUrl::parse("http://h/a b"),
            Err(HttpUrlError::InvalidPathChar(' '))
        );
        assert_eq!(
            HttpUrl::parse("http://h/é"),
            Err(HttpUrlError::InvalidPathChar('é'))
        );
        assert_eq!(
            HttpUrl::parse("http://h/%2"),
            Err(HttpUrlError::InvalidEscape)
        );
        assert_eq!(
            HttpUrl::parse("http://h/%zz"),
            Err(HttpUrlError::InvalidEscape)
        );
    }
}
