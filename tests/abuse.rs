//! What one hostile or careless client (or operator) could do to a gateway, each over real
//! sockets and processes, and what the gateway does instead: bounded memory, rooms that keep
//! their state, clear refusals, and errors that name no file and no OS error.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{script_file, Gateway};

#[test]
fn flags_that_would_make_the_service_unusable_stop_the_start_with_the_range() {
    for (flag, value) in [
        ("--idle-timeout-ms", "0"),
        ("--max-frame-bytes", "0"),
        ("--rate-burst", "0"),
        ("--max-rooms", "0"),
        ("--max-channels-per-socket", "0"),
        ("--js-heap-bytes", "0"),
        ("--history-on-join", "100000"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["--port", "0", flag, value])
            .output()
            .expect("the gateway runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag) && stderr.contains("is not in"), "{flag} {value}: {stderr}");
        assert!(output.stdout.is_empty(), "{flag} {value}: it never listened");
    }
}

#[tokio::test]
async fn a_reply_over_the_ipc_limit_is_refused_and_the_room_keeps_running() {
    // The first history is 100 KB, over the 64 KiB IPC limit; later ones are small.
    let script = script_file(
        "big-reply",
        "let first = true;\n\
         function getHistory(limit) { if (first) { first = false; return ['x'.repeat(100000)]; } return ['ok']; }\n\
         function sendMessage(sender, text) { return { sender, text }; }\n",
    );
    let gateway =
        Gateway::start(&["--room-script", script.to_str().unwrap(), "--max-ipc-frame-bytes", "65536"]);
    let mut client = gateway.connect().await;
    let (_, refused) = client.join("room:big").await;
    assert_eq!(refused["status"], "error", "{refused}");
    assert_eq!(refused["response"]["reason"], "reply too large");
    let pid = gateway.wait_room_pid("big");

    let (_, history) = client.join_ok("room:big").await;
    assert_eq!(history, ["ok"], "the same runtime answers, with its state");
    assert_eq!(gateway.room_pid("big"), Some(pid), "the worker was not killed");
    assert!(!gateway.log_contains_now("protocol violation"));
}

#[tokio::test]
async fn an_unreadable_room_script_is_named_in_the_log_and_not_to_the_client() {
    let gateway = Gateway::start(&["--room-script", "/nonexistent/secret-dir/room.js"]);
    let mut client = gateway.connect().await;
    let (_, refused) = client.join("room:lost").await;
    let reason = refused["response"]["reason"].as_str().unwrap_or_default().to_owned();
    assert_eq!(reason, "room unavailable: cannot read the room script", "{refused}");
    assert!(
        common::wait_for_within(Duration::from_secs(5), || gateway
            .log_contains_now("/nonexistent/secret-dir/room.js")
            .then_some(()))
        .is_some(),
        "the operator's log names the file"
    );
}

/// 100 messages whose text escapes to about 24 KB of JSON each: every join's history is about
/// 2.4 MB, as in the report.
async fn fill_with_heavy_messages(client: &mut common::Client, join_ref: &str, topic: &str) {
    let heavy = "\u{1}".repeat(3_900);
    for _ in 0..100 {
        let reply = client.send_message(join_ref, topic, "filler", &heavy).await;
        assert_eq!(reply["status"], "ok", "{reply}");
    }
}

#[tokio::test]
async fn a_flood_of_joins_does_not_wipe_a_room() {
    let gateway = Gateway::start(&[]);
    let topic = "room:target";
    let mut member = gateway.connect().await;
    let (join_ref, _) = member.join_ok(topic).await;
    fill_with_heavy_messages(&mut member, &join_ref, topic).await;
    let pid = gateway.wait_room_pid("target");

    // Ten sockets send 100 joins each at once, each join followed by a heavy message (so the
    // worker's input fills while it writes 2.4 MB histories back), and read whatever comes.
    let mut attackers = Vec::new();
    for _ in 0..10 {
        let mut attacker = gateway.connect().await;
        attackers.push(tokio::spawn(async move {
            let heavy = "\u{1}".repeat(3_900);
            let refs: Vec<String> = (0..100).map(|i| format!("a{i}")).collect();
            for r in &refs {
                attacker.send(serde_json::json!([r, r, topic, "phx_join", {}])).await;
                let message = serde_json::json!({"sender": "attacker", "text": heavy});
                attacker.send(serde_json::json!([r, format!("{r}m"), topic, "send_message", message])).await;
            }
            // Read until every frame is answered, or until the gateway cuts this socket off
            // (a reader slower than 2.4 MB replies arrive passes its outbound byte limit,
            // which is the gateway doing its job, not a failure here).
            let mut answered = 0;
            while answered < 2 * refs.len() {
                use futures_util::StreamExt;
                use tokio_tungstenite::tungstenite::Message;
                let next = tokio::time::timeout(Duration::from_secs(30), attacker.ws.next()).await;
                match next {
                    Ok(Some(Ok(Message::Text(text)))) if text.contains("\"phx_reply\"") => answered += 1,
                    Ok(Some(Ok(Message::Close(_)) | Err(_)) | None) | Err(_) => break,
                    Ok(Some(Ok(_))) => {}
                }
            }
            answered
        }));
    }
    // Meanwhile the member speaks: the room serves its callers in turn, so the member's call
    // waits behind one call of each flooding socket, not behind all of them.
    let before = rss_mib(gateway.pid());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let during = member.send_message(&join_ref, topic, "member", "during").await;
    let latency = started.elapsed().as_secs_f64() * 1000.0;
    let peak = rss_mib(gateway.pid());
    for attacker in attackers {
        let answered = attacker.await.expect("the attacker task ends");
        assert!(answered > 0, "the attacker was served at all");
    }
    assert_eq!(during["status"], "ok", "the member is served during the flood: {during}");
    eprintln!(
        "join flood: gateway RSS {before:.1} → {peak:.1} MiB; member's send during it: {} {} in {latency:.0} ms",
        during["status"],
        during["response"]["reason"]
    );

    member.assert_no_event("room_reset", Duration::from_millis(200)).await;
    assert!(!gateway.log_contains_now("unresponsive"), "the busy worker was never killed");
    assert_eq!(gateway.room_pid("target"), Some(pid), "the same runtime");
    let reply = member.send_message(&join_ref, topic, "member", "still here").await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let mut late = gateway.connect().await;
    let (_, history) = late.join_ok(topic).await;
    assert_eq!(history.len(), 100, "a join returns the last 100");
    let last = history.last().cloned().unwrap_or_default();
    assert_eq!(last["text"], "still here");
    assert!(last["id"].as_u64() > Some(100), "ids go on from the 100 heavy messages: {last}");
}

/// The gateway's resident memory, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the gateway's /proc status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib / 1024.0
}

/// A member's round trip (send → its own reply) while something else goes on.
async fn round_trip_ms(member: &mut common::Client, join_ref: &str, topic: &str) -> f64 {
    let started = std::time::Instant::now();
    let reply = member.send_message(join_ref, topic, "member", "ping").await;
    assert_eq!(reply["status"], "ok", "the normal client is served: {reply}");
    started.elapsed().as_secs_f64() * 1000.0
}

#[tokio::test]
async fn a_socket_that_never_reads_its_replies_is_cut_off_at_its_byte_limit() {
    let gateway = Gateway::start(&[]);
    let topic = "room:heavy";
    let mut member = gateway.connect().await;
    let (join_ref, _) = member.join_ok(topic).await;
    fill_with_heavy_messages(&mut member, &join_ref, topic).await;
    let before = rss_mib(gateway.pid());

    // 150 joins (about 6 KB sent), each answered with a 2.4 MB history it never reads.
    let mut attacker = gateway.connect_raw().await;
    for i in 0..150 {
        use futures_util::SinkExt;
        let join = serde_json::json!([format!("j{i}"), format!("j{i}"), topic, "phx_join", {}]);
        let sent =
            attacker.send(tokio_tungstenite::tungstenite::Message::Text(join.to_string().into())).await;
        if sent.is_err() {
            break;
        }
    }
    let mut peak = before;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss_mib(gateway.pid()));
    }
    let latency = round_trip_ms(&mut member, &join_ref, topic).await;
    eprintln!("reply amplification: gateway RSS {before:.1} → peak {peak:.1} MiB; member round trip {latency:.1} ms");
    // 8 MiB may be queued for the socket and about as much sit in its write buffer; the rest
    // is the replies in flight through the room. Before the byte limit: +390 to +520 MiB.
    assert!(peak - before < 100.0, "gateway grew {:.1} MiB", peak - before);
    assert!(gateway.log_contains_now("does not keep up"), "the slow socket was cut off");
}

#[tokio::test]
async fn a_ping_flood_closes_the_socket_and_costs_little_memory() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let gateway = Gateway::start(&[]);
    let topic = "room:quiet";
    let mut member = gateway.connect().await;
    let (join_ref, _) = member.join_ok(topic).await;
    let before = rss_mib(gateway.pid());

    // Pings as fast as the socket takes them for two seconds, never reading a pong.
    let mut attacker = gateway.connect_raw().await;
    let until = std::time::Instant::now() + Duration::from_secs(2);
    let mut sent = 0u64;
    while std::time::Instant::now() < until {
        if attacker.send(Message::Ping(vec![0u8; 125].into())).await.is_err() {
            break;
        }
        sent += 1;
    }
    let peak = rss_mib(gateway.pid());
    let latency = round_trip_ms(&mut member, &join_ref, topic).await;
    eprintln!("ping flood: {sent} pings; gateway RSS {before:.1} → {peak:.1} MiB; member round trip {latency:.1} ms");
    assert!(peak - before < 32.0, "gateway grew {:.1} MiB", peak - before);
    // The server closed the socket: reading finds its close frame (after the pongs it did
    // answer) or the connection gone.
    let closed = tokio::time::timeout(common::WAIT, async {
        loop {
            match attacker.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
    .expect("the server closed the flooding socket");
    assert!(matches!(closed, Some(1008) | None), "closed with {closed:?}");
}

/// The status of a WebSocket upgrade sent with exactly these `Host` and `Origin` headers.
fn upgrade_status(gateway: &Gateway, host: &str, origin: &str) -> u16 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(gateway.addr).expect("connect");
    stream.set_read_timeout(Some(common::WAIT)).expect("a read timeout");
    let request = format!(
        "GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).expect("send the request");
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).expect("a status line");
    let line = String::from_utf8_lossy(&head).into_owned();
    line[9..12].parse().unwrap_or_else(|_| panic!("no status in {line:?}"))
}

#[test]
fn a_rebound_host_name_or_a_foreign_scheme_cannot_open_a_socket() {
    let gateway = Gateway::start(&[]);
    let port = gateway.addr.port();
    // DNS rebinding: the attacker's page, its name now resolving to 127.0.0.1, sends a Host
    // header that matches its own Origin.
    let evil = format!("evil.example:{port}");
    assert_eq!(upgrade_status(&gateway, &evil, &format!("http://{evil}")), 403);
    for scheme in ["ftp", "file", "chrome-extension"] {
        let own = format!("{scheme}://127.0.0.1:{port}");
        assert_eq!(upgrade_status(&gateway, &format!("127.0.0.1:{port}"), &own), 403, "{own}");
    }
    for own in [format!("http://localhost:{port}"), format!("http://127.0.0.1:{port}")] {
        assert_eq!(upgrade_status(&gateway, &format!("localhost:{port}"), &own), 101, "{own}");
    }
    let listed = Gateway::start(&["--allowed-origin", "https://chat.example"]);
    assert_eq!(upgrade_status(&listed, "chat.example", "https://chat.example"), 101);
}

#[tokio::test]
async fn slow_request_heads_cannot_take_the_gateway_from_everyone_else() {
    // 256 descriptors, as a small container might give; the gateway cannot raise it.
    let wrapper = script_file(
        "gateway-256-fds.sh",
        &format!("#!/bin/sh\nulimit -n 256\nexec {} \"$@\"\n", env!("CARGO_BIN_EXE_gateway")),
    );
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let gateway = Gateway::start_binary(&wrapper, &["--request-head-timeout-ms", "1500"]);
    assert!(gateway.log_contains("256 open files"), "the gateway runs under the small limit");
    let before = rss_mib(gateway.pid());

    // 600 connections that each send a request head one byte at a time, and never finish.
    let mut slow = Vec::new();
    for _ in 0..600 {
        if let Ok(mut stream) = tokio::net::TcpStream::connect(gateway.addr).await {
            use tokio::io::AsyncWriteExt;
            let _ = stream.write_all(b"G").await;
            slow.push(stream);
        }
    }
    // Everyone else is still served: a health check, a socket, a new room's worker.
    let (status, _) = common::http_get(gateway.addr, "/healthz", &[]);
    assert_eq!(status, 200, "the health check is answered");
    let mut member = gateway.connect().await;
    let (join_ref, _) = member.join_ok("room:fresh").await;
    let latency = round_trip_ms(&mut member, &join_ref, "room:fresh").await;
    eprintln!(
        "slow heads: gateway RSS {before:.1} → {:.1} MiB; member round trip {latency:.1} ms",
        rss_mib(gateway.pid())
    );
    assert!(!gateway.log_contains_now("Too many open files"), "no descriptor ran out");

    // Past the deadline every slow connection has been closed by the gateway.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut still_open = 0;
    for stream in &mut slow {
        use tokio::io::AsyncReadExt;
        let mut byte = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(20), stream.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(_)) => {} // an error response, then the close
            Err(_) => still_open += 1,
        }
    }
    assert_eq!(still_open, 0, "slow connections outlived the request head deadline");
}

#[tokio::test]
async fn one_address_holds_only_its_share_of_sockets() {
    let gateway = Gateway::start(&["--max-sockets-per-address", "3"]);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(gateway.connect().await);
    }
    let url = format!("ws://{}/socket/websocket?vsn=2.0.0", gateway.addr);
    match tokio_tungstenite::connect_async(url.as_str()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 429),
        other => panic!("a fourth socket from the same address: {:?}", other.map(|_| "connected")),
    }
    let (_, history) = held[0].join_ok("room:shared").await;
    assert!(history.is_empty(), "the sockets it holds still work");
    // A closed socket frees its place (the server sees the close a moment later).
    held.pop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut replacement = gateway.connect().await;
    replacement.join_ok("room:shared").await;
}

#[test]
fn the_rooms_api_answers_this_machine_and_token_holders_only() {
    let Some(ip) = common::non_loopback_address() else {
        eprintln!(
            "SKIPPED: the_rooms_api_answers_this_machine_and_token_holders_only: no non-loopback address"
        );
        return;
    };
    let gateway = Gateway::start(&["--bind", "0.0.0.0", "--api-token", "s3cret"]);
    let remote = std::net::SocketAddr::new(ip, gateway.addr.port());
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], gateway.addr.port()));
    assert_eq!(common::http_get(local, "/api/rooms", &[]).0, 200, "this machine");
    assert_eq!(common::http_get(remote, "/api/rooms", &[]).0, 403, "another address without the token");
    assert_eq!(common::http_get(remote, "/api/rooms", &[("Authorization", "Bearer wrong")]).0, 403);
    assert_eq!(common::http_get(remote, "/api/rooms", &[("Authorization", "Bearer s3cret")]).0, 200);
    assert_eq!(common::http_get(remote, "/healthz", &[]).0, 200, "the health check stays open");
}

#[tokio::test]
async fn a_few_sockets_cannot_pin_the_room_limit() {
    let gateway = Gateway::start(&["--max-rooms", "20", "--max-rooms-started-per-socket", "3"]);
    let mut attackers = Vec::new();
    for a in 0..5 {
        let mut attacker = gateway.connect().await;
        let mut started = 0;
        for r in 0..10 {
            let (_, reply) = attacker.join(&format!("room:pin-{a}-{r}")).await;
            match reply["status"].as_str() {
                Some("ok") => started += 1,
                _ => assert_eq!(reply["response"]["reason"], "too many rooms started by this socket"),
            }
        }
        assert_eq!(started, 3, "each socket starts its share and no more");
        attackers.push(attacker);
    }
    let mut member = gateway.connect().await;
    let (join_ref, _) = member.join_ok("room:mine").await;
    let reply = member.send_message(&join_ref, "room:mine", "member", "hello").await;
    assert_eq!(reply["status"], "ok");
    // Joining a room that runs already is free.
    attackers[0].join_ok("room:mine").await;
}

async fn join_and_leave(client: &mut common::Client, topic: &str) {
    let (join_ref, _) = client.join_ok(topic).await;
    let leave = client.push(Some(&join_ref), topic, "phx_leave", serde_json::json!({})).await;
    assert_eq!(client.reply_to(&leave).await["status"], "ok");
}

#[tokio::test]
async fn a_room_another_client_used_lately_outlasts_one_clients_new_rooms() {
    let gateway = Gateway::start(&["--max-rooms", "4", "--max-rooms-started-per-socket", "100"]);
    let mut creator = gateway.connect().await;
    let (join_ref, _) = creator.join_ok("room:keep").await;
    assert_eq!(creator.send_message(&join_ref, "room:keep", "ann", "remember me").await["status"], "ok");
    let leave = creator.push(Some(&join_ref), "room:keep", "phx_leave", serde_json::json!({})).await;
    creator.reply_to(&leave).await;
    let mut visitor = gateway.connect().await;
    join_and_leave(&mut visitor, "room:keep").await;
    let pid = gateway.wait_room_pid("keep");

    // One client creates room after room; nobody is in any of them.
    let mut flooder = gateway.connect().await;
    for i in 0..12 {
        join_and_leave(&mut flooder, &format!("room:flood-{i}")).await;
    }
    assert_eq!(gateway.room_pid("keep"), Some(pid), "the shared room was not evicted");
    let (_, history) = visitor.join_ok("room:keep").await;
    assert_eq!(history.first().map(|m| m["text"].clone()), Some("remember me".into()));
}

#[tokio::test]
async fn open_sockets_count_against_the_connection_cap() {
    let gateway = Gateway::start(&["--max-connections", "3"]);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(gateway.connect().await);
    }
    let (status, _) = common::http_get(gateway.addr, "/healthz", &[]);
    assert_eq!(status, 503, "three open sockets hold all three slots");
    drop(held.pop());
    let freed = common::wait_for_within(Duration::from_secs(5), || {
        (common::http_get(gateway.addr, "/healthz", &[]).0 == 200).then_some(())
    });
    assert!(freed.is_some(), "a closed socket gives its slot back");
}
