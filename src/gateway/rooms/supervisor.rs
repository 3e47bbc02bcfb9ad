//! The room supervisor and registry: the DynamicSupervisor + Registry of the original design.
//!
//! Rooms start lazily on first use, exactly once however many first uses race. When a worker
//! ends, its monitor removes it from the registry, counts crashes (a crash-looping room is
//! refused for a cool-down), and tells the room's subscribers with `room_reset`. The next use
//! starts a fresh runtime. In a cluster, a [`Placement`] says where each room runs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::console::{ConsoleLine, Consoles};
use super::crashes::CrashGuard;
use super::error::RoomError;
use super::handle::{ExitReason, ExitReport, RoomHandle};
use super::launcher::{Launched, Launcher, ProcessLauncher};
use super::placement::{Claim, Placement};
use super::shares::{Caller, Shares};
use crate::gateway::config::Config;
use crate::gateway::hooks::{self, RoomReset};
use crate::gateway::ids::{NodeId, RoomId, RuntimeId};
use crate::gateway::metrics;
use crate::gateway::phoenix::{self, ROOM_RESET};
use crate::gateway::pubsub::PubSub;
use crate::gateway::storage::Storage;
use crate::util::LockExt;

type StartOutcome = Option<Result<RoomHandle, RoomError>>;

pub(super) enum Slot {
    /// A worker is being started; later users wait for the same outcome.
    Starting {
        runtime: RuntimeId,
        outcome: watch::Receiver<StartOutcome>,
    },
    Live(RoomHandle),
}

pub(super) struct State {
    pub(super) rooms: HashMap<RoomId, Slot>,
    /// Every worker not yet reaped, by runtime, so shutdown can reach starting ones too.
    workers: HashMap<RuntimeId, RoomHandle>,
    /// Runtimes stopped on purpose (to make room at the limit: "evicted"; idle durable rooms:
    /// "hibernated"), until they are reaped: the exit's label.
    pub(super) stopped: HashMap<RuntimeId, &'static str>,
    crashes: CrashGuard,
    pub(super) shares: Shares,
    shutting_down: bool,
}

/// One row of `GET /api/rooms`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RoomInfo {
    pub id: String,
    /// The room's kind: the prefix of its topic.
    pub kind: String,
    /// The node that runs the room.
    pub node: String,
    /// The worker's pid, started_at (ms since the Unix epoch) and calls are known only on the
    /// node that runs the room; null for rooms of other nodes.
    pub pid: Option<u32>,
    pub started_at: Option<u64>,
    /// Sockets of this node joined to the room.
    pub subscribers: usize,
    pub calls: Option<u64>,
    /// Whether the room keeps its state in storage (`--data-dir`).
    pub durable: bool,
    /// Bytes the room stores (keys and JSON values); null for a transient room.
    pub stored_bytes: Option<u64>,
}

#[derive(Clone)]
pub struct Supervisor {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) config: Arc<Config>,
    pub(super) pubsub: Arc<PubSub>,
    launcher: Box<dyn Launcher>,
    pub(super) placement: Option<Arc<dyn Placement>>,
    /// This node's name in `/api/rooms`.
    node: NodeId,
    state: Mutex<State>,
    next_runtime: AtomicU64,
    monitors: TaskTracker,
    /// Each room's recent console lines, which the launcher's workers fill.
    consoles: Consoles,
    /// Where durable rooms keep their state; `None`: every room is transient.
    storage: Option<Storage>,
}

impl Supervisor {
    pub fn new(config: Arc<Config>, pubsub: Arc<PubSub>) -> Supervisor {
        Supervisor::with_placement(config, pubsub, None, None)
    }

    /// A supervisor that, in a cluster, runs a room only where `placement` says, and keeps
    /// durable rooms' state in `storage`.
    pub fn with_placement(
        config: Arc<Config>,
        pubsub: Arc<PubSub>,
        placement: Option<Arc<dyn Placement>>,
        storage: Option<Storage>,
    ) -> Supervisor {
        let consoles = Consoles::default();
        let launcher =
            ProcessLauncher::new(config.clone(), pubsub.clone(), consoles.clone(), storage.clone());
        Supervisor::with_launcher(config, pubsub, placement, Box::new(launcher), consoles, storage)
    }

    pub(crate) fn with_launcher(
        config: Arc<Config>,
        pubsub: Arc<PubSub>,
        placement: Option<Arc<dyn Placement>>,
        launcher: Box<dyn Launcher>,
        consoles: Consoles,
        storage: Option<Storage>,
    ) -> Supervisor {
        let node = placement.as_ref().map(|p| p.node().clone()).unwrap_or_else(NodeId::local);
        let crashes = CrashGuard::new(config.crash_limit, config.crash_window(), config.crash_cooldown());
        let state = State {
            rooms: HashMap::new(),
            workers: HashMap::new(),
            stopped: HashMap::new(),
            crashes,
            shares: Shares::default(),
            shutting_down: false,
        };
        Supervisor {
            inner: Arc::new(Inner {
                config,
                pubsub,
                launcher,
                placement,
                node,
                state: Mutex::new(state),
                next_runtime: AtomicU64::new(RuntimeId::FIRST.get()),
                monitors: TaskTracker::new(),
                consoles,
                storage,
            }),
        }
    }

    pub fn pubsub(&self) -> &Arc<PubSub> {
        &self.inner.pubsub
    }

    pub fn node(&self) -> &NodeId {
        &self.inner.node
    }

    /// Whether rooms keep their state (`--data-dir`): a restarted room comes back with it.
    pub fn is_durable(&self) -> bool {
        self.inner.storage.is_some()
    }

    pub fn storage(&self) -> Option<&Storage> {
        self.inner.storage.as_ref()
    }

    /// The room's live worker, started now if it has none.
    pub async fn room(&self, id: &RoomId) -> Result<RoomHandle, RoomError> {
        self.room_for(None, id).await
    }

    /// The room's live worker for `caller`, started now (on its share) if it has none.
    pub async fn room_for(&self, caller: Option<&Caller>, id: &RoomId) -> Result<RoomHandle, RoomError> {
        let mut outcome = {
            let mut state = self.lock();
            let state = &mut *state;
            match state.rooms.get(id) {
                Some(Slot::Live(handle)) if !handle.is_closed() => {
                    state.shares.used(id, handle.runtime, caller, Instant::now());
                    return Ok(handle.clone());
                }
                Some(Slot::Starting { outcome, runtime }) => {
                    state.shares.used(id, *runtime, caller, Instant::now());
                    outcome.clone()
                }
                _ => self.begin_start(state, id, caller, None)?,
            }
        };
        let settled = outcome.wait_for(Option::is_some).await;
        match settled {
            Ok(outcome) => outcome.clone().unwrap_or(Err(RoomError::WorkerExited)),
            Err(_) => Err(RoomError::WorkerExited),
        }
    }

    /// Stops the runtime if it is still running here (its lease went to another node).
    pub fn kill_runtime(&self, id: &RoomId, runtime: RuntimeId) {
        let handle = self.lock().workers.get(&runtime).filter(|h| h.room == *id).cloned();
        if let Some(handle) = handle {
            handle.kill();
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.lock().shutting_down
    }

    /// This node's live rooms, by id.
    pub fn rooms(&self) -> Vec<RoomInfo> {
        let state = self.lock();
        let mut rooms: Vec<RoomInfo> = state
            .rooms
            .iter()
            .filter_map(|(id, slot)| match slot {
                Slot::Live(handle) => Some(RoomInfo {
                    id: id.as_str().to_owned(),
                    kind: id.kind().to_owned(),
                    node: self.inner.node.to_string(),
                    pid: Some(handle.pid),
                    started_at: Some(handle.started_at_ms),
                    subscribers: self.inner.pubsub.socket_count(&id.topic()),
                    calls: Some(handle.calls()),
                    durable: handle.durable,
                    stored_bytes: handle.durable.then(|| handle.stored_bytes()),
                }),
                Slot::Starting { .. } => None,
            })
            .collect();
        rooms.sort_by(|a, b| (&a.kind, &a.id).cmp(&(&b.kind, &b.id)));
        rooms
    }

    /// The room's recent console lines (operators).
    pub fn console(&self, id: &RoomId) -> Vec<ConsoleLine> {
        self.inner.consoles.lines(id)
    }

    /// The room's live worker on this node, if it has one.
    pub fn live_handle(&self, id: &RoomId) -> Option<RoomHandle> {
        match self.lock().rooms.get(id) {
            Some(Slot::Live(handle)) if !handle.is_closed() => Some(handle.clone()),
            _ => None,
        }
    }

    /// Worker processes started and prepared, waiting for rooms (`--warm-workers`).
    pub fn warm_workers(&self) -> usize {
        self.inner.launcher.warm_workers()
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
        // No new spares while the rooms go; the ones waiting go with the pool's close.
        self.inner.launcher.close();
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
        caller: Option<&Caller>,
        reset: Option<String>,
    ) -> Result<watch::Receiver<StartOutcome>, RoomError> {
        if state.shutting_down {
            return Err(RoomError::ShuttingDown);
        }
        if state.crashes.is_cooling(id, Instant::now()) {
            ::metrics::counter!(metrics::CRASH_LOOP_REFUSALS).increment(1);
            return Err(RoomError::CrashLooping);
        }
        if !state.shares.may_start(caller) {
            return Err(RoomError::StartQuota);
        }
        if state.rooms.len() >= self.inner.config.max_rooms && !self.evict_idle_room(state, id) {
            ::metrics::counter!(metrics::REFUSALS, "reason" => "room_limit").increment(1);
            return Err(RoomError::RoomLimit);
        }
        if let Err(figures) = crate::gateway::descriptors::room_fits(state.workers.len()) {
            ::metrics::counter!(metrics::REFUSALS, "reason" => "descriptors").increment(1);
            tracing::warn!(room = %id, "not starting the room: {figures}");
            return Err(RoomError::AtCapacity(figures));
        }
        let runtime = RuntimeId::new(self.inner.next_runtime.fetch_add(1, Ordering::Relaxed));
        state.shares.started(runtime, caller);
        let (done, outcome) = watch::channel(None);
        state.rooms.insert(id.clone(), Slot::Starting { runtime, outcome: outcome.clone() });
        // Started in its own task so that a caller that gives up does not abandon the start
        // that others are waiting on.
        let supervisor = self.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let result = supervisor.launch(&id, runtime).await;
            // Before anyone else's call: the new runtime first hears every join still open.
            if let Ok(handle) = &result {
                supervisor.replay_joins(handle, reset.as_deref()).await;
            }
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
                        state.shares.ended(runtime);
                        // Counted here, before anyone hears of the failure, so that a client
                        // retrying at once already meets the crash-loop guard; and counted
                        // even when the worker's monitor cleared the slot first.
                        if error.is_room_failure() {
                            state.crashes.record(&id, Instant::now());
                        }
                    }
                }
            }
            let _ = done.send(Some(result));
        });
        Ok(outcome)
    }

    /// Hands a new runtime the joins its room still has on this node (a previous runtime
    /// took them), in join order, through `onJoin`: each client gets `room_reset` with its new
    /// join response, or `phx_close` if the new runtime refuses the join.
    async fn replay_joins(&self, handle: &RoomHandle, reset: Option<&str>) {
        let pubsub = &self.inner.pubsub;
        let topic = handle.room.topic();
        let joins = pubsub.joins(&topic);
        if joins.is_empty() {
            return;
        }
        let detail = reset.unwrap_or("the room restarted");
        let (mut taken, mut closed) = (0, 0);
        // Presence outlives the runtime: entries stay while the new one replays the joins,
        // and those it does not track again leave when the replay is over.
        pubsub.presence_begin_replay(&topic, joins.iter().map(|join| join.conn.clone()));
        for join in &joins {
            let args = hooks::join_args(&join.conn, join.user.as_deref(), &join.params);
            let answer = handle.call(hooks::JOIN, args).await;
            match answer.map(hooks::response) {
                Ok(Ok(response)) => {
                    pubsub.push_local(
                        &topic,
                        &join.conn,
                        ROOM_RESET,
                        &RoomReset::restarted(detail, &response, self.is_durable()),
                    );
                    taken += 1;
                }
                Ok(Err(_)) | Err(RoomError::Script(_)) => {
                    pubsub.close_join(&topic, &join.conn);
                    closed += 1;
                }
                // The new runtime itself failed; its monitor deals with that, and the joins
                // not replayed yet are replayed by the runtime after it.
                Err(error) => {
                    tracing::warn!(room = %handle.room, "replaying the joins stopped: {}", error.detail());
                    break;
                }
            }
        }
        pubsub.presence_end_replay(&topic);
        tracing::info!(room = %handle.room, pid = handle.pid, taken, closed, "replayed the room's joins");
    }

    /// Makes space at the room limit by stopping a room that no socket has joined, so a flood
    /// of one-off room ids cannot lock everyone else out; rooms that someone is in are never
    /// evicted. Rooms no other client than their creator used in the last minute go first,
    /// least recently used first. The evicted room's state is gone, as after a restart.
    fn evict_idle_room(&self, state: &mut State, for_room: &RoomId) -> bool {
        let pubsub = &self.inner.pubsub;
        let now = Instant::now();
        let shares = &state.shares;
        let victim = state
            .rooms
            .iter()
            .filter_map(|(id, slot)| match slot {
                Slot::Live(handle) if pubsub.socket_count(&id.topic()) == 0 => Some(handle),
                _ => None,
            })
            .min_by_key(|handle| (shares.is_shared(&handle.room, now), handle.last_used_ms()))
            .cloned();
        let Some(victim) = victim else { return false };
        state.rooms.remove(&victim.room);
        state.stopped.insert(victim.runtime, "evicted");
        self.inner.consoles.forget(&victim.room);
        state.shares.forget(&victim.room);
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

    async fn launch(&self, id: &RoomId, runtime: RuntimeId) -> Result<RoomHandle, RoomError> {
        if let Some(placement) = &self.inner.placement {
            match placement.claim(id, runtime).await? {
                Claim::Ours => {}
                Claim::Held(_) => return Err(RoomError::OwnedElsewhere),
            }
        }
        let launched = self.launch_worker(id, runtime).await;
        if launched.is_err() {
            self.release(id, runtime).await;
        }
        launched
    }

    /// Gives up the room's place in the cluster, if this runtime holds it.
    async fn release(&self, id: &RoomId, runtime: RuntimeId) {
        if let Some(placement) = &self.inner.placement {
            placement.release(id, runtime).await;
        }
    }

    async fn launch_worker(&self, id: &RoomId, runtime: RuntimeId) -> Result<RoomHandle, RoomError> {
        let Launched { handle, ready, actor } = self.inner.launcher.launch(id, runtime)?;
        ::metrics::counter!(metrics::WORKER_STARTS).increment(1);
        self.lock().workers.insert(runtime, handle.clone());
        let supervisor = self.clone();
        self.inner.monitors.spawn(async move {
            let report = actor.await;
            let (room, runtime) = (report.room.clone(), report.runtime);
            supervisor.room_exited(report);
            // Awaited here, inside the tracked monitor, so a shutdown releases every lease
            // before the gateway exits and other nodes can take the rooms over at once.
            supervisor.release(&room, runtime).await;
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
            let stopped = state.stopped.remove(&report.runtime);
            ::metrics::counter!(metrics::WORKER_EXITS, "reason" => exit_label(&report.reason, stopped))
                .increment(1);
            state.workers.remove(&report.runtime);
            state.shares.ended(report.runtime);
            let ours = match state.rooms.get(&report.room) {
                Some(Slot::Live(handle)) => handle.runtime == report.runtime,
                Some(Slot::Starting { runtime, .. }) => *runtime == report.runtime,
                None => false,
            };
            if ours {
                state.rooms.remove(&report.room);
                state.shares.forget(&report.room);
                // A room stopped on purpose (evicted, stopped, shut down) starts afresh if it
                // comes back; a crashed one keeps its last lines for the operator to read.
                if !crashed {
                    self.inner.consoles.forget(&report.room);
                }
            }
            if crashed {
                state.crashes.record(&report.room, Instant::now());
            }
        }
        // A room whose writes failed restarts like a crashed one, without counting as one:
        // it did nothing wrong, and its clients go on with what is stored.
        let storage_failed = matches!(report.reason, ExitReason::StorageFailed(_)) && report.was_ready;
        if crashed || storage_failed {
            self.restart_after_crash(&report.room, report.reason.to_string());
        }
    }

    /// A crashed room that still has joins here starts again at once, so that its clients
    /// get their new join responses (see `replay_joins`); one nobody is in waits for its
    /// next use. Either way its clients hear `room_reset`.
    fn restart_after_crash(&self, room: &RoomId, detail: String) {
        let restored = self.is_durable();
        if self.inner.pubsub.joins(&room.topic()).is_empty() {
            announce_reset(&self.inner.pubsub, room, &detail, restored);
            return;
        }
        let started = {
            let mut state = self.lock();
            match state.rooms.get(room) {
                // Someone's use already started it again; that start replays the joins.
                Some(_) => Ok(()),
                None => self.begin_start(&mut state, room, None, Some(detail.clone())).map(drop),
            }
        };
        if let Err(error) = started {
            // Crash-looping, say: the joins stay, and the next start replays them.
            tracing::info!(room = %room, "not restarting at once: {}", error.detail());
            announce_reset(&self.inner.pubsub, room, &detail, restored);
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock_or_recover()
    }
}

/// The `reason` label of `roomvisor_worker_exits_total`.
fn exit_label(reason: &ExitReason, stopped: Option<&'static str>) -> &'static str {
    use std::os::unix::process::ExitStatusExt;
    match reason {
        ExitReason::Requested => stopped.unwrap_or("normal"),
        ExitReason::StorageFailed(_) => "storage",
        ExitReason::Hibernated => "hibernated",
        ExitReason::Exited(status) if status.signal().is_some() => "killed",
        ExitReason::Exited(_) => "crash",
        ExitReason::ProtocolViolation(_) => "protocol_violation",
        ExitReason::Unresponsive => "unresponsive",
        ExitReason::Killed(_) => "killed",
    }
}

/// Tells this node's subscribers of the room that its runtime is gone (`room_reset`), so a
/// client knows the room's state started over. Each node tells its own subscribers: a reset
/// is never relayed through the cluster.
/// `restored`: the room is durable, and comes back with what it stored.
pub fn announce_reset(pubsub: &PubSub, id: &RoomId, detail: &str, restored: bool) {
    let topic = id.topic();
    let payload = serde_json::json!({"reason": RoomError::WorkerExited.reason(), "detail": detail, "restored": restored});
    let frame = phoenix::push(None, &topic, ROOM_RESET, &payload);
    let told = pubsub.broadcast_local(&topic, &frame);
    tracing::info!(room = %id, "room reset ({detail}); told {told} subscribers");
}
