//! The limits (design section 6, "Limits and bad input") that the README promises, each over a
//! real socket.

mod common;

use common::Gateway;
use serde_json::json;

#[tokio::test]
async fn inbound_frames_past_the_rate_limit_get_an_error_reply() {
    let gateway = Gateway::start(&["--rate-per-sec", "1", "--rate-burst", "3"]);
    let mut client = gateway.connect().await;
    for i in 0..5 {
        client.send(json!([null, format!("hb{i}"), "phoenix", "heartbeat", {}])).await;
    }
    let mut statuses = Vec::new();
    for i in 0..5 {
        let reply = client.reply_to(&format!("hb{i}")).await;
        statuses.push(
            reply["response"]["reason"].as_str().unwrap_or(reply["status"].as_str().unwrap()).to_owned(),
        );
    }
    assert_eq!(statuses, ["ok", "ok", "ok", "rate limited", "rate limited"]);
    assert!(gateway.log_contains("rate limiting a socket past 1/s"));
}

#[tokio::test]
async fn joins_past_the_live_room_limit_are_refused() {
    let gateway = Gateway::start(&["--max-rooms", "2"]);
    let mut client = gateway.connect().await;
    client.join_ok("room:first").await;
    client.join_ok("room:second").await;
    let (_, reply) = client.join("room:third").await;
    assert_eq!(reply, json!({"status": "error", "response": {"reason": "room limit reached"}}));
    assert_eq!(gateway.rooms().len(), 2);
    // A live room can still be joined by others.
    let mut other = gateway.connect().await;
    other.join_ok("room:first").await;
}

#[tokio::test]
async fn joins_past_the_channel_limit_of_a_socket_are_refused() {
    let gateway = Gateway::start(&["--max-channels-per-socket", "2"]);
    let mut client = gateway.connect().await;
    client.join_ok("room:c1").await;
    client.join_ok("room:c2").await;
    let (_, reply) = client.join("room:c3").await;
    assert_eq!(reply["status"], "error");
    assert_eq!(reply["response"]["reason"], "too many channels on this socket");
    // Rejoining a topic already joined replaces it and does not count twice.
    client.join_ok("room:c2").await;
}

#[tokio::test]
async fn a_client_that_never_reads_is_disconnected_and_the_rest_of_the_room_keeps_up() {
    let gateway =
        Gateway::start(&["--outbound-queue", "16", "--rate-per-sec", "100000", "--rate-burst", "100000"]);
    let mut slow = gateway.connect().await;
    let mut sender = gateway.connect().await;
    let mut bystander = gateway.connect().await;
    slow.join_ok("room:fanout").await;
    let (join_ref, _) = sender.join_ok("room:fanout").await;
    bystander.join_ok("room:fanout").await;
    // Another reader in the room, reading as it goes. It has the same 16-frame queue as the
    // slow one, so had it ever waited behind the slow client it would be cut off too.
    let bystander = tokio::spawn(async move {
        let mut bulk = 0;
        loop {
            let message = bystander.next_event("new_message").await;
            if message[4]["text"] == "after" {
                return (bulk, bystander);
            }
            bulk += 1;
        }
    });

    // Enough bulk to fill the slow client's socket buffers and then its queue.
    let text = "x".repeat(3900);
    let mut sent = 0;
    while !gateway.log_contains_now("does not keep up") {
        assert!(sent < 5000, "the slow client was never disconnected");
        let reply = sender.send_message(&join_ref, "room:fanout", "bulk", &text).await;
        assert_eq!(reply["status"], "ok");
        sent += 1;
    }
    // The sender received every one of its own broadcasts, none dropped for the slow one.
    for _ in 0..sent {
        sender.next_event("new_message").await;
    }
    let reply = sender.send_message(&join_ref, "room:fanout", "bulk", "after").await;
    assert_eq!(reply["status"], "ok");
    let after = sender.recv_until(|f| f[3] == "new_message" && f[4]["text"] == "after").await;
    assert_eq!(after[4]["sender"], "bulk");
    let (received, _still_joined) = bystander.await.expect("the bystander reads");
    assert_eq!(received, sent, "the bystander missed messages");
    common::wait_for(|| (gateway.rooms()[0]["subscribers"] == 2).then_some(()))
        .expect("only the slow client was unsubscribed");
    drop(slow);
}

#[tokio::test]
async fn a_flood_of_room_ids_evicts_idle_rooms_and_never_passes_the_limit() {
    let gateway = Gateway::start(&["--max-rooms", "4", "--rate-per-sec", "100000", "--rate-burst", "100000"]);
    let mut resident = gateway.connect().await;
    let (resident_ref, _) = resident.join_ok("room:resident").await;
    resident.send_message(&resident_ref, "room:resident", "ann", "keep me").await;
    let resident_pid = gateway.wait_room_pid("resident");

    // One client walks through 40 fresh room ids, joining and leaving each.
    let mut flooder = gateway.connect().await;
    for i in 0..40 {
        let topic = format!("room:flood-{i}");
        let (join_ref, _) = flooder.join_ok(&topic).await;
        let leave_ref = flooder.push(Some(&join_ref), &topic, "phx_leave", json!({})).await;
        assert_eq!(flooder.reply_to(&leave_ref).await["status"], "ok");
        let live = gateway.rooms().len();
        assert!(live <= 4, "{live} live rooms past a limit of 4");
    }
    // Evicted workers are asked to exit and are reaped: they do not pile up, not even as
    // zombies. The gateway's room workers are exactly the four live rooms' (the warm pool's
    // spares and template are children too, but not room workers).
    common::wait_for(|| (common::workers_of(gateway.pid()).len() == 4).then_some(()))
        .unwrap_or_else(|| panic!("children left: {:?}", common::children_of(gateway.pid())));
    let zombies = common::zombies_of(gateway.pid());
    assert!(zombies.is_empty(), "evicted workers left unreaped: {zombies:?}");
    let listed: std::collections::BTreeSet<u32> =
        gateway.rooms().iter().filter_map(|r| r["pid"].as_u64()).map(|p| p as u32).collect();
    assert_eq!(listed.len(), 4, "four live rooms");
    let workers: std::collections::BTreeSet<u32> =
        common::workers_of(gateway.pid()).iter().map(|p| p.pid).collect();
    assert_eq!(workers, listed, "the gateway's workers are the live rooms' workers");
    assert!(gateway.log_contains("evicting an idle room"));
    // The room someone is in was never evicted: same worker, same history.
    assert_eq!(gateway.room_pid("resident"), Some(resident_pid));
    let mut late = gateway.connect().await;
    let (_, history) = late.join_ok("room:resident").await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["text"], "keep me");
}
