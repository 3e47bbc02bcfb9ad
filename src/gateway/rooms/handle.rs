//! What the rest of the gateway holds on a live room: a cheap, cloneable [`RoomHandle`] that
//! queues calls for the room's actor, and the report the actor files when its runtime ends.

use std::process::ExitStatus;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use super::error::RoomError;
use super::shares::ClientId;
use crate::gateway::ids::{RoomId, RuntimeId};
use crate::util::epoch_ms;
use crate::wire::WorkerStats;

/// How a worker ended.
#[derive(Debug, Clone)]
pub enum ExitReason {
    /// The gateway asked it to stop (shutdown); not a crash.
    Requested,
    /// It exited or was killed from outside (e.g. `kill <pid>`).
    Exited(ExitStatus),
    ProtocolViolation(String),
    /// A call stayed unanswered past the hard limit, or start-up never finished.
    Unresponsive,
    /// Killed by the gateway for a reason of its own (start-up timeout, shutdown grace over).
    Killed(&'static str),
    /// A durable room's writes could not be stored: its runtime's memory no longer matches
    /// the store, so it is ended and the room starts again from what is stored (as Durable
    /// Objects reset an object whose write failed). Not the script's fault, not a crash.
    StorageFailed(String),
    /// A durable room idle past `--room-idle-ms` was stopped; it starts on its next use.
    Hibernated,
}

impl ExitReason {
    pub fn is_crash(&self) -> bool {
        !matches!(self, ExitReason::Requested | ExitReason::StorageFailed(_) | ExitReason::Hibernated)
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Requested => f.write_str("shut down on request"),
            ExitReason::Exited(status) => write!(f, "exited unexpectedly ({status})"),
            ExitReason::ProtocolViolation(why) => write!(f, "protocol violation: {why}"),
            ExitReason::Unresponsive => f.write_str("unresponsive past the hard timeout"),
            ExitReason::Killed(why) => write!(f, "killed: {why}"),
            ExitReason::StorageFailed(why) => write!(f, "stopped: its writes could not be stored ({why})"),
            ExitReason::Hibernated => f.write_str("hibernated"),
        }
    }
}

/// What the actor reports once its worker is gone and reaped.
#[derive(Debug)]
pub struct ExitReport {
    pub room: RoomId,
    pub runtime: RuntimeId,
    pub pid: u32,
    pub reason: ExitReason,
    /// Whether the runtime ever became ready: only then was there state to lose, and only
    /// then is its end counted here (a failed start is counted when it fails).
    pub was_ready: bool,
}

/// What a handle asks of the room's actor.
pub(crate) enum Request {
    Call(Call),
    /// The worker's heap, timers and pending calls, for operators and hibernation.
    Stats(oneshot::Sender<WorkerStats>),
    Shutdown,
}

/// One call of the room script, and where its answer goes.
pub(crate) struct Call {
    /// The socket that made it, if any: its share of the room's queue.
    pub caller: Option<ClientId>,
    pub function: String,
    pub args: String,
    pub reply: oneshot::Sender<Result<String, RoomError>>,
}

/// A cheap handle on a live room.
#[derive(Clone, Debug)]
pub struct RoomHandle {
    pub room: RoomId,
    pub runtime: RuntimeId,
    pub pid: u32,
    pub started_at_ms: u64,
    commands: mpsc::Sender<Request>,
    kill: CancellationToken,
    calls: Arc<AtomicU64>,
    /// When a caller last asked for this room (ms since the epoch): the least recently used
    /// idle room is the one evicted when the room limit is reached.
    last_used_ms: Arc<AtomicU64>,
    /// What a durable room stores, as its last committed writes said.
    stored_bytes: Arc<AtomicU64>,
    /// Whether the room keeps its state in storage.
    pub durable: bool,
    call_timeout: Duration,
}

impl RoomHandle {
    /// Calls a top-level function of the room script. `args_json` is a JSON array; the
    /// result is JSON. Calls reach the worker in the order they were made (round-robin between
    /// sockets); a full queue is refused at once with `room busy`.
    pub async fn call(&self, function: &str, args_json: String) -> Result<String, RoomError> {
        self.call_as(None, function, args_json).await
    }

    /// [`RoomHandle::call`] for a socket, which gets its turn and its share of the queue.
    pub async fn call_as(
        &self,
        caller: Option<ClientId>,
        function: &str,
        args_json: String,
    ) -> Result<String, RoomError> {
        self.last_used_ms.store(epoch_ms(), Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        let command = Request::Call(Call { caller, function: function.to_owned(), args: args_json, reply });
        // A full queue is refused at once: waiting for space would let a flood of calls hold
        // every caller's memory, and each of them would time out anyway.
        self.commands.try_send(command).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => RoomError::Busy,
            mpsc::error::TrySendError::Closed(_) => RoomError::WorkerExited,
        })?;
        let answer = async { answer.await.map_err(|_| RoomError::WorkerExited)? };
        let asked = std::time::Instant::now();
        let result = timeout(self.call_timeout, answer).await.unwrap_or(Err(RoomError::Timeout));
        let kind = crate::gateway::metrics::call_kind(function);
        ::metrics::histogram!(crate::gateway::metrics::CALL_SECONDS, "call" => kind).record(asked.elapsed());
        result
    }

    /// The runtime's heap, timers and pending calls; `None` if it does not answer within
    /// `within` (it is busy, or gone).
    pub async fn stats(&self, within: Duration) -> Option<WorkerStats> {
        let (reply, answer) = oneshot::channel();
        self.commands.try_send(Request::Stats(reply)).ok()?;
        timeout(within, answer).await.ok()?.ok()
    }

    /// Bytes the room stores (durable rooms; 0 for transient ones).
    pub fn stored_bytes(&self) -> u64 {
        self.stored_bytes.load(Ordering::Relaxed)
    }

    /// Asks the worker to finish; it exits once it has drained what it was sent.
    pub async fn shutdown(&self) {
        let _ = self.commands.send(Request::Shutdown).await;
    }

    pub fn kill(&self) {
        self.kill.cancel();
    }

    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    pub fn last_used_ms(&self) -> u64 {
        self.last_used_ms.load(Ordering::Relaxed)
    }

    pub fn is_closed(&self) -> bool {
        self.commands.is_closed()
    }
}

/// Resolves once the runtime is ready or has failed to start.
pub type ReadySignal = oneshot::Receiver<Result<(), RoomError>>;

/// The actor's side of a new handle: the queue it serves, the signal to kill the worker now,
/// and the call counter it keeps for `/api/rooms`.
pub(crate) struct HandleEnds {
    pub commands: mpsc::Receiver<Request>,
    pub kill: CancellationToken,
    pub calls: Arc<AtomicU64>,
    pub stored_bytes: Arc<AtomicU64>,
}

impl RoomHandle {
    /// A handle on a runtime that is starting now, and the ends its actor keeps. `max_queued`
    /// calls may wait for the room; more are refused with `room busy`.
    pub(crate) fn new(
        room: RoomId,
        runtime: RuntimeId,
        pid: u32,
        call_timeout: Duration,
        max_queued: usize,
        durable: bool,
    ) -> (RoomHandle, HandleEnds) {
        let (commands_tx, commands) = mpsc::channel(max_queued.max(1));
        let kill = CancellationToken::new();
        let calls = Arc::new(AtomicU64::new(0));
        let stored_bytes = Arc::new(AtomicU64::new(0));
        let started_at_ms = epoch_ms();
        let handle = RoomHandle {
            room,
            runtime,
            pid,
            started_at_ms,
            commands: commands_tx,
            kill: kill.clone(),
            calls: calls.clone(),
            last_used_ms: Arc::new(AtomicU64::new(started_at_ms)),
            stored_bytes: stored_bytes.clone(),
            durable,
            call_timeout,
        };
        (handle, HandleEnds { commands, kill, calls, stored_bytes })
    }
}
