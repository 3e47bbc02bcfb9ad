//! Presence (design §9) over real sockets: the chat tracks each join, a joiner gets
//! `presence_state` right after its reply, the room gets `presence_diff`s in Phoenix's shapes,
//! and entries leave with their join, their socket, or a replay that does not track them.

mod common;

use std::time::Duration;

use common::{kill9, Client, Gateway};
use serde_json::{json, Value};

/// A room that tracks on request, so a test can see a join the script stops tracking.
const TRACKER: &str = r#"
function onJoin(conn, params) {
  if (params.track !== false) Room.presence.track(conn.id, params.name, { name: params.name });
  return { list: Room.presence.list() };
}
function onEvent(conn, event, payload) {
  if (event === "untrack") Room.presence.untrack(conn.id);
  if (event === "list") return Room.presence.list();
  if (event === "meta") Room.presence.track(conn.id, "bad", 42);
}
"#;

async fn ask(client: &mut Client, join_ref: &str, topic: &str, event: &str) -> Value {
    let msg_ref = client.push(Some(join_ref), topic, event, json!({})).await;
    client.reply_to(&msg_ref).await
}

async fn presence_client(gateway: &Gateway) -> Client {
    let mut client = gateway.connect().await;
    client.presence = true;
    client
}

/// The keys of a presence list, each with its number of metas.
fn keys(list: &Value) -> Vec<(String, usize)> {
    let mut keys: Vec<(String, usize)> = list
        .as_object()
        .map(|o| o.iter().map(|(k, v)| (k.clone(), v["metas"].as_array().map_or(0, Vec::len))).collect())
        .unwrap_or_default();
    keys.sort();
    keys
}

/// What a client knows of the room's presence, kept as phoenix.js's `Presence.syncState` and
/// `syncDiff` keep it: metas by key, each known by its `phx_ref`.
#[derive(Default)]
struct View {
    metas: std::collections::BTreeMap<String, Vec<Value>>,
    synced: bool,
}

impl View {
    fn apply(&mut self, frame: &Value) {
        match frame[3].as_str() {
            Some("presence_state") => {
                self.metas.clear();
                self.add(&frame[4]);
                self.synced = true;
            }
            Some("presence_diff") => {
                self.add(&frame[4]["joins"]);
                for (key, entry) in frame[4]["leaves"].as_object().into_iter().flatten() {
                    let gone: Vec<&Value> =
                        entry["metas"].as_array().into_iter().flatten().map(|m| &m["phx_ref"]).collect();
                    if let Some(metas) = self.metas.get_mut(key) {
                        metas.retain(|m| !gone.contains(&&m["phx_ref"]));
                        if metas.is_empty() {
                            self.metas.remove(key);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn add(&mut self, list: &Value) {
        for (key, entry) in list.as_object().into_iter().flatten() {
            let metas = self.metas.entry(key.clone()).or_default();
            for meta in entry["metas"].as_array().into_iter().flatten() {
                if !metas.iter().any(|m| m["phx_ref"] == meta["phx_ref"]) {
                    metas.push(meta.clone());
                }
            }
        }
    }

    fn keys(&self) -> Vec<(String, usize)> {
        self.metas.iter().map(|(k, v)| (k.clone(), v.len())).collect()
    }
}

/// Reads the client's frames into its view until the view lists exactly `want`.
async fn until_listed(client: &mut Client, view: &mut View, want: &[(&str, usize)]) {
    let want: Vec<(String, usize)> = want.iter().map(|(k, n)| (k.to_string(), *n)).collect();
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while !(view.synced && view.keys() == want) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(frame) = client.try_recv(left).await else {
            panic!("presence never settled on {want:?}; the client sees {:?}", view.keys());
        };
        view.apply(&frame);
    }
}

#[tokio::test]
async fn joins_see_the_list_then_diffs_and_leaves_of_every_kind() {
    let gateway = Gateway::start(&[]);
    let mut ann = presence_client(&gateway).await;
    let (ann_ref, _) = ann.join_with("room:p", json!({"name": "ann"})).await;
    let state = ann.next_event("presence_state").await;
    assert_eq!(state[0], json!(ann_ref), "on the joiner's join_ref");
    assert_eq!(state[1], Value::Null);
    let metas = &state[4]["ann"]["metas"];
    assert_eq!(metas[0]["name"], "ann");
    assert!(metas[0]["online_at"].is_u64() && metas[0]["phx_ref"].is_string(), "{state}");
    let mut ann_view = View::default();
    ann_view.apply(&state);

    let mut bob = presence_client(&gateway).await;
    let mut bob_view = View::default();
    bob.join_with("room:p", json!({"name": "bob"})).await;
    until_listed(&mut bob, &mut bob_view, &[("ann", 1), ("bob", 1)]).await;
    let diff = ann.next_event("presence_diff").await;
    assert_eq!((&diff[0], &diff[1]), (&Value::Null, &Value::Null), "diffs are broadcasts");
    ann_view.apply(&diff);
    until_listed(&mut ann, &mut ann_view, &[("ann", 1), ("bob", 1)]).await;

    // A second tab of ann: a second meta under the same key.
    let mut ann2 = presence_client(&gateway).await;
    let (ann2_ref, _) = ann2.join_with("room:p", json!({"name": "ann"})).await;
    until_listed(&mut bob, &mut bob_view, &[("ann", 2), ("bob", 1)]).await;

    // A leave, then a closed socket: each takes its meta with it.
    let leave = ann2.push(Some(&ann2_ref), "room:p", "phx_leave", json!({})).await;
    ann2.reply_to(&leave).await;
    until_listed(&mut bob, &mut bob_view, &[("ann", 1), ("bob", 1)]).await;
    drop(ann);
    until_listed(&mut bob, &mut bob_view, &[("bob", 1)]).await;
    let mut carol = presence_client(&gateway).await;
    carol.join_with("room:p", json!({"name": "carol"})).await;
    assert_eq!(keys(&carol.next_event("presence_state").await[4]), [("bob".into(), 1), ("carol".into(), 1)]);
}

#[tokio::test]
async fn presence_outlives_a_worker_crash_and_the_replay_settles_it() {
    let script = common::script_file("tracker.js", TRACKER);
    let gateway = Gateway::start(&["--room", &format!("t={}", script.display())]);
    let mut ann = presence_client(&gateway).await;
    let (ann_ref, _) = ann.join_with("t:x", json!({"name": "ann"})).await;
    let mut bob = presence_client(&gateway).await;
    bob.join_with("t:x", json!({"name": "bob"})).await;
    ann.recv_until(|f| f[3] == "presence_diff" && f[4]["joins"].get("bob").is_some()).await;
    let before = ask(&mut ann, &ann_ref, "t:x", "list").await["response"].clone();
    // Carol is here, but the room does not list her.
    let mut carol = presence_client(&gateway).await;
    let (_, reply) = carol.join_with("t:x", json!({"name": "carol", "track": false})).await;
    assert_eq!(
        keys(&reply["response"]["list"]),
        [("ann".into(), 1), ("bob".into(), 1)],
        "list() from the script"
    );

    kill9(gateway.wait_room_pid("x"));
    ann.next_event("room_reset").await;
    // The new runtime tracked ann and bob again as before: same entries, same refs, no diff.
    let after = ask(&mut ann, &ann_ref, "t:x", "list").await["response"].clone();
    assert_eq!(after, before, "presence survived the crash unchanged");
    ann.assert_no_event("presence_diff", Duration::from_millis(300)).await;

    // A meta that is not an object fails the call; untrack leaves.
    let reply = ask(&mut ann, &ann_ref, "t:x", "meta").await;
    assert_eq!(reply["response"]["reason"], "internal error");
    ask(&mut ann, &ann_ref, "t:x", "untrack").await;
    let diff = bob.recv_until(|f| f[3] == "presence_diff" && f[4]["leaves"].get("ann").is_some()).await;
    assert_eq!(keys(&diff[4]["leaves"]), [("ann".into(), 1)]);
}

#[tokio::test]
async fn verified_users_are_tracked_under_their_sub() {
    let secret = "presence-test-secret-0123";
    let mint = |sub: &str, name: &str| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["token", "--sub", sub, "--name", name, "--auth-secret", secret])
            .output()
            .expect("gateway token runs");
        String::from_utf8(output.stdout).expect("text").trim().to_owned()
    };
    let gateway = Gateway::start(&["--auth-secret", secret]);
    let token = mint("u-1", "Ann");
    let mut ann = gateway.connect_with(&format!("token={token}"), None).await.expect("connects");
    ann.presence = true;
    // The name in the payload does not matter: the token says who this is.
    ann.join_with("room:who", json!({"name": "mallory"})).await;
    let state = ann.next_event("presence_state").await;
    assert_eq!(keys(&state[4]), [("u-1".into(), 1)]);
    assert_eq!(state[4]["u-1"]["metas"][0]["name"], "Ann");
}

#[tokio::test]
async fn a_chat_crash_is_invisible_in_presence() {
    // The chat stamps online_at when it tracks a join; the replay after a crash must not turn
    // that into a room-wide leave and rejoin.
    let gateway = Gateway::start(&[]);
    let mut ann = presence_client(&gateway).await;
    let (_, _) = ann.join_with("room:steady", json!({"name": "ann"})).await;
    let state = ann.next_event("presence_state").await;
    // Her own arrival, which the room hears as a diff too.
    ann.recv_until(|f| f[3] == "presence_diff" && f[4]["joins"].get("ann").is_some()).await;
    kill9(gateway.wait_room_pid("steady"));
    let reset = ann.next_event("room_reset").await;
    assert!(reset[4]["response"].is_object(), "{reset}");
    ann.assert_no_event("presence_diff", Duration::from_millis(400)).await;
    let mut bob = presence_client(&gateway).await;
    bob.join_with("room:steady", json!({"name": "bob"})).await;
    let listed = bob.next_event("presence_state").await;
    assert_eq!(listed[4]["ann"], state[4]["ann"], "ann's entry, online_at and phx_ref, unchanged");
}
