//! How a room's runtime comes to exist: the supervisor decides when, a [`Launcher`] decides
//! how. The gateway's launcher starts a worker process from its configuration; unit tests
//! plug in a stand-in.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::console::{ConsoleLog, Consoles};
use super::error::RoomError;
use super::handle::{ExitReport, ReadySignal, RoomHandle};
use super::placement::BoxFuture;
use super::process;
use super::spawn::{exec_worker, NewWorker, WorkerCommand};
use super::warm::WarmPool;
use crate::gateway::config::Config;
use crate::gateway::ids::{RoomId, RuntimeId};
use crate::gateway::pubsub::PubSub;
use crate::gateway::storage::Storage;
use crate::wire::{RuntimeLimits, ScriptError, ToWorker};

/// Starts one runtime of a room.
pub(crate) trait Launcher: Send + Sync + 'static {
    fn launch(&self, room: &RoomId, runtime: RuntimeId) -> Result<Launched, RoomError>;

    /// Prepared workers waiting for rooms.
    fn warm_workers(&self) -> usize {
        0
    }

    /// No more rooms will start: let go of anything kept ready for them.
    fn close(&self) {}
}

/// A runtime on its way up: its handle, the signal that it is ready (or failed), and its
/// actor, which the supervisor polls and which resolves once the runtime is gone.
pub(crate) struct Launched {
    pub handle: RoomHandle,
    pub ready: ReadySignal,
    pub actor: BoxFuture<'static, ExitReport>,
}

/// Starts rooms as worker processes, from the gateway's configuration.
pub(crate) struct ProcessLauncher {
    pub config: Arc<Config>,
    pub pubsub: Arc<PubSub>,
    pub consoles: Consoles,
    pub storage: Option<Storage>,
    /// Prepared workers for new rooms; `None` with `--warm-workers 0`.
    pub pool: Option<WarmPool>,
}

impl Launcher for ProcessLauncher {
    fn launch(&self, room: &RoomId, runtime: RuntimeId) -> Result<Launched, RoomError> {
        let config = &self.config;
        let (script_name, script) = config.load_script(room.kind()).map_err(|e| match e.kind() {
            // Read, but not runnable (a .ts that does not strip): the script's own fault,
            // like a syntax error, and counted towards the crash-loop guard as one.
            std::io::ErrorKind::InvalidData => RoomError::StartFailed(ScriptError::exception(e.to_string())),
            _ => RoomError::ScriptUnreadable(Arc::new(e)),
        })?;
        let (path, argv0) = config.worker_command().map_err(|e| {
            tracing::error!(room = %room, "cannot find the room-worker executable: {e}");
            RoomError::WorkerNotFound(Arc::new(e))
        })?;
        let spec = RoomSpec {
            room: room.clone(),
            runtime,
            worker: WorkerCommand { path, argv0 },
            script_name,
            script,
            limits: config.runtime_limits(),
            settings: crate::gateway::hooks::settings(config),
            console: self.consoles.for_room(room),
            call_timeout: config.call_timeout(),
            hard_timeout: config.hard_timeout(),
            max_queued_calls: config.max_queued_calls,
            storage: self.storage.clone(),
        };
        let (handle, ready, actor) = spawn(spec, self.pubsub.clone(), self.pool.as_ref()).map_err(|e| {
            tracing::error!(room = %room, "cannot start a room worker: {e}");
            RoomError::SpawnFailed(Arc::new(e))
        })?;
        // Every line the actor logs carries the room's kind, id and pid, as fields a log
        // shipper can filter on (`--log-format json` puts them in each line's `span`).
        let span = tracing::info_span!("room", kind = room.kind(), id = room.as_str(), pid = handle.pid);
        Ok(Launched { handle, ready, actor: Box::pin(tracing::Instrument::instrument(actor, span)) })
    }

    fn warm_workers(&self) -> usize {
        self.pool.as_ref().map_or(0, WarmPool::spares)
    }

    fn close(&self) {
        if let Some(pool) = &self.pool {
            pool.close();
        }
    }
}

impl ProcessLauncher {
    pub fn new(
        config: Arc<Config>,
        pubsub: Arc<PubSub>,
        consoles: Consoles,
        storage: Option<Storage>,
    ) -> Self {
        let pool = match config.worker_command() {
            Ok((path, argv0)) => {
                WarmPool::start(config.warm_workers, WorkerCommand { path, argv0 }, config.runtime_limits())
            }
            // Every room start will say so too.
            Err(e) => {
                tracing::error!("cannot find the room-worker executable, no warm workers: {e}");
                None
            }
        };
        ProcessLauncher { config, pubsub, consoles, storage, pool }
    }
}

/// Everything needed to start one runtime.
#[derive(Clone)]
pub struct RoomSpec {
    pub room: RoomId,
    /// Unique per start; tells a restarted room's worker from the one it replaces.
    pub runtime: RuntimeId,
    pub worker: WorkerCommand,
    pub script_name: String,
    pub script: String,
    pub limits: RuntimeLimits,
    /// `Room.settings`, as JSON.
    pub settings: String,
    /// Where the script's console lines are kept for operators.
    pub console: Arc<std::sync::Mutex<ConsoleLog>>,
    pub call_timeout: Duration,
    pub hard_timeout: Duration,
    /// Calls that may wait for the room before more are refused as `room busy`.
    pub max_queued_calls: usize,
    /// Where a durable room's state lives; `None` for a transient room.
    pub storage: Option<Storage>,
}

/// Starts the worker process (a spare from the warm pool when it has one) and its actor. The
/// returned future is the actor: it must be polled (spawned) for the room to work, and
/// resolves once the worker is gone and reaped.
pub(super) fn spawn(
    spec: RoomSpec,
    pubsub: Arc<PubSub>,
    pool: Option<&WarmPool>,
) -> std::io::Result<(RoomHandle, ReadySignal, impl Future<Output = ExitReport> + Send)> {
    let worker = match pool.and_then(WarmPool::take) {
        Some(worker) => worker,
        // Spawned from a runtime worker thread, which lives as long as the gateway (see
        // `exec_worker`).
        None => exec_worker(&spec.worker, ToWorker::Prepare { limits: spec.limits })?,
    };
    let NewWorker { process, socket } = worker;
    socket.set_nonblocking(true)?;
    let channel = tokio::net::UnixStream::from_std(socket)?;
    process::start(spec, process, channel, pubsub)
}
