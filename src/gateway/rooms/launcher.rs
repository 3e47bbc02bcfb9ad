//! How a room's runtime comes to exist: the supervisor decides when, a [`Launcher`] decides
//! how. The gateway's launcher starts a worker process from its configuration; unit tests
//! plug in a stand-in.

use std::future::Future;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use std::os::unix::process::CommandExt;
use std::process::Command;

use super::console::{ConsoleLog, Consoles};
use super::error::RoomError;
use super::handle::{ExitReport, ReadySignal, RoomHandle};
use super::placement::BoxFuture;
use super::process;
use crate::gateway::config::Config;
use crate::gateway::ids::{RoomId, RuntimeId};
use crate::gateway::pubsub::PubSub;
use crate::gateway::storage::Storage;
use crate::wire::{RuntimeLimits, ScriptError, PARENT_PID_ENV};

/// Starts one runtime of a room.
pub(crate) trait Launcher: Send + Sync + 'static {
    fn launch(&self, room: &RoomId, runtime: RuntimeId) -> Result<Launched, RoomError>;
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
        let (worker_path, worker_argv0) = config.worker_command().map_err(|e| {
            tracing::error!(room = %room, "cannot find the room-worker executable: {e}");
            RoomError::WorkerNotFound(Arc::new(e))
        })?;
        let spec = RoomSpec {
            room: room.clone(),
            runtime,
            worker_path,
            worker_argv0,
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
        let (handle, ready, actor) = spawn(spec, self.pubsub.clone()).map_err(|e| {
            tracing::error!(room = %room, "cannot start a room worker: {e}");
            RoomError::SpawnFailed(Arc::new(e))
        })?;
        // Every line the actor logs carries the room's kind, id and pid, as fields a log
        // shipper can filter on (`--log-format json` puts them in each line's `span`).
        let span = tracing::info_span!("room", kind = room.kind(), id = room.as_str(), pid = handle.pid);
        Ok(Launched { handle, ready, actor: Box::pin(tracing::Instrument::instrument(actor, span)) })
    }
}

/// Everything needed to start one runtime.
#[derive(Clone)]
pub struct RoomSpec {
    pub room: RoomId,
    /// Unique per start; tells a restarted room's worker from the one it replaces.
    pub runtime: RuntimeId,
    pub worker_path: PathBuf,
    pub worker_argv0: &'static str,
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

/// Starts the worker process and its actor. The returned future is the actor: it must be
/// polled (spawned) for the room to work, and resolves once the worker is gone and reaped.
///
/// One descriptor per worker in the gateway: a socket pair whose other end is the worker's
/// fd 0 carries frames both ways (three pipes capped a gateway at about 5,000 rooms under a
/// 20,000 descriptor limit). The script's console and the worker's own diagnostics travel as
/// `Log` frames; what a worker writes to stderr before the frames are up (the loader, a panic)
/// goes straight to the gateway's own stderr, which it inherits, so it lands in the same log.
pub fn spawn(
    spec: RoomSpec,
    pubsub: Arc<PubSub>,
) -> std::io::Result<(RoomHandle, ReadySignal, impl Future<Output = ExitReport> + Send)> {
    let (gateway_end, worker_end) = std::os::unix::net::UnixStream::pair()?;
    let mut command = Command::new(&spec.worker_path);
    command
        .arg0(spec.worker_argv0)
        .env(PARENT_PID_ENV, std::process::id().to_string())
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(worker_end)))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    // The child is spawned from a runtime worker thread that lives as long as the gateway:
    // PR_SET_PDEATHSIG fires when the spawning *thread* exits, so never spawn from
    // spawn_blocking, whose threads come and go.
    let child = command.spawn()?;
    // The worker's end closes here with the command, so that the gateway reads end of file
    // once the worker is gone; the actor reaps it by pid (see `reap.rs`).
    drop(command);
    let pid = child.id();
    gateway_end.set_nonblocking(true)?;
    let channel = tokio::net::UnixStream::from_std(gateway_end)?;
    process::start(spec, pid, channel, pubsub)
}
