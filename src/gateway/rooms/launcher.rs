//! How a room's runtime comes to exist: the supervisor decides when, a [`Launcher`] decides
//! how. The gateway's launcher starts a worker process from its configuration; unit tests
//! plug in a stand-in.

use std::sync::Arc;

use super::error::RoomError;
use super::handle::{ExitReport, ReadySignal, RoomHandle};
use super::placement::BoxFuture;
use super::process::{spawn, RoomSpec};
use crate::gateway::config::Config;
use crate::gateway::ids::{RoomId, RuntimeId};
use crate::gateway::pubsub::PubSub;

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
}

impl Launcher for ProcessLauncher {
    fn launch(&self, room: &RoomId, runtime: RuntimeId) -> Result<Launched, RoomError> {
        let config = &self.config;
        let (script_name, script) =
            config.load_room_script().map_err(|e| RoomError::ScriptUnreadable(Arc::new(e)))?;
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
            call_timeout: config.call_timeout(),
            hard_timeout: config.hard_timeout(),
            max_queued_calls: config.max_queued_calls,
        };
        let (handle, ready, actor) = spawn(spec, self.pubsub.clone()).map_err(|e| {
            tracing::error!(room = %room, "cannot start a room worker: {e}");
            RoomError::SpawnFailed(Arc::new(e))
        })?;
        Ok(Launched { handle, ready, actor: Box::pin(actor) })
    }
}
