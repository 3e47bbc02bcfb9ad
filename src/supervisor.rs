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
    shutting_down: bool,
}

/// One row of `GET /api/rooms`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RoomInfo {
    pub id: String,
    pub pid: u32,
    /// Milliseconds since the Unix epoch.
    pub started_at: u64,
    pub subscribers: usize,
    pub calls: u64,
}

#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

struct Inner {
    config: Arc<Config>,
    pubsub: Arc<PubSub>,
    state: Mutex<State>,
    next_runtime: AtomicU64,
    monitors: TaskTracker,
}

impl Supervisor {
    pub fn new(config: Arc<Config>, pubsub: Arc<PubSub>) -> Supervisor {
        Supervisor {
            inner: Arc::new(Inner {
                config,
                pubsub,
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

    /// Calls a function of the room's script, starting the room if needed.
    pub async fn call(&self, id: &RoomId, function: &str, args_json: String) -> Result<String, RoomError> {
        self.room(id).await?.call(function, args_json).await
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
                    pid: handle.pid,
                    started_at: handle.started_at_ms,
                    subscribers: self.inner.pubsub.socket_count(&id.topic()),
                    calls: handle.calls(),
                }),
                Slot::Starting { .. } => None,
            })
            .collect();
        rooms.sort_by(|a, b| a.id.cmp(&b.id));
        rooms
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
                        if !matches!(error, RoomError::Unavailable(_)) {
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
            supervisor.room_exited(report);
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
            let topic = report.room.topic();
            let payload = serde_json::json!({
                "reason": RoomError::WorkerExited.reason(),
                "detail": report.reason.to_string(),
            });
            let frame = phoenix::push(None, &topic, "room_reset", &payload);
            let told = self.inner.pubsub.broadcast(&topic, &frame);
            tracing::info!(room = %report.room, pid = report.pid, "room reset; told {told} subscribers");
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
