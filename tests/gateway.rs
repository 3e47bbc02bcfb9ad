//! Phoenix Channels v2 over a real socket to a spawned `gateway` process.

mod common;

use std::time::Duration;

use common::{kill9, workers_of, Gateway};
use serde_json::json;

const QUIET: Duration = Duration::from_millis(300);

#[tokio::test]
async fn join_returns_the_rooms_history() {
    let gateway = Gateway::start(&[]);
    let mut ann = gateway.connect().await;
    let (join_ref, history) = ann.join_ok("room:history").await;
    assert!(history.is_empty(), "a new room has no history");
    for text in ["first", "second"] {
        let reply = ann.send_message(&join_ref, "room:history", "ann", text).await;
        assert_eq!(reply["status"], "ok", "{reply}");
    }
    let mut bob = gateway.connect().await;
    let (_, history) = bob.join_ok("room:history").await;
    let texts: Vec<_> = history.iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["first", "second"]);
    assert_eq!(history[0]["sender"], "ann");
    assert_eq!(history[0]["id"], 1);
    assert!(history[1]["timestamp"].as_u64().unwrap() >= history[0]["timestamp"].as_u64().unwrap());
}

#[tokio::test]
async fn a_message_reaches_everyone_in_the_room_and_nobody_else() {
    let gateway = Gateway::start(&[]);
    let mut ann = gateway.connect().await;
    let mut bob = gateway.connect().await;
    let mut eve = gateway.connect().await;
    let (ann_ref, _) = ann.join_ok("room:lobby").await;
    bob.join_ok("room:lobby").await;
    eve.join_ok("room:elsewhere").await;

    let msg_ref = ann
        .push(Some(&ann_ref), "room:lobby", "send_message", json!({"sender": "ann", "text": "hi all"}))
        .await;
    let reply = ann.reply_to(&msg_ref).await;
    assert_eq!(reply["status"], "ok");
    let message = reply["response"].clone();
    assert_eq!(message["sender"], "ann");
    assert_eq!(message["text"], "hi all");
    assert!(message["id"].is_u64() && message["timestamp"].is_u64());

    for client in [&mut ann, &mut bob] {
        let push = client.next_event("new_message").await;
        assert_eq!(push, json!([null, null, "room:lobby", "new_message", message]));
    }
    eve.assert_no_event("new_message", QUIET).await;
}

#[tokio::test]
async fn heartbeat_gets_an_empty_ok_reply() {
    let gateway = Gateway::start(&[]);
    let mut client = gateway.connect().await;
    client.send(json!([null, "9", "phoenix", "heartbeat", {}])).await;
    assert_eq!(
        client.recv().await,
        json!([null, "9", "phoenix", "phx_reply", {"status": "ok", "response": {}}])
    );
}

#[tokio::test]
async fn leave_replies_then_closes_the_channel() {
    let gateway = Gateway::start(&[]);
    let mut client = gateway.connect().await;
    let (join_ref, _) = client.join_ok("room:leaving").await;
    let leave_ref = client.push(Some(&join_ref), "room:leaving", "phx_leave", json!({})).await;
    assert_eq!(
        client.recv().await,
        json!([join_ref, leave_ref, "room:leaving", "phx_reply", {"status": "ok", "response": {}}])
    );
    assert_eq!(client.recv().await, json!([join_ref, join_ref, "room:leaving", "phx_close", {}]));
    // Gone: the socket is no longer subscribed, and events on the topic are unmatched.
    let mut other = gateway.connect().await;
    let (other_ref, _) = other.join_ok("room:leaving").await;
    let sent = other.send_message(&other_ref, "room:leaving", "bob", "anyone?").await;
    assert_eq!(sent["status"], "ok", "the bystander's message was sent: {sent}");
    // The broadcast went out (the bystander has it), so its absence below means something.
    let heard = loop {
        match other.try_recv(common::WAIT).await {
            Some(frame) if frame[3] == "new_message" => break frame,
            Some(_) => continue,
            None => panic!("the bystander never received the broadcast of its own message"),
        }
    };
    assert_eq!(heard[4], sent["response"]);
    client.assert_no_event("new_message", QUIET).await;
    let reply = client.send_message(&join_ref, "room:leaving", "ann", "still here?").await;
    assert_eq!(reply, json!({"status": "error", "response": {"reason": "unmatched topic"}}));
}

#[tokio::test]
async fn a_second_join_closes_the_first() {
    let gateway = Gateway::start(&[]);
    let mut client = gateway.connect().await;
    let (first_ref, _) = client.join_ok("room:twice").await;
    let second_ref = client.make_ref();
    client.send(json!([second_ref, second_ref, "room:twice", "phx_join", {}])).await;
    assert_eq!(client.recv().await, json!([first_ref, first_ref, "room:twice", "phx_close", {}]));
    let reply = client.reply_to(&second_ref).await;
    assert_eq!(reply["status"], "ok");
    // Only the new join receives broadcasts, once.
    let sent = client.send_message(&second_ref, "room:twice", "ann", "once").await;
    assert_eq!(sent["status"], "ok");
    client.next_event("new_message").await;
    client.assert_no_event("new_message", QUIET).await;
}

#[tokio::test]
async fn events_on_a_topic_not_joined_are_unmatched() {
    let gateway = Gateway::start(&[]);
    let mut client = gateway.connect().await;
    let msg_ref =
        client.push(Some("1"), "room:nowhere", "send_message", json!({"sender": "a", "text": "b"})).await;
    assert_eq!(
        client.recv().await,
        json!(["1", msg_ref, "room:nowhere", "phx_reply", {"status": "error", "response": {"reason": "unmatched topic"}}])
    );
    assert!(gateway.rooms().is_empty(), "an unmatched event must not start a room");
    // Leaving a topic that is not joined succeeds, as Phoenix answers it, without a phx_close.
    let leave_ref = client.push(Some("1"), "room:nowhere", "phx_leave", json!({})).await;
    assert_eq!(
        client.recv().await,
        json!(["1", leave_ref, "room:nowhere", "phx_reply", {"status": "ok", "response": {}}])
    );
    client.assert_no_event("phx_close", QUIET).await;
}

#[tokio::test]
async fn unknown_events_on_a_joined_room_are_refused() {
    let gateway = Gateway::start(&[]);
    let mut client = gateway.connect().await;
    let (join_ref, _) = client.join_ok("room:events").await;
    let msg_ref = client.push(Some(&join_ref), "room:events", "drop_tables", json!({})).await;
    assert_eq!(
        client.reply_to(&msg_ref).await,
        json!({"status": "error", "response": {"reason": "unknown event"}})
    );
}

#[tokio::test]
async fn invalid_room_ids_are_refused_without_starting_anything() {
    let gateway = Gateway::start(&[]);
    let mut client = gateway.connect().await;
    let long = format!("room:{}", "x".repeat(65));
    for topic in ["room:", long.as_str(), "room:../x", "room:a b", "room:é", "room:a\u{0}b"] {
        let (_, reply) = client.join(topic).await;
        assert_eq!(reply, json!({"status": "error", "response": {"reason": "invalid room id"}}), "{topic:?}");
    }
    assert!(gateway.rooms().is_empty());
    assert!(workers_of(gateway.pid()).is_empty());
}

#[tokio::test]
async fn blank_or_oversize_messages_are_refused_and_not_stored() {
    let gateway = Gateway::start(&[]);
    let mut client = gateway.connect().await;
    let (join_ref, _) = client.join_ok("room:strict").await;
    let too_long = "x".repeat(4001);
    for (sender, text, reason) in [
        ("ann", "   ", "text must not be blank"),
        ("", "hi", "sender must not be blank"),
        ("ann", too_long.as_str(), "text is longer than 4000 characters"),
    ] {
        let reply = client.send_message(&join_ref, "room:strict", sender, text).await;
        assert_eq!(reply, json!({"status": "error", "response": {"reason": reason}}));
    }
    let invalid = json!({"status": "error", "response": {"reason": "invalid payload: expected {\"sender\": string, \"text\": string}"}});
    for payload in [json!({"text": 5}), json!(["ann", "an array is not an object"]), json!(null)] {
        let msg_ref = client.push(Some(&join_ref), "room:strict", "send_message", payload).await;
        assert_eq!(client.reply_to(&msg_ref).await, invalid);
    }
    let mut later = gateway.connect().await;
    let (_, history) = later.join_ok("room:strict").await;
    assert!(history.is_empty(), "nothing was stored: {history:?}");
}

#[tokio::test]
async fn killing_a_worker_restarts_the_room_at_once_and_replays_its_joins() {
    let gateway = Gateway::start(&[]);
    let mut ann = gateway.connect().await;
    let mut bob = gateway.connect().await;
    let (ann_ref, _) = ann.join_ok("room:phoenix").await;
    let (bob_ref, _) = bob.join_ok("room:phoenix").await;
    ann.send_message(&ann_ref, "room:phoenix", "ann", "before").await;
    let old_pid = gateway.wait_room_pid("phoenix");

    kill9(old_pid);
    // Each join hears the reset on its own join_ref, with the join response of the new
    // runtime: an empty history, since the old runtime's state is gone.
    for (client, join_ref) in [(&mut ann, &ann_ref), (&mut bob, &bob_ref)] {
        let reset = client.next_event("room_reset").await;
        assert_eq!(reset[0], json!(join_ref), "{reset}");
        assert_eq!(reset[2], "room:phoenix");
        assert_eq!(reset[4]["reason"], "room worker exited");
        assert!(reset[4]["detail"].as_str().unwrap_or_default().contains("signal: 9"), "{reset}");
        assert_eq!(reset[4]["response"]["messages"], json!([]), "{reset}");
        assert_eq!(reset[4]["response"]["resumed"], false, "{reset}");
        assert_eq!(reset[4]["restored"], false, "a transient room keeps nothing: {reset}");
    }
    // The exit line for exactly this pid (not its start line, not pid=123 for pid=12), which
    // the gateway writes once it has reaped the worker.
    let exit = gateway
        .worker_exit_line(old_pid)
        .unwrap_or_else(|| panic!("no exit logged for worker {old_pid}: {:#?}", gateway.log_lines_now()));
    assert!(exit.contains("exited unexpectedly (signal: 9"), "the exit says how: {exit}");
    assert!(
        common::process(old_pid).is_none(),
        "the killed worker {old_pid} is gone from /proc, not even a zombie: {:?}",
        common::process(old_pid)
    );
    assert!(workers_of(gateway.pid()).iter().all(|p| p.pid != old_pid), "the killed worker was reaped");
    // Restarted before anyone used it: it had joins to replay.
    let new_pid = gateway.wait_room_pid("phoenix");
    assert_ne!(new_pid, old_pid);

    // Still joined, on the fresh runtime with empty state.
    let reply = ann.send_message(&ann_ref, "room:phoenix", "ann", "after").await;
    assert_eq!(reply["status"], "ok", "{reply}");
    assert_eq!(reply["response"]["id"], 1, "a fresh runtime numbers from 1");
    let after = bob.recv_until(|f| f[3] == "new_message" && f[4]["text"] == "after").await;
    assert_eq!(after[4]["id"], 1);
    assert_eq!(gateway.room_pid("phoenix"), Some(new_pid));
    let mut carol = gateway.connect().await;
    let (_, history) = carol.join_ok("room:phoenix").await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["text"], "after");
}

#[tokio::test]
async fn fifty_racing_first_joins_start_exactly_one_worker() {
    let gateway = Gateway::start(&[]);
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(gateway.connect().await);
    }
    let joins = clients.iter_mut().map(|c| c.join("room:stampede"));
    let replies = futures_util::future::join_all(joins).await;
    assert!(replies.iter().all(|(_, r)| r["status"] == "ok"), "{replies:?}");
    let rooms = gateway.rooms();
    assert_eq!(rooms.len(), 1);
    assert_eq!(rooms[0]["subscribers"], 50);
    let workers = workers_of(gateway.pid());
    assert_eq!(workers.len(), 1, "{workers:?}");
    assert_eq!(workers[0].pid as u64, rooms[0]["pid"].as_u64().unwrap());
    // Every worker ever spawned logs a start line, so one that started and already died (a
    // racer's duplicate, shut down or crashed) is counted too. Every start came before the
    // replies; the wait is for the log reader to catch up.
    assert!(gateway.log_contains(common::WORKER_STARTED), "the worker's start is logged");
    tokio::time::sleep(QUIET).await;
    let starts: Vec<String> =
        gateway.log_lines_now().into_iter().filter(|l| l.contains(common::WORKER_STARTED)).collect();
    assert_eq!(starts.len(), 1, "workers started for one room: {starts:#?}");
}

#[tokio::test]
async fn api_rooms_and_healthz_describe_the_live_rooms() {
    let gateway = Gateway::start(&[]);
    assert_eq!(gateway.get_json("/healthz")["status"], "ok");
    let mut client = gateway.connect().await;
    let (join_ref, _) = client.join_ok("room:ops").await;
    client.send_message(&join_ref, "room:ops", "ann", "hello").await;
    let rooms = gateway.rooms();
    assert_eq!(rooms.len(), 1);
    let room = &rooms[0];
    assert_eq!(room["id"], "ops");
    assert_eq!(room["subscribers"], 1);
    assert_eq!(room["calls"], 2, "getHistory on join, then sendMessage");
    assert!(room["started_at"].as_u64().unwrap() > 1_600_000_000_000);
    assert!(common::is_alive(room["pid"].as_u64().unwrap() as u32));
    let (status, page) = common::http_get(gateway.addr, "/", &[]);
    assert_eq!(status, 200);
    assert!(page.contains("roomvisor"));
    let (status, page) = common::http_get(gateway.addr, "/game", &[]);
    assert_eq!(status, 200);
    assert!(page.contains("tic-tac-toe") && page.contains("game:"), "GET /game serves the game page");
}

#[tokio::test]
async fn malformed_frames_are_dropped_and_repeated_garbage_closes_the_socket() {
    let gateway = Gateway::start(&[]);
    let mut client = gateway.connect().await;
    client.send_raw("not json").await;
    client.send_raw(r#"["1","1","room:a","phx_join"]"#).await;
    client.send(json!([1, 2, "room:a", "phx_join", {}])).await;
    // Still serving after a few bad frames.
    client.send(json!([null, "h", "phoenix", "heartbeat", {}])).await;
    assert_eq!(client.recv().await[1], "h");
    for _ in 0..10 {
        client.send_raw("[[[[").await;
    }
    assert_eq!(client.closed().await, Some(1008));
    assert!(gateway.log_contains("dropped a frame"));
    // The gateway itself is fine.
    let mut fresh = gateway.connect().await;
    fresh.join_ok("room:after-garbage").await;
}

#[tokio::test]
async fn frames_over_the_size_limit_close_the_socket_with_1009() {
    let gateway = Gateway::start(&["--max-frame-bytes", "1024"]);
    let mut client = gateway.connect().await;
    let (join_ref, _) = client.join_ok("room:big").await;
    let text = "x".repeat(2000);
    client.push(Some(&join_ref), "room:big", "send_message", json!({"sender": "a", "text": text})).await;
    assert_eq!(client.closed().await, Some(1009));
}

#[tokio::test]
async fn upgrades_from_a_foreign_origin_are_forbidden() {
    let gateway = Gateway::start(&[]);
    let path = "/socket/websocket?vsn=2.0.0";
    let upgrade = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    let mut foreign = upgrade.to_vec();
    foreign.push(("Origin", "http://evil.example"));
    let (status, _) = common::http_get_head(gateway.addr, path, &foreign);
    assert_eq!(status, 403);
    let own = format!("http://{}", gateway.addr);
    let mut same = upgrade.to_vec();
    same.push(("Origin", own.as_str()));
    let (status, _) = common::http_get_head(gateway.addr, path, &same);
    assert_eq!(status, 101);
}

#[tokio::test]
async fn the_phoenix_subprotocol_offered_with_an_auth_token_is_selected() {
    let gateway = Gateway::start(&[]);
    let (status, head) = common::http_get_head(
        gateway.addr,
        "/socket/websocket?vsn=2.0.0",
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            // What phoenix.js sends for `new Socket(url, {authToken: "secret"})`.
            ("Sec-WebSocket-Protocol", "phoenix, base64url.bearer.phx.c2VjcmV0"),
        ],
    );
    assert_eq!(status, 101);
    let selected = head.lines().find_map(|l| {
        l.to_ascii_lowercase().strip_prefix("sec-websocket-protocol:").map(str::trim).map(str::to_owned)
    });
    assert_eq!(selected.as_deref(), Some("phoenix"), "{head}");
}

#[tokio::test]
async fn a_client_asking_for_another_serializer_version_is_refused_at_the_upgrade() {
    let gateway = Gateway::start(&[]);
    let upgrade = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    let (status, _) = common::http_get_head(gateway.addr, "/socket/websocket?vsn=1.0.0", &upgrade);
    assert_eq!(status, 403);
    assert!(gateway.log_contains("unsupported protocol version"));
    let (status, _) = common::http_get_head(gateway.addr, "/socket/websocket?vsn=2.0.0", &upgrade);
    assert_eq!(status, 101);
}

#[tokio::test]
async fn a_binary_push_gets_an_error_reply_and_the_socket_stays_usable() {
    let gateway = Gateway::start(&[]);
    let mut client = gateway.connect().await;
    let (join_ref, _) = client.join_ok("room:binary").await;
    // phoenix.js binaryEncode: kind 0, four lengths, join_ref, ref, topic, event, payload.
    let mut push = vec![0, join_ref.len() as u8, 2, 11, 12];
    push.extend_from_slice(format!("{join_ref}b1room:binarysend_message").as_bytes());
    push.extend_from_slice(&[1, 2, 3]);
    client.send_binary(push).await;
    let reply = client.reply_to("b1").await;
    assert_eq!(
        reply,
        json!({"status": "error", "response": {"reason": "binary payloads are not supported"}})
    );
    assert_eq!(client.send_message(&join_ref, "room:binary", "ann", "still here").await["status"], "ok");
}
