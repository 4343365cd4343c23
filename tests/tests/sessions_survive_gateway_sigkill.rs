//! Persistent sessions and retained messages survive a SIGKILL of the gateway: subscriptions,
//! the offline queue (QoS 1 messages acknowledged to their publisher while the subscriber was
//! away), an unacknowledged in-flight message (resent with DUP and the same packet id), and
//! retained messages, checked with paho-mqtt (MQTT 5 and 3.1.1), mosquitto_pub and raw
//! 3.1.1 packets (to see packet ids and flags exactly).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use outpost_tests::{GatewayConfig, Outpost, TestDir, mosquitto_pub_ok, py_script};

/// Runs `session_client.py` to completion; its stdout lines, and whether it exited 0.
fn session_client(port: u16, args: &[&str]) -> Result<(bool, Vec<String>)> {
    let out = Command::new("python3")
        .arg(py_script("session_client.py"))
        .args(["--port", &port.to_string()])
        .args(args)
        .output()
        .context("running session_client.py")?;
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    if !out.stderr.is_empty() {
        eprintln!(
            "session_client.py stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((out.status.success(), lines))
}

fn messages(lines: &[String]) -> Vec<&str> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("message "))
        .collect()
}

fn gateway(dir: &TestDir) -> Result<Outpost> {
    Outpost::start(dir, &GatewayConfig::new(dir, "sessions", None)?)
}

#[test]
fn mqtt5_session_subscriptions_offline_queue_and_retained_survive_sigkill() -> Result<()> {
    let dir = TestDir::new("session-sigkill-v5")?;
    let mut gw = gateway(&dir)?;
    let port = gw.port();
    let client = |extra: &[&str]| -> Result<(bool, Vec<String>)> {
        let mut args = vec!["--protocol", "5", "--client-id", "keeper5"];
        args.extend_from_slice(extra);
        session_client(port, &args)
    };

    let (ok, lines) = client(&["--subscribe", "keep/#:1", "--subscription-id", "7"])?;
    assert!(ok, "first connection failed: {lines:?}");
    assert_eq!(
        lines[0], "connected rc=Success session_present=0",
        "{lines:?}"
    );
    assert_eq!(lines[1], "subscribed granted=1", "{lines:?}");

    // While the subscriber is away: five QoS 1 messages (each PUBACKed to mosquitto_pub, so
    // acknowledged as stored) and a retained one.
    for i in 1..=5 {
        mosquitto_pub_ok(
            port,
            &[
                "-V",
                "mqttv5",
                "-t",
                "keep/a",
                "-q",
                "1",
                "-m",
                &format!("queued-{i}"),
            ],
        )?;
    }
    mosquitto_pub_ok(
        port,
        &["-t", "other/retained", "-q", "1", "-r", "-m", "still-here"],
    )?;

    gw.sigkill()?;
    gw.restart()?;

    // Reconnecting without subscribing: the session is there, with its queue, in order, and
    // the subscription identifier of the subscription that selected them.
    let (ok, lines) = client(&["--expect", "5", "--timeout", "20"])?;
    assert!(ok, "queued messages missing after SIGKILL: {lines:?}");
    assert_eq!(
        lines[0], "connected rc=Success session_present=1",
        "{lines:?}"
    );
    let expected: Vec<String> = (1..=5)
        .map(|i| format!("1 0 keep/a queued-{i} subids=7"))
        .collect();
    assert_eq!(messages(&lines), expected, "{lines:?}");

    // The subscription itself survived: a new message reaches the session again.
    mosquitto_pub_ok(port, &["-t", "keep/b", "-q", "1", "-m", "after-restart"])?;
    let (ok, lines) = client(&["--expect", "1", "--timeout", "20"])?;
    assert!(ok, "the restored subscription got nothing: {lines:?}");
    assert_eq!(
        messages(&lines),
        ["1 0 keep/b after-restart subids=7"],
        "{lines:?}"
    );

    // The retained message survived too.
    let (ok, lines) = session_client(
        port,
        &[
            "--protocol",
            "5",
            "--client-id",
            "late",
            "--subscribe",
            "other/#:1",
            "--expect",
            "1",
            "--timeout",
            "20",
        ],
    )?;
    assert!(ok, "retained message lost: {lines:?}");
    assert_eq!(
        messages(&lines),
        ["1 1 other/retained still-here subids=-"],
        "{lines:?}"
    );

    // Delivered messages are gone from the session: after another SIGKILL nothing comes again.
    gw.sigkill()?;
    gw.restart()?;
    mosquitto_pub_ok(port, &["-t", "keep/c", "-q", "1", "-m", "sentinel"])?;
    let (ok, lines) = client(&["--expect", "1", "--timeout", "20"])?;
    assert!(ok, "{lines:?}");
    assert_eq!(
        lines[0], "connected rc=Success session_present=1",
        "{lines:?}"
    );
    assert_eq!(
        messages(&lines),
        ["1 0 keep/c sentinel subids=7"],
        "acknowledged messages were delivered again: {lines:?}"
    );
    Ok(())
}

#[test]
fn mqtt311_persistent_session_survives_sigkill_and_clean_session_does_not() -> Result<()> {
    let dir = TestDir::new("session-sigkill-v311")?;
    let mut gw = gateway(&dir)?;
    let port = gw.port();
    let v311 = |id: &str, extra: &[&str]| -> Result<(bool, Vec<String>)> {
        let mut args = vec!["--protocol", "3.1.1", "--client-id", id];
        args.extend_from_slice(extra);
        session_client(port, &args)
    };
    let (ok, lines) = v311("keeper311", &["--subscribe", "q311/#:2"])?;
    assert!(ok, "{lines:?}");
    assert_eq!(lines[1], "subscribed granted=2", "{lines:?}");
    // (paho hands a QoS 2 message over only after PUBREL, so the QoS 1 one goes first to keep
    // the order it prints the order they were queued in.)
    mosquitto_pub_ok(port, &["-t", "q311/x", "-q", "1", "-m", "at-least-once"])?;
    mosquitto_pub_ok(port, &["-t", "q311/x", "-q", "2", "-m", "exactly-once"])?;
    mosquitto_pub_ok(port, &["-t", "q311/x", "-q", "0", "-m", "not-kept-offline"])?;

    gw.sigkill()?;
    gw.restart()?;

    let (ok, lines) = v311("keeper311", &["--expect", "2", "--timeout", "20"])?;
    assert!(ok, "{lines:?}");
    assert_eq!(
        lines[0], "connected rc=Success session_present=1",
        "{lines:?}"
    );
    assert_eq!(
        messages(&lines),
        [
            "1 0 q311/x at-least-once subids=-",
            "2 0 q311/x exactly-once subids=-"
        ],
        "delivered QoS is the published QoS, QoS 0 is not queued offline: {lines:?}"
    );
    // An id never seen has no session, before or after a restart.
    let (ok, lines) = v311("stranger", &[])?;
    assert!(ok, "{lines:?}");
    assert_eq!(
        lines[0], "connected rc=Success session_present=0",
        "{lines:?}"
    );
    Ok(())
}

// --- raw MQTT 3.1.1, to see the packet id and DUP flag of a resent message ---------------------

fn connect_raw(port: u16, client_id: &str) -> Result<(TcpStream, u8)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let id = client_id.as_bytes();
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x00, 0, 60];
    body.extend_from_slice(&u16::try_from(id.len())?.to_be_bytes());
    body.extend_from_slice(id);
    let mut pkt = vec![0x10, u8::try_from(body.len())?];
    pkt.extend(body);
    s.write_all(&pkt)?;
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack)?;
    if connack[0] != 0x20 || connack[3] != 0 {
        bail!("CONNECT refused: {connack:02x?}");
    }
    Ok((s, connack[2] & 1))
}

/// Reads one packet: (first byte, body).
fn read_packet(s: &mut TcpStream) -> Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 1];
    s.read_exact(&mut head)?;
    let (mut len, mut mult) = (0usize, 1usize);
    loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        len += usize::from(b[0] & 0x7f) * mult;
        mult *= 128;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok((head[0], body))
}

/// A QoS 1 PUBLISH's (dup, packet id, topic, payload).
fn parse_publish(first: u8, body: &[u8]) -> Result<(bool, u16, String, Vec<u8>)> {
    if first & 0xf0 != 0x30 || (first >> 1) & 3 != 1 {
        bail!("expected a QoS 1 PUBLISH, got {first:02x} {body:02x?}");
    }
    let tlen = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let topic = String::from_utf8(body[2..2 + tlen].to_vec())?;
    let pkid = u16::from_be_bytes([body[2 + tlen], body[3 + tlen]]);
    Ok((first & 0x08 != 0, pkid, topic, body[4 + tlen..].to_vec()))
}

#[test]
fn unacknowledged_inflight_message_is_resent_with_dup_and_same_packet_id_after_sigkill()
-> Result<()> {
    let dir = TestDir::new("session-sigkill-inflight")?;
    let mut gw = gateway(&dir)?;
    let port = gw.port();

    let (mut s, present) = connect_raw(port, "raw-inflight")?;
    assert_eq!(present, 0);
    // SUBSCRIBE pkid 1, "inflight/#" QoS 1.
    let filter = b"inflight/#";
    let mut body = vec![0, 1, 0, u8::try_from(filter.len())?];
    body.extend_from_slice(filter);
    body.push(1);
    let mut pkt = vec![0x82, u8::try_from(body.len())?];
    pkt.extend(body);
    s.write_all(&pkt)?;
    let (first, suback) = read_packet(&mut s)?;
    assert_eq!((first, suback), (0x90, vec![0, 1, 1]), "SUBACK");

    mosquitto_pub_ok(port, &["-t", "inflight/x", "-q", "1", "-m", "unacked"])?;
    let (first, body) = read_packet(&mut s)?;
    let (dup, pkid, topic, payload) = parse_publish(first, &body)?;
    assert!(!dup);
    assert_eq!(
        (topic.as_str(), payload.as_slice()),
        ("inflight/x", &b"unacked"[..])
    );
    // Not acknowledged: the gateway dies with the message in flight.
    gw.sigkill()?;
    drop(s);
    gw.restart()?;

    let (mut s, present) = connect_raw(port, "raw-inflight")?;
    assert_eq!(present, 1, "session-present after SIGKILL");
    let (first, body) = read_packet(&mut s)?;
    let (dup, again, topic, payload) = parse_publish(first, &body)?;
    assert!(dup, "a resent message carries DUP");
    assert_eq!(
        again, pkid,
        "resent with its original packet id (MQTT 3.1.1 §4.4)"
    );
    assert_eq!(
        (topic.as_str(), payload.as_slice()),
        ("inflight/x", &b"unacked"[..])
    );
    // PUBACK it now; after another SIGKILL it does not come back.
    let [hi, lo] = pkid.to_be_bytes();
    s.write_all(&[0x40, 2, hi, lo])?;
    // A round trip (PINGREQ/PINGRESP) so the PUBACK has been handled before the kill.
    s.write_all(&[0xc0, 0])?;
    let (first, _) = read_packet(&mut s)?;
    assert_eq!(first, 0xd0, "PINGRESP");
    // The PUBACK's delete is group-committed without anyone waiting: give it a moment.
    std::thread::sleep(Duration::from_millis(500));
    gw.sigkill()?;
    drop(s);
    gw.restart()?;
    let (mut s, present) = connect_raw(port, "raw-inflight")?;
    assert_eq!(present, 1);
    mosquitto_pub_ok(port, &["-t", "inflight/y", "-q", "1", "-m", "sentinel"])?;
    let (first, body) = read_packet(&mut s)?;
    let (_, _, topic, payload) = parse_publish(first, &body)?;
    assert_eq!(
        (topic.as_str(), payload.as_slice()),
        ("inflight/y", &b"sentinel"[..]),
        "the acknowledged message was sent again"
    );
    Ok(())
}
