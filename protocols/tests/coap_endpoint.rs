//! The CoAP endpoint on 127.0.0.1:0, driven with raw coap-lite packets over a UDP socket, with a
//! scripted gateway behind it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet};
use outpost_protocols::coap::{CoapHandle, CoapServer, CoapSettings};
use outpost_protocols::{Inbound, IngestRefusal, IngestReply, Source};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const GET: u8 = 0x01;
const POST: u8 = 0x02;
const PUT: u8 = 0x03;
const DELETE: u8 = 0x04;

struct Server {
    addr: SocketAddr,
    handle: CoapHandle,
    shutdown: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn settings() -> CoapSettings {
    let mut s = CoapSettings::new(vec!["127.0.0.1:0".parse().unwrap()]);
    s.max_payload = 8 * 1024;
    s.max_exchanges = 64;
    s.max_observers = 4;
    s
}

async fn start_manual(s: CoapSettings) -> (Server, mpsc::Receiver<Inbound>) {
    let server = CoapServer::bind(s).await.expect("bind");
    let addr = server.local_addrs()[0];
    let handle = server.handle();
    let (tx, rx) = mpsc::channel(16);
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move { server.run(tx, token).await.expect("run") });
    (
        Server {
            addr,
            handle,
            shutdown,
        },
        rx,
    )
}

/// A gateway that answers every reading with `decide`; what it saw goes to the receiver.
async fn start(
    decide: impl Fn(&Inbound) -> IngestReply + Send + 'static,
) -> (Server, mpsc::UnboundedReceiver<Inbound>) {
    let (server, mut rx) = start_manual(settings()).await;
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(mut inbound) = rx.recv().await {
            let answer = decide(&inbound);
            if let Some(reply) = inbound.reply.take() {
                let _ = reply.send(answer);
            }
            let _ = seen_tx.send(inbound);
        }
    });
    (server, seen_rx)
}

struct Client {
    sock: UdpSocket,
    server: SocketAddr,
    mid: std::cell::Cell<u16>,
}

impl Client {
    async fn new(server: SocketAddr) -> Self {
        Client {
            sock: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            server,
            mid: std::cell::Cell::new(100),
        }
    }

    fn next_mid(&self) -> u16 {
        self.mid.set(self.mid.get() + 1);
        self.mid.get()
    }

    fn request(&self, t: MessageType, code: u8, path: &str, payload: &[u8]) -> Packet {
        let mid = self.next_mid();
        let mut p = Packet::new();
        p.header.set_type(t);
        p.header.code = MessageClass::from(code);
        p.header.message_id = mid;
        p.set_token(vec![0xa0, (mid & 0xff) as u8]);
        for seg in path.split('/').filter(|s| !s.is_empty()) {
            let (seg, query) = match seg.split_once('?') {
                Some((s, q)) => (s, Some(q)),
                None => (seg, None),
            };
            p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
            if let Some(q) = query {
                p.add_option(CoapOption::UriQuery, q.as_bytes().to_vec());
            }
        }
        p.payload = payload.to_vec();
        p
    }

    async fn send(&self, p: &Packet) {
        self.send_raw(&p.to_bytes_with_limit(65_000).unwrap()).await;
    }

    async fn send_raw(&self, b: &[u8]) {
        self.sock.send_to(b, self.server).await.unwrap();
    }

    async fn recv_raw(&self, wait: Duration) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65_535];
        match timeout(wait, self.sock.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
            _ => None,
        }
    }

    async fn recv(&self, wait: Duration) -> Option<Packet> {
        self.recv_raw(wait)
            .await
            .map(|b| Packet::from_bytes(&b).expect("server sent a valid packet"))
    }

    /// Sends `p` and returns the response.
    async fn call(&self, p: &Packet) -> Packet {
        self.send(p).await;
        self.recv(Duration::from_secs(3)).await.expect("response")
    }
}

fn code(p: &Packet) -> u8 {
    p.header.code.into()
}

fn uint_opt(p: &Packet, n: u16) -> Option<u32> {
    p.get_first_option(CoapOption::from(n))
        .map(|v| v.iter().fold(0u32, |a, b| (a << 8) | u32::from(*b)))
}

fn set_uint(p: &mut Packet, n: u16, v: u32) {
    let b = v.to_be_bytes();
    let skip = b.iter().take_while(|x| **x == 0).count();
    p.add_option(CoapOption::from(n), b[skip..].to_vec());
}

const CREATED: u8 = 0x41;
const CHANGED: u8 = 0x44;
const CONTENT: u8 = 0x45;
const CONTINUE: u8 = 0x5f;
const BAD_REQUEST: u8 = 0x80;
const BAD_OPTION: u8 = 0x82;
const NOT_FOUND: u8 = 0x84;
const METHOD_NOT_ALLOWED: u8 = 0x85;
const INCOMPLETE: u8 = 0x88;
const TOO_LARGE: u8 = 0x8d;
const UNSUPPORTED: u8 = 0x8f;
const UNAVAILABLE: u8 = 0xa3;

const OBSERVE: u16 = 6;
const CONTENT_FORMAT: u16 = 12;
const MAX_AGE: u16 = 14;
const BLOCK2: u16 = 23;
const BLOCK1: u16 = 27;
const SIZE1: u16 = 60;

#[tokio::test]
async fn confirmable_post_is_answered_only_after_the_commit() {
    let (server, mut rx) = start_manual(settings()).await;
    let c = Client::new(server.addr).await;
    let mut req = c.request(MessageType::Confirmable, POST, "t/room1/temp", b"\x81\xa0");
    set_uint(&mut req, CONTENT_FORMAT, 112);
    c.send(&req).await;
    let mut inbound = timeout(Duration::from_secs(2), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(inbound.topic, "sensors/room1/temp");
    assert_eq!(inbound.source, Source::Coap);
    assert_eq!(inbound.content_format, Some(112));
    assert_eq!(&inbound.payload[..], b"\x81\xa0");
    // Not committed yet: nothing comes back.
    assert!(c.recv(Duration::from_millis(400)).await.is_none());
    inbound.reply.take().unwrap().send(Ok(())).unwrap();
    let resp = c.recv(Duration::from_secs(2)).await.unwrap();
    assert_eq!(resp.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(resp.header.message_id, req.header.message_id);
    assert_eq!(resp.get_token(), req.get_token());
    assert_eq!(code(&resp), CREATED);
    assert_eq!(server.handle.stats().stored, 1);

    // PUT answers 2.04.
    let req = c.request(MessageType::Confirmable, PUT, "t/room1/temp", b"21");
    c.send(&req).await;
    let mut inbound = rx.recv().await.unwrap();
    inbound.reply.take().unwrap().send(Ok(())).unwrap();
    assert_eq!(
        code(&c.recv(Duration::from_secs(2)).await.unwrap()),
        CHANGED
    );
}

#[tokio::test]
async fn retransmitted_confirmable_post_is_stored_once_with_the_same_response() {
    let (server, mut seen) = start(|_| Ok(())).await;
    let c = Client::new(server.addr).await;
    let req = c.request(MessageType::Confirmable, POST, "t/a", b"1");
    let first = {
        c.send(&req).await;
        c.recv_raw(Duration::from_secs(2)).await.unwrap()
    };
    // The ACK was "lost": the client retransmits the same message.
    c.send(&req).await;
    let second = c.recv_raw(Duration::from_secs(2)).await.unwrap();
    assert_eq!(first, second, "the same response again");
    assert!(seen.recv().await.is_some());
    assert!(
        timeout(Duration::from_millis(300), seen.recv())
            .await
            .is_err(),
        "stored once"
    );
    let stats = server.handle.stats();
    assert_eq!(stats.duplicates, 1);
    assert_eq!(stats.stored, 1);
}

#[tokio::test]
async fn duplicate_while_pending_is_not_handed_over_twice() {
    let (server, mut rx) = start_manual(settings()).await;
    let c = Client::new(server.addr).await;
    let req = c.request(MessageType::Confirmable, POST, "t/a", b"1");
    c.send(&req).await;
    let mut inbound = rx.recv().await.unwrap();
    c.send(&req).await;
    assert!(
        timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err()
    );
    assert!(c.recv(Duration::from_millis(100)).await.is_none());
    inbound.reply.take().unwrap().send(Ok(())).unwrap();
    assert_eq!(
        code(&c.recv(Duration::from_secs(2)).await.unwrap()),
        CREATED
    );
}

#[tokio::test]
async fn slow_commit_gets_an_empty_ack_then_a_separate_confirmable_response() {
    let (server, mut rx) = start_manual(settings()).await;
    let c = Client::new(server.addr).await;
    let req = c.request(MessageType::Confirmable, POST, "t/slow", b"1");
    c.send(&req).await;
    let mut inbound = rx.recv().await.unwrap();
    let ack = c.recv(Duration::from_secs(3)).await.unwrap();
    assert_eq!(ack.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(code(&ack), 0, "empty ACK");
    assert_eq!(ack.header.message_id, req.header.message_id);
    inbound.reply.take().unwrap().send(Ok(())).unwrap();
    let resp = c.recv(Duration::from_secs(2)).await.unwrap();
    assert_eq!(resp.header.get_type(), MessageType::Confirmable);
    assert_eq!(code(&resp), CREATED);
    assert_eq!(resp.get_token(), req.get_token());
    // Not ACKed: retransmitted after ACK_TIMEOUT (2-3 s).
    let again = c.recv(Duration::from_secs(4)).await.unwrap();
    assert_eq!(again.header.message_id, resp.header.message_id);
    let mut ack = Packet::new();
    ack.header.set_type(MessageType::Acknowledgement);
    ack.header.code = MessageClass::Empty;
    ack.header.message_id = resp.header.message_id;
    c.send(&ack).await;
    assert!(
        c.recv(Duration::from_secs(5)).await.is_none(),
        "stops after the ACK"
    );
    assert_eq!(server.handle.stats().retransmissions, 1);
}

#[tokio::test]
async fn non_confirmable_request_gets_a_non_confirmable_response() {
    let (server, mut seen) = start(|_| Ok(())).await;
    let c = Client::new(server.addr).await;
    let req = c.request(MessageType::NonConfirmable, POST, "t/n", b"x");
    let resp = c.call(&req).await;
    assert_eq!(resp.header.get_type(), MessageType::NonConfirmable);
    assert_eq!(code(&resp), CREATED);
    assert_eq!(resp.get_token(), req.get_token());
    assert!(seen.recv().await.is_some());
    // A duplicate NON is ignored.
    c.send(&req).await;
    assert!(c.recv(Duration::from_millis(300)).await.is_none());
    assert!(
        timeout(Duration::from_millis(100), seen.recv())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn block1_upload_of_several_kilobytes_is_reassembled() {
    let (server, mut seen) = start(|_| Ok(())).await;
    let c = Client::new(server.addr).await;
    let body: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let blocks: Vec<&[u8]> = body.chunks(1024).collect();
    for (i, chunk) in blocks.iter().enumerate() {
        let more = i + 1 < blocks.len();
        let mut req = c.request(MessageType::Confirmable, POST, "t/big", chunk);
        set_uint(
            &mut req,
            BLOCK1,
            ((i as u32) << 4) | (u32::from(more) << 3) | 6,
        );
        if i == 0 {
            set_uint(&mut req, SIZE1, body.len() as u32);
            set_uint(&mut req, CONTENT_FORMAT, 60);
        }
        let resp = c.call(&req).await;
        let echoed = uint_opt(&resp, BLOCK1).unwrap();
        assert_eq!(echoed >> 4, i as u32);
        if more {
            assert_eq!(code(&resp), CONTINUE, "block {i}");
            assert_eq!(echoed & 0x8, 0x8);
        } else {
            assert_eq!(code(&resp), CREATED);
            assert_eq!(echoed & 0x8, 0);
        }
    }
    let inbound = seen.recv().await.unwrap();
    assert_eq!(&inbound.payload[..], &body[..]);
    assert_eq!(inbound.content_format, Some(60));
    assert_eq!(server.handle.stats().block_uploads, 1);

    // Out of order: block 2 after block 0.
    let mut b0 = c.request(MessageType::Confirmable, POST, "t/big", &body[..1024]);
    set_uint(&mut b0, BLOCK1, 0x8 | 6);
    assert_eq!(code(&c.call(&b0).await), CONTINUE);
    let mut b2 = c.request(MessageType::Confirmable, POST, "t/big", &body[2048..3072]);
    set_uint(&mut b2, BLOCK1, (2 << 4) | 0x8 | 6);
    assert_eq!(code(&c.call(&b2).await), INCOMPLETE);
    // A later block without block 0.
    let mut b1 = c.request(MessageType::Confirmable, POST, "t/other", &body[..1024]);
    set_uint(&mut b1, BLOCK1, (1 << 4) | 0x8 | 6);
    assert_eq!(code(&c.call(&b1).await), INCOMPLETE);
}

/// Found by `src/coap/endpoint/fuzz.rs`: reassemblies were bounded in count only, so one peer
/// could hold `max_exchanges` x `max_payload` (256 MiB with the defaults) in uploads it never
/// finished. The bytes are bounded too; the oldest upload makes room.
#[tokio::test]
async fn block1_reassemblies_are_bounded_in_bytes_oldest_evicted() {
    let mut s = settings();
    s.max_buffered_bytes = 8 * 1024;
    let (server, _seen) = start_manual(s).await;
    let c = Client::new(server.addr).await;
    let block = |topic: &str, num: u32| {
        let mut b = c.request(MessageType::Confirmable, POST, topic, &[b'b'; 1024]);
        set_uint(&mut b, BLOCK1, (num << 4) | 0x8 | 6);
        b
    };
    // Four uploads of 2 KiB each fill the 8 KiB.
    for num in 0..2 {
        for topic in ["t/u0", "t/u1", "t/u2", "t/u3"] {
            assert_eq!(code(&c.call(&block(topic, num)).await), CONTINUE);
        }
    }
    assert_eq!(server.handle.stats().evicted, 0);
    // A fifth: the oldest (u0) goes.
    assert_eq!(code(&c.call(&block("t/u4", 0)).await), CONTINUE);
    assert_eq!(server.handle.stats().evicted, 1);
    assert_eq!(code(&c.call(&block("t/u0", 2)).await), INCOMPLETE);
    assert_eq!(code(&c.call(&block("t/u1", 2)).await), CONTINUE);
}

/// Found by `src/coap/endpoint/fuzz.rs`: readings waiting for the gateway were bounded in count
/// only (`max_exchanges` x `max_payload` while the store is slow). Their bytes are bounded too,
/// with 5.03 Max-Age 1 beyond; and a last block refused so keeps its upload, so the client's
/// retry completes it (it used to be dropped: the retry got 4.08).
#[tokio::test]
async fn readings_waiting_for_the_gateway_are_bounded_in_bytes_and_a_refused_last_block_can_be_retried()
 {
    let mut s = settings();
    s.max_payload = 4 * 1024;
    s.max_buffered_bytes = 4 * 1024;
    let (server, mut rx) = start_manual(s).await;
    let c = Client::new(server.addr).await;
    // 3 KiB waiting for the gateway.
    let held = c.request(MessageType::NonConfirmable, POST, "t/held", &[b'h'; 3072]);
    c.send(&held).await;
    let mut inbound = timeout(Duration::from_secs(2), rx.recv())
        .await
        .unwrap()
        .unwrap();
    // 2 KiB more would pass the 4 KiB: 5.03, for a plain request and for the last block.
    let plain = c.request(MessageType::Confirmable, POST, "t/plain", &[b'p'; 2048]);
    let resp = c.call(&plain).await;
    assert_eq!(code(&resp), UNAVAILABLE);
    assert_eq!(uint_opt(&resp, MAX_AGE), Some(1));
    let mut b0 = c.request(MessageType::Confirmable, POST, "t/up", &[b'0'; 1024]);
    set_uint(&mut b0, BLOCK1, 0x8 | 6);
    assert_eq!(code(&c.call(&b0).await), CONTINUE);
    let last = |c: &Client| {
        let mut b1 = c.request(MessageType::Confirmable, POST, "t/up", &[b'1'; 1024]);
        set_uint(&mut b1, BLOCK1, (1 << 4) | 6);
        b1
    };
    assert_eq!(code(&c.call(&last(&c)).await), UNAVAILABLE);
    assert_eq!(server.handle.stats().overloaded, 2);
    // The gateway answers; the client retries the last block (a new message): complete.
    inbound.reply.take().unwrap().send(Ok(())).unwrap();
    assert_eq!(
        code(&c.recv(Duration::from_secs(2)).await.unwrap()),
        CREATED
    );
    c.send(&last(&c)).await;
    let mut up = timeout(Duration::from_secs(2), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(up.topic, "sensors/up");
    assert_eq!(&up.payload[..1024], &[b'0'; 1024][..]);
    assert_eq!(&up.payload[1024..], &[b'1'; 1024][..]);
    up.reply.take().unwrap().send(Ok(())).unwrap();
    assert_eq!(
        code(&c.recv(Duration::from_secs(2)).await.unwrap()),
        CREATED
    );
}

#[tokio::test]
async fn too_large_is_413_with_size1() {
    let (server, mut seen) = start(|_| Ok(())).await;
    let c = Client::new(server.addr).await;
    let req = c.request(MessageType::Confirmable, POST, "t/x", &vec![b'a'; 9000]);
    let resp = c.call(&req).await;
    assert_eq!(code(&resp), TOO_LARGE);
    assert_eq!(uint_opt(&resp, SIZE1), Some(8 * 1024));
    // Announced up front with Size1 on block 0.
    let mut b0 = c.request(MessageType::Confirmable, POST, "t/x", &[0; 1024]);
    set_uint(&mut b0, BLOCK1, 0x8 | 6);
    set_uint(&mut b0, SIZE1, 100_000);
    assert_eq!(code(&c.call(&b0).await), TOO_LARGE);
    // Discovered while reassembling.
    for i in 0..9u32 {
        let mut b = c.request(MessageType::Confirmable, POST, "t/y", &[0; 1024]);
        set_uint(&mut b, BLOCK1, (i << 4) | 0x8 | 6);
        let resp = c.call(&b).await;
        if i < 8 {
            assert_eq!(code(&resp), CONTINUE);
        } else {
            assert_eq!(code(&resp), TOO_LARGE);
        }
    }
    assert!(
        timeout(Duration::from_millis(200), seen.recv())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn refusals_map_to_coap_codes() {
    let (server, _seen) = start(|m| match m.topic.as_str() {
        "sensors/invalid" => Err(IngestRefusal::PayloadInvalid(
            "SenML record 3: missing value".into(),
        )),
        "sensors/format" => Err(IngestRefusal::UnsupportedFormat),
        "sensors/large" => Err(IngestRefusal::TooLarge),
        "sensors/full" => Err(IngestRefusal::QuotaExceeded),
        _ => Err(IngestRefusal::StoreUnavailable),
    })
    .await;
    let c = Client::new(server.addr).await;
    let resp = c
        .call(&c.request(MessageType::Confirmable, POST, "t/invalid", b"x"))
        .await;
    assert_eq!(code(&resp), BAD_REQUEST);
    assert_eq!(resp.payload, b"SenML record 3: missing value");
    let resp = c
        .call(&c.request(MessageType::Confirmable, POST, "t/format", b"x"))
        .await;
    assert_eq!(code(&resp), UNSUPPORTED);
    let resp = c
        .call(&c.request(MessageType::Confirmable, POST, "t/large", b"x"))
        .await;
    assert_eq!(code(&resp), TOO_LARGE);
    for path in ["t/full", "t/down"] {
        let resp = c
            .call(&c.request(MessageType::Confirmable, POST, path, b"x"))
            .await;
        assert_eq!(code(&resp), UNAVAILABLE);
        assert_eq!(uint_opt(&resp, MAX_AGE), Some(30));
    }
    assert_eq!(server.handle.stats().refused, 5);
}

#[tokio::test]
async fn routing_errors() {
    let (server, _seen) = start(|_| Ok(())).await;
    let c = Client::new(server.addr).await;
    let req = c.request(MessageType::Confirmable, POST, "nope", b"x");
    assert_eq!(code(&c.call(&req).await), NOT_FOUND);
    let req = c.request(MessageType::Confirmable, GET, "t/a", b"");
    assert_eq!(code(&c.call(&req).await), METHOD_NOT_ALLOWED);
    let req = c.request(MessageType::Confirmable, DELETE, "status", b"");
    assert_eq!(code(&c.call(&req).await), METHOD_NOT_ALLOWED);
    let req = c.request(MessageType::Confirmable, POST, "t", b"x");
    assert_eq!(code(&c.call(&req).await), BAD_REQUEST);
    let req = c.request(MessageType::Confirmable, POST, "t/a+b", b"x");
    assert_eq!(code(&c.call(&req).await), BAD_REQUEST);
    // An unknown critical option (odd number, 2049).
    let mut req = c.request(MessageType::Confirmable, POST, "t/a", b"x");
    req.add_option(CoapOption::Unknown(2049), vec![1]);
    let resp = c.call(&req).await;
    assert_eq!(code(&resp), BAD_OPTION);
    // An unknown elective option is ignored.
    let mut req = c.request(MessageType::Confirmable, POST, "t/a", b"x");
    req.add_option(CoapOption::Unknown(2048), vec![1]);
    assert_eq!(code(&c.call(&req).await), CREATED);
}

#[tokio::test]
async fn well_known_core_lists_resources_and_filters() {
    let (server, _seen) = start(|_| Ok(())).await;
    let c = Client::new(server.addr).await;
    let resp = c
        .call(&c.request(MessageType::Confirmable, GET, ".well-known/core", b""))
        .await;
    assert_eq!(code(&resp), CONTENT);
    assert_eq!(uint_opt(&resp, CONTENT_FORMAT), Some(40));
    let text = String::from_utf8(resp.payload).unwrap();
    assert!(
        text.contains(r#"</t>;rt="outpost.ingest";ct="0 50 60 110 112""#),
        "{text}"
    );
    assert!(
        text.contains(r#"</status>;rt="outpost.status";ct=50;if="core.rp";obs"#),
        "{text}"
    );
    let resp = c
        .call(&c.request(
            MessageType::Confirmable,
            GET,
            ".well-known/core?rt=outpost.status",
            b"",
        ))
        .await;
    let text = String::from_utf8(resp.payload).unwrap();
    assert!(
        text.starts_with("</status>") && !text.contains("</t>"),
        "{text}"
    );
}

#[tokio::test]
async fn large_status_is_served_in_blocks() {
    let (server, _seen) = start(|_| Ok(())).await;
    let body = format!("{{\"pad\":\"{}\"}}", "x".repeat(3000));
    server.handle.set_status(body.clone());
    let c = Client::new(server.addr).await;
    let mut got = Vec::new();
    for num in 0.. {
        let mut req = c.request(MessageType::Confirmable, GET, "status", b"");
        set_uint(&mut req, BLOCK2, (num << 4) | 5); // 512-byte blocks
        let resp = c.call(&req).await;
        assert_eq!(code(&resp), CONTENT);
        got.extend_from_slice(&resp.payload);
        let b2 = uint_opt(&resp, BLOCK2).unwrap();
        if b2 & 0x8 == 0 {
            break;
        }
    }
    assert_eq!(got, body.as_bytes());
}

#[tokio::test]
async fn observe_notifies_with_increasing_sequence_until_reset() {
    let (server, _seen) = start(|_| Ok(())).await;
    server.handle.set_status(r#"{"n":0}"#);
    let c = Client::new(server.addr).await;
    let mut req = c.request(MessageType::Confirmable, GET, "status", b"");
    set_uint(&mut req, OBSERVE, 0);
    let resp = c.call(&req).await;
    assert_eq!(code(&resp), CONTENT);
    assert_eq!(resp.payload, br#"{"n":0}"#);
    let mut last = uint_opt(&resp, OBSERVE).expect("registered");
    assert_eq!(server.handle.stats().observers, 1);
    for i in 1..=6 {
        server.handle.set_status(format!(r#"{{"n":{i}}}"#));
        let n = c
            .recv(Duration::from_secs(2))
            .await
            .unwrap_or_else(|| panic!("notification {i}"));
        assert_eq!(n.get_token(), req.get_token());
        assert_eq!(n.payload, format!(r#"{{"n":{i}}}"#).as_bytes());
        let seq = uint_opt(&n, OBSERVE).unwrap();
        assert!(seq > last, "{seq} > {last}");
        last = seq;
        if n.header.get_type() == MessageType::Confirmable && i < 6 {
            let mut ack = Packet::new();
            ack.header.set_type(MessageType::Acknowledgement);
            ack.header.code = MessageClass::Empty;
            ack.header.message_id = n.header.message_id;
            c.send(&ack).await;
        }
        if i == 6 {
            // Not interested any more.
            let mut rst = Packet::new();
            rst.header.set_type(MessageType::Reset);
            rst.header.code = MessageClass::Empty;
            rst.header.message_id = n.header.message_id;
            c.send(&rst).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stats = server.handle.stats();
    assert_eq!(stats.observers, 0);
    assert_eq!(stats.observers_lost, 1);
    server.handle.set_status(r#"{"n":7}"#);
    assert!(c.recv(Duration::from_millis(500)).await.is_none());
}

#[tokio::test]
async fn observe_deregisters_with_observe_1_and_is_bounded() {
    let (server, _seen) = start(|_| Ok(())).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        let c = Client::new(server.addr).await;
        let mut req = c.request(MessageType::Confirmable, GET, "status", b"");
        set_uint(&mut req, OBSERVE, 0);
        let resp = c.call(&req).await;
        clients.push((c, req, uint_opt(&resp, OBSERVE).is_some()));
    }
    // max_observers = 4: the fifth is served without registration.
    let registered: Vec<bool> = clients.iter().map(|c| c.2).collect();
    assert_eq!(registered, [true, true, true, true, false]);
    assert_eq!(server.handle.stats().observers, 4);
    let (c, req, _) = &clients[0];
    let mut dereg = req.clone();
    dereg.header.message_id = c.next_mid();
    dereg.clear_option(CoapOption::Observe);
    set_uint(&mut dereg, OBSERVE, 1);
    let resp = c.call(&dereg).await;
    assert_eq!(code(&resp), CONTENT);
    assert_eq!(uint_opt(&resp, OBSERVE), None);
    assert_eq!(server.handle.stats().observers, 3);
}

#[tokio::test]
async fn malformed_datagrams_are_counted_and_the_server_keeps_serving() {
    let (server, mut seen) = start(|_| Ok(())).await;
    let c = Client::new(server.addr).await;
    // Too short; wrong version; token length 9; option delta 15; empty CON with a payload.
    for junk in [
        &[0x40][..],
        &[0x80, 0x01, 0, 1][..],
        &[0x49, 0x01, 0, 2, 1, 2, 3, 4, 5, 6, 7, 8, 9][..],
        &[0x40, 0x01, 0, 3, 0xf1, 0][..],
        &[0x40, 0x00, 0, 4, 0xff, 1][..],
    ] {
        c.send_raw(junk).await;
    }
    // The three confirmable ones with a readable header get RST.
    let mut resets = 0;
    while let Some(p) = c.recv(Duration::from_millis(300)).await {
        assert_eq!(p.header.get_type(), MessageType::Reset);
        resets += 1;
    }
    assert_eq!(resets, 3);
    assert_eq!(server.handle.stats().bad_requests, 5);
    let resp = c
        .call(&c.request(MessageType::Confirmable, POST, "t/ok", b"1"))
        .await;
    assert_eq!(code(&resp), CREATED);
    assert!(seen.recv().await.is_some());
    // CoAP ping: empty CON gets RST.
    let mut ping = Packet::new();
    ping.header.set_type(MessageType::Confirmable);
    ping.header.code = MessageClass::Empty;
    ping.header.message_id = 999;
    let pong = c.call(&ping).await;
    assert_eq!(pong.header.get_type(), MessageType::Reset);
    assert_eq!(pong.header.message_id, 999);
}

#[tokio::test]
async fn shutdown_stops_the_server_and_closes_ingest() {
    let (server, mut rx) = start_manual(settings()).await;
    server.shutdown.cancel();
    assert!(
        timeout(Duration::from_secs(2), rx.recv())
            .await
            .unwrap()
            .is_none(),
        "ingest channel closed once the endpoint stopped"
    );
}

#[tokio::test]
async fn random_datagrams_do_not_stop_the_server() {
    let (server, mut seen) = start(|_| Ok(())).await;
    let c = Client::new(server.addr).await;
    let valid = c
        .request(MessageType::Confirmable, POST, "t/a/b", b"payload")
        .to_bytes()
        .unwrap();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..3000 {
        let mut d = if i % 2 == 0 {
            valid.clone()
        } else {
            (0..(next() % 64)).map(|_| next() as u8).collect()
        };
        if !d.is_empty() {
            let n = d.len();
            for _ in 0..(next() % 4) {
                d[(next() as usize) % n] = next() as u8;
            }
            d.truncate(1 + (next() as usize) % n);
        }
        c.send_raw(&d).await;
        if i % 100 == 0 {
            // Drain whatever came back so the socket buffer does not fill.
            while c.recv_raw(Duration::from_millis(1)).await.is_some() {}
        }
    }
    while c.recv_raw(Duration::from_millis(50)).await.is_some() {}
    while seen.try_recv().is_ok() {}
    let resp = c
        .call(&c.request(MessageType::Confirmable, POST, "t/after", b"1"))
        .await;
    assert_eq!(code(&resp), CREATED);
    assert!(server.handle.stats().bad_requests > 0);
}
