//! The text rules of `[coap]` and `[[observe]]`: the ingest path segment and `coap://` URIs.
//!
//! Both end up as CoAP Uri-Path options, sent or matched verbatim, so the rules are strict: no
//! percent-encoding, no empty, `.` or `..` segments, nothing a URI would normalise away.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

/// Default port of `coap://` (RFC 7252 section 6.1).
pub(crate) const COAP_PORT: u16 = 5683;

/// First path segments the CoAP endpoint serves itself (`/.well-known/core`, `/status`).
const RESERVED_SEGMENTS: &[&str] = &[".well-known", "status"];

/// Why an `ingest_path` is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub(crate) enum IngestPathError {
    #[error("must not be empty")]
    Empty,
    #[error(
        "must be one path segment, without '/' (the ingest resource is /<ingest_path>/<topic...>)"
    )]
    Slash,
    #[error("contains {0:?}; only A-Z, a-z, 0-9, '.', '_', '~' and '-' are allowed")]
    InvalidChar(char),
    #[error("{0:?} is a relative path segment, not a name")]
    DotSegment(String),
    #[error("{0:?} is served by the CoAP endpoint itself; choose another name")]
    Reserved(String),
}

/// Checks the ingest resource's path segment.
pub(crate) fn check_ingest_path(path: &str) -> Result<(), IngestPathError> {
    if path.is_empty() {
        return Err(IngestPathError::Empty);
    }
    if path.contains('/') {
        return Err(IngestPathError::Slash);
    }
    if let Some(c) = path
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '~' | '-')))
    {
        return Err(IngestPathError::InvalidChar(c));
    }
    if path == "." || path == ".." {
        return Err(IngestPathError::DotSegment(path.to_owned()));
    }
    if RESERVED_SEGMENTS.contains(&path) {
        return Err(IngestPathError::Reserved(path.to_owned()));
    }
    Ok(())
}

/// Why an `[[observe]]` `uri` is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub(crate) enum CoapUriError {
    #[error("invalid uri {0:?}; expected coap://IP[:port]/path, e.g. \"coap://192.168.1.20/temp\"")]
    NotAUri(String),
    #[error("coaps (DTLS) is not supported; use coap://")]
    Coaps,
    #[error("unsupported scheme {0:?}; expected coap")]
    UnsupportedScheme(String),
    #[error("credentials do not belong in a coap uri")]
    Credentials,
    #[error("uri has no host")]
    MissingHost,
    #[error(
        "host {0:?} is not an IP address; write an IPv4 address or an IPv6 address in brackets (names are not resolved)"
    )]
    NotAnIp(String),
    #[error("invalid port {0:?}; expected 1-65535")]
    InvalidPort(String),
    #[error("uri has no resource path, e.g. \"coap://192.168.1.20/temp\"")]
    MissingPath,
    #[error("a query or fragment is not supported: {0:?}")]
    QueryOrFragment(String),
    #[error("path has an empty segment ('//' or a trailing '/')")]
    EmptySegment,
    #[error("path segment {0:?} is relative; write the resolved path")]
    DotSegment(String),
    #[error(
        "path must not contain {0:?}; percent-encoding and characters that need it are not supported"
    )]
    InvalidPathChar(char),
}

/// A parsed `coap://` URI: the device's address and the resource path (with its leading `/`).
pub(crate) fn parse_coap_uri(uri: &str) -> Result<(SocketAddr, String), CoapUriError> {
    let (scheme, rest) = uri
        .split_once("://")
        .ok_or_else(|| CoapUriError::NotAUri(uri.to_owned()))?;
    match scheme.to_ascii_lowercase().as_str() {
        "coap" => {}
        "coaps" => return Err(CoapUriError::Coaps),
        _ => return Err(CoapUriError::UnsupportedScheme(scheme.to_owned())),
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    if authority.contains('@') {
        return Err(CoapUriError::Credentials);
    }
    let target = authority_addr(authority)?;
    if let Some(i) = tail.find(['?', '#']) {
        return Err(CoapUriError::QueryOrFragment(tail[i..].to_owned()));
    }
    if tail.len() <= 1 {
        return Err(CoapUriError::MissingPath);
    }
    for segment in tail[1..].split('/') {
        if segment.is_empty() {
            return Err(CoapUriError::EmptySegment);
        }
        if segment == "." || segment == ".." {
            return Err(CoapUriError::DotSegment(segment.to_owned()));
        }
        // RFC 3986 pchar without pct-encoded: unreserved, sub-delims, ':' and '@'.
        let pchar = |c: char| c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@".contains(c);
        if let Some(c) = segment.chars().find(|c| !pchar(*c)) {
            return Err(CoapUriError::InvalidPathChar(c));
        }
    }
    Ok((target, tail.to_owned()))
}

/// `IPv4[:port]` or `[IPv6][:port]`; the port defaults to 5683.
fn authority_addr(authority: &str) -> Result<SocketAddr, CoapUriError> {
    let not_ip = |host: &str| CoapUriError::NotAnIp(host.to_owned());
    let (ip, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']').ok_or_else(|| not_ip(authority))?;
        let ip = host.parse::<Ipv6Addr>().map_err(|_| not_ip(host))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| not_ip(authority))?),
        };
        (IpAddr::V6(ip), port)
    } else {
        // A ':' in the host would be an unbracketed IPv6 address, ambiguous with the port.
        let (host, port) = match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        };
        if port.is_some_and(|p| p.contains(':')) {
            return Err(not_ip(authority));
        }
        if host.is_empty() {
            return Err(CoapUriError::MissingHost);
        }
        let ip = host.parse::<Ipv4Addr>().map_err(|_| not_ip(host))?;
        (IpAddr::V4(ip), port)
    };
    let port = match port {
        None => COAP_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n != 0 && !p.starts_with('+') => n,
            _ => return Err(CoapUriError::InvalidPort(p.to_owned())),
        },
    };
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ingest_path_rules() {
        for ok in ["t", "ingest", "a.b_c~d-1", "Status", ".well-known2", "..."] {
            assert_eq!(check_ingest_path(ok), Ok(()), "{ok}");
        }
        use IngestPathError::*;
        for (bad, err) in [
            ("", Empty),
            ("/t", Slash),
            ("t/", Slash),
            ("a/b", Slash),
            ("a b", InvalidChar(' ')),
            ("a%20", InvalidChar('%')),
            ("é", InvalidChar('é')),
            (".", DotSegment(".".into())),
            ("..", DotSegment("..".into())),
            (".well-known", Reserved(".well-known".into())),
            ("status", Reserved("status".into())),
        ] {
            assert_eq!(check_ingest_path(bad), Err(err), "{bad:?}");
        }
    }

    #[test]
    fn coap_uris() {
        let ok = |uri: &str| parse_coap_uri(uri).unwrap();
        assert_eq!(
            ok("coap://192.168.1.20:5683/temp"),
            ("192.168.1.20:5683".parse().unwrap(), "/temp".to_owned())
        );
        assert_eq!(ok("coap://10.0.0.1/a/b").0.port(), 5683);
        assert_eq!(ok("COAP://10.0.0.1/a/b").1, "/a/b");
        assert_eq!(
            ok("coap://[fe80::1]:6000/s/t"),
            ("[fe80::1]:6000".parse().unwrap(), "/s/t".to_owned())
        );
        assert_eq!(ok("coap://[::1]/x").0, "[::1]:5683".parse().unwrap());
        assert_eq!(ok("coap://10.0.0.1/a:b@c;v=1").1, "/a:b@c;v=1");

        use CoapUriError::*;
        for (bad, err) in [
            ("10.0.0.1/temp", NotAUri("10.0.0.1/temp".into())),
            ("coaps://10.0.0.1/temp", Coaps),
            ("http://10.0.0.1/temp", UnsupportedScheme("http".into())),
            ("coap://u@10.0.0.1/temp", Credentials),
            ("coap:///temp", MissingHost),
            ("coap://:5683/temp", MissingHost),
            ("coap://sensor.local/temp", NotAnIp("sensor.local".into())),
            ("coap://::1/temp", NotAnIp("::1".into())),
            ("coap://[::1/temp", NotAnIp("[::1".into())),
            ("coap://[zz]/temp", NotAnIp("zz".into())),
            ("coap://[::1]x/temp", NotAnIp("[::1]x".into())),
            ("coap://10.0.0.256/temp", NotAnIp("10.0.0.256".into())),
            ("coap://10.0.0.1:0/temp", InvalidPort("0".into())),
            ("coap://10.0.0.1:65536/temp", InvalidPort("65536".into())),
            ("coap://10.0.0.1:/temp", InvalidPort("".into())),
            ("coap://10.0.0.1:+1/temp", InvalidPort("+1".into())),
            ("coap://10.0.0.1", MissingPath),
            ("coap://10.0.0.1/", MissingPath),
            ("coap://10.0.0.1/temp?x=1", QueryOrFragment("?x=1".into())),
            ("coap://10.0.0.1?x=1", QueryOrFragment("?x=1".into())),
            ("coap://10.0.0.1/temp#f", QueryOrFragment("#f".into())),
            ("coap://10.0.0.1/a//b", EmptySegment),
            ("coap://10.0.0.1/temp/", EmptySegment),
            ("coap://10.0.0.1/a/../b", DotSegment("..".into())),
            ("coap://10.0.0.1/./b", DotSegment(".".into())),
            ("coap://10.0.0.1/a%20b", InvalidPathChar('%')),
            ("coap://10.0.0.1/a b", InvalidPathChar(' ')),
            ("coap://10.0.0.1/tëmp", InvalidPathChar('ë')),
        ] {
            assert_eq!(parse_coap_uri(bad), Err(err), "{bad:?}");
        }
    }
}
