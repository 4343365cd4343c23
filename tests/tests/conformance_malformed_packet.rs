//! A malformed packet closes only the connection that sent it: raw TCP garbage after a valid
//! CONNECT gets that socket closed, while another subscriber keeps receiving; the broker counts
//! malformed packets in `status --json` (runtime.broker_malformed_packets).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use outpost_tests::{Client, GatewayConfig, Outpost, TestDir, json_u64, mosquitto_pub_ok};

/// MQTT 3.1.1 CONNECT: clean session, keep-alive 60, client id `id` (3 bytes).
fn connect_packet(id: &[u8; 3]) -> Vec<u8> {
    let mut p = vec![0x10, 15, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 3];
    p.extend_from_slice(id);
    p
}

/// Connects, checks the CONNACK, sends `garbage`, and requires the server to close the socket.
fn garbage_closes_connection(port: u16, id: &[u8; 3], garbage: &[u8]) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.write_all(&connect_packet(id))?;
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack)?;
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "CONNACK accepted");
    s.write_all(garbage)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Ok(()), // reset: closed
        }
        if Instant::now() > deadline {
            anyhow::bail!("connection still open 30 s after sending {garbage:02x?}");
        }
    }
}

#[test]
fn malformed_packet_closes_only_that_connection() -> anyhow::Result<()> {
    let dir = TestDir::new("malformed")?;
    let gw = Outpost::start(&dir, &GatewayConfig::new(&dir, "gw1", None)?)?;
    let sub = Client::spawn(&dir, "bystander", gw.port(), &["--subscribe", "m/#:1"])?;
    sub.wait_line("subscribed", Duration::from_secs(30))?;
    // An idle bystander connection at the protocol level too.
    let mut idle = TcpStream::connect(("127.0.0.1", gw.port()))?;
    idle.write_all(&connect_packet(b"idl"))?;
    let mut connack = [0u8; 4];
    idle.set_read_timeout(Some(Duration::from_secs(30)))?;
    idle.read_exact(&mut connack)?;

    let cases: [(&str, &[u8]); 3] = [
        ("reserved packet type 0", &[0x00, 0x00]),
        (
            "remaining length longer than 4 bytes",
            &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
        ),
        (
            "topic length past the end of the packet",
            &[0x30, 0x04, 0x00, 0x10, b'a', b'b'],
        ),
    ];
    mosquitto_pub_ok(gw.port(), &["-t", "m/0", "-q", "1", "-m", "before"])?;
    sub.wait_line("message 1 0 m/0 before", Duration::from_secs(30))?;
    for (i, (what, garbage)) in cases.iter().enumerate() {
        garbage_closes_connection(gw.port(), b"bad", garbage)
            .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
        let topic = format!("m/{}", i + 1);
        mosquitto_pub_ok(gw.port(), &["-t", &topic, "-q", "1", "-m", "after"])?;
        sub.wait_line(
            &format!("message 1 0 {topic} after"),
            Duration::from_secs(30),
        )
        .map_err(|e| anyhow::anyhow!("bystander stopped receiving after {what}: {e}"))?;
    }
    assert!(
        !sub.lines().iter().any(|l| l.starts_with("disconnected")),
        "the bystander subscriber was disconnected: {:?}",
        sub.lines()
    );
    // The idle raw connection is still open: a PINGREQ gets a PINGRESP.
    idle.write_all(&[0xC0, 0x00])?;
    let mut pingresp = [0u8; 2];
    idle.read_exact(&mut pingresp)?;
    assert_eq!(pingresp, [0xD0, 0x00], "idle connection answered PINGREQ");

    gw.wait_status(
        "three malformed packets counted",
        Duration::from_secs(30),
        |s| json_u64(s, &["runtime", "broker_malformed_packets"]).is_some_and(|n| n >= 3),
    )?;
    Ok(())
}
