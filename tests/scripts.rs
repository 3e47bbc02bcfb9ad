//! The room script API (design section 5) as scripts use it, through a real gateway and real
//! workers.

mod common;

use std::time::Duration;

use common::{script_file, workers_of, Gateway};
use serde_json::json;

/// The original design's code path: the script pushes through the `broadcast` host handler.
const CALL_SYNC_ROOM: &str = r#"
const messages = [];
function getHistory(limit) { return messages.slice(-limit); }
function sendMessage(sender, text) {
  const message = { id: messages.length + 1, sender, text, timestamp: Date.now() };
  messages.push(message);
  const result = Beam.callSync("broadcast", message);
  if (result !== null) throw new Error("broadcast returned " + JSON.stringify(result));
  return message;
}
"#;

/// Rooms that talk to each other over a shared BroadcastChannel name, and exercise the rest
/// of the runtime API.
const LOBBY_ROOM: &str = r#"
const heard = [];
const lobby = new BroadcastChannel("lobby");
lobby.addEventListener("message", (event) => heard.push(event.data));
function getHistory() { return []; }
function announce(text) { lobby.postMessage({ from: Room.id, text }); return true; }
function whatDidIHear() { return heard; }
function callUnknownHandler() { return Beam.callSync("no_such_handler", 1); }
async function viaPromise() { await Beam.call("broadcast", { text: "async" }); return "sent"; }
function later(ms) {
  return new Promise((resolve) => {
    const started = Date.now();
    const ticks = [];
    const interval = setInterval(() => ticks.push(Date.now()), 5);
    const cancelled = setTimeout(() => resolve("cancelled timer fired"), ms / 2);
    clearTimeout(cancelled);
    setTimeout(() => { clearInterval(interval); resolve({ waited: Date.now() - started, ticks: ticks.length }); }, ms);
  });
}
function spin() { for (;;) {} }
// Megabyte strings: the heap limit is reached in a few dozen allocations on either engine.
// Built as a kilobyte repeated, not "x" repeated a million times: deno_core's QuickJS backend
// writes a one-character repeat a character at a time, about 4 ms of CPU a megabyte, which
// would spend this room's 200 ms budget before its 64 MiB heap.
function hog() { const held = []; for (;;) held.push("x".repeat(1 << 10).repeat(1 << 10) + held.length); }
function throwing() { throw new TypeError("nope, says the script"); }
function microtaskOrder() {
  const order = [];
  queueMicrotask(() => order.push("microtask"));
  order.push("sync");
  return Promise.resolve().then(() => order);
}
"#;

#[tokio::test]
async fn beam_call_sync_broadcast_reaches_websocket_clients() {
    let script = script_file("callsync.js", CALL_SYNC_ROOM);
    let gateway = Gateway::start(&["--room-script", script.to_str().unwrap()]);
    let mut ann = gateway.connect().await;
    let mut bob = gateway.connect().await;
    let (ann_ref, _) = ann.join_ok("room:beam").await;
    bob.join_ok("room:beam").await;
    let reply = ann.send_message(&ann_ref, "room:beam", "ann", "via Beam.callSync").await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let push = bob.next_event("new_message").await;
    assert_eq!(push[4], reply["response"]);
    assert_eq!(push[4]["text"], "via Beam.callSync");
}

#[tokio::test]
async fn a_post_on_the_rooms_own_broadcast_channel_reaches_its_clients() {
    // The original design's way to broadcast, beside Room.broadcast: a post on the channel
    // named after the room's topic reaches its Phoenix clients as new_message.
    let script = script_file(
        "posting.js",
        r#"const channel = new BroadcastChannel(Room.topic);
           function getHistory() { return []; }
           function sendMessage(sender, text) { const m = { id: 1, sender, text }; channel.postMessage(m); return m; }"#,
    );
    let gateway = Gateway::start(&["--room-script", script.to_str().unwrap()]);
    let mut ann = gateway.connect().await;
    let mut bob = gateway.connect().await;
    let (ann_ref, _) = ann.join_ok("room:bc").await;
    bob.join_ok("room:bc").await;
    let reply = ann.send_message(&ann_ref, "room:bc", "ann", "via BroadcastChannel").await;
    assert_eq!(bob.next_event("new_message").await[4], reply["response"]);
}

#[tokio::test]
async fn broadcast_channel_posts_reach_other_runtimes_but_not_the_poster() {
    let script = script_file("lobby.js", LOBBY_ROOM);
    let supervisor = common::supervisor(&script, 200);
    let (a, b, c) = (room("a"), room("b"), room("c"));
    for r in [&a, &b, &c] {
        supervisor.call(r, "whatDidIHear", "[]".into()).await.unwrap();
    }
    let pids: std::collections::HashSet<u32> = supervisor.rooms().iter().filter_map(|r| r.pid).collect();
    assert_eq!(pids.len(), 3, "three runtimes in three processes");
    assert_eq!(supervisor.call(&a, "announce", r#"["hello from a"]"#.into()).await.unwrap(), "true");
    let expected = json!([{ "from": "a", "text": "hello from a" }]);
    for r in [&b, &c] {
        let heard = common::wait_for_async(|| async {
            let heard: serde_json::Value =
                serde_json::from_str(&supervisor.call(r, "whatDidIHear", "[]".into()).await.unwrap())
                    .unwrap();
            (heard == expected).then_some(heard)
        })
        .await;
        assert!(heard.is_some(), "room {r} never heard the post");
    }
    let own: serde_json::Value =
        serde_json::from_str(&supervisor.call(&a, "whatDidIHear", "[]".into()).await.unwrap()).unwrap();
    assert_eq!(own, json!([]), "the poster does not hear itself");
    supervisor.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn script_errors_host_calls_timers_and_budgets() {
    let script = script_file("lobby.js", LOBBY_ROOM);
    let supervisor = common::supervisor(&script, 200);
    let r = room("api");

    // A script's exceptions reach clients as "internal error"; the message is for the log.
    let error = supervisor.call(&r, "callUnknownHandler", "[]".into()).await.unwrap_err();
    assert_eq!(error.reason(), "internal error");
    assert!(error.detail().contains("no_such_handler"), "{error:?}");

    let error = supervisor.call(&r, "throwing", "[]".into()).await.unwrap_err();
    assert_eq!(error.reason(), "internal error");
    assert!(error.detail().starts_with("nope, says the script"), "{error:?}");

    let error = supervisor.call(&r, "noSuchFunction", "[]".into()).await.unwrap_err();
    assert!(error.detail().contains("noSuchFunction"), "{error:?}");
    let error = supervisor.call(&r, "eval", r#"["1+1"]"#.into()).await.unwrap_err();
    assert!(error.detail().contains("no function named"), "builtins are not callable: {error}");

    let (outbox, mut frames) = roomvisor::gateway::phoenix::Outbox::new(8);
    supervisor.pubsub().subscribe_socket("room:api", outbox);
    assert_eq!(supervisor.call(&r, "viaPromise", "[]".into()).await.unwrap(), r#""sent""#);
    let frame = tokio::time::timeout(Duration::from_secs(5), frames.recv()).await.unwrap().unwrap();
    assert_eq!(frame.as_str(), r#"[null,null,"room:api","new_message",{"text":"async"}]"#);

    let waited: serde_json::Value =
        serde_json::from_str(&supervisor.call(&r, "later", "[100]".into()).await.unwrap()).unwrap();
    assert!(waited["waited"].as_u64().unwrap() >= 100, "{waited}");
    assert!(waited["ticks"].as_u64().unwrap() >= 5, "the interval kept firing: {waited}");

    assert_eq!(supervisor.call(&r, "microtaskOrder", "[]".into()).await.unwrap(), r#"["sync","microtask"]"#);

    let pid = supervisor.rooms()[0].pid;
    let error = supervisor.call(&r, "hog", "[]".into()).await.unwrap_err();
    assert_eq!(error.reason(), "out of memory");
    assert_eq!(supervisor.rooms()[0].pid, pid, "the runtime survives its heap limit");
    let error = supervisor.call(&r, "spin", "[]".into()).await.unwrap_err();
    assert_eq!(error.reason(), "timeout");
    // The runtime survived the interrupted call, state and process alike.
    assert_eq!(supervisor.call(&r, "whatDidIHear", "[]".into()).await.unwrap(), "[]");
    assert_eq!(supervisor.rooms()[0].pid, pid);
    supervisor.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_script_with_a_syntax_error_fails_the_join_without_a_respawn_loop() {
    let script = script_file("broken.js", "function getHistory( {\n");
    let gateway = Gateway::start(&["--room-script", script.to_str().unwrap()]);
    let mut client = gateway.connect().await;
    let (_, reply) = client.join("room:broken").await;
    assert_eq!(reply["status"], "error");
    // The client hears that the room cannot start; the log says why and where.
    assert_eq!(reply["response"]["reason"], "room unavailable: the room script failed to start");
    let logged = common::wait_for(|| gateway.log_lines_now().into_iter().find(|l| l.contains("SyntaxError")))
        .expect("the syntax error is logged");
    assert!(logged.contains("broken.js:"), "where the error is: {logged}");

    // Nothing respawns on its own: the failed worker is reaped and none appears later.
    assert_no_workers_stay(&gateway, 1).await;
    assert!(gateway.rooms().is_empty());

    // Retrying is allowed until the crash-loop limit (5 in 10 s), then the room cools down.
    let mut reasons = Vec::new();
    for _ in 0..6 {
        let (_, reply) = client.join("room:broken").await;
        reasons.push(reply["response"]["reason"].as_str().unwrap().to_owned());
    }
    assert_eq!(reasons.last().unwrap(), "room is crash-looping", "{reasons:?}");
    // One worker for each join that got as far as the script; none for a refused one.
    let started = reasons.iter().filter(|r| r.as_str() != "room is crash-looping").count();
    assert_no_workers_stay(&gateway, 1 + started).await;
    // Other rooms are not affected by the cool-down, and the gateway is up.
    assert_eq!(gateway.get_json("/healthz")["status"], "ok");
}

/// The gateway's workers are all reaped, and it has started exactly `starts` workers in all,
/// then and over the next 500 ms. Counted from the log, where every spawn leaves a line: a
/// loop of short-lived workers may never be caught alive in the process table.
async fn assert_no_workers_stay(gateway: &Gateway, starts: usize) {
    common::wait_for(|| workers_of(gateway.pid()).is_empty().then_some(()))
        .expect("failed workers are reaped");
    // Every start so far came before its join's reply; the log reader may lag a little.
    common::wait_for(|| (gateway.worker_starts_now() >= starts).then_some(()))
        .unwrap_or_else(|| panic!("{} workers started, not {starts}", gateway.worker_starts_now()));
    let before = gateway.worker_starts_now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = gateway.worker_starts_now();
    assert_eq!((before, after), (starts, starts), "workers started (before, after the wait): one per join");
    assert!(workers_of(gateway.pid()).is_empty(), "a worker was respawned on its own");
}

#[tokio::test]
async fn a_call_left_unanswered_times_out_and_the_worker_is_killed_at_the_hard_limit() {
    // A promise that never settles: the worker is idle, but the call is never answered.
    let script = script_file(
        "hang.js",
        r#"
        function getHistory() { return []; }
        function sendMessage(sender, text) {
          if (text === "hang") return new Promise(() => {});
          return { id: 1, sender, text, timestamp: Date.now() };
        }
        "#,
    );
    let gateway = Gateway::start(&[
        "--room-script",
        script.to_str().unwrap(),
        "--call-timeout-ms",
        "300",
        "--hard-timeout-ms",
        "1000",
    ]);
    let mut client = gateway.connect().await;
    let (join_ref, _) = client.join_ok("room:stuck").await;
    let pid = gateway.wait_room_pid("stuck");

    // "timeout", not "room worker exited": the caller was answered at the call timeout,
    // before the hard limit killed the worker.
    let reply = client.send_message(&join_ref, "room:stuck", "ann", "hang").await;
    assert_eq!(reply, json!({"status": "error", "response": {"reason": "timeout"}}));

    let reset = client.next_event("room_reset").await;
    assert_eq!(reset[4]["reason"], "room worker exited");
    assert!(gateway.log_contains("unresponsive past the hard timeout"));
    common::wait_for(|| (!common::is_alive(pid)).then_some(())).expect("the unresponsive worker was killed");

    let reply = client.send_message(&join_ref, "room:stuck", "ann", "fine").await;
    assert_eq!(reply["status"], "ok", "the next message starts a fresh runtime: {reply}");
    assert_ne!(gateway.wait_room_pid("stuck"), pid);
}

fn room(id: &str) -> roomvisor::gateway::rooms::RoomId {
    roomvisor::gateway::rooms::RoomId::parse(id).unwrap()
}

/// A chat room whose `sendMessage` misbehaves on command; the history survives every failure.
const FRAGILE_ROOM: &str = r#"
const messages = [];
function getHistory(limit) { return messages.slice(-limit); }
function sendMessage(sender, text) {
  if (text === "throw") throw new Error("the script refused: " + text);
  if (text === "spin") for (;;) {}
  if (text === "hog") { const held = []; for (;;) held.push("x".repeat(1 << 10).repeat(1 << 10) + held.length); }
  const message = { id: messages.length + 1, sender, text, timestamp: Date.now() };
  messages.push(message);
  Beam.callSync("broadcast", message);
  return message;
}
"#;

#[tokio::test]
async fn a_throwing_looping_or_hogging_call_fails_alone_and_the_room_keeps_its_state() {
    let script = script_file("fragile.js", FRAGILE_ROOM);
    let gateway = Gateway::start(&[
        "--room-script",
        script.to_str().unwrap(),
        "--js-cpu-ms",
        "200",
        "--js-heap-bytes",
        "33554432",
    ]);
    let mut client = gateway.connect().await;
    let (join_ref, _) = client.join_ok("room:fragile").await;
    let pid = gateway.wait_room_pid("fragile");
    let mut neighbour = gateway.connect().await;
    let (neighbour_ref, _) = neighbour.join_ok("room:neighbour").await;

    let reply = client.send_message(&join_ref, "room:fragile", "ann", "first").await;
    assert_eq!(reply["status"], "ok", "{reply}");
    for (text, reason) in [("throw", "internal error"), ("spin", "timeout"), ("hog", "out of memory")] {
        let reply = client.send_message(&join_ref, "room:fragile", "ann", text).await;
        assert_eq!(reply, json!({"status": "error", "response": {"reason": reason}}), "{text}");
        // Other rooms never wait on this one.
        let other =
            neighbour.send_message(&neighbour_ref, "room:neighbour", "bob", &format!("while {text}")).await;
        assert_eq!(other["status"], "ok", "{other}");
    }
    let logged = common::wait_for(|| gateway.log_contains_now("the script refused: throw").then_some(()));
    assert!(logged.is_some(), "the exception's message goes to the log");
    let reply = client.send_message(&join_ref, "room:fragile", "ann", "second").await;
    assert_eq!(reply["response"]["id"], 2, "the failed calls stored nothing and lost nothing");
    assert_eq!(gateway.room_pid("fragile"), Some(pid), "the same runtime survived all three");
    let (_, history) = gateway.connect().await.join_ok("room:fragile").await;
    let texts: Vec<&str> = history.iter().filter_map(|m| m["text"].as_str()).collect();
    assert_eq!(texts, ["first", "second"]);
}

#[tokio::test]
async fn an_async_call_cut_off_by_the_cpu_budget_in_a_promise_job_is_answered_with_timeout() {
    let script = script_file(
        "late-spin.js",
        r#"
        let count = 0;
        function getHistory() { return []; }
        async function spinAfterAwait() { await null; for (;;) {} }
        function bump() { return ++count; }
        "#,
    );
    // Caller timeouts far beyond the test's patience: only the CPU budget can answer in time.
    let config = roomvisor::gateway::config::Config {
        worker_bin: Some(std::path::PathBuf::from(env!("CARGO_BIN_EXE_room-worker"))),
        room_script: Some(script),
        js_cpu_ms: 200,
        call_timeout_ms: 600_000,
        hard_timeout_ms: 600_000,
        ..Default::default()
    };
    let supervisor = roomvisor::gateway::rooms::Supervisor::new(
        std::sync::Arc::new(config),
        roomvisor::gateway::pubsub::PubSub::new(),
    );
    let r = room("late");
    assert_eq!(supervisor.call(&r, "bump", "[]".into()).await.unwrap(), "1");
    let pid = supervisor.rooms()[0].pid;
    let answered =
        tokio::time::timeout(Duration::from_secs(30), supervisor.call(&r, "spinAfterAwait", "[]".into()))
            .await
            .expect("the cut-off async call was never answered");
    assert_eq!(answered.unwrap_err().reason(), "timeout");
    // Same runtime, state intact.
    assert_eq!(supervisor.call(&r, "bump", "[]".into()).await.unwrap(), "2");
    assert_eq!(supervisor.rooms()[0].pid, pid);
    supervisor.shutdown(Duration::from_secs(5)).await;
}
