//! The named load shapes. Each connects its clients, measures, and returns its figures; the
//! same code drives every server, only the protocol differs.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use tokio::time::Instant;

use crate::client::{Client, Error};
use crate::health;
use crate::presence::{unbatched_frames, Wave};
use crate::procmem::Snapshot;
use crate::protocol::Protocol;
use crate::stats::{Better, Latencies, Metrics};
use crate::traffic::{Counts, Mode, Traffic};
use crate::Target;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// 1,000 new rooms joined one after another, then 1,000 more 20 at a time.
    ColdStart,
    /// One room, 1,000 subscribers, one sender.
    Fanout,
    /// 1,000 rooms, 2 clients each, all sending.
    ManyRooms,
    /// 10,000 idle sockets in 100 rooms: gateway memory per socket.
    Idle,
    /// 2,000 live idle rooms: memory per room.
    RoomsMemory,
    /// 1,000 clients join one fresh room, 64 joins in flight: what Presence sends them
    /// (`presence_state`, batched `presence_diff`). roomvisor only: the others have no Presence.
    /// (The wave's time includes starting the room, which its first join does.)
    PresenceWave,
    /// 10,000 rooms created 20 at a time, each with one stored message, then 1,000 of them
    /// kept busy (2 clients each, all sending) while the others hibernate: what the store and
    /// the gateway keep per room that is known but not live. For a gateway with `--data-dir`
    /// and a short `--room-idle-ms`; pass `--data-dir` here too for the disk figures.
    StoredRooms,
}

/// The size of a run; each scenario reads the fields it needs. `scaled` shrinks a preset for
/// a smoke run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Shape {
    pub clients: usize,
    pub rooms: usize,
    pub concurrency: usize,
    pub seconds: f64,
    pub window: usize,
}

impl Scenario {
    pub fn preset(self) -> Shape {
        let shape = |clients, rooms| Shape { clients, rooms, concurrency: 20, seconds: 10.0, window: 8 };
        match self {
            Scenario::ColdStart => shape(0, 1_000),
            Scenario::Fanout => shape(1_000, 1),
            Scenario::ManyRooms => Shape { window: 1, ..shape(2_000, 1_000) },
            Scenario::Idle => shape(10_000, 100),
            Scenario::RoomsMemory => shape(0, 2_000),
            // As many joins in flight as `join_all` keeps: all 1,000 at once would overflow
            // the room's call queue (256 waiting by default) and be refused as `room busy`.
            Scenario::PresenceWave => Shape { concurrency: CONNECT_CONCURRENCY, ..shape(1_000, 1) },
            // `clients` are phase (b)'s: two to each busy room.
            Scenario::StoredRooms => Shape { window: 1, ..shape(2_000, 10_000) },
        }
    }

    pub async fn run(self, target: &Target, shape: &Shape) -> Result<Metrics, Error> {
        let run_id = format!("{}-{}", std::process::id(), target.clock_tag());
        match self {
            Scenario::ColdStart => cold_start(target, shape, &run_id).await,
            Scenario::Fanout => traffic(target, shape, &format!("load-{run_id}")).await,
            Scenario::ManyRooms => traffic(target, shape, &format!("load-{run_id}")).await,
            Scenario::Idle => idle(target, shape, &run_id).await,
            Scenario::RoomsMemory => rooms_memory(target, shape, &run_id).await,
            Scenario::PresenceWave => presence_wave(target, shape, &run_id).await,
            Scenario::StoredRooms => stored_rooms(target, shape, &run_id).await,
        }
    }
}

/// Connections are opened this many at a time: a burst of thousands of handshakes measures
/// the kernel's accept queue, not the server.
const CONNECT_CONCURRENCY: usize = 64;

async fn connect_all(target: &Target, count: usize) -> Result<Vec<Client>, Error> {
    let mut clients: Vec<Client> = stream::iter(0..count as u64)
        .map(|id| target.connect(id))
        .buffer_unordered(CONNECT_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    clients.sort_by_key(|c| c.id);
    Ok(clients)
}

/// Joins each client to its room; returns the clients with their join refs.
async fn join_all(
    clients: Vec<Client>,
    room_of: impl Fn(u64) -> String,
) -> Result<Vec<(Client, String, u64)>, Error> {
    stream::iter(clients)
        .map(|mut client| {
            let room = room_of(client.id);
            async move {
                let join_ref = client.join(&room).await?;
                Ok::<_, Error>((client, room, join_ref))
            }
        })
        .buffer_unordered(CONNECT_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

async fn cold_start(target: &Target, shape: &Shape, run_id: &str) -> Result<Metrics, Error> {
    let before = target.memory();
    let mut metrics = Metrics::default();

    let mut one = target.connect(0).await?;
    let serial = join_and_leave(&mut one, (0..shape.rooms).map(|i| format!("cold-{run_id}-s{i}"))).await?;
    metrics.latencies("first join, one after another", &serial);

    let started = Instant::now();
    let workers = (0..shape.concurrency).map(|k| {
        let rooms: Vec<String> =
            (k..shape.rooms).step_by(shape.concurrency).map(|i| format!("cold-{run_id}-c{i}")).collect();
        let target = target.clone();
        tokio::spawn(async move {
            let mut client = target.connect(1 + k as u64).await?;
            join_and_leave(&mut client, rooms.into_iter()).await
        })
    });
    let mut concurrent = Latencies::default();
    for worker in workers.collect::<Vec<_>>() {
        concurrent.merge(&worker.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    metrics.latencies("first join, concurrently", &concurrent);
    metrics.push("new rooms/s, concurrently", concurrent.len() as f64 / elapsed, "/s", Better::Higher);
    target.memory_metrics(&mut metrics, &before, shape.rooms * 2, "room");
    Ok(metrics)
}

/// Joins each room (starting it) and leaves again, so one socket can open any number of
/// rooms; returns the join latencies.
async fn join_and_leave(
    client: &mut Client,
    rooms: impl Iterator<Item = String>,
) -> Result<Latencies, Error> {
    let mut latencies = Latencies::default();
    for room in rooms {
        let started = Instant::now();
        let join_ref = client.join(&room).await?;
        latencies.record(started.elapsed());
        client.leave(&room, join_ref).await?;
    }
    Ok(latencies)
}

/// `fanout` and `many-rooms`: as fast as the server delivers, then at half that rate. Client
/// `i` joins room `<prefix>-<i mod rooms>`.
async fn traffic(target: &Target, shape: &Shape, prefix: &str) -> Result<Metrics, Error> {
    let rooms = shape.rooms.max(1);
    let per_room = (shape.clients / rooms).max(1);
    let fanout = rooms == 1;
    let senders = if fanout { 1 } else { shape.clients };
    // A fan-out sender may run at most a few messages ahead of its receivers (see traffic.rs).
    let backlog = fanout.then_some((per_room as u64, shape.window as u64));
    let traffic = Arc::new(Traffic::new(2, backlog));

    let clients = connect_all(target, shape.clients).await?;
    let joined = join_all(clients, |id| format!("{prefix}-{}", id as usize % rooms)).await?;
    let before = target.memory();
    let tasks: Vec<_> = joined
        .into_iter()
        .map(|(client, room, join_ref)| {
            let sends = !fanout || client.id == 0;
            tokio::spawn(client.drive(room, join_ref, sends, traffic.clone()))
        })
        .collect();

    let window = Duration::from_secs_f64(shape.seconds);
    // Warm up at full speed, then measure it.
    traffic.set_mode(Mode::Max { window: shape.window });
    tokio::time::sleep(window.min(Duration::from_secs(2))).await;
    traffic.measure(0);
    let max = measure(&traffic, window).await;
    // Memory under full load, while queues are at their fullest.
    let mut memory = Metrics::default();
    target.memory_metrics(&mut memory, &before, 0, "room");
    traffic.set_mode(Mode::Quiet);
    traffic.drain(per_room as u64, Duration::from_secs(5)).await;

    // Half the rate just measured, spread over every sender.
    let half_rate = (max.pushes as f64 / window.as_secs_f64() / 2.0).max(1.0);
    let interval = Duration::from_secs_f64(senders as f64 / half_rate);
    traffic.measure(1);
    traffic.set_mode(Mode::Paced { interval });
    let paced = measure(&traffic, window).await;
    traffic.set_mode(Mode::Quiet);
    traffic.drain(per_room as u64, Duration::from_secs(5)).await;
    traffic.stop();
    for task in tasks {
        let _ = task.await;
    }

    let secs = window.as_secs_f64();
    let mut metrics = Metrics::default();
    metrics.push("pushes/s, as fast as delivered", max.pushes as f64 / secs, "/s", Better::Higher);
    metrics.push("deliveries/s, as fast as delivered", max.deliveries as f64 / secs, "/s", Better::Higher);
    metrics.latencies("send→receive at full speed", &traffic.latencies(0));
    metrics.push("pushes/s, paced at half", paced.pushes as f64 / secs, "/s", Better::Higher);
    metrics.push("deliveries/s, paced at half", paced.deliveries as f64 / secs, "/s", Better::Higher);
    metrics.latencies("send→receive at half speed", &traffic.latencies(1));
    let errors: u64 = traffic.errors().values().sum();
    metrics.push("errors", errors as f64, "", Better::Lower);
    metrics.0.extend(memory.0);
    report_errors(&traffic);
    Ok(metrics)
}

/// Counters over one measured window.
async fn measure(traffic: &Traffic, window: Duration) -> Counts {
    let start = traffic.counts();
    tokio::time::sleep(window).await;
    let end = traffic.counts();
    Counts {
        pushes: end.pushes - start.pushes,
        deliveries: end.deliveries - start.deliveries,
        ok_replies: end.ok_replies - start.ok_replies,
        error_replies: end.error_replies - start.error_replies,
    }
}

fn report_errors(traffic: &Traffic) {
    for (what, count) in traffic.errors() {
        eprintln!("  error ×{count}: {what}");
    }
}

async fn idle(target: &Target, shape: &Shape, run_id: &str) -> Result<Metrics, Error> {
    let before = target.memory();
    let started = Instant::now();
    let clients = connect_all(target, shape.clients).await?;
    let rooms = shape.rooms.max(1);
    let joined = join_all(clients, |id| format!("idle-{run_id}-{}", id as usize % rooms)).await?;
    let setup = started.elapsed().as_secs_f64();
    let traffic = Arc::new(Traffic::new(0, None));
    let tasks: Vec<_> = joined
        .into_iter()
        .map(|(client, room, join_ref)| tokio::spawn(client.drive(room, join_ref, false, traffic.clone())))
        .collect();
    // Let the server settle (buffers shrink, workers finish starting) before reading memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut metrics = Metrics::default();
    metrics.push("sockets connected and joined/s", shape.clients as f64 / setup, "/s", Better::Higher);
    target.memory_metrics(&mut metrics, &before, shape.clients, "socket");
    traffic.stop();
    for task in tasks {
        let _ = task.await;
    }
    let errors: u64 = traffic.errors().values().sum();
    metrics.push("errors", errors as f64, "", Better::Lower);
    report_errors(&traffic);
    Ok(metrics)
}

async fn rooms_memory(target: &Target, shape: &Shape, run_id: &str) -> Result<Metrics, Error> {
    let before = target.memory();
    let workers = (0..shape.concurrency).map(|k| {
        let rooms: Vec<String> =
            (k..shape.rooms).step_by(shape.concurrency).map(|i| format!("mem-{run_id}-{i}")).collect();
        let target = target.clone();
        tokio::spawn(async move {
            let mut client = target.connect(k as u64).await?;
            join_and_leave(&mut client, rooms.into_iter()).await
        })
    });
    for worker in workers.collect::<Vec<_>>() {
        worker.await??;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut metrics = Metrics::default();
    target.memory_metrics(&mut metrics, &before, shape.rooms, "room");
    Ok(metrics)
}

/// The room counts as quiet once no presence frame (or join reply) has arrived anywhere for
/// this long; the quiet itself is not part of any time reported.
const QUIET: Duration = Duration::from_secs(1);
/// A wave that makes no progress at all for this long (every join has its own 30 s) is over.
const STALLED: Duration = Duration::from_secs(40);

/// `presence-wave`: every client joins one new room as `u<i>`, `shape.concurrency` joins in
/// flight, and counts the presence frames it receives from the first join sent until the room
/// is quiet; then each checks that its view (phoenix.js's `syncState`/`syncDiff`) lists
/// every member. `--concurrency` sets the joins in flight; `--concurrency 1000` sends all
/// 1,000 at once, which overflows the room's call queue (see the preset).
///
///     loadgen run --url http://127.0.0.1:4700 --scenario presence-wave [--clients 1000]
async fn presence_wave(target: &Target, shape: &Shape, run_id: &str) -> Result<Metrics, Error> {
    if target.protocol != Protocol::Phoenix {
        return Err("presence-wave needs Phoenix Presence, which only roomvisor has".into());
    }
    let members = shape.clients.max(1);
    let room = format!("wave-{run_id}");
    let clients = connect_all(target, members).await?;
    let wave = Arc::new(Wave::default());
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|client| {
            let params = serde_json::json!({ "name": format!("u{}", client.id) });
            tokio::spawn(client.presence_wave(room.clone(), params, wave.clone()))
        })
        .collect();
    wave.open(shape.concurrency);
    while wave.answered_count() < members && wave.quiet_for() < STALLED {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if wave.answered_count() < members {
        eprintln!("  the wave stalled: {} of {members} joins answered", wave.answered_count());
    }
    let waited = Instant::now();
    while wave.quiet_for() < QUIET && waited.elapsed() < STALLED {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wave.stop();
    let wave_time = wave.wave_time();
    let presence_time = wave.presence_time();

    // In the views' (BTreeMap) order.
    let mut expected: Vec<String> = (0..members).map(|i| format!("u{i}")).collect();
    expected.sort_unstable();
    let mut joins = Latencies::default();
    let (mut joined, mut refused, mut wrong_views, mut full_views) = (0usize, 0usize, 0usize, 0usize);
    let (mut states, mut diffs, mut state_bytes, mut diff_bytes) = (0u64, 0u64, 0u64, 0u64);
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        let seen = task.await?;
        states += seen.state_frames;
        diffs += seen.diff_frames;
        state_bytes += seen.state_bytes;
        diff_bytes += seen.diff_bytes;
        outcomes.push(seen);
    }
    if states + diffs == 0 {
        return Err("no presence frames arrived: the server does not speak Phoenix Presence".into());
    }
    for (id, seen) in outcomes.into_iter().enumerate() {
        match seen.join {
            Some(Ok(latency)) => {
                joined += 1;
                joins.record(latency);
            }
            failed => {
                refused += 1;
                if refused <= 5 {
                    let why = failed.and_then(Result::err).unwrap_or_else(|| "never sent".to_owned());
                    eprintln!("  client {id}: join failed: {why}");
                }
                continue;
            }
        }
        let problem = match &seen.view {
            Ok(view) if view.pending() > 0 => {
                Some(format!("{} diffs never applied: no presence_state", view.pending()))
            }
            Ok(view) if view.state.keys().eq(expected.iter()) => None,
            Ok(view) => {
                let missing = expected.iter().filter(|k| !view.state.contains_key(*k)).count();
                let extra = view.state.keys().filter(|k| expected.binary_search(k).is_err()).count();
                Some(format!(
                    "its view lists {} keys, not {members} ({missing} missing, {extra} unexpected)",
                    view.state.len()
                ))
            }
            Err(why) => Some(why.clone()),
        };
        match problem {
            None => full_views += 1,
            Some(problem) => {
                wrong_views += 1;
                if wrong_views <= 5 {
                    eprintln!("  FAILED: client {id}: {problem}");
                }
            }
        }
    }
    if wrong_views > 5 {
        eprintln!("  FAILED: … {wrong_views} views in all that do not list exactly the {members} members");
    }
    if refused > 5 {
        eprintln!("  … {refused} joins failed in all");
    }

    let frames = (states + diffs) as f64;
    let estimate = unbatched_frames(members);
    let wave_secs = wave_time.as_secs_f64();
    let mut metrics = Metrics::default();
    metrics.push("members", joined as f64, "", Better::Higher);
    metrics.push("wave: first join sent → last join reply", wave_secs * 1000.0, "ms", Better::Lower);
    if wave_secs > 0.0 {
        metrics.push("joins/s in the wave", joined as f64 / wave_secs, "/s", Better::Higher);
    }
    metrics.latencies("join sent → reply", &joins);
    metrics.push(
        "first join sent → last presence frame",
        presence_time.as_secs_f64() * 1000.0,
        "ms",
        Better::Lower,
    );
    metrics.push("presence frames, total (state + diffs)", frames, "", Better::Lower);
    metrics.push("presence bytes, total", (state_bytes + diff_bytes) as f64, "B", Better::Lower);
    metrics.push("presence_state bytes", state_bytes as f64, "B", Better::Lower);
    metrics.push("presence_diff bytes", diff_bytes as f64, "B", Better::Lower);
    metrics.push("presence_diff frames per member", diffs as f64 / members as f64, "", Better::Lower);
    metrics.push("unbatched estimate N(N-1)/2 + N", estimate, "frames", Better::Lower);
    metrics.push("unbatched estimate ÷ frames sent", estimate / frames, "×", Better::Higher);
    metrics.push("views listing exactly the N members", full_views as f64, "", Better::Higher);
    metrics.push("errors", (refused + wrong_views) as f64, "", Better::Lower);
    Ok(metrics)
}

/// `stored-rooms`, against a gateway with `--data-dir` and a short `--room-idle-ms`:
/// (a) creates `shape.rooms` rooms, `shape.concurrency` at a time: a client joins each,
/// sends one message, waits for its reply (the message is stored by then) and leaves, so the
/// room hibernates once it has been idle; (b) keeps `shape.clients / 2` of them (at most half
/// of them, so that some always sleep) busy, two clients each, all sending as in many-rooms (waking them from the store), while the rest
/// stay hibernated. Reports what the store knows, what is live, the disk the data directory
/// takes (with `--data-dir`) and the gateway's RSS before, in between and after.
///
///     loadgen run --url http://127.0.0.1:4700 --pid 1234 --scenario stored-rooms \
///         --data-dir target/data [--rooms 10000 --clients 2000]
async fn stored_rooms(target: &Target, shape: &Shape, run_id: &str) -> Result<Metrics, Error> {
    if target.protocol != Protocol::Phoenix {
        return Err("stored-rooms needs roomvisor's gateway, with --data-dir".into());
    }
    let prefix = format!("stored-{run_id}");
    let before = target.memory();
    let mut metrics = Metrics::default();

    // (a) Every room created with one message.
    let started = Instant::now();
    let workers = (0..shape.concurrency).map(|k| {
        let rooms: Vec<String> =
            (k..shape.rooms).step_by(shape.concurrency).map(|i| format!("{prefix}-{i}")).collect();
        let target = target.clone();
        tokio::spawn(async move {
            let mut client = target.connect(k as u64).await?;
            create_rooms(&mut client, rooms.into_iter()).await
        })
    });
    let mut created = Latencies::default();
    for worker in workers.collect::<Vec<_>>() {
        created.merge(&worker.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    metrics.push(
        "rooms created/s (join, one message, leave)",
        created.len() as f64 / elapsed,
        "/s",
        Better::Higher,
    );
    metrics.latencies("room created: join sent → message's reply", &created);
    let after_creating = target.memory();
    if let Some(health) = target.health().await {
        metrics.push("rooms live once all are created", health.live as f64, "", Better::Lower);
        // One message in each: the cost of a room that is known but asleep.
        target.disk_metrics(&mut metrics, "once all are created", health.stored);
    }

    // (b) A few of them busy, the rest hibernating.
    let busy_rooms = (shape.clients / 2).min(shape.rooms / 2).max(1);
    let busy = Shape { clients: busy_rooms * 2, rooms: busy_rooms, ..shape.clone() };
    let traffic = traffic(target, &busy, &prefix).await?;
    metrics.0.extend(traffic.0);

    // What is left: the store's rooms, the live ones, their disk and the gateway's memory.
    let health = target.health().await.ok_or("no /healthz answer from the gateway")?;
    let known =
        health.stored.ok_or("/healthz counts no stored rooms: is the gateway running with --data-dir?")?;
    metrics.push("rooms known to the store", known as f64, "", Better::Higher);
    metrics.push("rooms live", health.live as f64, "", Better::Lower);
    target.disk_metrics(&mut metrics, "after", Some(known));
    let points = [("before", before), ("once all are created", after_creating), ("after", target.memory())];
    for (when, snapshot) in points {
        if let Some(snapshot) = snapshot {
            metrics.push(
                format!("gateway RSS {when}"),
                snapshot.server.rss_kib as f64 / 1024.0,
                "MiB",
                Better::Lower,
            );
        }
    }
    Ok(metrics)
}

/// Joins each room (starting it), sends it one message and waits for the reply, and leaves
/// again; returns the time from each join sent to its message's reply.
async fn create_rooms(client: &mut Client, rooms: impl Iterator<Item = String>) -> Result<Latencies, Error> {
    let mut latencies = Latencies::default();
    let sender = format!("client-{}", client.id);
    for room in rooms {
        let started = Instant::now();
        let join_ref = client.join(&room).await?;
        client.say(&room, join_ref, &sender, &format!("the first message in {room}")).await?;
        latencies.record(started.elapsed());
        client.leave(&room, join_ref).await?;
    }
    Ok(latencies)
}

impl Target {
    fn memory(&self) -> Option<Snapshot> {
        self.pid.map(Snapshot::take)
    }

    /// The data directory's size (with `--data-dir`), its WAL's, and the bytes per known room.
    fn disk_metrics(&self, metrics: &mut Metrics, when: &str, known: Option<u64>) {
        let Some(dir) = &self.data_dir else { return };
        let disk = health::disk_use(dir);
        let mib = |bytes: u64| bytes as f64 / 1024.0 / 1024.0;
        metrics.push(format!("data directory {when}"), mib(disk.total), "MiB", Better::Lower);
        metrics.push(format!("data directory {when}: the WAL"), mib(disk.wal), "MiB", Better::Lower);
        if let Some(known) = known.filter(|&n| n > 0) {
            metrics.push(
                format!("disk per known room {when}"),
                disk.total as f64 / known as f64,
                "B",
                Better::Lower,
            );
        }
    }

    /// The gateway's `/healthz`, from its first URL; a failure is told and skipped.
    async fn health(&self) -> Option<health::Health> {
        match health::read(self.url_for(0)).await {
            Ok(health) => Some(health),
            Err(e) => {
                eprintln!("  cannot read /healthz: {e}");
                None
            }
        }
    }

    /// The server's growth since `before`, its workers, and the cost per `unit` (socket or
    /// room) when `units` is not zero.
    fn memory_metrics(&self, metrics: &mut Metrics, before: &Option<Snapshot>, units: usize, unit: &str) {
        let (Some(before), Some(now)) = (before, self.memory()) else { return };
        let mib = |kib: u64| kib as f64 / 1024.0;
        let grown = now.server.rss_kib.saturating_sub(before.server.rss_kib);
        metrics.push("server RSS", mib(now.server.rss_kib), "MiB", Better::Lower);
        let workers = now.children_total();
        if !now.children.is_empty() {
            let mut rss: Vec<u64> = now.children.iter().map(|m| m.rss_kib).collect();
            rss.sort_unstable();
            metrics.push("worker processes", now.children.len() as f64, "", Better::Lower);
            metrics.push("workers RSS, sum", mib(workers.rss_kib), "MiB", Better::Lower);
            metrics.push("workers PSS, sum", mib(workers.pss_kib), "MiB", Better::Lower);
            metrics.push("worker RSS, median", mib(rss[rss.len() / 2]), "MiB", Better::Lower);
            metrics.push("worker RSS, max", mib(rss[rss.len() - 1]), "MiB", Better::Lower);
        }
        if units > 0 {
            metrics.push(
                format!("server growth per {unit}"),
                grown as f64 / units as f64,
                "KiB",
                Better::Lower,
            );
            let added_workers = workers.pss_kib.saturating_sub(before.children_total().pss_kib);
            let total = grown + added_workers;
            if unit == "room" && !now.children.is_empty() {
                metrics.push(
                    format!("total per {unit} (server growth + worker PSS)"),
                    total as f64 / units as f64,
                    "KiB",
                    Better::Lower,
                );
            }
        }
    }
}
