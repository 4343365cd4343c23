//! MQTT session behaviour of outpost's local broker, checked with third-party clients
//! (paho for Python, mosquitto_pub, raw packets): keep-alive 0 is accepted, a will is sent when a
//! client's socket dies but not after a clean DISCONNECT, and a second client with the same
//! client id takes the session over (the first is disconnected).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use outpost_tests::{Client, GatewayConfig, Outpost, TestDir, mosquitto_pub_ok};

fn gateway(dir: &TestDir) -> anyhow::Result<Outpost> {
    Outpost::start(dir, &GatewayConfig::new(dir, "gw1", None)?)
}

#[test]
fn keep_alive_zero_is_accepted() -> anyhow::Result<()> {
    let dir = TestDir::new("keepalive0")?;
    let gw = gateway(&dir)?;

    let mut paho = Client::spawn(
        &dir,
        "paho-k0",
        gw.port(),
        &["--keepalive", "0", "--subscribe", "ka/#:1"],
    )?;
    let connected = paho.wait_line("connected", Duration::from_secs(30))?;
    assert_eq!(
        connected, "connected rc=Success",
        "paho with keepalive=0 refused"
    );
    paho.wait_line("subscribed", Duration::from_secs(30))?;

    // A raw MQTT 3.1.1 CONNECT with keep-alive 0 (mosquitto_sub 2.0 refuses `-k 0` itself).
    let mut raw = TcpStream::connect(("127.0.0.1", gw.port()))?;
    raw.set_read_timeout(Some(Duration::from_secs(30)))?;
    raw.write_all(&[
        0x10, 15, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 0, 0, 3, b'k', b'a', b'0',
    ])?;
    let mut connack = [0u8; 4];
    raw.read_exact(&mut connack)?;
    assert_eq!(
        connack,
        [0x20, 0x02, 0x00, 0x00],
        "raw CONNECT with keep-alive 0 refused"
    );

    mosquitto_pub_ok(gw.port(), &["-t", "ka/x", "-q", "1", "-m", "hello-k0"])?;
    paho.wait_line("message 1 0 ka/x hello-k0", Duration::from_secs(30))?;

    // With keep-alive 0 the server must never time the client out.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        paho.alive(),
        "paho keepalive=0 client was disconnected: {:?}",
        paho.lines()
    );
    raw.write_all(&[0xC0, 0x00])?;
    let mut pingresp = [0u8; 2];
    raw.read_exact(&mut pingresp)?;
    assert_eq!(
        pingresp,
        [0xD0, 0x00],
        "keep-alive 0 connection still served"
    );
    Ok(())
}

#[test]
fn will_is_sent_when_socket_dies_not_on_clean_disconnect() -> anyhow::Result<()> {
    let dir = TestDir::new("will")?;
    let gw = gateway(&dir)?;
    let watcher = Client::spawn(&dir, "watcher", gw.port(), &["--subscribe", "will/#:1"])?;
    watcher.wait_line("subscribed", Duration::from_secs(30))?;

    // A clean DISCONNECT discards the will.
    let mut polite = Client::spawn(
        &dir,
        "polite",
        gw.port(),
        &[
            "--client-id",
            "polite",
            "--will-topic",
            "will/polite",
            "--will-payload",
            "gone",
            "--disconnect-after",
            "1",
        ],
    )?;
    polite.wait_line("connected rc=Success", Duration::from_secs(30))?;
    polite.proc().wait(Duration::from_secs(30))?;

    // A socket that dies without DISCONNECT triggers it.
    let mut dying = Client::spawn(
        &dir,
        "dying",
        gw.port(),
        &[
            "--client-id",
            "dying",
            "--will-topic",
            "will/dying",
            "--will-payload",
            "gone",
        ],
    )?;
    dying.wait_line("connected rc=Success", Duration::from_secs(30))?;
    dying.proc().kill()?;

    watcher.wait_line("message 1 0 will/dying gone", Duration::from_secs(30))?;
    // The polite client disconnected before the dying one was killed, so a wrongly sent will
    // would be in the watcher's output by now; give a slow broker a moment more anyway.
    std::thread::sleep(Duration::from_secs(1));
    let polite_wills: Vec<String> = watcher
        .lines()
        .into_iter()
        .filter(|l| l.contains("will/polite"))
        .collect();
    assert!(
        polite_wills.is_empty(),
        "will sent after a clean DISCONNECT: {polite_wills:?}"
    );
    Ok(())
}

#[test]
fn second_client_with_same_id_takes_over_the_session() -> anyhow::Result<()> {
    let dir = TestDir::new("takeover")?;
    let gw = gateway(&dir)?;
    let mut first = Client::spawn(
        &dir,
        "first",
        gw.port(),
        &["--client-id", "dup", "--subscribe", "take/a:1"],
    )?;
    first.wait_line("subscribed", Duration::from_secs(30))?;
    let mut second = Client::spawn(
        &dir,
        "second",
        gw.port(),
        &["--client-id", "dup", "--subscribe", "take/b:1"],
    )?;
    second.wait_line("connected rc=Success", Duration::from_secs(30))?;
    second.wait_line("subscribed", Duration::from_secs(30))?;

    first.wait_line("disconnected", Duration::from_secs(30))?;
    first.proc().wait(Duration::from_secs(30))?;

    mosquitto_pub_ok(gw.port(), &["-t", "take/b", "-q", "1", "-m", "to-second"])?;
    second.wait_line("message 1 0 take/b to-second", Duration::from_secs(30))?;
    assert!(
        second.alive(),
        "the client that took over was disconnected too: {:?}",
        second.lines()
    );
    assert!(
        !second.lines().iter().any(|l| l.starts_with("disconnected")),
        "the new session was dropped: {:?}",
        second.lines()
    );
    Ok(())
}
