//! A broker with a gateway stand-in that commits everything, for poking at with real clients:
//! `cargo run -p outpost-protocols --example local_broker -- 127.0.0.1:18830`, then
//! `mosquitto_pub -p 18830 -q 1 -t x -m y -d`.

use std::time::Duration;

use outpost_protocols::{Broker, BrokerSettings};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18830".to_owned())
        .parse()?;
    let broker = Broker::bind(BrokerSettings {
        listeners: vec![addr],
        max_connections: 100,
        max_packet_size: 256 * 1024,
        max_inflight: 20,
        max_inbound_pending: 20,
        max_queued_messages: 1000,
        max_queued_bytes: 1 << 20,
        max_retained: 10_000,
        max_retained_bytes: 16 << 20,
        max_sessions: 1000,
        session_expiry_311: Duration::from_secs(7 * 24 * 3600),
        max_session_expiry: Duration::from_secs(7 * 24 * 3600),
        connect_timeout: Duration::from_secs(10),
        auth: None,
        tls: Vec::new(),
    })
    .await?;
    println!("listening on {:?}", broker.local_addrs());
    let (tx, mut rx) = tokio::sync::mpsc::channel::<outpost_protocols::Inbound>(256);
    tokio::spawn(async move {
        while let Some(mut m) = rx.recv().await {
            println!(
                "{} -> {} {:?} retain={} {} bytes",
                m.client_id,
                m.topic,
                m.qos,
                m.retain,
                m.payload.len()
            );
            if let Some(reply) = m.reply.take() {
                let _ = reply.send(Ok(()));
            }
        }
    });
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    let handle = broker.handle();
    broker.run(tx, shutdown).await?;
    println!("{:?}", handle.stats());
    Ok(())
}
