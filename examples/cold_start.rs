//! Measures a running gateway: the time from a first join of a new room to its join reply
//! (which includes starting the room's worker process), and the resident memory of idle
//! room workers.
//!
//!     cargo run --release --bin gateway -- --rate-per-sec 100000 --rate-burst 100000 &
//!     cargo run --release --example cold_start -- 127.0.0.1:4000 200

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:4000".to_owned());
    let rooms: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(100);
    let url = format!("ws://{addr}/socket/websocket?vsn=2.0.0");
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true).await?;
    let run = std::process::id();

    let mut latencies = Vec::with_capacity(rooms);
    for i in 0..rooms {
        let topic = format!("room:cold-{run}-{i}");
        let join_ref = i.to_string();
        let started = Instant::now();
        ws.send(Message::Text(json!([join_ref, join_ref, topic, "phx_join", {}]).to_string().into())).await?;
        loop {
            let Some(message) = ws.next().await else { return Err("socket closed".into()) };
            let Message::Text(text) = message? else { continue };
            let frame: Value = serde_json::from_str(&text)?;
            if frame[3] == "phx_reply" && frame[1] == join_ref.as_str() {
                if frame[4]["status"] != "ok" {
                    return Err(format!("join failed: {frame}").into());
                }
                break;
            }
        }
        latencies.push(started.elapsed());
        // Leave again: a socket may hold only 100 channels, and the room stays up regardless.
        ws.send(Message::Text(json!([join_ref, "leave", topic, "phx_leave", {}]).to_string().into())).await?;
    }
    latencies.sort();
    let pct =
        |p: f64| latencies[((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1];
    println!("cold start (first join -> join reply), {rooms} new rooms one after another:");
    println!("  p50 {:?}  p99 {:?}  max {:?}", pct(0.50), pct(0.99), latencies[latencies.len() - 1]);

    // Let the workers settle, then read their resident memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let body = http_get(&addr, "/api/rooms")?;
    let listed: Vec<Value> = serde_json::from_str(&body)?;
    let mut rss_kib: Vec<u64> = listed
        .iter()
        .filter(|r| r["id"].as_str().is_some_and(|id| id.starts_with(&format!("cold-{run}-"))))
        .filter_map(|r| r["pid"].as_u64())
        .filter_map(|pid| rss_of(pid as u32))
        .collect();
    rss_kib.sort();
    if rss_kib.is_empty() {
        println!("no worker memory readable (is the gateway on another machine?)");
    } else {
        let sum: u64 = rss_kib.iter().sum();
        println!("idle room worker RSS over {} workers:", rss_kib.len());
        println!(
            "  median {} KiB  max {} KiB  mean {} KiB",
            rss_kib[rss_kib.len() / 2],
            rss_kib[rss_kib.len() - 1],
            sum / rss_kib.len() as u64
        );
    }
    Ok(())
}

fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default())
}
