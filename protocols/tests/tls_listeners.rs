//! TLS listeners against third-party clients: rumqttc over rustls (ring), a raw tokio-rustls
//! client to look at the served certificate, and mosquitto_pub (OpenSSL). The CA, server and
//! client certificates are made at test time with rcgen; the broker is set up through the TOML
//! keys, as the gateway does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{WAIT, settings};
use outpost_config::{Config, Overrides};
use outpost_protocols::{Auth, Broker, BrokerError, BrokerHandle, Inbound};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SerialNumber,
};
use rumqttc::{ConnectReturnCode, QoS, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------------
// Certificates

/// A test CA in a tempdir, issuing certificates as PEM files.
struct Pki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (pem, issuer) = ca("Outpost test CA");
        std::fs::write(dir.path().join("ca.pem"), pem).unwrap();
        Self { dir, issuer }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Issues a certificate; writes `<name>.pem` and `<name>.key`. `server`: for 127.0.0.1
    /// and localhost; else a client certificate with subject CN `cn`.
    fn issue(&self, name: &str, cn: &str, server: bool, serial: u64) -> (PathBuf, PathBuf) {
        let sans = if server {
            vec!["localhost".to_owned(), "127.0.0.1".to_owned()]
        } else {
            Vec::new()
        };
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.serial_number = Some(SerialNumber::from_slice(&serial.to_be_bytes()));
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            self.path(&format!("{name}.pem")),
            self.path(&format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

/// A self-signed CA: its PEM and an issuer for it.
fn ca(cn: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, cn);
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(params, key))
}

fn pem_cert(path: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(path).unwrap()
}

/// A rustls client config with the ring provider, trusting `ca`, optionally with a client
/// certificate.
fn client_tls(ca: &Path, identity: Option<&(PathBuf, PathBuf)>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(pem_cert(ca)).unwrap();
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
    Arc::new(match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![pem_cert(cert)],
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
    })
}

// ---------------------------------------------------------------------------------------------
// Broker

/// Listeners, in order: plain (anonymous), TLS (anonymous), TLS with optional client
/// certificates (anonymous refused), TLS requiring a client certificate.
struct Setup {
    pki: Pki,
    handle: BrokerHandle,
    plain: SocketAddr,
    tls: SocketAddr,
    optional_cert: SocketAddr,
    required_cert: SocketAddr,
    seen: mpsc::UnboundedReceiver<Inbound>,
    shutdown: CancellationToken,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

const ACL: &str = "\
topic readwrite tls/#
pattern readwrite devices/%u/#
";

async fn start() -> Setup {
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", "outpost-test-server", true, 1);
    std::fs::write(pki.path("acl"), ACL).unwrap();
    let ca = pki.path("ca.pem");
    let tls = format!(
        r#"cert_file = "{}", key_file = "{}""#,
        cert.display(),
        key.display()
    );
    let toml = format!(
        r#"
        [broker]
        acl_file = "{acl}"
        [[broker.listener]]
        address = "127.0.0.1:0"
        [[broker.listener]]
        address = "127.0.0.1:0"
        tls = {{ {tls} }}
        [[broker.listener]]
        address = "127.0.0.1:0"
        allow_anonymous = false
        tls = {{ {tls}, client_ca_file = "{ca}" }}
        [[broker.listener]]
        address = "127.0.0.1:0"
        tls = {{ {tls}, client_ca_file = "{ca}", require_client_cert = true }}
        "#,
        acl = pki.path("acl").display(),
        ca = ca.display(),
    );
    let config = Config::load(
        Some(&toml),
        &Overrides::default(),
        &std::collections::BTreeMap::new(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let b = &config.broker;
    let mut s = settings();
    s.listeners = b.listeners.clone();
    s.auth = Some(Arc::new(Auth::from_config(b)));
    // The line the gateway's `broker_settings` has.
    s.tls = b.listener_settings.iter().map(|l| l.tls.clone()).collect();
    let broker = Broker::bind(s).await.unwrap();
    let addrs = broker.local_addrs();
    let handle = broker.handle();
    let (tx, mut rx) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    tokio::spawn(broker.run(tx, shutdown.clone()));
    let (seen_tx, seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(mut inbound) = rx.recv().await {
            if let Some(reply) = inbound.reply.take() {
                let _ = reply.send(Ok(()));
            }
            let _ = seen_tx.send(inbound);
        }
    });
    Setup {
        pki,
        handle,
        plain: addrs[0],
        tls: addrs[1],
        optional_cert: addrs[2],
        required_cert: addrs[3],
        seen,
        shutdown,
    }
}

impl Setup {
    fn ca(&self) -> PathBuf {
        self.pki.path("ca.pem")
    }

    /// The next message the gateway was handed, within `WAIT`.
    async fn next_seen(&mut self) -> Inbound {
        tokio::time::timeout(WAIT, self.seen.recv())
            .await
            .expect("no message reached the gateway")
            .unwrap()
    }

    /// Asserts the gateway is handed nothing for a while.
    async fn nothing_seen(&mut self) {
        if let Ok(Some(m)) =
            tokio::time::timeout(Duration::from_millis(300), self.seen.recv()).await
        {
            panic!("unexpected message {} on {}", m.client_id, m.topic);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A rumqttc client

struct Client {
    client: rumqttc::AsyncClient,
    rx: mpsc::UnboundedReceiver<rumqttc::Packet>,
}

/// Connects a rumqttc 3.1.1 client (over TLS with `tls`); `Err` describes a refusal (CONNACK
/// code) or a failed connection (TLS).
async fn connect(
    addr: SocketAddr,
    id: &str,
    tls: Option<Arc<ClientConfig>>,
    login: Option<(&str, &str)>,
) -> Result<Client, String> {
    let mut opts = rumqttc::MqttOptions::new(id, "localhost", addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    if let Some(tls) = tls {
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    }
    if let Some((u, p)) = login {
        opts.set_credentials(u, p);
    }
    let (client, mut el) = rumqttc::AsyncClient::new(opts, 16);
    let (tx, rx) = mpsc::unbounded_channel();
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut first = Some(first_tx);
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) => {
                    if let Some(f) = first.take() {
                        let _ = f.send(match a.code {
                            ConnectReturnCode::Success => Ok(()),
                            code => Err(format!("refused: {code:?}")),
                        });
                    }
                }
                Ok(rumqttc::Event::Incoming(p)) => {
                    let _ = tx.send(p);
                }
                Ok(_) => {}
                Err(e) => {
                    if let Some(f) = first.take() {
                        let _ = f.send(Err(format!("connection failed: {e}")));
                    }
                    return;
                }
            }
        }
    });
    tokio::time::timeout(WAIT, first_rx)
        .await
        .expect("no CONNACK or error in time")
        .unwrap()?;
    Ok(Client { client, rx })
}

impl Client {
    async fn subscribe(&mut self, filter: &str) -> Vec<u8> {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            match tokio::time::timeout(WAIT, self.rx.recv()).await.unwrap() {
                Some(rumqttc::Packet::SubAck(ack)) => {
                    return ack
                        .return_codes
                        .iter()
                        .map(|c| match c {
                            rumqttc::SubscribeReasonCode::Success(q) => *q as u8,
                            rumqttc::SubscribeReasonCode::Failure => 0x80,
                        })
                        .collect();
                }
                Some(_) => {}
                None => panic!("connection closed"),
            }
        }
    }

    async fn publish(&self, topic: &str, payload: &str) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
            .await
            .unwrap();
    }

    async fn expect_publish(&mut self) -> rumqttc::Publish {
        loop {
            match tokio::time::timeout(WAIT, self.rx.recv()).await.unwrap() {
                Some(rumqttc::Packet::Publish(p)) => return p,
                Some(_) => {}
                None => panic!("connection closed"),
            }
        }
    }
}

/// The certificate a TLS listener presents to a new connection.
async fn served_certificate(addr: SocketAddr, ca: &Path) -> CertificateDer<'static> {
    let connector = tokio_rustls::TlsConnector::from(client_tls(ca, None));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn a_client_that_trusts_the_ca_publishes_and_subscribes_over_tls() {
    let mut s = start().await;
    let tls = client_tls(&s.ca(), None);
    let mut sub = connect(s.tls, "tls-sub", Some(tls.clone()), None)
        .await
        .unwrap();
    assert_eq!(sub.subscribe("tls/#").await, [1]);
    let publisher = connect(s.tls, "tls-pub", Some(tls), None).await.unwrap();
    publisher.publish("tls/temp", "21.5").await;
    let got = s.next_seen().await;
    assert_eq!(
        (got.client_id.as_ref(), got.topic.as_str()),
        ("tls-pub", "tls/temp")
    );
    let p = sub.expect_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("tls/temp", &b"21.5"[..])
    );
    assert_eq!(s.handle.stats().tls_handshake_failures, 0);
}

#[tokio::test]
async fn a_plain_client_cannot_talk_to_a_tls_port_and_the_broker_keeps_serving() {
    let mut s = start().await;
    // A 3.1.1 CONNECT in plain text to the TLS port: the handshake fails, the socket closes.
    let mut raw = TcpStream::connect(s.tls).await.unwrap();
    let mut out = bytes::BytesMut::new();
    rumqttc::mqttbytes::v4::Connect::new("plain")
        .write(&mut out)
        .unwrap();
    raw.write_all(&out).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(WAIT, raw.read_to_end(&mut buf))
        .await
        .expect("the broker did not close the socket");
    // Whatever came back (a TLS alert at most) is not a CONNACK.
    assert!(read.is_err() || buf.first() != Some(&0x20), "{buf:?}");
    wait_for("handshake failure counted", || {
        s.handle.stats().tls_handshake_failures == 1
    })
    .await;
    // rumqttc in plain text on the TLS port fails too.
    let err = connect(s.tls, "plain-rumqttc", None, None)
        .await
        .err()
        .unwrap();
    assert!(err.contains("connection failed"), "{err}");
    // A client that does not trust the broker's CA refuses the broker's certificate.
    let (other_ca, _) = ca("Some other CA");
    std::fs::write(s.pki.path("other-ca.pem"), other_ca).unwrap();
    let err = connect(
        s.tls,
        "distrustful",
        Some(client_tls(&s.pki.path("other-ca.pem"), None)),
        None,
    )
    .await
    .err()
    .unwrap();
    assert!(err.contains("connection failed"), "{err}");
    wait_for("three handshake failures counted", || {
        s.handle.stats().tls_handshake_failures == 3
    })
    .await;
    // Both listeners still serve.
    let c = connect(s.tls, "after", Some(client_tls(&s.ca(), None)), None)
        .await
        .unwrap();
    c.publish("tls/after", "1").await;
    assert_eq!(s.next_seen().await.topic, "tls/after");
    let c = connect(s.plain, "plain-ok", None, None).await.unwrap();
    c.publish("tls/plain", "1").await;
    assert_eq!(s.next_seen().await.topic, "tls/plain");
}

#[tokio::test]
async fn a_client_certificate_cn_is_the_acl_username() {
    let mut s = start().await;
    let device7 = s.pki.issue("device-7", "device-7", false, 70);
    let tls = client_tls(&s.ca(), Some(&device7));
    // Logged in by its certificate: no password; a claimed username is ignored.
    let mut c = connect(
        s.optional_cert,
        "sensor-a",
        Some(tls.clone()),
        Some(("device-8", "whatever")),
    )
    .await
    .unwrap();
    c.publish("devices/device-7/temp", "20").await;
    let got = s.next_seen().await;
    assert_eq!(got.topic, "devices/device-7/temp");
    // `pattern readwrite devices/%u/#`: another device's topics are not device-7's.
    c.publish("devices/device-8/temp", "20").await;
    s.nothing_seen().await;
    assert_eq!(s.handle.stats().publishes_denied, 1);
    assert_eq!(c.subscribe("devices/device-8/#").await, [0x80]);
    assert_eq!(c.subscribe("devices/device-7/cmd").await, [1]);
    s.handle
        .publish(
            "devices/device-7/cmd",
            bytes::Bytes::from_static(b"reboot"),
            outpost_protocols::QoS::AtLeastOnce,
            false,
        )
        .await
        .unwrap();
    assert_eq!(c.expect_publish().await.topic, "devices/device-7/cmd");

    // Without a certificate this listener wants a login, and there is no password file.
    let err = connect(
        s.optional_cert,
        "no-cert",
        Some(client_tls(&s.ca(), None)),
        None,
    )
    .await
    .err()
    .unwrap();
    assert!(err.contains("NotAuthorized"), "{err}");
    assert_eq!(s.handle.stats().auth_refused, 1);
    // A certificate from a CA the listener does not trust fails the handshake.
    let rogue = {
        let (pem, issuer) = ca("Rogue CA");
        std::fs::write(s.pki.path("rogue-ca.pem"), pem).unwrap();
        let rogue = Pki {
            dir: tempfile::tempdir_in(s.pki.dir.path()).unwrap(),
            issuer,
        };
        let id = rogue.issue("device-7", "device-7", false, 71);
        (rogue, id)
    };
    let err = connect(
        s.optional_cert,
        "rogue",
        Some(client_tls(&s.ca(), Some(&rogue.1))),
        None,
    )
    .await
    .err()
    .unwrap();
    assert!(err.contains("connection failed"), "{err}");
    wait_for("rogue certificate counted", || {
        s.handle.stats().tls_handshake_failures == 1
    })
    .await;
}

#[tokio::test]
async fn require_client_cert_refuses_clients_without_one_at_the_tls_layer() {
    let mut s = start().await;
    let err = connect(
        s.required_cert,
        "no-cert",
        Some(client_tls(&s.ca(), None)),
        None,
    )
    .await
    .err()
    .unwrap();
    // No CONNACK: the TLS handshake itself failed.
    assert!(err.contains("connection failed"), "{err}");
    wait_for("handshake failure counted", || {
        s.handle.stats().tls_handshake_failures == 1
    })
    .await;
    assert_eq!(s.handle.stats().auth_refused, 0);
    let device7 = s.pki.issue("device-7", "device-7", false, 70);
    let c = connect(
        s.required_cert,
        "with-cert",
        Some(client_tls(&s.ca(), Some(&device7))),
        None,
    )
    .await
    .unwrap();
    c.publish("devices/device-7/x", "1").await;
    assert_eq!(s.next_seen().await.topic, "devices/device-7/x");
}

#[tokio::test]
async fn reload_tls_serves_a_new_certificate_to_new_connections_and_keeps_open_ones() {
    let mut s = start().await;
    let tls = client_tls(&s.ca(), None);
    let old = pem_cert(&s.pki.path("server.pem"));
    assert_eq!(served_certificate(s.tls, &s.ca()).await, old);
    let mut kept = connect(s.tls, "kept", Some(tls.clone()), None)
        .await
        .unwrap();
    assert_eq!(kept.subscribe("tls/#").await, [1]);

    // Renewed in place (new key, new serial), then SIGHUP.
    s.pki
        .issue("server", "outpost-test-server-renewed", true, 2);
    let new = pem_cert(&s.pki.path("server.pem"));
    assert_ne!(new, old);
    s.handle.reload_tls().unwrap();
    assert_eq!(served_certificate(s.tls, &s.ca()).await, new);
    assert_eq!(served_certificate(s.required_cert, &s.ca()).await, new);

    // The connection opened before the reload is still up, both ways.
    let fresh = connect(s.tls, "fresh", Some(tls), None).await.unwrap();
    fresh.publish("tls/after-reload", "x").await;
    assert_eq!(s.next_seen().await.topic, "tls/after-reload");
    assert_eq!(kept.expect_publish().await.topic, "tls/after-reload");
    kept.publish("tls/from-kept", "y").await;
    assert_eq!(s.next_seen().await.topic, "tls/from-kept");

    // A bad file: the error names it, and the certificate in force stays.
    std::fs::write(s.pki.path("server.key"), "not a key\n").unwrap();
    let err = s.handle.reload_tls().unwrap_err();
    assert!(matches!(err, BrokerError::Tls { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("server.key"), "{text}");
    assert_eq!(served_certificate(s.tls, &s.ca()).await, new);
    // Plain listener untouched throughout.
    let c = connect(s.plain, "plain", None, None).await.unwrap();
    c.publish("tls/plain", "z").await;
    assert_eq!(s.next_seen().await.topic, "tls/plain");
}

#[tokio::test]
async fn a_tls_listener_in_the_config_is_never_served_in_plain_text() {
    let s = start().await;
    let toml = format!(
        "[[broker.listener]]\naddress = \"127.0.0.1:0\"\ntls = {{ cert_file = \"{}\", key_file = \"{}\" }}\n",
        s.pki.path("server.pem").display(),
        s.pki.path("server.key").display()
    );
    let config = Config::load(
        Some(&toml),
        &Overrides::default(),
        &std::collections::BTreeMap::new(),
    )
    .unwrap();
    let mut settings = settings();
    settings.listeners = config.broker.listeners.clone();
    settings.auth = Some(Arc::new(Auth::from_config(&config.broker)));
    // `tls` left empty: refused, not served in plain text.
    let err = Broker::bind(settings).await.unwrap_err();
    assert!(matches!(err, BrokerError::TlsMissing { .. }), "{err}");
}

/// mosquitto_pub (OpenSSL) publishing to the broker over TLS, with and without a client
/// certificate.
#[tokio::test]
async fn mosquitto_pub_publishes_over_tls() {
    let tool = Path::new("/usr/bin/mosquitto_pub");
    if !tool.exists() {
        let in_ci = std::env::var("CI")
            .is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"));
        assert!(
            !in_ci,
            "mosquitto_pub not installed (apt: mosquitto-clients) and CI=true"
        );
        eprintln!("mosquitto_pub not installed (apt: mosquitto-clients): skipped");
        return;
    }
    let mut s = start().await;
    let run = |port: u16, topic: &str, args: Vec<String>| {
        let mut cmd = tokio::process::Command::new(tool);
        cmd.args(["-h", "localhost", "-p", &port.to_string(), "-q", "1"])
            .args(["-t", topic, "-m", "over tls", "-i", "mosquitto-pub"])
            .args(args)
            .kill_on_drop(true);
        async move {
            tokio::time::timeout(WAIT, cmd.output())
                .await
                .unwrap()
                .unwrap()
        }
    };
    let ca = s.ca().display().to_string();
    let out = run(
        s.tls.port(),
        "tls/mosquitto",
        vec!["--cafile".into(), ca.clone()],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let got = s.next_seen().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("tls/mosquitto", &b"over tls"[..])
    );
    // With device-7's certificate on the listener that maps it to the username.
    let (cert, key) = s.pki.issue("device-7", "device-7", false, 70);
    let out = run(
        s.required_cert.port(),
        "devices/device-7/mosquitto",
        vec![
            "--cafile".into(),
            ca,
            "--cert".into(),
            cert.display().to_string(),
            "--key".into(),
            key.display().to_string(),
        ],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(s.next_seen().await.topic, "devices/device-7/mosquitto");
}
