//! Rooms that their script defines (design §8), over real sockets and real worker processes:
//! every hook, every call of the Room API, each error path, and the replay of a room's joins
//! into the runtime that replaces a killed one.

mod common;

use std::time::Duration;

use common::{kill9, script_file, Client, Gateway};
use serde_json::{json, Value};

/// A room that exercises the whole API: named joins (a name may be refused), events that
/// answer, refuse, throw, reject, push and broadcast, and a record of every hook call.
const LOUNGE: &str = r#"
const log = [];

function onJoin(conn, params) {
  if (params.name === "mallory") Room.refuse("not on the list");
  if (params.until !== undefined && Date.now() > params.until) Room.refuse("your invitation expired");
  conn.assigns.name = params.name;
  log.push(["join", params.name]);
  Room.broadcast("arrived", { name: params.name }, { except: conn.id });
  return { you: conn.id, here: Room.connections().map((c) => c.assigns.name) };
}

async function onEvent(conn, event, payload) {
  switch (event) {
    case "echo":
      return { echoed: payload, by: conn.assigns.name };
    case "whisper": {
      const to = Room.connections().find((c) => c.assigns.name === payload.to);
      if (to === undefined) Room.refuse("nobody called " + payload.to);
      Room.push(to.id, "whispered", { from: conn.assigns.name, text: payload.text });
      return;
    }
    case "shout":
      Room.broadcast("shouted", { from: conn.assigns.name }, { except: payload.except ?? [] });
      return { to: Room.connections().length };
    case "ids":
      return Object.fromEntries(Room.connections().map((c) => [c.assigns.name, c.id]));
    case "log":
      return log;
    case "forbidden":
      Room.refuse("you may not");
    case "bug":
      return null.property;
    case "spin":
      for (;;) {}
    case "later":
      await new Promise((resolve) => setTimeout(resolve, 10));
      throw new RangeError("rejected later");
    default:
      Room.refuse("unknown event " + event);
  }
}

function onLeave(conn, why) {
  log.push(["leave", conn.assigns.name, why]);
}
"#;

fn lounge() -> Gateway {
    let script = script_file("lounge.js", LOUNGE);
    Gateway::start(&["--room", &format!("lounge={}", script.display()), "--js-cpu-ms", "200"])
}

async fn enter(gateway: &Gateway, room: &str, name: &str) -> (Client, String, Value) {
    let mut client = gateway.connect().await;
    let (join_ref, reply) = client.join_with(&format!("lounge:{room}"), json!({ "name": name })).await;
    assert_eq!(reply["status"], "ok", "{name} joins: {reply}");
    (client, join_ref, reply["response"].clone())
}

async fn ask(client: &mut Client, join_ref: &str, room: &str, event: &str, payload: Value) -> Value {
    let msg_ref = client.push(Some(join_ref), &format!("lounge:{room}"), event, payload).await;
    client.reply_to(&msg_ref).await
}

const QUIET: Duration = Duration::from_millis(300);

#[tokio::test]
async fn hooks_answer_joins_and_events_and_speak_to_one_some_or_all() {
    let gateway = lounge();
    let (mut ann, ann_ref, joined) = enter(&gateway, "a", "ann").await;
    assert_eq!(joined["here"], json!(["ann"]), "onJoin's result is the join's response");
    let (mut bob, bob_ref, joined) = enter(&gateway, "a", "bob").await;
    assert_eq!(joined["here"], json!(["ann", "bob"]));
    let arrived = ann.next_event("arrived").await;
    assert_eq!(arrived[4], json!({"name": "bob"}));
    assert_eq!(arrived[0], Value::Null, "broadcasts carry no join_ref, as Phoenix's fastlane");
    let (mut cat, cat_ref, _) = enter(&gateway, "a", "cat").await;

    let reply = ask(&mut ann, &ann_ref, "a", "echo", json!({"n": [1, 2]})).await;
    assert_eq!(reply, json!({"status": "ok", "response": {"echoed": {"n": [1, 2]}, "by": "ann"}}));

    // push: exactly one join, with that join's join_ref.
    let reply = ask(&mut ann, &ann_ref, "a", "whisper", json!({"to": "cat", "text": "psst"})).await;
    assert_eq!(reply, json!({"status": "ok", "response": {}}), "undefined answers {{}}");
    let whispered = cat.next_event("whispered").await;
    assert_eq!(whispered, json!([cat_ref, null, "lounge:a", "whispered", {"from": "ann", "text": "psst"}]));
    bob.assert_no_event("whispered", QUIET).await;
    ann.assert_no_event("whispered", Duration::ZERO).await;

    // broadcast with except: everyone but exactly the named joins.
    let ids = ask(&mut bob, &bob_ref, "a", "ids", json!({})).await["response"].clone();
    let reply = ask(&mut bob, &bob_ref, "a", "shout", json!({"except": [ids["ann"], ids["bob"]]})).await;
    assert_eq!(reply["response"]["to"], 3);
    assert_eq!(cat.next_event("shouted").await[4], json!({"from": "bob"}));
    ann.assert_no_event("shouted", QUIET).await;
    bob.assert_no_event("shouted", Duration::ZERO).await;
    let reply = ask(&mut bob, &bob_ref, "a", "shout", json!({"except": ids["cat"]})).await;
    assert_eq!(reply["status"], "ok");
    for client in [&mut ann, &mut bob] {
        assert_eq!(client.next_event("shouted").await[4], json!({"from": "bob"}));
    }
    cat.assert_no_event("shouted", QUIET).await;

    // Another room of the same kind is another runtime: nothing crosses over.
    let (_, _, elsewhere) = enter(&gateway, "b", "dan").await;
    assert_eq!(elsewhere["here"], json!(["dan"]));
    ann.assert_no_event("arrived", QUIET).await;
}

#[tokio::test]
async fn refusals_exceptions_and_rejections_each_fail_one_call() {
    let gateway = lounge();
    let (mut ann, ann_ref, _) = enter(&gateway, "r", "ann").await;

    // A refused join gets the reason and is not subscribed: it hears nothing of the room.
    let mut mallory = gateway.connect().await;
    let (_, refused) = mallory.join_with("lounge:r", json!({"name": "mallory"})).await;
    assert_eq!(refused, json!({"status": "error", "response": {"reason": "not on the list"}}));
    let (_, _, _) = enter(&gateway, "r", "bob").await;
    ann.next_event("arrived").await;
    assert!(mallory.try_recv(QUIET).await.is_none(), "a refused join hears nothing");
    let msg_ref = mallory.push(None, "lounge:r", "echo", json!({})).await;
    assert_eq!(mallory.reply_to(&msg_ref).await["response"]["reason"], "unmatched topic");

    let reply = ask(&mut ann, &ann_ref, "r", "forbidden", json!({})).await;
    assert_eq!(reply, json!({"status": "error", "response": {"reason": "you may not"}}));
    let reply = ask(&mut ann, &ann_ref, "r", "bug", json!({})).await;
    assert_eq!(reply, json!({"status": "error", "response": {"reason": "internal error"}}));
    let reply = ask(&mut ann, &ann_ref, "r", "later", json!({})).await;
    assert_eq!(reply, json!({"status": "error", "response": {"reason": "internal error"}}));
    // The messages, with where they were thrown, are in the log and nowhere else.
    for needle in ["of null", "rejected later", "lounge.js:"] {
        let logged = common::wait_for(|| gateway.log_contains_now(needle).then_some(()));
        assert!(logged.is_some(), "the log has {needle:?}");
    }
    // A hook that loops is cut off by the CPU budget (--js-cpu-ms 200 here), alone.
    let reply = ask(&mut ann, &ann_ref, "r", "spin", json!({})).await;
    assert_eq!(reply, json!({"status": "error", "response": {"reason": "timeout"}}));
    let reply = ask(&mut ann, &ann_ref, "r", "echo", json!(1)).await;
    assert_eq!(reply["status"], "ok", "the room goes on after each failure: {reply}");
}

#[tokio::test]
async fn on_leave_hears_leaves_rejoins_and_closed_sockets() {
    let gateway = lounge();
    let (mut ann, ann_ref, _) = enter(&gateway, "l", "ann").await;
    let (mut bob, bob_ref, _) = enter(&gateway, "l", "bob").await;
    let (cat, _, _) = enter(&gateway, "l", "cat").await;

    let msg_ref = bob.push(Some(&bob_ref), "lounge:l", "phx_leave", json!({})).await;
    assert_eq!(bob.reply_to(&msg_ref).await["status"], "ok");
    let (_, again) = bob.join_with("lounge:l", json!({"name": "bob2"})).await;
    assert_eq!(again["status"], "ok");
    let (_, replaced) = bob.join_with("lounge:l", json!({"name": "bob3"})).await;
    assert_eq!(replaced["status"], "ok");
    drop(cat);

    let wanted = json!([["leave", "bob", "leave"], ["leave", "bob2", "rejoin"], ["leave", "cat", "closed"],]);
    // onLeave runs after the leave, in the room's own time: ask until it has.
    let mut leaves = Vec::new();
    for _ in 0..50 {
        let log = ask(&mut ann, &ann_ref, "l", "log", json!({})).await["response"].clone();
        leaves = log.as_array().cloned().unwrap_or_default();
        leaves.retain(|entry| entry[0] == "leave");
        if leaves.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(Value::from(leaves), wanted, "onLeave heard each way a join ends, with its conn");
    let ids = ask(&mut ann, &ann_ref, "l", "ids", json!({})).await["response"].clone();
    assert_eq!(ids.as_object().map(|o| o.len()), Some(2), "connections: ann and bob3: {ids}");
    assert!(ids.get("bob3").is_some() && ids.get("ann").is_some(), "{ids}");
}

#[tokio::test]
async fn a_killed_worker_is_replaced_and_its_joins_replayed_in_order_or_closed() {
    let gateway = lounge();
    let (mut ann, ann_ref, _) = enter(&gateway, "k", "ann").await;
    // Bob's invitation runs out soon: the runtime that replaces this one refuses him.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let until = now.as_millis() as u64 + 1_000;
    let mut bob = gateway.connect().await;
    let (bob_ref, reply) = bob.join_with("lounge:k", json!({"name": "bob", "until": until})).await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let (mut cat, cat_ref, _) = enter(&gateway, "k", "cat").await;
    let ids_before = ask(&mut ann, &ann_ref, "k", "ids", json!({})).await["response"].clone();
    tokio::time::sleep(Duration::from_millis(1_100)).await;

    let old_pid = gateway.wait_room_pid("k");
    kill9(old_pid);
    // The survivors get room_reset on their own join_ref with the new runtime's answer.
    let reset = ann.next_event("room_reset").await;
    assert_eq!(reset[0], json!(ann_ref));
    assert_eq!(reset[4]["reason"], "room worker exited");
    assert_eq!(reset[4]["response"]["here"], json!(["ann"]), "replayed first, as it joined first");
    let reset = cat.next_event("room_reset").await;
    assert_eq!(reset[0], json!(cat_ref));
    assert_eq!(reset[4]["response"]["here"], json!(["ann", "cat"]), "in join order, without bob");
    // The join the new runtime refused is closed.
    let close = bob.next_event("phx_close").await;
    assert_eq!(close, json!([bob_ref, bob_ref, "lounge:k", "phx_close", {}]));
    let msg_ref = bob.push(Some(&bob_ref), "lounge:k", "echo", json!({})).await;
    assert_eq!(bob.reply_to(&msg_ref).await["response"]["reason"], "unmatched topic");

    // The new runtime knows the same joins by the same ids, and their hooks run there.
    assert_ne!(gateway.wait_room_pid("k"), old_pid);
    let ids_after = ask(&mut ann, &ann_ref, "k", "ids", json!({})).await["response"].clone();
    assert_eq!(ids_after, json!({"ann": ids_before["ann"], "cat": ids_before["cat"]}));
    let log = ask(&mut cat, &cat_ref, "k", "log", json!({})).await["response"].clone();
    assert_eq!(log, json!([["join", "ann"], ["join", "cat"]]), "the replay ran before any other call");
}

#[tokio::test]
async fn the_readme_counter_is_a_room_kind_with_no_rust_change() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("rooms/counter.js");
    let gateway = Gateway::start(&["--room", &format!("counter={}", script.display())]);
    let mut ann = gateway.connect().await;
    let (_, nameless) = ann.join("counter:c").await;
    assert_eq!(nameless, json!({"status": "error", "response": {"reason": "a name, please"}}));
    let (ann_ref, joined) = ann.join_with("counter:c", json!({"name": "ann"})).await;
    assert_eq!(joined["response"], json!({"count": 0, "here": ["ann"]}));
    let mut bob = gateway.connect().await;
    let (bob_ref, _) = bob.join_with("counter:c", json!({"name": "bob"})).await;
    assert_eq!(ann.next_event("joined").await[4], json!({"name": "bob"}));
    for n in 1..=10 {
        let msg_ref = bob.push(Some(&bob_ref), "counter:c", "add", json!({})).await;
        assert_eq!(bob.reply_to(&msg_ref).await["response"], json!({"count": n}));
    }
    assert_eq!(bob.next_event("prize").await[4], json!({"count": 10}), "pushed to the tenth adder");
    let count = ann.recv_until(|f| f[3] == "count" && f[4]["count"] == 10).await;
    assert_eq!(count[4]["by"], "bob");
    ann.assert_no_event("prize", QUIET).await;
    let msg_ref = ann.push(Some(&ann_ref), "counter:c", "phx_leave", json!({})).await;
    assert_eq!(ann.reply_to(&msg_ref).await["status"], "ok");
    let left = bob.next_event("left").await;
    assert_eq!(left[4], json!({"name": "ann", "why": "leave"}));
}
