//! The room supervisor and registry: the DynamicSupervisor + Registry of the original design.
//!
//! Rooms start lazily on first use, exactly once however many first uses race. When a worker
//! ends, its monitor removes it from the registry, counts crashes (a crash-looping room is
//! refused for a cool-down), and tells the room's subscribers with `room_reset`. The next use
//! starts a fresh runtime.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::cluster::calls::{self, RemoteError};
use crate::cluster::leases::{Claim, Holder};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::phoenix;
use crate::pubsub::PubSub;
use crate::room::{self, ExitReport, RoomError, RoomHandle, RoomId, RoomSpec};

type StartOutcome = Option<Result<RoomHandle, RoomError>>;

enum Slot {
    /// A worker is being started; later users wait for the same outcome.
    Starting {
        runtime: u64,
        outcome: watch::Receiver<StartOutcome>,
    },
    Live(RoomHandle),
}

#[derive(Default)]
struct CrashRecord {
    recent: VecDeque<Instant>,
    cooling_until: Option<Instant>,
}

#[derive(Default)]
struct State {
    rooms: HashMap<RoomId, Slot>,
    /// Every worker not yet reaped, by runtime id, so shutdown can reach starting ones too.
    workers: HashMap<u64, RoomHandle>,
    crashes: HashMap<RoomId, CrashRecord>,
    /// In a cluster: rooms this node's subscribers use on other nodes, by the holder last seen.
    remote_rooms: HashMap<RoomId, Holder>,
    shutting_down: bool,
}

/// One row of `GET /api/rooms`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RoomInfo {
    pub id: String,
    /// The node that runs the room.
    pub node: String,
    /// The worker's pid, started_at (ms since the Unix epoch) and calls are known only on the
    /// node that runs the room; null for rooms of other nodes.
    pub pid: Option<u32>,
    pub started_at: Option<u64>,
    /// Sockets of this node joined to the room.
    pub subscribers: usize,
    pub calls: Option<u64>,
}

#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

struct Inner {
    config: Arc<Config>,
    pubsub: Arc<PubSub>,
    cluster: Option<Cluster>,
    /// This node's name in `/api/rooms`: the cluster's node id, or "local".
    node: String,
    state: Mutex<State>,
    next_runtime: AtomicU64,
    monitors: TaskTracker,
}

impl Supervisor {
    pub fn new(config: Arc<Config>, pubsub: Arc<PubSub>) -> Supervisor {
        Supervisor::with_cluster(config, pubsub, None)
    }

    /// A supervisor that is one node of a cluster; call [`Supervisor::join_cluster`] next.
    pub fn with_cluster(config: Arc<Config>, pubsub: Arc<PubSub>, cluster: Option<Cluster>) -> Supervisor {
        let node = cluster.as_ref().map(|c| c.node().to_owned()).unwrap_or_else(|| "local".to_owned());
        Supervisor {
            inner: Arc::new(Inner {
                config,
                pubsub,
                cluster,
                node,
                state: Mutex::new(State::default()),
                next_runtime: AtomicU64::new(1),
                monitors: TaskTracker::new(),
            }),
        }
    }

    pub fn pubsub(&self) -> &Arc<PubSub> {
        &self.inner.pubsub
    }

    /// The room's live worker, started now if it has none.
    pub async fn room(&self, id: &RoomId) -> Result<RoomHandle, RoomError> {
        let mut outcome = {
            let mut state = self.lock();
            match state.rooms.get(id) {
                Some(Slot::Live(handle)) if !handle.is_closed() => return Ok(handle.clone()),
                Some(Slot::Starting { outcome, .. }) => outcome.clone(),
                _ => self.begin_start(&mut state, id)?,
            }
        };
        let settled = outcome.wait_for(Option::is_some).await;
        match settled {
            Ok(outcome) => outcome.clone().unwrap_or(Err(RoomError::WorkerExited)),
            Err(_) => Err(RoomError::WorkerExited),
        }
    }

    /// Calls a function of the room's script, starting the room if needed (in a cluster:
    /// wherever it runs, starting it here if it runs nowhere).
    pub async fn call(&self, id: &RoomId, function: &str, args_json: String) -> Result<String, RoomError> {
        match &self.inner.cluster {
            None => self.room(id).await?.call(function, args_json).await,
            // Boxed: inline, the cluster path's NATS futures made every channel task's
            // future, and so every idle socket, ~5 KiB larger (loadgen idle: 14.4 → 19.3 KiB).
            Some(cluster) => Box::pin(self.call_in_cluster(cluster, id, function, args_json)).await,
        }
    }

    /// Calls the room if this node runs it (or is starting it); `None` if it does not.
    pub async fn call_here(
        &self,
        id: &RoomId,
        function: &str,
        args_json: String,
    ) -> Option<Result<String, RoomError>> {
        let mut outcome = {
            let state = self.lock();
            match state.rooms.get(id)? {
                Slot::Live(handle) if !handle.is_closed() => Ok(handle.clone()),
                Slot::Live(_) => return None,
                Slot::Starting { outcome, .. } => Err(outcome.clone()),
            }
        };
        let handle = match &mut outcome {
            Ok(handle) => handle.clone(),
            Err(starting) => match starting.wait_for(Option::is_some).await {
                Ok(settled) => match settled.clone() {
                    Some(Ok(handle)) => handle,
                    Some(Err(RoomError::OwnedElsewhere)) => return None,
                    Some(Err(error)) => return Some(Err(error)),
                    None => return Some(Err(RoomError::WorkerExited)),
                },
                Err(_) => return Some(Err(RoomError::WorkerExited)),
            },
        };
        Some(handle.call(function, args_json).await)
    }

    async fn call_in_cluster(
        &self,
        cluster: &Cluster,
        id: &RoomId,
        function: &str,
        args_json: String,
    ) -> Result<String, RoomError> {
        // A lease can move between looking it up and using it; a few looks settle it.
        const ATTEMPTS: usize = 3;
        for _ in 0..ATTEMPTS {
            if let Some(result) = self.call_here(id, function, args_json.clone()).await {
                return result;
            }
            let holder =
                cluster.leases().holder(id).await.map_err(|e| RoomError::Unavailable(e.to_string()))?;
            match holder {
                Some(holder) if holder.node() != cluster.node() => {
                    self.lock().remote_rooms.insert(id.clone(), holder.clone());
                    let timeout = self.inner.config.call_timeout();
                    match calls::call(
                        cluster.client(),
                        holder.node(),
                        id,
                        function,
                        args_json.clone(),
                        timeout,
                    )
                    .await
                    {
                        Ok(result) => return Ok(result),
                        Err(RemoteError::Room(error)) => return Err(error),
                        Err(RemoteError::NotHere) => continue,
                        Err(RemoteError::NodeGone) => {
                            return Err(RoomError::Unavailable(format!(
                                "its node {} is gone; the room starts again once its lease runs out",
                                holder.node()
                            )))
                        }
                    }
                }
                // Nobody's, or a lease of ours on a runtime that is gone: start it here.
                _ => match self.room(id).await {
                    Ok(handle) => {
                        self.reset_if_moved_here(id);
                        return handle.call(function, args_json).await;
                    }
                    Err(RoomError::OwnedElsewhere) => continue,
                    Err(error) => return Err(error),
                },
            }
        }
        Err(RoomError::Unavailable("the room's lease keeps changing hands; try again".to_owned()))
    }

    /// This node's subscribers used the room on another node; that runtime is gone, so they
    /// are told, as after a crash.
    fn reset_if_moved_here(&self, id: &RoomId) {
        let previous = self.lock().remote_rooms.remove(id);
        if let Some(previous) = previous {
            self.push_room_reset(id, &format!("its runtime on node {} ended", previous.node()));
        }
    }

    fn push_room_reset(&self, id: &RoomId, detail: &str) {
        let topic = id.topic();
        let payload = serde_json::json!({"reason": RoomError::WorkerExited.reason(), "detail": detail});
        let frame = phoenix::push(None, &topic, "room_reset", &payload);
        // Each node tells its own subscribers: a reset is never relayed through the cluster.
        let told = self.inner.pubsub.broadcast_local(&topic, &frame);
        tracing::info!(room = %id, "room reset ({detail}); told {told} subscribers");
    }

    /// Starts the cluster's background work: answering calls from other nodes; opening the
    /// lease bucket once NATS is reachable and renewing this node's leases; and, apart from
    /// that so it can never delay a renewal, watching the leases of rooms this node's
    /// subscribers use elsewhere.
    pub fn join_cluster(&self) {
        let Some(cluster) = self.inner.cluster.clone() else { return };
        tokio::spawn(calls::serve(cluster.client().clone(), cluster.node().to_owned(), self.clone()));
        let every = cluster.leases().lease() / 3;
        self.every(every, {
            let cluster = cluster.clone();
            move |supervisor| {
                let cluster = cluster.clone();
                async move { supervisor.renew_leases(&cluster).await }
            }
        });
        self.every(every, move |supervisor| {
            let cluster = cluster.clone();
            async move { supervisor.watch_remote_rooms(&cluster).await }
        });
    }

    /// Runs `work` every `period` until shutdown, never two at once.
    fn every<F, Fut>(&self, period: Duration, work: F)
    where
        F: Fn(Supervisor) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let supervisor = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if supervisor.lock().shutting_down {
                    return;
                }
                work(supervisor.clone()).await;
            }
        });
    }

    async fn renew_leases(&self, cluster: &Cluster) {
        let leases = cluster.leases();
        if !leases.is_ready() {
            if cluster.is_connected() {
                match leases.open(cluster.client()).await {
                    Ok(()) => tracing::info!(node = cluster.node(), "cluster ready"),
                    Err(e) => tracing::warn!("cannot open the cluster's lease bucket: {e}"),
                }
            }
            return;
        }
        match leases.renew().await {
            Ok(lost) => {
                for (room, holder) in lost {
                    tracing::warn!(room = %room, "another node took the room's lease; stopping it here");
                    let handle = self.lock().workers.values().find(|h| h.room == room).cloned();
                    if let Some(handle) = handle.filter(|h| Holder::new(cluster.node(), h.runtime) == holder)
                    {
                        handle.kill();
                    }
                }
            }
            // Most likely a restarted NATS server without the bucket: open it again.
            Err(e) => {
                tracing::warn!("renewing room leases failed ({e}); reopening the lease bucket");
                leases.close();
            }
        }
    }

    /// Tells this node's subscribers of each room they use elsewhere whose lease has ended
    /// or moved on (its runtime is gone), once.
    async fn watch_remote_rooms(&self, cluster: &Cluster) {
        use futures_util::StreamExt;
        const LOOKUPS_AT_ONCE: usize = 64;
        let watched: Vec<(RoomId, Holder)> = {
            let mut state = self.lock();
            let pubsub = &self.inner.pubsub;
            state.remote_rooms.retain(|room, _| pubsub.socket_count(&room.topic()) > 0);
            state.remote_rooms.iter().map(|(room, holder)| (room.clone(), holder.clone())).collect()
        };
        let ended: Vec<(RoomId, Holder)> = futures_util::stream::iter(watched)
            .map(|(room, seen)| async move {
                match cluster.leases().holder(&room).await {
                    Ok(now) if now.as_ref() != Some(&seen) => Some((room, seen)),
                    _ => None,
                }
            })
            .buffer_unordered(LOOKUPS_AT_ONCE)
            .filter_map(std::future::ready)
            .collect()
            .await;
        for (room, seen) in ended {
            let removed = {
                let mut state = self.lock();
                state.remote_rooms.get(&room) == Some(&seen) && state.remote_rooms.remove(&room).is_some()
            };
            if removed {
                self.push_room_reset(&room, &format!("its runtime on node {} ended", seen.node()));
            }
        }
    }

    /// Live rooms, by id.
    pub fn rooms(&self) -> Vec<RoomInfo> {
        let state = self.lock();
        let mut rooms: Vec<RoomInfo> = state
            .rooms
            .iter()
            .filter_map(|(id, slot)| match slot {
                Slot::Live(handle) => Some(RoomInfo {
                    id: id.to_string(),
                    node: self.inner.node.clone(),
                    pid: Some(handle.pid),
                    started_at: Some(handle.started_at_ms),
                    subscribers: self.inner.pubsub.socket_count(&id.topic()),
                    calls: Some(handle.calls()),
                }),
                Slot::Starting { .. } => None,
            })
            .collect();
        rooms.sort_by(|a, b| a.id.cmp(&b.id));
        rooms
    }

    /// This node's rooms and, in a cluster, every room other nodes hold a lease on.
    pub async fn rooms_in_cluster(&self) -> Vec<RoomInfo> {
        let mut rooms = self.rooms();
        let Some(cluster) = &self.inner.cluster else { return rooms };
        let Ok(leases) = cluster.leases().all().await else { return rooms };
        for (id, holder) in leases {
            if holder.node() == cluster.node() || rooms.iter().any(|r| r.id == id) {
                continue;
            }
            let subscribers =
                RoomId::parse(&id).map(|r| self.inner.pubsub.socket_count(&r.topic())).unwrap_or(0);
            rooms.push(RoomInfo {
                id,
                node: holder.node().to_owned(),
                pid: None,
                started_at: None,
                subscribers,
                calls: None,
            });
        }
        rooms.sort_by(|a, b| a.id.cmp(&b.id));
        rooms
    }

    /// The cluster this supervisor is a node of, if any.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.inner.cluster.as_ref()
    }

    /// How many rooms have a live worker.
    pub fn live_room_count(&self) -> usize {
        self.lock().rooms.values().filter(|slot| matches!(slot, Slot::Live(_))).count()
    }

    /// Asks every worker to exit, waits up to `grace`, then kills what is left; returns once
    /// every worker is reaped.
    pub async fn shutdown(&self, grace: Duration) {
        let workers: Vec<RoomHandle> = {
            let mut state = self.lock();
            state.shutting_down = true;
            state.workers.values().cloned().collect()
        };
        for worker in &workers {
            worker.shutdown().await;
        }
        self.inner.monitors.close();
        if tokio::time::timeout(grace, self.inner.monitors.wait()).await.is_err() {
            let left: Vec<RoomHandle> = self.lock().workers.values().cloned().collect();
            tracing::warn!("{} room workers still running after {grace:?}; killing them", left.len());
            for worker in left {
                worker.kill();
            }
            self.inner.monitors.wait().await;
        }
    }

    fn begin_start(
        &self,
        state: &mut State,
        id: &RoomId,
    ) -> Result<watch::Receiver<StartOutcome>, RoomError> {
        if state.shutting_down {
            return Err(RoomError::Unavailable("the gateway is shutting down".to_owned()));
        }
        if let Some(record) = state.crashes.get(id) {
            if record.cooling_until.is_some_and(|until| until > Instant::now()) {
                return Err(RoomError::CrashLooping);
            }
        }
        if state.rooms.len() >= self.inner.config.max_rooms && !self.evict_idle_room(state, id) {
            return Err(RoomError::RoomLimit);
        }
        let runtime = self.inner.next_runtime.fetch_add(1, Ordering::Relaxed);
        let (done, outcome) = watch::channel(None);
        state.rooms.insert(id.clone(), Slot::Starting { runtime, outcome: outcome.clone() });
        // Started in its own task so that a caller that gives up does not abandon the start
        // that others are waiting on.
        let supervisor = self.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let result = supervisor.launch(&id, runtime).await;
            {
                let mut state = supervisor.lock();
                let still_ours =
                    matches!(state.rooms.get(&id), Some(Slot::Starting { runtime: r, .. }) if *r == runtime);
                match &result {
                    Ok(handle) if still_ours => {
                        state.rooms.insert(id.clone(), Slot::Live(handle.clone()));
                    }
                    Ok(_) => {}
                    Err(error) => {
                        if still_ours {
                            state.rooms.remove(&id);
                        }
                        // Counted here, before anyone hears of the failure, so that a client
                        // retrying at once already meets the crash-loop guard; and counted
                        // even when the worker's monitor cleared the slot first.
                        if !matches!(error, RoomError::Unavailable(_) | RoomError::OwnedElsewhere) {
                            supervisor.record_crash(&mut state, &id);
                        }
                    }
                }
            }
            let _ = done.send(Some(result));
        });
        Ok(outcome)
    }

    /// Makes space at the room limit by stopping the least recently used room that no socket
    /// has joined, so a flood of one-off room ids cannot lock everyone else out; rooms that
    /// someone is in are never evicted. The evicted room's state is gone, as after a restart.
    fn evict_idle_room(&self, state: &mut State, for_room: &RoomId) -> bool {
        let pubsub = &self.inner.pubsub;
        let victim = state
            .rooms
            .iter()
            .filter_map(|(id, slot)| match slot {
                Slot::Live(handle) if pubsub.socket_count(&id.topic()) == 0 => Some(handle),
                _ => None,
            })
            .min_by_key(|handle| handle.last_used_ms())
            .cloned();
        let Some(victim) = victim else { return false };
        state.rooms.remove(&victim.room);
        tracing::info!(
            room = %victim.room,
            pid = victim.pid,
            "evicting an idle room at the limit of {} to start {for_room}",
            self.inner.config.max_rooms
        );
        // The worker drains and exits on its own; its monitor reaps it as a requested exit.
        tokio::spawn(async move { victim.shutdown().await });
        true
    }

    async fn launch(&self, id: &RoomId, runtime: u64) -> Result<RoomHandle, RoomError> {
        if let Some(cluster) = &self.inner.cluster {
            match cluster.leases().claim(id, Holder::new(cluster.node(), runtime)).await {
                Ok(Claim::Ours) => {}
                Ok(Claim::Held(_)) => return Err(RoomError::OwnedElsewhere),
                Err(e) => return Err(RoomError::Unavailable(e.to_string())),
            }
        }
        let launched = self.launch_worker(id, runtime).await;
        if launched.is_err() {
            self.release_lease(id, runtime).await;
        }
        launched
    }

    /// Gives up the room's lease in the cluster, if this runtime holds it.
    async fn release_lease(&self, id: &RoomId, runtime: u64) {
        if let Some(cluster) = &self.inner.cluster {
            cluster.leases().release(id, &Holder::new(cluster.node(), runtime)).await;
        }
    }

    async fn launch_worker(&self, id: &RoomId, runtime: u64) -> Result<RoomHandle, RoomError> {
        let config = &self.inner.config;
        let (script_name, script) =
            config.load_room_script().map_err(|e| RoomError::Unavailable(e.to_string()))?;
        let (worker_path, worker_argv0) = config
            .worker_command()
            .map_err(|e| RoomError::Unavailable(format!("cannot find the room-worker executable: {e}")))?;
        let spec = RoomSpec {
            room: id.clone(),
            runtime,
            worker_path,
            worker_argv0,
            script_name,
            script,
            limits: config.runtime_limits(),
            call_timeout: config.call_timeout(),
            hard_timeout: config.hard_timeout(),
        };
        let (handle, ready, actor) = room::spawn(spec, self.inner.pubsub.clone()).map_err(|e| {
            tracing::error!(room = %id, "cannot start a room worker: {e}");
            RoomError::Unavailable(format!("cannot start a room worker: {e}"))
        })?;
        self.lock().workers.insert(runtime, handle.clone());
        let supervisor = self.clone();
        self.inner.monitors.spawn(async move {
            let report = actor.await;
            let (room, runtime) = (report.room.clone(), report.runtime);
            supervisor.room_exited(report);
            // Awaited here, inside the tracked monitor, so a shutdown releases every lease
            // before the gateway exits and other nodes can take the rooms over at once.
            supervisor.release_lease(&room, runtime).await;
        });
        match ready.await {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(RoomError::WorkerExited),
        }
    }

    fn room_exited(&self, report: ExitReport) {
        let crashed = report.reason.is_crash() && report.was_ready;
        {
            let mut state = self.lock();
            state.workers.remove(&report.runtime);
            let ours = match state.rooms.get(&report.room) {
                Some(Slot::Live(handle)) => handle.runtime == report.runtime,
                Some(Slot::Starting { runtime, .. }) => *runtime == report.runtime,
                None => false,
            };
            if ours {
                state.rooms.remove(&report.room);
            }
            if crashed {
                self.record_crash(&mut state, &report.room);
            }
        }
        if crashed {
            self.push_room_reset(&report.room, &report.reason.to_string());
        }
    }

    fn record_crash(&self, state: &mut State, id: &RoomId) {
        let config = &self.inner.config;
        let now = Instant::now();
        let record = state.crashes.entry(id.clone()).or_default();
        record.recent.push_back(now);
        while record.recent.front().is_some_and(|t| now.duration_since(*t) > config.crash_window()) {
            record.recent.pop_front();
        }
        if record.recent.len() > config.crash_limit {
            record.recent.clear();
            record.cooling_until = Some(now + config.crash_cooldown());
            tracing::warn!(
                room = %id,
                "room crashed more than {} times in {:?}; refusing it for {:?}",
                config.crash_limit,
                config.crash_window(),
                config.crash_cooldown()
            );
        }
        // Forget rooms that have been quiet, so the table does not grow with every id ever seen.
        state.crashes.retain(|_, r| {
            r.recent.back().is_some_and(|t| now.duration_since(*t) <= config.crash_window())
                || r.cooling_until.is_some_and(|until| until > now)
        });
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the maps whole, so a panic elsewhere must not wedge the registry.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}
