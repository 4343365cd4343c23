//! Nothing the gateway writes or serves shows a password or a private key: the log (at debug
//! level), `/status`, `/metrics`, `outpost status`, `outpost check-config`, after clients logged
//! in with right and wrong passwords (mosquitto_pub), with an upstream password configured, and
//! with a TLS listener whose key file is read.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, ensure};
use outpost_tests::{
    GatewayConfig, ListenerTable, ListenerTls, Mosquitto, Outpost, TestDir, free_port,
    mosquitto_pub, openssl, outpost_command, wait_for,
};

const USER_PASSWORD: &str = "Us3r-Pa55-xyzzy";
const WRONG_PASSWORD: &str = "Wr0ng-Pa55-plugh";
const UPSTREAM_PASSWORD: &str = "Upstr3am-S3cret-zork";

/// GET `path` from the status endpoint (HTTP/1.0, whole response).
fn http_get(port: u16, path: &str) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn passwords_and_private_keys_never_appear_in_logs_status_or_metrics() -> Result<()> {
    let dir = TestDir::new("secrets")?;
    let cloud = Mosquitto::start(&dir)?;

    // A user made by mosquitto_passwd, and a TLS listener with a real key.
    let passwd = dir.join("passwd");
    let made = Command::new("mosquitto_passwd")
        .args(["-c", "-b"])
        .arg(&passwd)
        .args(["sensor", USER_PASSWORD])
        .output()?;
    ensure!(made.status.success(), "mosquitto_passwd: {made:?}");
    openssl(
        dir.path(),
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.pem",
        ],
    )?;
    let key_text = std::fs::read_to_string(dir.join("server.key"))?;
    // The base64 lines of the key: any one of them in the output would be a leak.
    let key_lines: Vec<&str> = key_text
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16)
        .collect();
    ensure!(!key_lines.is_empty(), "unexpected key file:\n{key_text}");

    let mut cfg = GatewayConfig::new(&dir, "secrets", Some(cloud.port()))?;
    cfg.broker_extra = format!("password_file = {:?}\n", passwd.display().to_string());
    let tls_port = free_port()?;
    cfg.listener_tables = vec![
        ListenerTable {
            port: cfg.port,
            allow_anonymous: Some(false),
            tls: None,
        },
        ListenerTable {
            port: tls_port,
            allow_anonymous: Some(false),
            tls: Some(ListenerTls {
                cert_file: dir.join("server.pem"),
                key_file: dir.join("server.key"),
                client_ca_file: None,
                require_client_cert: false,
            }),
        },
    ];
    let toml = cfg.to_toml();
    let upstream = "topic_prefix = \"outpost\"\n";
    ensure!(toml.contains(upstream), "unexpected [upstream]:\n{toml}");
    let toml = toml.replacen(
        upstream,
        &format!("{upstream}username = \"gw\"\npassword = \"{UPSTREAM_PASSWORD}\"\n"),
        1,
    );
    let mut gw = Outpost::start_raw_with_log(&dir, &toml, cfg.port, "debug")?;

    // A good login, a wrong password, and an unknown user.
    let port = cfg.port.to_string();
    let ok = mosquitto_pub(
        cfg.port,
        &[
            "-u",
            "sensor",
            "-P",
            USER_PASSWORD,
            "-t",
            "s/1",
            "-q",
            "1",
            "-m",
            "21.5",
        ],
    )?;
    ensure!(
        ok.status.success(),
        "login with the right password failed: {ok:?}"
    );
    for (user, pass) in [("sensor", WRONG_PASSWORD), ("nobody", WRONG_PASSWORD)] {
        let refused = mosquitto_pub(cfg.port, &["-u", user, "-P", pass, "-t", "s/1", "-m", "x"])?;
        ensure!(
            !refused.status.success(),
            "{user} with a wrong password got in on {port}"
        );
    }
    // Wait until the reading is upstream: the uplink logged in with its password by then.
    wait_for(
        "the reading upstream and the refusals counted",
        Duration::from_secs(60),
        || {
            let metrics = http_get(cfg.health_port, "/metrics").ok()?;
            let synced = metrics
                .lines()
                .find_map(|l| l.strip_prefix("outpost_synced_total "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0);
            (metrics.contains("outpost_broker_auth_refused_total 2") && synced >= 1.0).then_some(())
        },
    )?;

    let mut outputs = vec![
        (
            "/metrics".to_owned(),
            http_get(cfg.health_port, "/metrics")?,
        ),
        ("/status".to_owned(), http_get(cfg.health_port, "/status")?),
    ];
    let status = outpost_command()?
        .args(["status", "--json", "--config"])
        .arg(gw.config_path())
        .output()?;
    outputs.push((
        "outpost status".into(),
        String::from_utf8_lossy(&status.stdout).into_owned(),
    ));
    let check = outpost_command()?
        .arg("check-config")
        .arg(gw.config_path())
        .output()?;
    outputs.push((
        "outpost check-config".into(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        ),
    ));
    gw.sigterm()?;
    outputs.push(("the log".into(), std::fs::read_to_string(gw.log())?));
    let log = &outputs.last().map(|o| o.1.clone()).unwrap_or_default();
    ensure!(
        log.contains("DEBUG") && log.contains("not authenticated"),
        "the log is not at debug level or lacks the refusals:\n{log}"
    );

    for (what, text) in &outputs {
        for secret in [USER_PASSWORD, WRONG_PASSWORD, UPSTREAM_PASSWORD] {
            ensure!(
                !text.contains(secret),
                "{what} shows the password {secret:?}:\n{text}"
            );
        }
        for line in &key_lines {
            ensure!(
                !text.contains(line),
                "{what} shows a line of the TLS private key:\n{text}"
            );
        }
    }
    Ok(())
}
