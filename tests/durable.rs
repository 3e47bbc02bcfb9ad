//! Durable rooms (design §10) against a real gateway with `--data-dir`: nothing acknowledged
//! is lost to `kill -9` of the worker or of the gateway, a full store fails writes cleanly,
//! idle rooms hibernate, alarms wake stopped rooms (across a restart too), and joins resume
//! after the last message they saw.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{kill9, script_file, wait_for, Client, Gateway, ALARM_ROOM};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const TOPIC: &str = "room:durable";

/// A fresh data directory, removed when dropped.
struct DataDir(PathBuf);

impl DataDir {
    fn new(name: &str) -> DataDir {
        let path = std::env::temp_dir().join(format!("roomvisor-data-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        DataDir(path)
    }

    fn arg(&self) -> &str {
        self.0.to_str().expect("a UTF-8 temp path")
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o755));
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start(data: &DataDir, extra: &[&str]) -> Gateway {
    let mut args = vec!["--data-dir", data.arg(), "--rate-per-sec", "100000", "--rate-burst", "100000"];
    if !extra.contains(&"--history-on-join") {
        args.extend(["--history-on-join", "1000"]);
    }
    args.extend_from_slice(extra);
    Gateway::start(&args)
}

/// Sends `count` messages, `window` at a time, and returns the ids of those acknowledged. Stops
/// early, without panicking, when the socket dies (the gateway was killed) or `until` is set.
async fn flood(client: &mut Client, join_ref: &str, count: usize, window: usize, text: &str) -> Vec<u64> {
    flood_until(client, join_ref, count, window, text, &AtomicBool::new(false)).await
}

async fn flood_until(
    client: &mut Client,
    join_ref: &str,
    count: usize,
    window: usize,
    text: &str,
    until: &AtomicBool,
) -> Vec<u64> {
    let mut acked = Vec::new();
    let mut sent = 0;
    'flood: while sent < count && !until.load(Ordering::SeqCst) {
        let mut waiting = BTreeSet::new();
        for _ in 0..window.min(count - sent) {
            let frame = json!([join_ref, (sent + 1).to_string(), TOPIC, "send_message", {"sender": "f", "text": format!("{text} {sent}")}]);
            if client.ws.send_message(frame).await.is_err() {
                break 'flood;
            }
            waiting.insert((sent + 1).to_string());
            sent += 1;
        }
        while !waiting.is_empty() {
            let next = tokio::time::timeout(Duration::from_secs(10), client.ws.next()).await;
            let text = match next {
                Ok(Some(Ok(Message::Text(text)))) => text,
                Ok(Some(Ok(_))) => continue,
                _ => break 'flood,
            };
            let frame: Value = serde_json::from_str(&text).expect("JSON frames");
            if frame[3] != "phx_reply" {
                continue;
            }
            let Some(msg_ref) = frame[1].as_str() else { continue };
            if waiting.remove(msg_ref) && frame[4]["status"] == "ok" {
                acked.push(frame[4]["response"]["id"].as_u64().expect("an acknowledged message has an id"));
            }
        }
    }
    acked
}

trait SendJson {
    async fn send_message(&mut self, frame: Value) -> Result<(), ()>;
}

impl SendJson for common::WsStream {
    async fn send_message(&mut self, frame: Value) -> Result<(), ()> {
        use futures_util::SinkExt;
        self.send(Message::Text(frame.to_string().into())).await.map_err(drop)
    }
}

/// The ids a new join sees.
async fn history_ids(gateway: &Gateway) -> (Vec<u64>, Value) {
    let mut client = gateway.connect().await;
    let (_, reply) = client.join(TOPIC).await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let ids = reply["response"]["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["id"].as_u64().expect("an id"))
        .collect();
    (ids, reply["response"].clone())
}

fn assert_kept(acked: &[u64], history: &[u64]) {
    assert!(history.windows(2).all(|w| w[0] < w[1]), "ids strictly increase: {history:?}");
    let kept: BTreeSet<u64> = history.iter().copied().collect();
    let lost: Vec<u64> = acked.iter().filter(|id| !kept.contains(id)).copied().collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
}

#[tokio::test]
async fn every_acknowledged_message_survives_kill_9_of_the_worker() {
    let data = DataDir::new("kill-worker");
    let gateway = start(&data, &[]);
    let mut client = gateway.connect().await;
    let (join_ref, _) = client.join_ok(TOPIC).await;
    let pid = gateway.wait_room_pid("durable");
    // Enough acknowledged before the kill to mean something, however fast the engine is.
    let mut acked = flood(&mut client, &join_ref, 100, 16, "before").await;
    let (killed, stop) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let (killed_flag, stop_flag) = (killed.clone(), stop.clone());
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        kill9(pid);
        killed_flag.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(700));
        stop_flag.store(true, Ordering::SeqCst);
    });
    acked.extend(flood_until(&mut client, &join_ref, usize::MAX, 16, "flood", &stop).await);
    killer.join().unwrap();
    assert!(killed.load(Ordering::SeqCst), "the worker was killed while the flood went on");
    eprintln!("{} messages acknowledged around the kill", acked.len());
    assert!(acked.len() > 50, "enough messages were acknowledged to mean something: {}", acked.len());
    new_pid(&gateway, "durable", pid);
    let (history, _) = history_ids(&gateway).await;
    assert_kept(&acked, &history);
    // Ids go on from where they were.
    let more = flood(&mut client, &join_ref, 1, 1, "after").await;
    if let (Some(next), Some(last)) = (more.first(), history.last()) {
        assert!(next > last, "{next} after {last}");
    }
}

#[tokio::test]
async fn every_acknowledged_message_survives_kill_9_of_the_gateway() {
    let data = DataDir::new("kill-gateway");
    let gateway = start(&data, &[]);
    let mut client = gateway.connect().await;
    let (join_ref, _) = client.join_ok(TOPIC).await;
    // Enough acknowledged before the kill to mean something, however fast the engine is.
    let mut acked = flood(&mut client, &join_ref, 100, 16, "before").await;
    let gateway_pid = gateway.pid();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        kill9(gateway_pid);
    });
    acked.extend(flood(&mut client, &join_ref, 100_000, 16, "flood").await);
    killer.join().unwrap();
    drop(gateway);
    assert!(acked.len() > 50, "enough messages were acknowledged to mean something: {}", acked.len());

    let gateway = start(&data, &[]);
    let (history, _) = history_ids(&gateway).await;
    let expected: Vec<u64> = acked.iter().rev().take(1000).rev().copied().collect();
    assert_kept(&expected, &history);
    let mut client = gateway.connect().await;
    let (join_ref, _) = client.join_ok(TOPIC).await;
    let next = flood(&mut client, &join_ref, 1, 1, "after").await;
    assert!(next[0] > *history.last().unwrap(), "ids go on: {} after {:?}", next[0], history.last());
}

#[tokio::test]
async fn a_full_store_fails_the_write_sends_nothing_of_it_and_keeps_serving_reads() {
    let data = DataDir::new("full");
    let gateway = start(&data, &["--data-max-bytes", "131072", "--max-text-chars", "4000"]);
    let mut writer = gateway.connect().await;
    let (join_ref, _) = writer.join_ok(TOPIC).await;
    let mut watcher = gateway.connect().await;
    watcher.join_ok(TOPIC).await;
    let big = "x".repeat(3900);
    let mut acked = Vec::new();
    let refusal = loop {
        let reply = writer.send_message(&join_ref, TOPIC, "w", &format!("{} {big}", acked.len())).await;
        if reply["status"] != "ok" {
            break reply;
        }
        acked.push(reply["response"]["id"].as_u64().unwrap());
        assert!(acked.len() < 200, "a 128 KiB store took {} messages of 4 KB", acked.len());
    };
    assert_eq!(refusal["response"]["reason"], "storage unavailable", "{refusal}");
    assert!(gateway.log_contains("storage is full"));
    // The watcher saw every acknowledged message and nothing of the refused one.
    let mut seen = Vec::new();
    while let Some(frame) = watcher.try_recv(Duration::from_millis(500)).await {
        if frame[3] == "new_message" {
            seen.push(frame[4]["id"].as_u64().unwrap());
        }
    }
    assert_eq!(seen, acked, "broadcasts: exactly the stored messages");
    // Reads go on: a new join gets every stored message, and the next write fails the same way.
    let (history, _) = history_ids(&gateway).await;
    assert_eq!(history, acked);
    let again = writer.send_message(&join_ref, TOPIC, "w", &big).await;
    assert_eq!(again["response"]["reason"], "storage unavailable", "{again}");
}

#[tokio::test]
async fn a_data_directory_the_gateway_cannot_write_stops_it_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let data = DataDir::new("read-only");
    std::fs::create_dir_all(&data.0).unwrap();
    std::fs::set_permissions(&data.0, std::fs::Permissions::from_mode(0o555)).unwrap();
    if std::fs::write(data.0.join("probe"), b"x").is_ok() {
        eprintln!("skipped: this user (root?) writes to a read-only directory anyway");
        return;
    }
    let log = start_fails(data.arg());
    assert!(log.contains("cannot open the database"), "{log}");
}

#[tokio::test]
async fn a_data_directory_that_cannot_be_created_stops_the_gateway_at_start() {
    // procfs takes no new directories, whoever asks (root included).
    let log = start_fails("/proc/self/roomvisor-data");
    assert!(log.contains("cannot create the data directory"), "{log}");
}

/// Starts a gateway on `data_dir`, expects it to exit with an error, and returns its log.
fn start_fails(data_dir: &str) -> String {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--port", "0", "--data-dir", data_dir])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_for(|| child.try_wait().ok().flatten()).expect("the gateway exits");
    let mut log = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(!status.success(), "{log}");
    log
}

#[tokio::test]
async fn an_idle_durable_room_hibernates_and_wakes_with_its_state() {
    let data = DataDir::new("hibernate");
    let gateway = start(&data, &["--room-idle-ms", "300"]);
    let mut client = gateway.connect().await;
    let (join_ref, _) = client.join_ok(TOPIC).await;
    let sent = client.send_message(&join_ref, TOPIC, "ann", "before the nap").await;
    assert_eq!(sent["status"], "ok");
    let pid = gateway.wait_room_pid("durable");
    drop(client);
    assert!(
        wait_for(|| gateway.room_pid("durable").is_none().then_some(())).is_some(),
        "the room hibernated"
    );
    assert!(gateway.log_contains("hibernating"));
    assert!(
        wait_for(|| (!common::is_alive(pid)).then_some(())).is_some(),
        "its worker exited and was reaped"
    );
    let (history, _) = history_ids(&gateway).await;
    assert_eq!(history, vec![sent["response"]["id"].as_u64().unwrap()]);
    new_pid(&gateway, "durable", pid);
}

/// Waits for the room to run in a worker other than `old`.
fn new_pid(gateway: &Gateway, room: &str, old: u32) -> u32 {
    wait_for(|| gateway.room_pid(room).filter(|pid| *pid != old)).expect("a new runtime took over")
}

#[tokio::test]
async fn an_alarm_starts_a_stopped_room_and_survives_a_gateway_restart() {
    let data = DataDir::new("alarm");
    let script = script_file("alarm.js", ALARM_ROOM);
    let kind = format!("alarm={}", script.display());
    let args = ["--room", kind.as_str(), "--room-idle-ms", "200"];
    let gateway = start(&data, &args);
    let mut client = gateway.connect().await;
    let (join_ref, reply) = client.join("alarm:a").await;
    assert_eq!(reply["response"]["fired"], 0, "{reply}");
    let msg_ref = client.push(Some(&join_ref), "alarm:a", "arm", json!({"in": 1500})).await;
    assert!(client.reply_to(&msg_ref).await["response"]["alarm"].as_u64().is_some());
    drop(client);
    // Hibernates first, then the alarm starts it again.
    assert!(wait_for(|| gateway.room_pid("a").is_none().then_some(())).is_some(), "the room hibernated");
    assert!(gateway.log_contains("alarm fired"), "onAlarm ran");
    let mut client = gateway.connect().await;
    let (_, reply) = client.join("alarm:a").await;
    assert_eq!(reply["response"]["fired"], 1, "{reply}");
    assert_eq!(reply["response"]["alarm"], Value::Null, "a run alarm is deleted");

    drop(client);

    // Armed, then the gateway stops before it is due: the next gateway runs it.
    let mut client = gateway.connect().await;
    let (join_ref, _) = client.join("alarm:b").await;
    let msg_ref = client.push(Some(&join_ref), "alarm:b", "arm", json!({"in": 1500})).await;
    assert!(client.reply_to(&msg_ref).await["response"]["alarm"].as_u64().is_some());
    drop(client);
    let mut gateway = gateway;
    gateway.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(gateway.wait_exit(Duration::from_secs(10)).is_some());
    let gateway = start(&data, &args);
    assert!(gateway.log_contains("alarm fired"), "the alarm ran after the restart");
    let mut client = gateway.connect().await;
    let (_, reply) = client.join("alarm:b").await;
    assert_eq!(reply["response"]["fired"], 1, "{reply}");
}

#[tokio::test]
async fn a_join_after_a_known_message_gets_exactly_the_ones_after_it() {
    let data = DataDir::new("resume");
    let gateway = start(&data, &["--history-on-join", "3"]);
    let mut client = gateway.connect().await;
    let (join_ref, reply) = client.join(TOPIC).await;
    let epoch = reply["response"]["epoch"].as_u64().expect("an epoch");
    assert_eq!(reply["response"]["resumed"], false);
    let mut ids = Vec::new();
    for n in 0..8 {
        let sent = client.send_message(&join_ref, TOPIC, "ann", &format!("m{n}")).await;
        ids.push(sent["response"]["id"].as_u64().unwrap());
    }
    let mut other = gateway.connect().await;
    let (_, resumed) = other.join_with(TOPIC, json!({"since": {"epoch": epoch, "id": ids[2]}})).await;
    let got: Vec<u64> = resumed["response"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(got, ids[3..].to_vec(), "every message after the one seen, more than --history-on-join");
    assert_eq!(resumed["response"]["resumed"], true);
    assert_eq!(resumed["response"]["epoch"], epoch);

    let mut stranger = gateway.connect().await;
    let (_, fresh) = stranger.join_with(TOPIC, json!({"since": {"epoch": epoch + 1, "id": ids[2]}})).await;
    assert_eq!(fresh["response"]["resumed"], false, "{fresh}");
    assert_eq!(fresh["response"]["messages"].as_array().unwrap().len(), 3, "the latest --history-on-join");

    // A durable room's ids go on across runs, and so does its epoch.
    let pid = gateway.wait_room_pid("durable");
    kill9(pid);
    new_pid(&gateway, "durable", pid);
    let mut later = gateway.connect().await;
    let (_, after) = later.join_with(TOPIC, json!({"since": {"epoch": epoch, "id": ids[6]}})).await;
    assert_eq!(after["response"]["resumed"], true, "{after}");
    assert_eq!(after["response"]["messages"][0]["id"], ids[7]);
}

#[tokio::test]
async fn the_readme_counter_keeps_its_count_across_kill_9() {
    let data = DataDir::new("counter");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("rooms/counter.js");
    let gateway = start(&data, &["--room", &format!("counter={}", script.display())]);
    let mut ann = gateway.connect().await;
    let (ann_ref, _) = ann.join_with("counter:c", json!({"name": "ann"})).await;
    for n in 1..=3 {
        let msg_ref = ann.push(Some(&ann_ref), "counter:c", "add", json!({})).await;
        assert_eq!(ann.reply_to(&msg_ref).await["response"], json!({"count": n}));
    }
    let pid = gateway.wait_room_pid("c");
    kill9(pid);
    let reset = ann.next_event("room_reset").await;
    assert_eq!(reset[4]["restored"], true, "{reset}");
    assert_eq!(reset[4]["response"]["count"], 3, "the new runtime read the stored count: {reset}");
    let msg_ref = ann.push(Some(&ann_ref), "counter:c", "add", json!({})).await;
    assert_eq!(ann.reply_to(&msg_ref).await["response"], json!({"count": 4}));
}
