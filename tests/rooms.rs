//! The original design's room tests, over the library API: real worker processes, no sockets.

mod common;

use std::time::Duration;

use roomvisor::gateway::phoenix::Outbox;
use roomvisor::gateway::rooms::Supervisor;
use roomvisor::gateway::rooms::{RoomError, RoomId};
use serde_json::{json, Value};

fn supervisor() -> Supervisor {
    common::supervisor(&common::chat_script(), 1_000)
}

fn room(id: &str) -> RoomId {
    RoomId::parse(id).expect("valid room id")
}

async fn call(sup: &Supervisor, id: &RoomId, function: &str, args: Value) -> Result<Value, RoomError> {
    let json = sup.call(id, function, args.to_string()).await?;
    Ok(serde_json::from_str(&json).expect("the room answers JSON"))
}

async fn send(sup: &Supervisor, id: &RoomId, sender: &str, text: &str) -> Value {
    call(sup, id, "sendMessage", json!([sender, text])).await.expect("sendMessage succeeds")
}

#[tokio::test]
async fn messages_come_back_in_order_with_all_fields() {
    let sup = supervisor();
    let general = room("general");
    for (i, text) in ["one", "two", "three"].iter().enumerate() {
        let sent = send(&sup, &general, "ann", text).await;
        assert_eq!(sent["id"], json!(i + 1));
        assert_eq!(sent["text"], json!(text));
    }
    let history = call(&sup, &general, "getHistory", json!([100])).await.unwrap();
    let history = history.as_array().expect("history is an array");
    let texts: Vec<&str> = history.iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["one", "two", "three"]);
    let mut last_timestamp = 0;
    for message in history {
        assert_eq!(message["sender"], "ann");
        assert!(message["id"].is_u64());
        let timestamp = message["timestamp"].as_u64().expect("timestamp in ms");
        assert!(timestamp >= last_timestamp, "timestamps go backwards");
        last_timestamp = timestamp;
    }
    let limited = call(&sup, &general, "getHistory", json!([2])).await.unwrap();
    assert_eq!(limited.as_array().unwrap().len(), 2);
    assert_eq!(limited[1]["text"], "three");
    sup.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn rooms_keep_separate_state_in_separate_processes() {
    let sup = supervisor();
    let (a, b) = (room("alpha"), room("beta"));
    send(&sup, &a, "ann", "in alpha").await;
    send(&sup, &a, "ann", "again alpha").await;
    send(&sup, &b, "bob", "in beta").await;
    assert_eq!(call(&sup, &a, "getState", json!([])).await.unwrap()["messageCount"], 2);
    assert_eq!(call(&sup, &b, "getState", json!([])).await.unwrap()["messageCount"], 1);
    let rooms = sup.rooms();
    assert_eq!(rooms.len(), 2);
    assert_ne!(rooms[0].pid, rooms[1].pid, "each room has its own worker process");
    sup.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_sent_message_reaches_a_pubsub_subscriber() {
    let sup = supervisor();
    let general = room("general");
    let (outbox, mut frames) = Outbox::new(16);
    sup.pubsub().subscribe_socket(&general.topic(), outbox);
    let sent = send(&sup, &general, "ann", "hello").await;
    let frame = tokio::time::timeout(Duration::from_secs(5), frames.recv())
        .await
        .expect("a broadcast arrives")
        .expect("the outbox is open");
    let frame: Value = serde_json::from_str(frame.as_str()).unwrap();
    assert_eq!(frame, json!([null, null, "room:general", "new_message", sent]));
    sup.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_killed_worker_is_replaced_by_a_fresh_runtime() {
    let sup = supervisor();
    let general = room("general");
    send(&sup, &general, "ann", "before the crash").await;
    let old_pid = sup.rooms()[0].pid.expect("a local room has a pid");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old_pid as i32), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    // The supervisor reaps the worker and drops it from the registry.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !sup.rooms().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the killed worker stayed registered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sent = send(&sup, &general, "ann", "after the crash").await;
    assert_eq!(sent["id"], 1, "ids restart in a fresh runtime");
    let history = call(&sup, &general, "getHistory", json!([100])).await.unwrap();
    assert_eq!(history.as_array().unwrap().len(), 1);
    assert_eq!(history[0]["text"], "after the crash");
    let new_pid = sup.rooms()[0].pid;
    assert_ne!(new_pid, Some(old_pid));
    sup.shutdown(Duration::from_secs(5)).await;
}
