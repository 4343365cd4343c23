//! TLS listeners: the rustls server configuration of each (ring provider, built explicitly so
//! no process-wide default is needed), swapped whole on reload, and the username a verified
//! client certificate stands for.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use outpost_config::{TlsListenerConfig, TlsMaterial};
use rustls::ServerConfig;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

use super::BrokerError;

/// One TLS listener's settings and the server configuration new connections get.
#[derive(Debug)]
pub(crate) struct TlsListener {
    addr: SocketAddr,
    config: TlsListenerConfig,
    /// Replaced whole by a reload; each accept takes the one in force then.
    current: RwLock<Arc<ServerConfig>>,
}

impl TlsListener {
    /// Reads the files and builds the server configuration.
    pub(crate) fn new(addr: SocketAddr, config: TlsListenerConfig) -> Result<Self, BrokerError> {
        let server = build(addr, &config)?;
        Ok(Self {
            addr,
            config,
            current: RwLock::new(server),
        })
    }

    /// An acceptor with the configuration in force now.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }

    /// Reads the files again and builds a new configuration (not yet in force).
    pub(crate) fn reload(&self) -> Result<Arc<ServerConfig>, BrokerError> {
        build(self.addr, &self.config)
    }

    /// Puts a configuration from [`Self::reload`] in force for new connections.
    pub(crate) fn replace(&self, server: Arc<ServerConfig>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = server;
    }

    /// Whether a client without a certificate is refused during the handshake.
    pub(crate) fn requires_client_cert(&self) -> bool {
        self.config.require_client_cert
    }
}

fn build(addr: SocketAddr, config: &TlsListenerConfig) -> Result<Arc<ServerConfig>, BrokerError> {
    let material = config
        .load()
        .map_err(|source| BrokerError::Tls { addr, source })?;
    server_config(material, config.require_client_cert).map_err(|e| BrokerError::TlsSetup {
        addr,
        reason: e.to_string(),
    })
}

/// A rustls server configuration from checked files, with the ring provider.
fn server_config(
    material: TlsMaterial,
    require_client_cert: bool,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match material.client_roots {
        None => builder.with_no_client_auth(),
        Some(roots) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider);
            let verifier = if require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier
                .build()
                .map_err(|e| rustls::Error::General(format!("client certificate verifier: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    Ok(Arc::new(
        builder.with_single_cert(material.cert_chain, material.key)?,
    ))
}

/// What a TLS client proved about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PeerCert {
    /// No certificate (a plain listener, no client CA, or the client sent none).
    None,
    /// A verified certificate naming this identity: the client's username.
    Named(String),
    /// A verified certificate with no usable CN or DNS/email SAN.
    Unnamed,
}

impl PeerCert {
    /// From the chain rustls verified (the client's own certificate first).
    pub(crate) fn from_chain(chain: Option<&[CertificateDer<'_>]>) -> Self {
        match chain.and_then(|c| c.first()) {
            None => Self::None,
            Some(cert) => cert_identity(cert).map_or(Self::Unnamed, Self::Named),
        }
    }
}

/// The subject's first common name, or else the first DNS or email subject alternative name,
/// of a DER certificate. `None` when it has neither (or is not DER a verifier accepted).
pub(crate) fn cert_identity(cert: &[u8]) -> Option<String> {
    let (tag, certificate) = Der(cert).next()?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs) = Der(certificate).next()?;
    if tag != SEQUENCE {
        return None;
    }
    let mut fields = Der(tbs);
    let mut field = fields.next()?;
    if field.0 == VERSION {
        field = fields.next()?;
    }
    // serial, signature algorithm, issuer, validity, subject
    for _ in 0..4 {
        field = fields.next()?;
    }
    let (tag, subject) = field;
    if tag != SEQUENCE {
        return None;
    }
    if let Some(cn) = common_name(subject) {
        return Some(cn);
    }
    while let Some((tag, body)) = fields.next() {
        if tag == EXTENSIONS {
            return san(body);
        }
    }
    None
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const OCTET_STRING: u8 = 0x04;
const VERSION: u8 = 0xA0;
const EXTENSIONS: u8 = 0xA3;
/// 2.5.4.3
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
/// 2.5.29.17
const OID_SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1D, 0x11];
/// GeneralName `[1] rfc822Name` and `[2] dNSName` (IMPLICIT IA5String).
const SAN_EMAIL: u8 = 0x81;
const SAN_DNS: u8 = 0x82;

fn common_name(name: &[u8]) -> Option<String> {
    let mut rdns = Der(name);
    while let Some((tag, rdn)) = rdns.next() {
        if tag != SET {
            return None;
        }
        let mut attributes = Der(rdn);
        while let Some((tag, attribute)) = attributes.next() {
            if tag != SEQUENCE {
                return None;
            }
            let mut parts = Der(attribute);
            let (tag, oid) = parts.next()?;
            if tag == OID && oid == OID_COMMON_NAME {
                let (tag, value) = parts.next()?;
                return directory_string(tag, value).filter(|s| !s.is_empty());
            }
        }
    }
    None
}

fn san(extensions: &[u8]) -> Option<String> {
    let (tag, list) = Der(extensions).next()?;
    if tag != SEQUENCE {
        return None;
    }
    let mut list = Der(list);
    while let Some((tag, extension)) = list.next() {
        if tag != SEQUENCE {
            return None;
        }
        let mut parts = Der(extension);
        let (tag, oid) = parts.next()?;
        if tag != OID || oid != OID_SUBJECT_ALT_NAME {
            continue;
        }
        // An optional `critical` BOOLEAN, then the OCTET STRING.
        let mut value = parts.next()?;
        if value.0 != OCTET_STRING {
            value = parts.next()?;
        }
        let (tag, names) = Der(value.1).next()?;
        if value.0 != OCTET_STRING || tag != SEQUENCE {
            return None;
        }
        let mut names = Der(names);
        while let Some((tag, name)) = names.next() {
            if matches!(tag, SAN_EMAIL | SAN_DNS)
                && let Ok(s) = std::str::from_utf8(name)
                && !s.is_empty()
            {
                return Some(s.to_owned());
            }
        }
        return None;
    }
    None
}

/// The X.520 string types a name uses in practice.
fn directory_string(tag: u8, value: &[u8]) -> Option<String> {
    match tag {
        // UTF8String, PrintableString, IA5String
        0x0C | 0x13 | 0x16 => std::str::from_utf8(value).ok().map(str::to_owned),
        // TeletexString: taken as Latin-1, as most software does.
        0x14 => Some(value.iter().map(|&b| char::from(b)).collect()),
        // BMPString: UTF-16BE.
        0x1E if value.len().is_multiple_of(2) => {
            let units = value
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]));
            char::decode_utf16(units)
                .collect::<Result<String, _>>()
                .ok()
        }
        _ => None,
    }
}

/// A reader of DER TLVs (definite lengths, low tag numbers: what certificates use).
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    /// The next tag and contents; `None` at the end or on malformed input.
    fn next(&mut self) -> Option<(u8, &'a [u8])> {
        let (&tag, rest) = self.0.split_first()?;
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7F);
            if n == 0 || n > 4 {
                return None;
            }
            let (bytes, after) = rest.split_at_checked(n)?;
            rest = after;
            bytes
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
        };
        let (body, after) = rest.split_at_checked(len)?;
        self.0 = after;
        Some((tag, body))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    use super::*;

    fn cert(cn: Option<&str>, sans: Vec<SanType>) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Outpost");
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.subject_alt_names = sans;
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn common_name_first_then_first_dns_or_email_san() {
        let dns = || SanType::DnsName("dev.example".try_into().unwrap());
        let email = || SanType::Rfc822Name("d7@example.com".try_into().unwrap());
        let ip = || SanType::IpAddress([10, 0, 0, 7].into());
        assert_eq!(
            cert_identity(&cert(Some("device-7"), vec![dns()])).as_deref(),
            Some("device-7")
        );
        assert_eq!(
            cert_identity(&cert(None, vec![ip(), dns(), email()])).as_deref(),
            Some("dev.example")
        );
        assert_eq!(
            cert_identity(&cert(None, vec![ip(), email(), dns()])).as_deref(),
            Some("d7@example.com")
        );
        assert_eq!(
            cert_identity(&cert(Some("名前"), vec![])).as_deref(),
            Some("名前")
        );
        assert_eq!(cert_identity(&cert(None, vec![ip()])), None);
        assert_eq!(cert_identity(&cert(None, vec![])), None);
    }

    #[test]
    fn truncated_or_garbage_input_is_none_not_a_panic() {
        let der = cert(Some("device-7"), vec![]);
        for len in 0..der.len() {
            let _ = cert_identity(&der[..len]);
        }
        let mut flipped = der.clone();
        for i in 0..flipped.len() {
            flipped[i] ^= 0xFF;
            let _ = cert_identity(&flipped);
            flipped[i] ^= 0xFF;
        }
        assert_eq!(cert_identity(&[0x30, 0x84, 0xFF, 0xFF, 0xFF, 0xFF]), None);
    }
}
