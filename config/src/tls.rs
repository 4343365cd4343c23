//! The certificate and key files of a TLS listener (`[[broker.listener]] tls = {..}`).
//!
//! The files are read and checked when the configuration is loaded, and read again by the
//! broker when it binds and on every reload (SIGHUP): [`TlsListenerConfig::load`] is the one
//! loader both use, so a file the configuration accepted is one the broker can serve.
//!
//! Checked: `cert_file` holds at least one PEM `CERTIFICATE` (the server's first, then its
//! chain); `key_file` holds a PEM private key (PKCS#8 `PRIVATE KEY`, PKCS#1 `RSA PRIVATE KEY` or
//! SEC1 `EC PRIVATE KEY`) of a type rustls (ring) can sign with, and it is the key of the first
//! certificate; `client_ca_file`, when set, holds at least one PEM certificate, each a valid
//! trust anchor. Errors name the file and never quote its contents: the key file's bytes appear
//! in no message.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use thiserror::Error;

/// One listener's TLS settings, as configured: paths, checked at load to exist and parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsListenerConfig {
    /// PEM certificate chain presented to clients: the server certificate first.
    pub cert_file: PathBuf,
    /// PEM private key of the first certificate in `cert_file`. Never printed.
    pub key_file: PathBuf,
    /// PEM CA certificates that client certificates are verified against. `None`: clients are
    /// not asked for a certificate. With it, a client that presents a certificate it verifies
    /// is logged in as the certificate's subject CN (or its first DNS or email SAN when it has
    /// no CN), with no password.
    pub client_ca_file: Option<PathBuf>,
    /// Refuse, at the TLS handshake, clients that present no certificate. Needs
    /// `client_ca_file`. Default false.
    pub require_client_cert: bool,
}

/// The parsed contents of a listener's TLS files, ready for a rustls `ServerConfig`.
#[derive(Debug)]
pub struct TlsMaterial {
    /// `cert_file`'s certificates, in file order (the server's first).
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// `key_file`'s key (its `Debug` does not show the key bytes).
    pub key: PrivateKeyDer<'static>,
    /// `client_ca_file`'s certificates as trust anchors; `None` without a client CA file.
    pub client_roots: Option<Arc<RootCertStore>>,
}

/// Which of a listener's TLS files a [`TlsFileError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFileKey {
    /// `cert_file`.
    CertFile,
    /// `key_file`.
    KeyFile,
    /// `client_ca_file`.
    ClientCaFile,
}

impl TlsFileKey {
    /// The key's name in the configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CertFile => "cert_file",
            Self::KeyFile => "key_file",
            Self::ClientCaFile => "client_ca_file",
        }
    }
}

/// Why a listener's TLS files could not be loaded. Never quotes a key file's contents.
#[derive(Debug, Error)]
pub enum TlsFileError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// Which setting names the file.
        key: TlsFileKey,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file was read, and is not what the setting needs (or, for `key_file`, is not the
    /// key of the certificate).
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// Which setting names the file.
        key: TlsFileKey,
        /// The file.
        path: PathBuf,
        /// What is wrong; no file contents.
        reason: String,
    },
}

impl TlsFileError {
    /// Which setting the error is about (`cert_file`, `key_file`, `client_ca_file`).
    pub fn key(&self) -> TlsFileKey {
        match self {
            Self::Read { key, .. } | Self::Invalid { key, .. } => *key,
        }
    }
}

impl TlsListenerConfig {
    /// Reads and checks the files (see the module doc). Used at load and on every reload.
    /// On error, the first problem found (cert_file, key_file, then client_ca_file).
    pub fn load(&self) -> Result<TlsMaterial, TlsFileError> {
        self.load_all().map_err(|mut errors| errors.swap_remove(0))
    }

    /// As [`Self::load`], with every problem (each file is checked on its own; whether the
    /// key matches only when both files are readable). The error list is never empty.
    pub(crate) fn load_all(&self) -> Result<TlsMaterial, Vec<TlsFileError>> {
        let mut errors = Vec::new();
        let certs = load_certs(TlsFileKey::CertFile, &self.cert_file).map_err(|e| errors.push(e));
        let key = load_key(&self.key_file).map_err(|e| errors.push(e));
        if let (Ok(certs), Ok(key)) = (&certs, &key)
            && let Err(e) = check_key_matches(certs, &self.cert_file, key, &self.key_file)
        {
            errors.push(e);
        }
        let client_roots = match &self.client_ca_file {
            None => Ok(None),
            Some(path) => load_roots(path).map(Some).map_err(|e| errors.push(e)),
        };
        match (certs, key, client_roots) {
            (Ok(cert_chain), Ok(key), Ok(client_roots)) if errors.is_empty() => Ok(TlsMaterial {
                cert_chain,
                key,
                client_roots,
            }),
            _ => Err(errors),
        }
    }
}

fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsFileError> {
    let certs = load_certs(TlsFileKey::ClientCaFile, path)?;
    let mut roots = RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        roots.add(cert).map_err(|e| TlsFileError::Invalid {
            key: TlsFileKey::ClientCaFile,
            path: path.to_owned(),
            reason: format!("certificate {} is not a usable CA certificate: {e}", i + 1),
        })?;
    }
    Ok(Arc::new(roots))
}

fn read(key: TlsFileKey, path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|source| TlsFileError::Read {
        key,
        path: path.to_owned(),
        source,
    })
}

fn load_certs(key: TlsFileKey, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let bytes = read(key, path)?;
    let invalid = |reason: String| TlsFileError::Invalid {
        key,
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(|e| invalid(format!("not a valid PEM file: {}", pem_problem(&e))))?;
    if certs.is_empty() {
        return Err(invalid(
            "no PEM certificate (-----BEGIN CERTIFICATE-----) in it".to_owned(),
        ));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsFileError> {
    let bytes = read(TlsFileKey::KeyFile, path)?;
    let invalid = |reason: &str| TlsFileError::Invalid {
        key: TlsFileKey::KeyFile,
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(key) => Ok(key),
        Err(pem::Error::NoItemsFound) => Err(invalid(
            "no PEM private key in it (PKCS#8 \"PRIVATE KEY\", PKCS#1 \"RSA PRIVATE KEY\" or \
             SEC1 \"EC PRIVATE KEY\")",
        )),
        // The parser's messages may quote a line of the file: not for a key file.
        Err(_) => Err(invalid("not a valid PEM private key file")),
    }
}

/// The key can sign (a type ring supports) and belongs to the first certificate.
fn check_key_matches(
    chain: &[CertificateDer<'static>],
    cert_path: &Path,
    key: &PrivateKeyDer<'static>,
    key_path: &Path,
) -> Result<(), TlsFileError> {
    let invalid = |reason: String| TlsFileError::Invalid {
        key: TlsFileKey::KeyFile,
        path: key_path.to_owned(),
        reason,
    };
    let signing = rustls::crypto::ring::sign::any_supported_type(key).map_err(|_| {
        invalid(
            "the private key cannot be used (not an RSA, ECDSA P-256/P-384 or Ed25519 key rustls \
             supports, or malformed)"
                .to_owned(),
        )
    })?;
    match CertifiedKey::new(chain.to_vec(), signing).keys_match() {
        Ok(()) => Ok(()),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => Err(
            invalid("the private key does not match the first certificate in cert_file".to_owned()),
        ),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(()),
        Err(e) => Err(TlsFileError::Invalid {
            key: TlsFileKey::CertFile,
            path: cert_path.to_owned(),
            reason: format!("the first certificate cannot be parsed: {e}"),
        }),
    }
}

/// A PEM error's gist, without the bytes some variants carry.
fn pem_problem(e: &pem::Error) -> &'static str {
    match e {
        pem::Error::MissingSectionEnd { .. } => "a section has no END line",
        pem::Error::IllegalSectionStart { .. } => "a BEGIN line is malformed",
        pem::Error::Base64Decode(_) => "a section is not valid base64",
        pem::Error::NoItemsFound => "no PEM section",
        pem::Error::SectionTooLarge => "a section is too large",
        _ => "unreadable PEM",
    }
}
