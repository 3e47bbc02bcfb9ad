//! Chaos under load (issue 4): 200 clients in 20 rooms send steadily while a killer `kill -9`s
//! a random live room worker every 100 ms. The gateway must stay up, every push must get a
//! reply (ok, or an error that says why), no client may be disconnected, every message that
//! was acknowledged must reach the whole room, and every room must work at the end.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Gateway, WsStream};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Message;

const ROOMS: usize = 20;
const PER_ROOM: usize = 10;
const KILL_EVERY: Duration = Duration::from_millis(100);
const KILLING: Duration = Duration::from_secs(20);
/// Clients keep sending this long after the last kill; longer than the crash cool-down.
const RECOVERY: Duration = Duration::from_secs(2);
const COOLDOWN_MS: u64 = 1000;
/// The gateway's call timeout (its default) plus a margin: past this, a push went unanswered.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const REPLY_DEADLINE: Duration = Duration::from_secs(10);
/// The whole test, start to finish.
const TEST_LIMIT: Duration = Duration::from_secs(60);
/// Error reasons a push may get while its room's worker is being killed.
const ACCEPTABLE_ERRORS: [&str; 3] = ["room worker exited", "room is crash-looping", "timeout"];

/// splitmix64, one per client, so that clients do not send in lockstep.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next_u64() % (hi - lo + 1))
    }
}

fn topic(room: usize) -> String {
    format!("room:chaos{room}")
}

/// A frame from the server, parsed only as far as the test needs: 200 clients receive some
/// 13,000 frames a second, and a full `serde_json::Value` for each costs a good part of a core.
struct Frame {
    join_ref: Option<String>,
    msg_ref: Option<String>,
    topic: String,
    event: String,
    payload: Payload,
    raw: String,
}

/// The payload fields the test reads: a `phx_reply` has `status` and `response`; a message
/// has `text`; an error response and a `room_reset` have `reason`.
#[derive(Deserialize, Default)]
struct Payload {
    status: Option<String>,
    response: Option<Box<RawValue>>,
    text: Option<String>,
    reason: Option<String>,
}

impl Frame {
    fn parse(raw: &str) -> Result<Frame, String> {
        type Wire = (Option<String>, Option<String>, String, String, Payload);
        let (join_ref, msg_ref, topic, event, payload): Wire =
            serde_json::from_str(raw).map_err(|e| format!("not a v2 frame ({e}): {raw}"))?;
        Ok(Frame { join_ref, msg_ref, topic, event, payload, raw: raw.to_owned() })
    }

    fn is_reply_to(&self, msg_ref: &str) -> bool {
        self.event == "phx_reply" && self.msg_ref.as_deref() == Some(msg_ref)
    }

    fn status(&self) -> Option<&str> {
        self.payload.status.as_deref()
    }

    /// The `response` of a reply.
    fn response(&self) -> Payload {
        let response = self.payload.response.as_ref();
        response.and_then(|r| serde_json::from_str(r.get()).ok()).unwrap_or_default()
    }
}

/// What one client saw.
struct Report {
    client: usize,
    room: usize,
    ws: WsStream,
    pushes: u64,
    /// Texts of this client's messages that were acknowledged with ok.
    acked: Vec<String>,
    errors: BTreeMap<String, u64>,
    /// Texts of every `new_message` received.
    received: HashSet<String>,
    resets: u64,
    slowest_reply: Duration,
    /// Anything that breaks the contract: silence, a close, a frame that makes no sense.
    problems: Vec<String>,
}

impl Report {
    /// Takes in one frame that is not the awaited reply.
    fn on_push(&mut self, frame: Frame) {
        let broadcast =
            frame.topic == topic(self.room) && frame.join_ref.is_none() && frame.msg_ref.is_none();
        match frame.event.as_str() {
            "new_message" if broadcast => match frame.payload.text {
                Some(text) => {
                    self.received.insert(text);
                }
                None => self.problems.push(format!("new_message without a text: {}", frame.raw)),
            },
            // To everyone when the room could not restart at once; to this join, with its
            // new join response, when the restarted room replayed it.
            "room_reset" if frame.topic == topic(self.room) && frame.msg_ref.is_none() => {
                self.resets += 1;
                if frame.payload.reason.as_deref() != Some("room worker exited") {
                    self.problems.push(format!("room_reset without the reason: {}", frame.raw));
                }
            }
            // The chat tracks who is online; this test does not look at it.
            "presence_state" | "presence_diff" if frame.topic == topic(self.room) => {}
            _ => self.problems.push(format!("an unexpected frame: {}", frame.raw)),
        }
    }
}

enum Next {
    Frame(Frame),
    Closed(String),
    TimedOut,
}

async fn next(ws: &mut WsStream, deadline: tokio::time::Instant) -> Next {
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Next::TimedOut,
            Ok(None) => return Next::Closed("the stream ended".into()),
            Ok(Some(Err(e))) => return Next::Closed(format!("socket error: {e}")),
            Ok(Some(Ok(Message::Close(frame)))) => return Next::Closed(format!("close frame {frame:?}")),
            Ok(Some(Ok(Message::Text(text)))) => match Frame::parse(&text) {
                Ok(frame) => return Next::Frame(frame),
                Err(e) => return Next::Closed(e),
            },
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// Sends until told to stop: one push, its reply, a pause of 100–200 ms (reading meanwhile).
async fn run_client(
    mut report: Report,
    join_ref: String,
    started: Arc<tokio::sync::Barrier>,
    stop: Arc<AtomicBool>,
) -> Report {
    let mut rng = Rng(report.client as u64 + 1);
    let topic = topic(report.room);
    started.wait().await;
    let mut n = 0u64;
    'sending: while !stop.load(Ordering::Relaxed) {
        n += 1;
        let msg_ref = format!("m{n}");
        let text = format!("c{}-{n}", report.client);
        let sender = format!("c{}", report.client);
        let frame = json!([join_ref, msg_ref, topic, "send_message", {"sender": sender, "text": text}]);
        if let Err(e) = report.ws.send(Message::Text(frame.to_string().into())).await {
            report.problems.push(format!("sending failed: {e}"));
            break;
        }
        report.pushes += 1;
        let sent_at = Instant::now();
        let deadline = tokio::time::Instant::now() + REPLY_DEADLINE;
        loop {
            match next(&mut report.ws, deadline).await {
                Next::Frame(frame) if frame.is_reply_to(&msg_ref) => {
                    report.slowest_reply = report.slowest_reply.max(sent_at.elapsed());
                    if frame.join_ref.as_deref() != Some(&join_ref) || frame.topic != topic {
                        report.problems.push(format!("a reply with the wrong refs or topic: {}", frame.raw));
                    }
                    let response = frame.response();
                    match frame.status() {
                        Some("ok") if response.text.as_deref() == Some(&text) => report.acked.push(text),
                        Some("error") => {
                            let reason = response.reason.unwrap_or_else(|| "(none)".to_owned());
                            *report.errors.entry(reason).or_default() += 1;
                        }
                        _ => report
                            .problems
                            .push(format!("a reply that is neither ok nor error: {}", frame.raw)),
                    }
                    break;
                }
                Next::Frame(frame) => report.on_push(frame),
                Next::Closed(why) => {
                    report.problems.push(format!("disconnected while waiting for {msg_ref}: {why}"));
                    break 'sending;
                }
                Next::TimedOut => {
                    report.problems.push(format!("no reply to {msg_ref} ({text}) within {REPLY_DEADLINE:?}"));
                    break 'sending;
                }
            }
        }
        let pause_until = tokio::time::Instant::now() + rng.millis(100, 200);
        loop {
            match next(&mut report.ws, pause_until).await {
                Next::Frame(frame) => report.on_push(frame),
                Next::Closed(why) => {
                    report.problems.push(format!("disconnected: {why}"));
                    break 'sending;
                }
                Next::TimedOut => break,
            }
        }
    }
    report
}

/// Kills a random live worker of the gateway every [`KILL_EVERY`] until `stop`; returns the
/// pids it killed.
fn killer(addr: std::net::SocketAddr, gateway_pid: u32, stop: Arc<AtomicBool>) -> Vec<u32> {
    let mut rng = Rng(0x5EED);
    let mut killed = Vec::new();
    let mut tick = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let live: Vec<u32> = common::room_pids_at(addr)
            .into_iter()
            .map(|(_, pid)| pid)
            // Only the gateway's own live children: never a pid that has been reused.
            .filter(|pid| common::process(*pid).is_some_and(|p| p.ppid == gateway_pid && p.state != 'Z'))
            .collect();
        if !live.is_empty() {
            let pid = live[(rng.next_u64() % live.len() as u64) as usize];
            if common::try_kill9(pid) {
                killed.push(pid);
            }
        }
        tick += KILL_EVERY;
        std::thread::sleep(tick.saturating_duration_since(Instant::now()));
    }
    killed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_keep_chatting_while_workers_are_killed_every_100ms() {
    let test_started = Instant::now();
    let cooldown = COOLDOWN_MS.to_string();
    let call_timeout = CALL_TIMEOUT.as_millis().to_string();
    let mut gateway = Gateway::start(&[
        "--crash-cooldown-ms",
        &cooldown,
        "--call-timeout-ms",
        &call_timeout,
        "--rate-per-sec",
        "1000",
        "--rate-burst",
        "1000",
    ]);
    tokio::time::timeout(TEST_LIMIT, chaos(&mut gateway, test_started))
        .await
        .unwrap_or_else(|_| panic!("the chaos test ran past {TEST_LIMIT:?}"));
}

async fn chaos(gateway: &mut Gateway, test_started: Instant) {
    // Everyone connects and joins before the first kill.
    let mut joined = Vec::new();
    for client in 0..ROOMS * PER_ROOM {
        let room = client % ROOMS;
        let mut ws = gateway.connect_raw().await;
        let join_ref = format!("j{client}");
        let frame = json!([join_ref, join_ref, topic(room), "phx_join", {}]);
        ws.send(Message::Text(frame.to_string().into())).await.expect("join sent");
        joined.push((client, room, ws, join_ref));
    }
    let started = Arc::new(tokio::sync::Barrier::new(ROOMS * PER_ROOM + 1));
    let stop_sending = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (client, room, mut ws, join_ref) in joined {
        let deadline = tokio::time::Instant::now() + common::WAIT;
        let reply = loop {
            match next(&mut ws, deadline).await {
                Next::Frame(frame) if frame.is_reply_to(&join_ref) => break frame,
                Next::Frame(_) => continue,
                Next::Closed(why) => panic!("client {client} was disconnected before the chaos: {why}"),
                Next::TimedOut => panic!("client {client} got no join reply"),
            }
        };
        assert_eq!(reply.status(), Some("ok"), "client {client} could not join: {}", reply.raw);
        let report = Report {
            client,
            room,
            ws,
            pushes: 0,
            acked: Vec::new(),
            errors: BTreeMap::new(),
            received: HashSet::new(),
            resets: 0,
            slowest_reply: Duration::ZERO,
            problems: Vec::new(),
        };
        tasks.push(tokio::spawn(run_client(report, join_ref, started.clone(), stop_sending.clone())));
    }
    let rooms_before = gateway.rooms().len();
    assert_eq!(rooms_before, ROOMS, "every room is live before the chaos");
    let started_workers = gateway.log_count_now("room worker started");
    started.wait().await;
    println!("chaos: {} clients in {ROOMS} rooms joined in {:.1?}", ROOMS * PER_ROOM, test_started.elapsed());

    // Let the traffic settle, then kill for KILLING.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let killer = {
        let (addr, pid, stop) = (gateway.addr, gateway.pid(), stop.clone());
        std::thread::spawn(move || killer(addr, pid, stop))
    };
    tokio::time::sleep(KILLING).await;
    stop.store(true, Ordering::Relaxed);
    let killed = killer.join().expect("the killer thread");
    assert!(gateway.is_running(), "the gateway died during the chaos");
    tokio::time::sleep(RECOVERY).await;
    stop_sending.store(true, Ordering::Relaxed);
    let mut reports = Vec::new();
    for task in tasks {
        reports.push(task.await.expect("a client task panicked"));
    }

    // The final round: in every room one client sends, and all ten must see it.
    let mut final_failures = Vec::new();
    for room in 0..ROOMS {
        let text = format!("final-{room}");
        let members: Vec<usize> = (0..reports.len()).filter(|i| reports[*i].room == room).collect();
        let sender = members[0];
        let msg_ref = "final";
        let join_ref = format!("j{}", reports[sender].client);
        let frame =
            json!([join_ref, msg_ref, topic(room), "send_message", {"sender": "final", "text": text}]);
        reports[sender].ws.send(Message::Text(frame.to_string().into())).await.expect("final push sent");
        let deadline = tokio::time::Instant::now() + REPLY_DEADLINE;
        loop {
            match next(&mut reports[sender].ws, deadline).await {
                Next::Frame(f) if f.is_reply_to(msg_ref) => {
                    if f.status() != Some("ok") {
                        final_failures.push(format!("room {room}: the final push failed: {}", f.raw));
                    }
                    break;
                }
                Next::Frame(f) => reports[sender].on_push(f),
                Next::Closed(why) => {
                    final_failures.push(format!("room {room}: the sender was disconnected: {why}"));
                    break;
                }
                Next::TimedOut => {
                    final_failures.push(format!("room {room}: no reply to the final push"));
                    break;
                }
            }
        }
        for &member in &members {
            let report = &mut reports[member];
            let deadline = tokio::time::Instant::now() + REPLY_DEADLINE;
            while !report.received.contains(&text) {
                match next(&mut report.ws, deadline).await {
                    Next::Frame(f) => report.on_push(f),
                    Next::Closed(why) => {
                        final_failures
                            .push(format!("room {room}: client {} was disconnected: {why}", report.client));
                        break;
                    }
                    Next::TimedOut => {
                        final_failures.push(format!(
                            "room {room}: client {} never got the final message",
                            report.client
                        ));
                        break;
                    }
                }
            }
        }
    }

    // Counts.
    let pushes: u64 = reports.iter().map(|r| r.pushes).sum();
    let ok: u64 = reports.iter().map(|r| r.acked.len() as u64).sum();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for report in &reports {
        for (reason, n) in &report.errors {
            *errors.entry(reason.clone()).or_default() += n;
        }
    }
    let error_total: u64 = errors.values().sum();
    let resets: u64 = reports.iter().map(|r| r.resets).sum();
    let slowest = reports.iter().map(|r| r.slowest_reply).max().unwrap_or_default();
    let respawns = gateway.log_count_now("room worker started").saturating_sub(started_workers);
    let distinct_killed: BTreeSet<u32> = killed.iter().copied().collect();
    let deliveries: usize = reports.iter().map(|r| r.received.len()).sum();
    let summary = format!(
        "chaos: {pushes} pushes, {ok} ok replies, {error_total} error replies {errors:?}, \
         {} kills ({} distinct workers), {respawns} respawns, {resets} room_reset pushes received, \
         {deliveries} messages delivered, slowest reply {slowest:.1?}, {:.1?} in all",
        killed.len(),
        distinct_killed.len(),
        test_started.elapsed()
    );
    println!("{summary}");
    // `cargo test` hides a passing test's output; CI prints the counts from this file.
    let counts = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("chaos-counts.txt");
    std::fs::write(&counts, format!("{summary}\n")).expect("write the chaos counts");

    // Every contract, room by room and client by client.
    assert!(gateway.is_running(), "the gateway died");
    let problems: Vec<String> = reports
        .iter()
        .flat_map(|r| r.problems.iter().map(move |p| format!("client {} (room {}): {p}", r.client, r.room)))
        .collect();
    assert!(
        problems.is_empty(),
        "{} problems, first ones:\n{}",
        problems.len(),
        problems[..problems.len().min(20)].join("\n")
    );
    assert!(final_failures.is_empty(), "not every room works at the end:\n{}", final_failures.join("\n"));
    assert_eq!(pushes, ok + error_total, "every push got exactly one reply");
    let odd: Vec<_> = errors.keys().filter(|r| !ACCEPTABLE_ERRORS.contains(&r.as_str())).collect();
    assert!(odd.is_empty(), "error replies that killing workers does not explain: {odd:?}");
    assert!(killed.len() >= 100, "the killer managed only {} kills", killed.len());
    assert!(respawns >= killed.len() / 2, "{respawns} respawns for {} kills", killed.len());
    assert!(resets > 0, "no client heard of a room reset");
    assert!(ok * 2 >= pushes, "fewer than half the pushes succeeded: {ok} of {pushes}");

    // An acknowledged message reached every client of its room, its sender included.
    let mut missing = Vec::new();
    for report in &reports {
        for text in &report.acked {
            for other in reports.iter().filter(|o| o.room == report.room) {
                if !other.received.contains(text) {
                    missing
                        .push(format!("{text} (room {}) never reached client {}", report.room, other.client));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{} acknowledged deliveries missing, first ones:\n{}",
        missing.len(),
        missing[..missing.len().min(20)].join("\n")
    );

    // Nothing is left over: one live worker per room, no zombies.
    let live: BTreeSet<u32> =
        gateway.rooms().iter().filter_map(|r| r["pid"].as_u64()).map(|p| p as u32).collect();
    assert_eq!(live.len(), ROOMS, "every room has a live worker");
    let workers: BTreeSet<u32> = common::wait_for(|| {
        let workers: BTreeSet<u32> = common::workers_of(gateway.pid()).iter().map(|p| p.pid).collect();
        (workers == live).then_some(workers)
    })
    .unwrap_or_else(|| {
        panic!("worker processes {:?} are not the live rooms {live:?}", common::workers_of(gateway.pid()))
    });
    assert_eq!(workers, live);
    assert!(common::zombies_of(gateway.pid()).is_empty(), "zombies: {:?}", common::zombies_of(gateway.pid()));
}
