//! Authentication and ACLs against third-party clients (rumqttc, 3.1.1 and 5): a password file
//! written by the real `mosquitto_passwd` when it is installed, a mosquitto ACL file, and the
//! whole path from the TOML keys (`Auth::from_config`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{WAIT, settings};
use outpost_config::{Config, Overrides};
use outpost_protocols::{Auth, Inbound};
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5;
use rumqttc::{ConnectReturnCode as Rc4, QoS as Q4};
use tokio::sync::mpsc;

/// Fallback when `mosquitto_passwd` is not installed: lines it wrote (mosquitto 2.0.11) for
/// `-b FILE alice secret` and `-H sha512 -b FILE carol legacy`.
const FIXTURE: &str = "\
alice:$7$101$OGHa2DYnj9xUSOMu$VTsrTPra1zIlZKNn+f7lTNk6fOXrI2/zkYLtqxOuG7JyQMCZWUHM4zTixl8csq0sqDq0tXHqBBFWnV4v9LjT2w==
carol:$6$0HOvr5dtfqVyFVOB$aTMi2HLLar4hAGiRlFLfCcdCZiC6f2wCQ6vOhCbIrOccSM5ei9o3Ur6qUQY8C0OrDJzuBkRM8JpyWyDkW3Bfew==
";

/// alice/secret (PBKDF2-SHA512) and carol/legacy (SHA-512), by `mosquitto_passwd` if present.
fn write_password_file(path: &Path) {
    let tool = Path::new("/usr/bin/mosquitto_passwd");
    if tool.exists() {
        let run = |args: &[&str]| {
            let status = std::process::Command::new(tool)
                .args(args)
                .status()
                .unwrap();
            assert!(status.success(), "mosquitto_passwd {args:?}");
        };
        let file = path.to_str().unwrap();
        run(&["-c", "-b", file, "alice", "secret"]);
        run(&["-H", "sha512", "-b", file, "carol", "legacy"]);
        let text = std::fs::read_to_string(path).unwrap();
        assert!(
            text.contains("alice:$7$") && text.contains("carol:$6$"),
            "{text}"
        );
    } else {
        eprintln!("mosquitto_passwd not installed: using the fixture it wrote");
        std::fs::write(path, FIXTURE).unwrap();
    }
}

/// A broker with two loopback listeners, [0] admitting anonymous clients and [1] not, set up
/// through the config keys.
async fn broker(
    acl: &str,
) -> (
    common::Running,
    mpsc::UnboundedReceiver<Inbound>,
    std::net::SocketAddr,
    std::net::SocketAddr,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    write_password_file(&passwd);
    let acl_path = dir.path().join("acl");
    std::fs::write(&acl_path, acl).unwrap();
    let toml = format!(
        r#"
        [broker]
        password_file = "{}"
        acl_file = "{}"
        [[broker.listener]]
        address = "127.0.0.1:0"
        allow_anonymous = true
        [[broker.listener]]
        address = "127.0.0.1:0"
        allow_anonymous = false
        "#,
        passwd.display(),
        acl_path.display()
    );
    let config = Config::load(
        Some(&toml),
        &Overrides::default(),
        &std::collections::BTreeMap::new(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut s = settings();
    s.listeners = config.broker.listeners.clone();
    s.auth = Some(Arc::new(Auth::from_config(&config.broker)));
    let broker = outpost_protocols::Broker::bind(s).await.unwrap();
    let addrs = broker.local_addrs();
    let handle = broker.handle();
    let (tx, mut rx) = mpsc::channel(64);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move { broker.run(tx, token).await.unwrap() });
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(mut inbound) = rx.recv().await {
            if let Some(reply) = inbound.reply.take() {
                let _ = reply.send(Ok(()));
            }
            let _ = seen_tx.send(inbound);
        }
    });
    let running = common::Running {
        addr: addrs[0],
        handle,
        shutdown,
        task,
    };
    (running, seen_rx, addrs[0], addrs[1], dir)
}

/// A rumqttc 3.1.1 client and what it receives.
struct C4 {
    client: rumqttc::AsyncClient,
    rx: mpsc::UnboundedReceiver<rumqttc::Packet>,
}

async fn connect4(
    addr: std::net::SocketAddr,
    id: &str,
    login: Option<(&str, &str)>,
) -> Result<C4, Rc4> {
    let mut opts = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
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
                        let _ = f.send(Ok(a.code));
                    }
                }
                Ok(rumqttc::Event::Incoming(p)) => {
                    let _ = tx.send(p);
                }
                Ok(_) => {}
                Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                    if let Some(f) = first.take() {
                        let _ = f.send(Err(code));
                    }
                    return;
                }
                Err(_) => return,
            }
        }
    });
    match tokio::time::timeout(WAIT, first_rx).await.unwrap().unwrap() {
        Ok(Rc4::Success) => Ok(C4 { client, rx }),
        Ok(code) | Err(code) => Err(code),
    }
}

/// A rumqttc MQTT 5 client and what it receives.
struct C5 {
    client: rumqttc::v5::AsyncClient,
    rx: mpsc::UnboundedReceiver<v5::Packet>,
}

async fn connect5(
    addr: std::net::SocketAddr,
    id: &str,
    login: Option<(&str, &str)>,
) -> Result<C5, v5::ConnectReturnCode> {
    let mut opts = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    if let Some((u, p)) = login {
        opts.set_credentials(u, p);
    }
    let (client, mut el) = rumqttc::v5::AsyncClient::new(opts, 16);
    let (tx, rx) = mpsc::unbounded_channel();
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut first = Some(first_tx);
        loop {
            match el.poll().await {
                Ok(rumqttc::v5::Event::Incoming(v5::Packet::ConnAck(a))) => {
                    if let Some(f) = first.take() {
                        let _ = f.send(Ok(a.code));
                    }
                }
                Ok(rumqttc::v5::Event::Incoming(p)) => {
                    let _ = tx.send(p);
                }
                Ok(_) => {}
                Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
                    if let Some(f) = first.take() {
                        let _ = f.send(Err(code));
                    }
                    return;
                }
                Err(_) => return,
            }
        }
    });
    match tokio::time::timeout(WAIT, first_rx).await.unwrap().unwrap() {
        Ok(v5::ConnectReturnCode::Success) => Ok(C5 { client, rx }),
        Ok(code) | Err(code) => Err(code),
    }
}

/// The next packet `pick` accepts, skipping others; panics after `WAIT`.
async fn next<P, T>(rx: &mut mpsc::UnboundedReceiver<P>, pick: impl Fn(P) -> Option<T>) -> T {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(t) = pick(rx.recv().await.expect("client stopped")) {
                return t;
            }
        }
    })
    .await
    .expect("expected packet did not arrive")
}

/// Topics of every PUBLISH received until nothing arrives for a moment.
async fn drain_topics4(rx: &mut mpsc::UnboundedReceiver<rumqttc::Packet>) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(400), rx.recv()).await {
        if let rumqttc::Packet::Publish(p) = p {
            out.push(p.topic);
        }
    }
    out
}

async fn drain_topics5(rx: &mut mpsc::UnboundedReceiver<v5::Packet>) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(400), rx.recv()).await {
        if let v5::Packet::Publish(p) = p {
            out.push(String::from_utf8(p.topic.to_vec()).unwrap());
        }
    }
    out
}

#[tokio::test]
async fn logins_are_checked_against_a_mosquitto_passwd_file() {
    let (b, _seen, open, closed, _dir) = broker("pattern readwrite devices/%c/#\n").await;
    // 3.1.1
    assert!(
        connect4(closed, "a4", Some(("alice", "secret")))
            .await
            .is_ok()
    );
    assert!(
        connect4(closed, "c4", Some(("carol", "legacy")))
            .await
            .is_ok(),
        "$6$ entries"
    );
    assert_eq!(
        connect4(closed, "w4", Some(("alice", "wrong"))).await.err(),
        Some(Rc4::BadUserNamePassword)
    );
    assert_eq!(
        connect4(open, "u4", Some(("mallory", "secret")))
            .await
            .err(),
        Some(Rc4::BadUserNamePassword),
        "an unknown user is refused like a wrong password, on any listener"
    );
    assert_eq!(
        connect4(closed, "n4", None).await.err(),
        Some(Rc4::NotAuthorized)
    );
    assert!(
        connect4(open, "n4", None).await.is_ok(),
        "anonymous where allowed"
    );
    // MQTT 5
    assert!(
        connect5(closed, "a5", Some(("alice", "secret")))
            .await
            .is_ok()
    );
    assert_eq!(
        connect5(closed, "w5", Some(("alice", "Secret")))
            .await
            .err(),
        Some(v5::ConnectReturnCode::BadUserNamePassword)
    );
    assert_eq!(
        connect5(closed, "u5", Some(("nobody", "x"))).await.err(),
        Some(v5::ConnectReturnCode::BadUserNamePassword)
    );
    assert_eq!(
        connect5(closed, "n5", None).await.err(),
        Some(v5::ConnectReturnCode::NotAuthorized)
    );
    assert!(connect5(open, "n5", None).await.is_ok());
    let stats = b.handle.stats();
    assert_eq!(stats.auth_refused, 6, "{stats:?}");
    assert_eq!(stats.connections_refused, 6, "{stats:?}");
    b.shutdown.cancel();
}

/// Two devices, each allowed only its own topics (`pattern readwrite devices/%c/#`), one on
/// 3.1.1 and logged in, one on MQTT 5 and anonymous.
#[tokio::test]
async fn acl_matrix_each_device_reads_and_writes_only_its_own_topics() {
    let (b, mut seen, open, closed, _dir) = broker("pattern readwrite devices/%c/#\n").await;
    let mut a = connect4(closed, "dev-a", Some(("alice", "secret")))
        .await
        .unwrap();
    let mut d = connect5(open, "dev-b", None).await.unwrap();

    // Subscriptions: own allowed, the other's refused with the protocol's failure code.
    a.client
        .subscribe("devices/dev-a/#", Q4::AtLeastOnce)
        .await
        .unwrap();
    a.client
        .subscribe("devices/dev-b/#", Q4::AtLeastOnce)
        .await
        .unwrap();
    let codes4: Vec<_> = vec![
        next(&mut a.rx, |p| match p {
            rumqttc::Packet::SubAck(s) => Some(s.return_codes),
            _ => None,
        })
        .await,
        next(&mut a.rx, |p| match p {
            rumqttc::Packet::SubAck(s) => Some(s.return_codes),
            _ => None,
        })
        .await,
    ];
    assert_eq!(
        codes4,
        [
            vec![rumqttc::SubscribeReasonCode::Success(Q4::AtLeastOnce)],
            vec![rumqttc::SubscribeReasonCode::Failure]
        ]
    );
    d.client
        .subscribe("devices/dev-b/#", Q5::AtLeastOnce)
        .await
        .unwrap();
    d.client
        .subscribe("devices/dev-a/#", Q5::AtLeastOnce)
        .await
        .unwrap();
    let mut codes5 = Vec::new();
    for _ in 0..2 {
        codes5.push(
            next(&mut d.rx, |p| match p {
                v5::Packet::SubAck(s) => Some(s.return_codes),
                _ => None,
            })
            .await,
        );
    }
    assert_eq!(
        codes5,
        [
            vec![v5::SubscribeReasonCode::Success(Q5::AtLeastOnce)],
            vec![v5::SubscribeReasonCode::NotAuthorized]
        ]
    );

    // Forbidden writes: 3.1.1 gets its PUBACK (as from mosquitto), MQTT 5 gets 0x87; neither
    // message reaches the gateway or a subscriber.
    a.client
        .publish("devices/dev-b/x", Q4::AtLeastOnce, false, "from a")
        .await
        .unwrap();
    next(&mut a.rx, |p| {
        matches!(p, rumqttc::Packet::PubAck(_)).then_some(())
    })
    .await;
    a.client
        .publish("devices/dev-b/y", Q4::AtMostOnce, false, "from a")
        .await
        .unwrap();
    d.client
        .publish("devices/dev-a/x", Q5::AtLeastOnce, false, "from b")
        .await
        .unwrap();
    let reason = next(&mut d.rx, |p| match p {
        v5::Packet::PubAck(ack) => Some(ack.reason),
        _ => None,
    })
    .await;
    assert_eq!(reason, v5::PubAckReason::NotAuthorized);
    d.client
        .publish("devices/dev-a/z", Q5::ExactlyOnce, false, "from b")
        .await
        .unwrap();
    let reason = next(&mut d.rx, |p| match p {
        v5::Packet::PubRec(rec) => Some(rec.reason),
        _ => None,
    })
    .await;
    assert_eq!(reason, v5::PubRecReason::NotAuthorized);

    // Allowed writes: stored, and delivered to the owner's own subscription only.
    a.client
        .publish("devices/dev-a/t", Q4::AtLeastOnce, false, "a ok")
        .await
        .unwrap();
    d.client
        .publish("devices/dev-b/t", Q5::AtLeastOnce, false, "b ok")
        .await
        .unwrap();
    let mut stored = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), seen.recv()).await {
        stored.push(m.topic);
    }
    stored.sort();
    assert_eq!(stored, ["devices/dev-a/t", "devices/dev-b/t"]);
    assert_eq!(drain_topics4(&mut a.rx).await, ["devices/dev-a/t"]);
    assert_eq!(drain_topics5(&mut d.rx).await, ["devices/dev-b/t"]);

    let stats = b.handle.stats();
    assert_eq!(stats.subscriptions_denied, 2, "{stats:?}");
    assert_eq!(stats.publishes_denied, 4, "{stats:?}");
    assert_eq!(stats.publishes_received, 6, "{stats:?}");
    b.shutdown.cancel();
}

#[tokio::test]
async fn wildcard_subscriptions_and_commands_never_leak_forbidden_topics() {
    let acl = "\
user alice
topic read fleet/#
pattern readwrite devices/%c/#
";
    let (b, _seen, open, _closed, dir) = broker(acl).await;
    // Retained before anyone subscribes: only its owner may get it.
    b.handle
        .publish(
            "devices/dev-b/state",
            "b".into(),
            outpost_protocols::QoS::AtLeastOnce,
            true,
        )
        .await
        .unwrap();
    let mut a = connect4(open, "dev-a", None).await.unwrap();
    let mut d = connect5(open, "dev-b", None).await.unwrap();
    // `devices/+/state` is granted (it matches devices/dev-a/state) but may only deliver that.
    a.client
        .subscribe("devices/+/state", Q4::AtLeastOnce)
        .await
        .unwrap();
    a.client
        .subscribe("devices/#", Q4::AtLeastOnce)
        .await
        .unwrap();
    d.client
        .subscribe("devices/#", Q5::AtLeastOnce)
        .await
        .unwrap();
    for _ in 0..2 {
        let codes = next(&mut a.rx, |p| match p {
            rumqttc::Packet::SubAck(s) => Some(s.return_codes),
            _ => None,
        })
        .await;
        assert_eq!(
            codes,
            [rumqttc::SubscribeReasonCode::Success(Q4::AtLeastOnce)]
        );
    }
    // Commands from the cloud (the gateway's own publishes) obey the same rules.
    for topic in ["devices/dev-a/cmd", "devices/dev-b/cmd", "other/cmd"] {
        b.handle
            .publish(
                topic,
                "c".into(),
                outpost_protocols::QoS::AtLeastOnce,
                false,
            )
            .await
            .unwrap();
    }
    d.client
        .publish("devices/dev-b/data", Q5::AtLeastOnce, false, "b")
        .await
        .unwrap();
    let mut got_a = drain_topics4(&mut a.rx).await;
    got_a.sort();
    assert_eq!(
        got_a,
        ["devices/dev-a/cmd"],
        "one delivery for overlapping filters"
    );
    let mut got_d = drain_topics5(&mut d.rx).await;
    got_d.sort();
    assert_eq!(
        got_d,
        [
            "devices/dev-b/cmd",
            "devices/dev-b/data",
            "devices/dev-b/state"
        ]
    );
    assert!(
        b.handle.stats().deliveries_denied >= 3,
        "{:?}",
        b.handle.stats()
    );

    // A reloaded ACL applies to the next check: now dev-a may read dev-b's topics too.
    std::fs::write(
        dir.path().join("acl"),
        format!("{acl}pattern read devices/+/state\n"),
    )
    .unwrap();
    let reloaded = b.handle.auth().unwrap().reloaded().unwrap();
    b.handle.reload_auth(Some(Arc::new(reloaded)));
    b.handle
        .publish(
            "devices/dev-b/state",
            "b2".into(),
            outpost_protocols::QoS::AtLeastOnce,
            true,
        )
        .await
        .unwrap();
    assert_eq!(drain_topics4(&mut a.rx).await, ["devices/dev-b/state"]);
    b.shutdown.cancel();
}
