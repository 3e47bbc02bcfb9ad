//! One live room: its id, the worker process that runs it, and the actor that owns that
//! process.
//!
//! The actor is the only code that touches the child: it writes calls in arrival order, reads
//! every frame the worker sends, answers host calls, routes BroadcastChannel posts through the
//! PubSub, kills the worker on a protocol violation or when a call stays unanswered past the
//! hard limit, and always reaps it. Callers hold a cheap, cloneable [`RoomHandle`].

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::value::RawValue;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, Instant};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use crate::ipc::{FromWorker, GatewayCodec, LogLevel, RuntimeLimits, ScriptError, ScriptErrorKind, ToWorker};
use crate::phoenix;
use crate::pubsub::{ChannelMessage, PubSub};

pub const TOPIC_PREFIX: &str = "room:";
const MAX_ROOM_ID_LEN: usize = 64;
/// Calls queued for one room before callers wait for room in the queue.
const COMMAND_QUEUE: usize = 1024;
/// BroadcastChannel messages queued for one runtime before further ones are dropped.
const DELIVERY_QUEUE: usize = 1024;

/// A room id: `^[A-Za-z0-9_-]{1,64}$`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomId(Arc<str>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRoomId;

impl RoomId {
    pub fn parse(id: &str) -> Result<RoomId, InvalidRoomId> {
        let valid = !id.is_empty()
            && id.len() <= MAX_ROOM_ID_LEN
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if valid {
            Ok(RoomId(id.into()))
        } else {
            Err(InvalidRoomId)
        }
    }

    /// The room of a `room:<id>` topic.
    pub fn from_topic(topic: &str) -> Result<RoomId, InvalidRoomId> {
        topic.strip_prefix(TOPIC_PREFIX).ok_or(InvalidRoomId).and_then(RoomId::parse)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn topic(&self) -> String {
        format!("{TOPIC_PREFIX}{}", self.0)
    }
}

impl std::fmt::Display for RoomId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a room could not answer. [`RoomError::reason`] is what clients see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomError {
    RoomLimit,
    CrashLooping,
    Timeout,
    WorkerExited,
    /// The script threw, or its start-up failed; carries the script's error.
    Script(ScriptError),
    /// The worker could not be started at all.
    Unavailable(String),
    /// Another node's room failed; carries the reason that node gave.
    Remote(String),
    /// In a cluster: another node holds the room's lease.
    OwnedElsewhere,
}

impl RoomError {
    pub fn reason(&self) -> String {
        match self {
            RoomError::RoomLimit => "room limit reached".to_owned(),
            RoomError::CrashLooping => "room is crash-looping".to_owned(),
            RoomError::Timeout => "timeout".to_owned(),
            RoomError::WorkerExited => "room worker exited".to_owned(),
            RoomError::Script(e) if e.kind == ScriptErrorKind::Timeout => "timeout".to_owned(),
            RoomError::Script(e) => e.message.clone(),
            RoomError::Unavailable(why) => format!("room unavailable: {why}"),
            RoomError::Remote(reason) => reason.clone(),
            RoomError::OwnedElsewhere => "room is owned by another node".to_owned(),
        }
    }
}

impl std::fmt::Display for RoomError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason())
    }
}

impl std::error::Error for RoomError {}

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
}

impl ExitReason {
    pub fn is_crash(&self) -> bool {
        !matches!(self, ExitReason::Requested)
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
        }
    }
}

/// What the actor reports once its worker is gone and reaped.
#[derive(Debug)]
pub struct ExitReport {
    pub room: RoomId,
    pub runtime: u64,
    pub pid: u32,
    pub reason: ExitReason,
    /// Whether the runtime ever became ready: only then was there state to lose, and only
    /// then is its end counted here (a failed start is counted when it fails).
    pub was_ready: bool,
}

/// Everything needed to start one runtime.
#[derive(Debug, Clone)]
pub struct RoomSpec {
    pub room: RoomId,
    /// Unique per start; tells a restarted room's worker from the one it replaces.
    pub runtime: u64,
    pub worker_path: PathBuf,
    pub worker_argv0: &'static str,
    pub script_name: String,
    pub script: String,
    pub limits: RuntimeLimits,
    pub call_timeout: Duration,
    pub hard_timeout: Duration,
}

enum Request {
    Call { function: String, args: String, reply: oneshot::Sender<Result<String, RoomError>> },
    Shutdown,
}

/// A cheap handle on a live room.
#[derive(Clone, Debug)]
pub struct RoomHandle {
    pub room: RoomId,
    pub runtime: u64,
    pub pid: u32,
    pub started_at_ms: u64,
    commands: mpsc::Sender<Request>,
    kill: CancellationToken,
    calls: Arc<AtomicU64>,
    /// When a caller last asked for this room (ms since the epoch): the least recently used
    /// idle room is the one evicted when the room limit is reached.
    last_used_ms: Arc<AtomicU64>,
    call_timeout: Duration,
}

impl RoomHandle {
    /// Calls a top-level function of the room script. `args_json` is a JSON array; the
    /// result is JSON. Calls run one at a time, in the order they were made.
    pub async fn call(&self, function: &str, args_json: String) -> Result<String, RoomError> {
        self.last_used_ms.store(epoch_ms(), Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        let command = Request::Call { function: function.to_owned(), args: args_json, reply };
        let exchange = async {
            self.commands.send(command).await.map_err(|_| RoomError::WorkerExited)?;
            answer.await.map_err(|_| RoomError::WorkerExited)?
        };
        timeout(self.call_timeout, exchange).await.unwrap_or(Err(RoomError::Timeout))
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

/// Starts the worker process. The returned future is the actor: it must be polled (spawned)
/// for the room to work, and resolves once the worker is gone and reaped.
pub fn spawn(
    spec: RoomSpec,
    pubsub: Arc<PubSub>,
) -> std::io::Result<(RoomHandle, ReadySignal, impl Future<Output = ExitReport> + Send)> {
    let mut command = Command::new(&spec.worker_path);
    command
        .arg0(spec.worker_argv0)
        .env(crate::worker::PARENT_PID_ENV, std::process::id().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // The child is spawned from a runtime worker thread that lives as long as the gateway:
    // PR_SET_PDEATHSIG fires when the spawning *thread* exits, so never spawn from
    // spawn_blocking, whose threads come and go.
    let mut child = command.spawn()?;
    let pid = child.id().unwrap_or_default();
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(std::io::Error::other("worker started without piped stdio"));
    };
    tokio::spawn(forward_stderr(spec.room.clone(), pid, stderr));

    let (commands_tx, commands) = mpsc::channel(COMMAND_QUEUE);
    let (inbox_tx, inbox) = mpsc::channel(DELIVERY_QUEUE);
    let (ready_tx, ready) = oneshot::channel();
    let kill = CancellationToken::new();
    let calls = Arc::new(AtomicU64::new(0));
    let started_at_ms = epoch_ms();
    let handle = RoomHandle {
        room: spec.room.clone(),
        runtime: spec.runtime,
        pid,
        started_at_ms,
        commands: commands_tx,
        kill: kill.clone(),
        calls: calls.clone(),
        last_used_ms: Arc::new(AtomicU64::new(started_at_ms)),
        call_timeout: spec.call_timeout,
    };
    let max_frame = usize::try_from(spec.limits.max_frame_bytes).unwrap_or(usize::MAX);
    let actor = Actor {
        writer: FramedWrite::new(stdin, GatewayCodec::new(max_frame)),
        reader: FramedRead::new(stdout, GatewayCodec::new(max_frame)),
        child,
        pid,
        commands,
        inbox,
        inbox_tx,
        in_flight: BTreeMap::new(),
        next_call_id: 1,
        channels: HashSet::new(),
        pubsub,
        ready: Some(ready_tx),
        kill,
        calls,
        shutting_down: false,
        spawned_at: Instant::now(),
        became_ready: false,
        spec,
    };
    Ok((handle, ready, actor.run()))
}

struct InFlight {
    reply: oneshot::Sender<Result<String, RoomError>>,
    sent_at: Instant,
}

struct Actor {
    spec: RoomSpec,
    child: Child,
    pid: u32,
    writer: FramedWrite<ChildStdin, GatewayCodec>,
    reader: FramedRead<ChildStdout, GatewayCodec>,
    commands: mpsc::Receiver<Request>,
    inbox: mpsc::Receiver<ChannelMessage>,
    inbox_tx: mpsc::Sender<ChannelMessage>,
    /// Keyed by call id, which only grows: the first entry is the oldest call.
    in_flight: BTreeMap<u64, InFlight>,
    next_call_id: u64,
    channels: HashSet<String>,
    pubsub: Arc<PubSub>,
    ready: Option<oneshot::Sender<Result<(), RoomError>>>,
    kill: CancellationToken,
    calls: Arc<AtomicU64>,
    shutting_down: bool,
    spawned_at: Instant,
    became_ready: bool,
}

/// A frame from the worker that breaks the protocol; the worker is killed for it.
struct Violation(String);

impl Actor {
    async fn run(mut self) -> ExitReport {
        let room = self.spec.room.clone();
        tracing::info!(room = %room, pid = self.pid, runtime = self.spec.runtime, "room worker started");
        let start = ToWorker::Start {
            room_id: room.to_string(),
            script_name: self.spec.script_name.clone(),
            script: std::mem::take(&mut self.spec.script),
            limits: self.spec.limits,
        };
        let reason = match self.send(start).await {
            Ok(()) => self.event_loop().await,
            Err(reason) => reason,
        };
        let still_running = !matches!(reason, ExitReason::Exited(_) | ExitReason::Requested);
        if still_running {
            let _ = self.child.start_kill();
        }
        // Always reap, so that no exit leaves a zombie behind.
        let status = self.child.wait().await;
        let reason = match (reason, status) {
            (ExitReason::Exited(_), Ok(status)) => ExitReason::Exited(status),
            (reason, _) => reason,
        };
        let was_ready = self.became_ready;
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(Err(RoomError::WorkerExited));
        }
        for (_, call) in std::mem::take(&mut self.in_flight) {
            let _ = call.reply.send(Err(RoomError::WorkerExited));
        }
        for channel in std::mem::take(&mut self.channels) {
            self.pubsub.unsubscribe_runtime(&channel, self.spec.runtime);
        }
        if reason.is_crash() {
            tracing::warn!(room = %room, pid = self.pid, "room worker {reason}");
        } else {
            tracing::info!(room = %room, pid = self.pid, "room worker {reason}");
        }
        ExitReport { room, runtime: self.spec.runtime, pid: self.pid, reason, was_ready }
    }

    async fn event_loop(&mut self) -> ExitReason {
        loop {
            // Until it is ready, the start-up itself is bounded by the hard limit.
            let waiting_since = if self.ready.is_some() {
                Some(self.spawned_at)
            } else {
                self.in_flight.first_key_value().map(|(_, call)| call.sent_at)
            };
            let unresponsive_at = waiting_since.map(|since| since + self.spec.hard_timeout);
            // Biased: the gateway's own deadlines first, so a worker flooding frames cannot
            // starve them; then the worker's frames before its exit, so its last words (a
            // StartFailed, a Reply) are never lost to a race with the exit.
            tokio::select! {
                biased;
                () = self.kill.cancelled() => return ExitReason::Killed("asked to stop"),
                () = sleep_until_opt(unresponsive_at) => return ExitReason::Unresponsive,
                frame = self.reader.next() => match frame {
                    Some(Ok(frame)) => {
                        if let Err(Violation(why)) = self.handle_frame(frame).await {
                            return ExitReason::ProtocolViolation(why);
                        }
                    }
                    Some(Err(e)) => return ExitReason::ProtocolViolation(e.to_string()),
                    // stdout closed: the worker is on its way out; the wait branch sees it go.
                    None => return self.await_exit().await,
                },
                command = self.commands.recv(), if !self.shutting_down => match command {
                    Some(Request::Call { function, args, reply }) => {
                        let id = self.next_call_id;
                        self.next_call_id += 1;
                        self.calls.fetch_add(1, Ordering::Relaxed);
                        self.in_flight.insert(id, InFlight { reply, sent_at: Instant::now() });
                        if let Err(reason) = self.send(ToWorker::Call { id, function, args }).await {
                            return reason;
                        }
                    }
                    // Every handle is gone (the registry dropped this room) or shutdown was
                    // asked for: closing stdin lets the worker drain and exit.
                    Some(Request::Shutdown) | None => {
                        self.shutting_down = true;
                        let _ = self.send(ToWorker::Shutdown).await;
                        let _ = self.writer.get_mut().shutdown().await;
                    }
                },
                Some(message) = self.inbox.recv() => {
                    let deliver = ToWorker::Deliver {
                        channel: message.channel.to_string(),
                        data: message.data.to_string(),
                    };
                    if let Err(reason) = self.send(deliver).await {
                        return reason;
                    }
                }
                status = self.child.wait() => {
                    if let Err(Violation(why)) = self.drain_frames().await {
                        return ExitReason::ProtocolViolation(why);
                    }
                    return self.exit_reason(status);
                }
            }
        }
    }

    /// Handles what the worker wrote before it exited; its stdout is closed, so this ends at
    /// EOF (bounded anyway, in case a stray process inherited the pipe).
    async fn drain_frames(&mut self) -> Result<(), Violation> {
        while let Ok(Some(frame)) = timeout(self.spec.hard_timeout, self.reader.next()).await {
            let frame = frame.map_err(|e| Violation(e.to_string()))?;
            self.handle_frame(frame).await?;
        }
        Ok(())
    }

    async fn await_exit(&mut self) -> ExitReason {
        match timeout(self.spec.hard_timeout, self.child.wait()).await {
            Ok(waited) => self.exit_reason(waited),
            Err(_) => ExitReason::ProtocolViolation("closed stdout but did not exit".to_owned()),
        }
    }

    /// Why the worker ended, from its reaped status: an exit the gateway asked for is not a crash.
    fn exit_reason(&self, waited: std::io::Result<ExitStatus>) -> ExitReason {
        match waited {
            Ok(_) if self.shutting_down => ExitReason::Requested,
            Ok(status) => ExitReason::Exited(status),
            Err(e) => ExitReason::ProtocolViolation(format!("waiting for the worker failed: {e}")),
        }
    }

    /// A worker that stops reading its stdin would block this write forever: bound it.
    async fn send(&mut self, frame: ToWorker) -> Result<(), ExitReason> {
        match timeout(self.spec.hard_timeout, self.writer.send(frame)).await {
            Ok(Ok(())) => Ok(()),
            // A broken pipe means the worker died; the wait branch reports how.
            Ok(Err(_)) => Ok(()),
            Err(_) => Err(ExitReason::Unresponsive),
        }
    }

    async fn handle_frame(&mut self, frame: FromWorker) -> Result<(), Violation> {
        match frame {
            FromWorker::Ready => {
                let ready = self.ready.take().ok_or_else(|| Violation("a second Ready".to_owned()))?;
                self.became_ready = true;
                let _ = ready.send(Ok(()));
            }
            FromWorker::StartFailed(error) => {
                let ready =
                    self.ready.take().ok_or_else(|| Violation("StartFailed after Ready".to_owned()))?;
                tracing::warn!(room = %self.spec.room, pid = self.pid, "room script failed to start: {}", error.message);
                let _ = ready.send(Err(RoomError::Script(error)));
            }
            FromWorker::Reply { id, result } => {
                let call = self
                    .in_flight
                    .remove(&id)
                    .ok_or_else(|| Violation(format!("a reply to unknown call {id}")))?;
                if let Err(error) = &result {
                    tracing::debug!(room = %self.spec.room, pid = self.pid, "call {id} failed: {}", error.message);
                }
                // A caller that timed out is gone; its late answer is dropped.
                let _ = call.reply.send(result.map_err(RoomError::Script));
            }
            FromWorker::HostCall { id, name, args } => {
                let result = self.host_call(&name, &args);
                let _ = self.send(ToWorker::HostReply { id, result }).await;
            }
            FromWorker::Post { channel, data } => {
                let raw = RawValue::from_string(data)
                    .map_err(|e| Violation(format!("a post whose data is not JSON: {e}")))?;
                if RoomId::from_topic(&channel).is_ok() {
                    let frame = phoenix::push(None, &channel, "new_message", &*raw);
                    self.pubsub.broadcast(&channel, &frame);
                }
                let message = ChannelMessage { channel: channel.into(), data: raw.get().into() };
                self.pubsub.deliver_to_runtimes(&message, self.spec.runtime);
            }
            FromWorker::Subscribe { channel } => {
                self.pubsub.subscribe_runtime(&channel, self.spec.runtime, self.inbox_tx.clone());
                self.channels.insert(channel);
            }
            FromWorker::Unsubscribe { channel } => {
                self.pubsub.unsubscribe_runtime(&channel, self.spec.runtime);
                self.channels.remove(&channel);
            }
            FromWorker::Log { level, message } => {
                let (room, pid) = (&self.spec.room, self.pid);
                match level {
                    LogLevel::Debug => tracing::debug!(room = %room, pid, "js: {message}"),
                    LogLevel::Info => tracing::info!(room = %room, pid, "js: {message}"),
                    LogLevel::Warn => tracing::warn!(room = %room, pid, "js: {message}"),
                    LogLevel::Error => tracing::error!(room = %room, pid, "js: {message}"),
                }
            }
        }
        Ok(())
    }

    /// The host handlers a script reaches through `Beam.call` / `Beam.callSync`.
    fn host_call(&self, name: &str, args_json: &str) -> Result<String, String> {
        match name {
            "broadcast" => {
                let args: Vec<Box<RawValue>> =
                    serde_json::from_str(args_json).map_err(|e| format!("broadcast: bad arguments: {e}"))?;
                let message = args.first().ok_or("broadcast needs a message to send")?;
                let topic = self.spec.room.topic();
                let frame = phoenix::push(None, &topic, "new_message", &**message);
                self.pubsub.broadcast(&topic, &frame);
                Ok("null".to_owned())
            }
            other => Err(format!("no host handler named \"{other}\"")),
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The worker's stderr carries its own diagnostics (not the script's console, which comes as
/// frames); each line is logged under the room and pid.
async fn forward_stderr(room: RoomId, pid: u32, stderr: tokio::process::ChildStderr) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::warn!(room = %room, pid, "worker stderr: {line}");
    }
}

pub fn epoch_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_ids_follow_the_design_pattern() {
        assert!(RoomId::parse("general").is_ok());
        assert!(RoomId::parse("a-b_C9").is_ok());
        assert!(RoomId::parse(&"x".repeat(64)).is_ok());
        for bad in ["", &"x".repeat(65), "../x", "a b", "é", "a\0b", "room:a"] {
            assert!(RoomId::parse(bad).is_err(), "accepted {bad:?}");
        }
        assert_eq!(RoomId::from_topic("room:general").unwrap().as_str(), "general");
        assert!(RoomId::from_topic("lobby:general").is_err());
    }
}
