//! A CoAP endpoint with a gateway stand-in that validates payloads with the payload module and
//! commits the valid ones, for poking at with real clients:
//! `cargo run -p outpost-protocols --example local_coap -- 127.0.0.1:15683`, then
//! `coap-client-notls -m post -t 112 -f pack.cbor coap://127.0.0.1:15683/t/room/temp -v 6`.

use std::time::SystemTime;

use outpost_protocols::IngestRefusal;
use outpost_protocols::coap::{CoapServer, CoapSettings};
use outpost_protocols::payload::{ContentFormat, validate};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:15683".to_owned())
        .parse()?;
    let server = CoapServer::bind(CoapSettings::new(vec![addr])).await?;
    println!("listening on udp {:?}", server.local_addrs());
    let handle = server.handle();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<outpost_protocols::Inbound>(256);
    tokio::spawn(async move {
        let mut stored = 0u64;
        while let Some(mut m) = rx.recv().await {
            let verdict = match m.content_format.map(ContentFormat::from_coap) {
                None => Ok(()),
                Some(None) => Err(IngestRefusal::UnsupportedFormat),
                Some(Some(f)) => validate(f, &m.payload, SystemTime::now())
                    .map(|_| ())
                    .map_err(|e| IngestRefusal::PayloadInvalid(e.to_string())),
            };
            println!(
                "{} {} cf={:?} {} bytes -> {verdict:?}",
                m.client_id,
                m.topic,
                m.content_format,
                m.payload.len()
            );
            if verdict.is_ok() {
                stored += 1;
                handle.set_status(format!("{{\"stored\":{stored}}}"));
            }
            if let Some(r) = m.reply.take() {
                let _ = r.send(verdict);
            }
        }
    });
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    server.run(tx, shutdown).await?;
    Ok(())
}
