//! MQTT over TLS on outpost's broker, checked with a third-party client: paho-mqtt (MQTT 5 and
//! 3.1.1; tests/py/paho_rules.py, one function per test below, named alike). A test CA, a server
//! certificate for 127.0.0.1, client certificates and a second ("rogue") CA are made with the
//! `openssl` command in the test's directory. A client trusting the test CA connects; one that
//! does not is refused; on a listener with a client CA, the certificate's CN is the username
//! the ACL sees; where client certificates are required, clients without a valid one are
//! refused during the handshake. Failed handshakes are counted.

use std::path::Path;

use outpost_tests::{
    GatewayConfig, ListenerTable, ListenerTls, TestDir, check_paho_rule, free_port,
};

/// Runs `openssl <args>` (split at whitespace) in `dir`, requiring success.
fn openssl(dir: &Path, args: &str) -> anyhow::Result<()> {
    let args: Vec<&str> = args.split_whitespace().collect();
    outpost_tests::openssl(dir, &args)
}

/// A new P-256 key, unencrypted.
const KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";

/// A self-signed CA: `<name>.pem`, `<name>.key`.
fn make_ca(dir: &Path, name: &str) -> anyhow::Result<()> {
    openssl(
        dir,
        &format!(
            "req -x509 {KEY} -days 2 -subj /CN=outpost-test-{name} \
             -keyout {name}.key -out {name}.pem -addext basicConstraints=critical,CA:TRUE \
             -addext keyUsage=critical,keyCertSign,cRLSign"
        ),
    )
}

/// `<name>.pem`/`<name>.key` with subject CN `cn`, signed by CA `ca`, with X.509 v3 `ext`.
fn make_cert(dir: &Path, name: &str, cn: &str, ca: &str, ext: &str) -> anyhow::Result<()> {
    std::fs::write(dir.join(format!("{name}.ext")), ext)?;
    openssl(
        dir,
        &format!("req -new {KEY} -subj /CN={cn} -keyout {name}.key -out {name}.csr"),
    )?;
    openssl(
        dir,
        &format!(
            "x509 -req -in {name}.csr -CA {ca}.pem -CAkey {ca}.key -CAcreateserial -days 2 \
             -extfile {name}.ext -out {name}.pem"
        ),
    )
}

/// A client certificate's extensions.
const CLIENT_EXT: &str = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                          extendedKeyUsage=clientAuth\n";

/// The certificates in `dir/certs`: ca, server (127.0.0.1), clients dev-tls and intruder (by
/// ca), rogue-ca and rogue (a client certificate with CN dev-tls, by rogue-ca).
fn make_certs(dir: &TestDir) -> anyhow::Result<std::path::PathBuf> {
    let certs = dir.join("certs");
    std::fs::create_dir(&certs)?;
    make_ca(&certs, "ca")?;
    make_ca(&certs, "rogue-ca")?;
    make_cert(
        &certs,
        "server",
        "localhost",
        "ca",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )?;
    make_cert(&certs, "dev-tls", "dev-tls", "ca", CLIENT_EXT)?;
    make_cert(&certs, "intruder", "intruder", "ca", CLIENT_EXT)?;
    make_cert(&certs, "rogue", "dev-tls", "rogue-ca", CLIENT_EXT)?;
    Ok(certs)
}

/// A gateway with a plain listener on `cfg.port` and three TLS listeners: server certificate
/// only; with the client CA (certificates optional); with the client CA, certificates required.
/// The ACL lets only user dev-tls write tls/dev-tls/#, and clients without a username read
/// tls/# and write tls/echo.
fn tls_gateway(dir: &TestDir) -> anyhow::Result<(GatewayConfig, Vec<String>)> {
    let certs = make_certs(dir)?;
    let tls = |client_ca: bool, require: bool| ListenerTls {
        cert_file: certs.join("server.pem"),
        key_file: certs.join("server.key"),
        client_ca_file: client_ca.then(|| certs.join("ca.pem")),
        require_client_cert: require,
    };
    let mut cfg = GatewayConfig::new(dir, "gw-tls", None)?;
    let ports = [free_port()?, free_port()?, free_port()?];
    cfg.listener_tables = vec![
        ListenerTable {
            port: cfg.port,
            allow_anonymous: Some(true),
            tls: None,
        },
        ListenerTable {
            port: ports[0],
            allow_anonymous: Some(true),
            tls: Some(tls(false, false)),
        },
        ListenerTable {
            port: ports[1],
            allow_anonymous: Some(true),
            tls: Some(tls(true, false)),
        },
        ListenerTable {
            port: ports[2],
            allow_anonymous: Some(true),
            tls: Some(tls(true, true)),
        },
    ];
    let acl = dir.join("acl");
    std::fs::write(
        &acl,
        "# Clients without a username (before any `user` line): read tls/#, echo on tls/echo.\n\
         topic read tls/#\n\
         topic readwrite tls/echo\n\
         user dev-tls\n\
         topic readwrite tls/dev-tls/#\n",
    )?;
    cfg.broker_extra = format!("acl_file = {:?}\n", acl.display().to_string());
    let args = vec![
        "--tls-port".to_owned(),
        ports[0].to_string(),
        "--tls-client-port".to_owned(),
        ports[1].to_string(),
        "--tls-required-port".to_owned(),
        ports[2].to_string(),
        "--certs".to_owned(),
        certs.display().to_string(),
    ];
    Ok((cfg, args))
}

fn check(rule: &str) -> anyhow::Result<()> {
    let dir = TestDir::new(rule)?;
    let (cfg, args) = tls_gateway(&dir)?;
    check_paho_rule(&dir, &cfg, rule, &args)?;
    Ok(())
}

#[test]
fn tls_client_trusting_test_ca_connects() -> anyhow::Result<()> {
    check("tls_client_trusting_test_ca_connects")
}

#[test]
fn tls_client_not_trusting_ca_is_refused() -> anyhow::Result<()> {
    check("tls_client_not_trusting_ca_is_refused")
}

#[test]
fn tls_client_certificate_cn_is_the_username() -> anyhow::Result<()> {
    check("tls_client_certificate_cn_is_the_username")
}
