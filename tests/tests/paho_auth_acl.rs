//! Authentication and authorisation of outpost's broker, checked with third-party clients:
//! paho-mqtt (MQTT 5 and 3.1.1; tests/py/paho_rules.py, one function per test below, named
//! alike) and mosquitto_pub.
//!
//! - A password file written by Debian mosquitto's `mosquitto_passwd -c -b` is used unchanged:
//!   its users log in; a wrong password or an unknown user gets CONNACK 0x86 (MQTT 5) / return
//!   code 4 (3.1.1); a client without a username gets 0x87 / 5 on a listener with
//!   `allow_anonymous = false` and is admitted on one with `true`. Refusals are counted.
//! - An ACL of `pattern` rules (%c, %u): two devices, each allowed only its own topics; every
//!   forbidden read and write is refused (MQTT 5 PUBACK/SUBACK 0x87; 3.1.1 SUBACK 0x80, publish
//!   acknowledged and dropped; a will on the other's topic: CONNACK 0x87 / 5; the other's
//!   messages and retained state not delivered through a permitted wildcard) and counted on
//!   /metrics; the allowed ones work.

use std::path::Path;
use std::process::Command;

use outpost_tests::{
    GatewayConfig, ListenerTable, TestDir, check_paho_rule, free_port, mosquitto_pub,
};

/// Users as NAME:PASSWORD (a password may hold spaces and colons).
const USERS: [(&str, &str); 2] = [("alice", "alice-pw"), ("bob", "b0b pass:with colon")];
/// The two devices of the ACL matrix; each logs in with its name as client id and username.
const DEVICES: [(&str, &str); 2] = [("dev-a", "secret-a"), ("dev-b", "secret-b")];

/// Writes `dir/passwd` with Debian mosquitto's own `mosquitto_passwd` (`-c` creates it).
fn password_file(dir: &TestDir, users: &[(&str, &str)]) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join("passwd");
    for (i, (name, password)) in users.iter().enumerate() {
        let mut cmd = Command::new("mosquitto_passwd");
        if i == 0 {
            cmd.arg("-c");
        }
        let out = cmd.arg("-b").arg(&path).args([name, password]).output()?;
        anyhow::ensure!(
            out.status.success(),
            "mosquitto_passwd failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(path)
}

fn user_args(users: &[(&str, &str)]) -> Vec<String> {
    users
        .iter()
        .flat_map(|(n, p)| ["--user".to_owned(), format!("{n}:{p}")])
        .collect()
}

fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// A gateway whose listener on `cfg.port` refuses anonymous clients and whose listener on the
/// returned port admits them, with the password file of [`USERS`].
fn password_gateway(dir: &TestDir) -> anyhow::Result<(GatewayConfig, u16)> {
    let mut cfg = GatewayConfig::new(dir, "gw-auth", None)?;
    let anon_port = free_port()?;
    cfg.broker_extra = format!(
        "password_file = {}\n",
        toml_path(&password_file(dir, &USERS)?)
    );
    cfg.listener_tables = vec![
        ListenerTable {
            port: cfg.port,
            allow_anonymous: Some(false),
            tls: None,
        },
        ListenerTable {
            port: anon_port,
            allow_anonymous: Some(true),
            tls: None,
        },
    ];
    Ok((cfg, anon_port))
}

/// Runs mosquitto_pub (MQTT 3.1.1) expecting a refused connection; returns its message.
fn mosquitto_pub_refused(port: u16, credentials: &[&str]) -> anyhow::Result<String> {
    let args = [
        credentials,
        &["-V", "mqttv311", "-t", "auth/mosq", "-m", "x"],
    ]
    .concat();
    let out = mosquitto_pub(port, &args)?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(
        !out.status.success(),
        "mosquitto_pub {credentials:?} was not refused: {text}"
    );
    Ok(text)
}

#[test]
fn password_file_users_log_in() -> anyhow::Result<()> {
    let dir = TestDir::new("password_file_users_log_in")?;
    let (cfg, _) = password_gateway(&dir)?;
    let (_gw, _) = check_paho_rule(&dir, &cfg, "password_file_users_log_in", &user_args(&USERS))?;
    for (name, password) in USERS {
        let out = mosquitto_pub(
            cfg.port,
            &[
                "-u",
                name,
                "-P",
                password,
                "-q",
                "1",
                "-t",
                "auth/mosq",
                "-m",
                "x",
            ],
        )?;
        assert!(
            out.status.success(),
            "mosquitto_pub as {name} refused: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[test]
fn wrong_password_and_unknown_user_are_refused() -> anyhow::Result<()> {
    let dir = TestDir::new("wrong_password_and_unknown_user")?;
    let (cfg, _) = password_gateway(&dir)?;
    let (_gw, _) = check_paho_rule(
        &dir,
        &cfg,
        "wrong_password_and_unknown_user_are_refused",
        &user_args(&USERS),
    )?;
    // libmosquitto names the 3.1.1 return code it got: 4 is "bad user name or password".
    for credentials in [
        ["-u", "alice", "-P", "alice-pw-wrong"],
        ["-u", "nobody", "-P", "alice-pw"],
    ] {
        let text = mosquitto_pub_refused(cfg.port, &credentials)?;
        assert!(
            text.contains("Connection Refused: bad user name or password"),
            "mosquitto_pub {credentials:?}: expected return code 4, got: {text}"
        );
    }
    Ok(())
}

#[test]
fn anonymous_refused_where_configured() -> anyhow::Result<()> {
    let dir = TestDir::new("anonymous_refused_where_configured")?;
    let (cfg, anon_port) = password_gateway(&dir)?;
    let (_gw, _) = check_paho_rule(
        &dir,
        &cfg,
        "anonymous_refused_where_configured",
        &["--anon-port".to_owned(), anon_port.to_string()],
    )?;
    // libmosquitto names the 3.1.1 return code it got: 5 is "not authorised".
    let text = mosquitto_pub_refused(cfg.port, &[])?;
    assert!(
        text.contains("Connection Refused: not authorised"),
        "anonymous mosquitto_pub: expected return code 5, got: {text}"
    );
    let out = mosquitto_pub(anon_port, &["-q", "1", "-t", "auth/mosq", "-m", "x"])?;
    assert!(
        out.status.success(),
        "anonymous mosquitto_pub refused where allowed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A gateway with [`DEVICES`] as users and the two-device ACL; anonymous clients refused.
fn acl_gateway(dir: &TestDir) -> anyhow::Result<GatewayConfig> {
    let acl = dir.join("acl");
    std::fs::write(
        &acl,
        "# Each device reads and writes only its own topics: by client id, and by username.\n\
         pattern readwrite devices/%c/#\n\
         pattern readwrite users/%u/#\n",
    )?;
    let mut cfg = GatewayConfig::new(dir, "gw-acl", None)?;
    cfg.broker_extra = format!(
        "password_file = {}\nacl_file = {}\nallow_anonymous = false\n",
        toml_path(&password_file(dir, &DEVICES)?),
        toml_path(&acl)
    );
    Ok(cfg)
}

#[test]
fn acl_v5_devices_read_and_write_only_their_own_topics() -> anyhow::Result<()> {
    let rule = "acl_v5_devices_read_and_write_only_their_own_topics";
    let dir = TestDir::new(rule)?;
    let cfg = acl_gateway(&dir)?;
    check_paho_rule(&dir, &cfg, rule, &user_args(&DEVICES))?;
    Ok(())
}

#[test]
fn acl_v311_devices_read_and_write_only_their_own_topics() -> anyhow::Result<()> {
    let rule = "acl_v311_devices_read_and_write_only_their_own_topics";
    let dir = TestDir::new(rule)?;
    let cfg = acl_gateway(&dir)?;
    check_paho_rule(&dir, &cfg, rule, &user_args(&DEVICES))?;
    Ok(())
}
