//! The gateway as a CoAP client: CoapObserver against a scripted device on a raw UDP socket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet};
use outpost_protocols::coap::{CoapObserver, ObserveSettings};
use outpost_protocols::{Inbound, Source};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const OBSERVE: u16 = 6;

fn uint_opt(p: &Packet, n: u16) -> Option<u32> {
    p.get_first_option(CoapOption::from(n))
        .map(|v| v.iter().fold(0u32, |a, b| (a << 8) | u32::from(*b)))
}

fn set_uint(p: &mut Packet, n: u16, v: u32) {
    let b = v.to_be_bytes();
    let skip = b.iter().take_while(|x| **x == 0).count();
    p.add_option(CoapOption::from(n), b[skip..].to_vec());
}

struct Device {
    sock: UdpSocket,
}

impl Device {
    async fn recv(&self) -> (Packet, std::net::SocketAddr) {
        let mut buf = vec![0u8; 2048];
        let (n, from) = timeout(Duration::from_secs(5), self.sock.recv_from(&mut buf))
            .await
            .expect("device got nothing")
            .unwrap();
        (Packet::from_bytes(&buf[..n]).unwrap(), from)
    }

    async fn notify(
        &self,
        to: std::net::SocketAddr,
        token: &[u8],
        mid: u16,
        t: MessageType,
        seq: Option<u32>,
        body: &[u8],
    ) {
        let mut p = Packet::new();
        p.header.set_type(t);
        p.header.code = MessageClass::from(0x45);
        p.header.message_id = mid;
        p.set_token(token.to_vec());
        if let Some(seq) = seq {
            set_uint(&mut p, OBSERVE, seq);
        }
        set_uint(&mut p, 12, 110);
        p.payload = body.to_vec();
        self.sock.send_to(&p.to_bytes().unwrap(), to).await.unwrap();
    }
}

/// Takes what the observer hands over and commits it.
fn gateway(mut rx: mpsc::Receiver<Inbound>) -> mpsc::UnboundedReceiver<Inbound> {
    let (tx, out) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(mut m) = rx.recv().await {
            if let Some(r) = m.reply.take() {
                let _ = r.send(Ok(()));
            }
            let _ = tx.send(m);
        }
    });
    out
}

#[tokio::test]
async fn observer_ingests_notifications_and_reregisters_after_a_device_restart() {
    let device = Device {
        sock: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    };
    let uri = format!("coap://{}/sensors/temp", device.sock.local_addr().unwrap());
    let settings = ObserveSettings::from_uri(&uri, "devices/d1/temp").unwrap();
    let observer = CoapObserver::bind(settings).await.unwrap();
    let handle = observer.handle();
    let (tx, rx) = mpsc::channel(8);
    let mut seen = gateway(rx);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(observer.run(tx, shutdown.clone()));

    // Registration: a CON GET with Observe=0 on the path.
    let (reg, gw) = device.recv().await;
    assert_eq!(reg.header.get_type(), MessageType::Confirmable);
    assert_eq!(u8::from(reg.header.code), 0x01);
    assert_eq!(uint_opt(&reg, OBSERVE), Some(0));
    let path: Vec<Vec<u8>> = reg
        .get_option(CoapOption::UriPath)
        .unwrap()
        .iter()
        .cloned()
        .collect();
    assert_eq!(path, vec![b"sensors".to_vec(), b"temp".to_vec()]);
    let token = reg.get_token().to_vec();
    device
        .notify(
            gw,
            &token,
            reg.header.message_id,
            MessageType::Acknowledgement,
            Some(100),
            b"20",
        )
        .await;
    let m = seen.recv().await.unwrap();
    assert_eq!(m.topic, "devices/d1/temp");
    assert_eq!(m.source, Source::Coap);
    assert_eq!(m.content_format, Some(110));
    assert_eq!(&m.payload[..], b"20");

    // A NON and a CON notification; the CON one is ACKed after the commit.
    device
        .notify(
            gw,
            &token,
            500,
            MessageType::NonConfirmable,
            Some(101),
            b"21",
        )
        .await;
    assert_eq!(&seen.recv().await.unwrap().payload[..], b"21");
    device
        .notify(gw, &token, 501, MessageType::Confirmable, Some(102), b"22")
        .await;
    assert_eq!(&seen.recv().await.unwrap().payload[..], b"22");
    let (ack, _) = device.recv().await;
    assert_eq!(ack.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(ack.header.message_id, 501);

    // The device restarts: its sequence goes back to 1. Not ingested; registered again.
    device
        .notify(gw, &token, 502, MessageType::NonConfirmable, Some(1), b"99")
        .await;
    let (again, _) = device.recv().await;
    assert_eq!(uint_opt(&again, OBSERVE), Some(0));
    assert!(
        timeout(Duration::from_millis(100), seen.recv())
            .await
            .is_err()
    );
    let stats = handle.stats();
    assert_eq!(stats.stored, 3);
    assert_eq!(stats.reregistrations, 1);
    assert_eq!(stats.registrations, 2);

    shutdown.cancel();
    timeout(Duration::from_secs(2), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
