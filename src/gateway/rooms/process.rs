//! The actor that owns one room's worker process.
//!
//! Once `launcher.rs` has spawned the child, the actor is the only code that touches it: it
//! hands calls to the worker (a few at a time, round-robin by socket, through the stdin
//! writer in `stdin.rs`), reads every frame the worker sends, answers host calls, routes
//! BroadcastChannel posts through the PubSub, kills the worker on a protocol violation or
//! when a call stays unanswered past the hard limit, and always reaps it.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::future::Future;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::StreamExt;
use serde_json::value::RawValue;
use tokio::net::unix::OwnedReadHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, Instant};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::error::RoomError;
use super::fair::FairQueue;
use super::handle::{Call, ExitReason, ExitReport, HandleEnds, ReadySignal, Request, RoomHandle};
use super::launcher::RoomSpec;
use super::reap::WorkerProcess;
use super::stdin::{Refused, Stdin};
use crate::gateway::ids::RoomId;
use crate::gateway::phoenix::{self, NEW_MESSAGE};
use crate::gateway::pubsub::{ChannelMessage, PubSub};
use crate::gateway::storage::{next_epoch, Batch, Reply, StorageError};
use crate::util::LockExt;
use crate::wire::{FromWorker, GatewayCodec, LogLevel, StorageInit, ToWorker, WorkerStats};

/// BroadcastChannel messages queued for one runtime before further ones are dropped.
const DELIVERY_QUEUE: usize = 1024;
/// Calls handed to the worker before it answers: enough that a call waiting on a timer or a
/// host call does not hold up the others, few enough that the rest wait where a call whose
/// caller gave up can still be dropped.
const CALLS_AT_THE_WORKER: usize = 8;
/// One socket may hold this fraction of a room's queue: sixteen flooding sockets are needed
/// to fill it.
const SHARES_OF_THE_QUEUE: usize = 16;
/// Heap readings asked of a worker and not yet answered; more are not asked.
const MAX_STATS_WAITING: usize = 4;
/// Frames (commits among them) a durable room's output gate holds before the worker's
/// output is left unread.
const MAX_HELD: usize = 4096;
/// A durable room's entries go to its new worker in frames of at most this many bytes.
const RESTORE_CHUNK_BYTES: u64 = 1024 * 1024;

/// Builds the actor for a worker just spawned. The returned future is the actor: it must be
/// polled (spawned) for the room to work, and resolves once the worker is gone and reaped.
pub(super) fn start(
    spec: RoomSpec,
    child: WorkerProcess,
    channel: UnixStream,
    pubsub: Arc<PubSub>,
) -> std::io::Result<(RoomHandle, ReadySignal, impl Future<Output = ExitReport> + Send)> {
    let (from_worker, to_worker) = channel.into_split();
    let pid = child.pid();

    let durable = spec.storage.is_some();
    let (handle, HandleEnds { commands, kill, calls, stored_bytes }) = RoomHandle::new(
        spec.room.clone(),
        spec.runtime,
        pid,
        spec.call_timeout,
        spec.max_queued_calls,
        durable,
    );
    let (inbox_tx, inbox) = mpsc::channel(DELIVERY_QUEUE);
    let (ready_tx, ready) = oneshot::channel();
    let max_frame = usize::try_from(spec.limits.max_frame_bytes).unwrap_or(usize::MAX);
    let actor = Actor {
        stdin: Stdin::spawn(to_worker, max_frame, spec.hard_timeout),
        reader: FramedRead::new(from_worker, GatewayCodec::new(max_frame)),
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
        abandoned: 0,
        last_answer_at: Instant::now(),
        waiting: FairQueue::new((spec.max_queued_calls / SHARES_OF_THE_QUEUE).max(1)),
        draining: false,
        stats_waiting: VecDeque::new(),
        gate: VecDeque::new(),
        stored_bytes,
        topic: spec.room.topic(),
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
    /// The room's topic, where its pushes and broadcasts go.
    topic: String,
    child: WorkerProcess,
    pid: u32,
    stdin: Stdin,
    reader: FramedRead<OwnedReadHalf, GatewayCodec>,
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
    /// Calls dropped unrun because their callers had gone.
    abandoned: u64,
    /// When the worker last answered a call: the earliest it can have started the next.
    last_answer_at: Instant,
    /// Calls not yet handed to the worker.
    waiting: FairQueue<Call>,
    /// Shutdown was asked for: no more calls are taken.
    draining: bool,
    /// Operators waiting for the worker's figures, in the order asked.
    stats_waiting: VecDeque<oneshot::Sender<WorkerStats>>,
    /// The output gate of a durable room: the worker's frames after a `Writes`, held (in
    /// order) until those writes are durable. Empty for a transient room.
    gate: VecDeque<Held>,
    /// What the room stores, for `/api/rooms`.
    stored_bytes: Arc<AtomicU64>,
}

/// What the output gate holds.
enum Held {
    /// Writes sent to the store: the frames behind them wait for this answer.
    Commit {
        answer: Reply<()>,
        alarm: Option<Option<u64>>,
        deadline: Instant,
    },
    Frame(FromWorker),
}

/// The answer to the commit at the front of the gate; pending while the front is a frame or
/// the gate is empty.
async fn front_commit(gate: &mut VecDeque<Held>) -> Result<(), StorageError> {
    let Some(Held::Commit { answer, deadline, .. }) = gate.front_mut() else {
        return std::future::pending().await;
    };
    match tokio::time::timeout_at(*deadline, answer).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(StorageError::Failed("the store stopped".to_owned())),
        Err(_) => Err(StorageError::Failed("the store did not answer in time".to_owned())),
    }
}

/// A frame from the worker that breaks the protocol; the worker is killed for it.
struct Violation(String);

impl Actor {
    async fn run(mut self) -> ExitReport {
        let room = self.spec.room.clone();
        tracing::info!(room = %room, pid = self.pid, runtime = %self.spec.runtime, "room worker started");
        let reason = match self.start_worker().await {
            Ok(()) => self.event_loop().await,
            Err(reason) => reason,
        };
        // Writes already with the store still count: what they held back goes out if they
        // are stored, and is failed if not.
        if !matches!(reason, ExitReason::StorageFailed(_)) {
            self.settle_gate_after_exit().await;
        }
        let unanswered = match reason {
            ExitReason::StorageFailed(_) => RoomError::StorageUnavailable,
            _ => RoomError::WorkerExited,
        };
        let still_running = !matches!(reason, ExitReason::Exited(_) | ExitReason::Requested);
        if still_running {
            self.child.kill();
        }
        // Always reap, so that no exit leaves a zombie behind.
        let status = self.child.wait().await;
        let reason = match (reason, status) {
            (ExitReason::Exited(_), Ok(status)) => ExitReason::Exited(status),
            (reason, _) => reason,
        };
        let was_ready = self.became_ready;
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(Err(unanswered.clone()));
        }
        for (_, call) in std::mem::take(&mut self.in_flight) {
            let _ = call.reply.send(Err(unanswered.clone()));
        }
        for call in self.waiting.drain() {
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

    /// Sends the worker its room: `Start`, and a durable room's entries after it.
    async fn start_worker(&mut self) -> Result<(), ExitReason> {
        let room = self.spec.room.clone();
        let mut restore = Vec::new();
        let (epoch, storage) = match &self.spec.storage {
            None => (next_epoch(0), None),
            Some(storage) => {
                let loaded =
                    match tokio::time::timeout(self.spec.hard_timeout, storage.store.load(&room)).await {
                        Ok(Ok(loaded)) => loaded,
                        Ok(Err(_)) => Err(StorageError::Failed("the store stopped".to_owned())),
                        Err(_) => Err(StorageError::Failed("the store did not answer in time".to_owned())),
                    };
                let data = loaded.map_err(|e| {
                    tracing::error!(room = %room, "cannot load the room's storage: {e}");
                    ExitReason::StorageFailed(e.to_string())
                })?;
                let stored: usize = data.entries.iter().map(|(k, v)| k.len() + v.len()).sum();
                self.stored_bytes.store(stored as u64, Ordering::Relaxed);
                let chunk_bytes =
                    (self.spec.limits.max_frame_bytes / 2).clamp(1024, RESTORE_CHUNK_BYTES) as usize;
                restore = chunks(data.entries, chunk_bytes);
                let init = StorageInit {
                    alarm_at: data.alarm_at,
                    max_bytes: storage.room_max_bytes,
                    chunks: u32::try_from(restore.len()).unwrap_or(u32::MAX),
                };
                (data.epoch, Some(init))
            }
        };
        let start = ToWorker::Start {
            room_id: room.as_str().to_owned(),
            kind: room.kind().to_owned(),
            script_name: self.spec.script_name.clone(),
            script: std::mem::take(&mut self.spec.script),
            settings: std::mem::take(&mut self.spec.settings),
            epoch,
            storage,
        };
        self.send(start)?;
        for entries in restore {
            self.send(ToWorker::Restore { entries })?;
        }
        Ok(())
    }

    async fn event_loop(&mut self) -> ExitReason {
        loop {
            if let Err(reason) = self.dispatch() {
                return reason;
            }
            // Until it is ready, the start-up itself is bounded by the hard limit. After that
            // the oldest unanswered call is, counted from when the worker could have started
            // it: calls queued behind others (the worker answers them in order) do not count
            // their wait, so a worker that keeps answering is never taken for a hung one.
            let waiting_since = if self.ready.is_some() {
                Some(self.spawned_at)
            } else {
                self.in_flight.first_key_value().map(|(_, call)| call.sent_at.max(self.last_answer_at))
            };
            let unresponsive_at = waiting_since.map(|since| since + self.spec.hard_timeout);
            let stalled = self.stdin.stalled().clone();
            // Biased: the gateway's own deadlines first, so a worker flooding frames cannot
            // starve them; then the worker's frames before its exit, so its last words (a
            // StartFailed, a Reply) are never lost to a race with the exit.
            tokio::select! {
                biased;
                () = self.kill.cancelled() => return ExitReason::Killed("asked to stop"),
                () = sleep_until_opt(unresponsive_at) => return ExitReason::Unresponsive,
                () = stalled.cancelled() => return ExitReason::Unresponsive,
                committed = front_commit(&mut self.gate) => {
                    if let Err(e) = committed {
                        return self.storage_failed(e);
                    }
                    if let Err(Violation(why)) = self.open_gate() {
                        return ExitReason::ProtocolViolation(why);
                    }
                }
                // A gate this full means the store is slower than the room writes: reading
                // stops, the pipe fills, and the worker waits, rather than memory growing.
                frame = self.reader.next(), if self.gate.len() < MAX_HELD => match frame {
                    Some(Ok(frame)) => {
                        if let Err(Violation(why)) = self.on_frame(frame) {
                            return ExitReason::ProtocolViolation(why);
                        }
                    }
                    Some(Err(e)) => return ExitReason::ProtocolViolation(e.to_string()),
                    // End of file: the worker closed its end, which it does by exiting.
                    None => return self.await_exit().await,
                },
                // Calls wait here, a share per socket, and go to the worker a few at a time
                // and round-robin by socket (see `dispatch`).
                command = self.commands.recv(), if !self.draining && self.waiting.len() < self.spec.max_queued_calls => match command {
                    Some(Request::Call(call)) => {
                        if let Err(call) = self.waiting.push(call.caller, call) {
                            let _ = call.reply.send(Err(RoomError::Busy));
                        }
                    }
                    // Every handle is gone (the registry dropped this room) or shutdown was
                    // asked for: once the calls before it are handed over, closing stdin lets
                    // the worker drain and exit.
                    Some(Request::Stats(reply)) => {
                        // A few at a time: an operator's page, not a flood.
                        if self.stats_waiting.len() < MAX_STATS_WAITING && self.send(ToWorker::Stats).is_ok() {
                            self.stats_waiting.push_back(reply);
                        }
                    }
                    Some(Request::Shutdown) | None => self.draining = true,
                },
                Some(message) = self.inbox.recv() => {
                    let deliver = ToWorker::Deliver {
                        channel: message.channel.to_string(),
                        data: message.data.to_string(),
                    };
                    if !self.stdin.offer(deliver) {
                        tracing::warn!(room = %self.spec.room, channel = %message.channel, "BroadcastChannel message dropped: the worker is not reading");
                    }
                }
            }
        }
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

    /// Hands waiting calls to the worker while fewer than [`CALLS_AT_THE_WORKER`] are there,
    /// dropping those whose callers have gone; once draining and nothing waits, tells the
    /// worker to finish.
    fn dispatch(&mut self) -> Result<(), ExitReason> {
        while self.in_flight.len() < CALLS_AT_THE_WORKER {
            let Some(call) = self.waiting.pop() else { break };
            if call.reply.is_closed() {
                self.abandoned += 1;
                tracing::debug!(room = %self.spec.room, dropped = self.abandoned, "dropped a call whose caller is gone");
                continue;
            }
            let id = self.next_call_id;
            self.next_call_id += 1;
            self.calls.fetch_add(1, Ordering::Relaxed);
            self.in_flight.insert(id, InFlight { reply: call.reply, sent_at: Instant::now() });
            self.send(ToWorker::Call { id, function: call.function, args: call.args })?;
        }
        if self.draining && !self.shutting_down && self.waiting.len() == 0 {
            self.shutting_down = true;
            let _ = self.send(ToWorker::Shutdown);
            self.stdin.close();
        }
        Ok(())
    }

    /// Queues a frame for the worker's stdin; a worker that has left a thousand frames
    /// unread is not reading at all.
    fn send(&self, frame: ToWorker) -> Result<(), ExitReason> {
        self.stdin.send(frame).map_err(|Refused::Full| ExitReason::Unresponsive)
    }

    /// A frame from the worker, through the output gate: behind writes not yet durable, it
    /// waits. Log lines and operators' figures are not effects of a turn, and never wait.
    fn on_frame(&mut self, frame: FromWorker) -> Result<(), Violation> {
        match frame {
            FromWorker::Writes { puts, deletes, alarm, stored_bytes } => {
                let Some(storage) = &self.spec.storage else {
                    return Err(Violation("storage writes from a transient room".to_owned()));
                };
                self.stored_bytes.store(stored_bytes, Ordering::Relaxed);
                let answer = storage.store.commit(&self.spec.room, Batch { puts, deletes, alarm });
                let deadline = Instant::now() + self.spec.hard_timeout;
                self.gate.push_back(Held::Commit { answer, alarm, deadline });
                Ok(())
            }
            frame @ (FromWorker::Log { .. } | FromWorker::Stats(_)) => self.handle_frame(frame),
            frame if self.gate.is_empty() => self.handle_frame(frame),
            frame => {
                self.gate.push_back(Held::Frame(frame));
                Ok(())
            }
        }
    }

    /// The commit at the front of the gate is durable: its alarm goes on the schedule, and
    /// the frames behind it go out, up to the next commit.
    fn open_gate(&mut self) -> Result<(), Violation> {
        if let Some(Held::Commit { alarm: Some(alarm), .. }) = self.gate.pop_front() {
            if let Some(storage) = &self.spec.storage {
                storage.alarms.set(&self.spec.room, alarm);
            }
        }
        while let Some(Held::Frame(_)) = self.gate.front() {
            if let Some(Held::Frame(frame)) = self.gate.pop_front() {
                self.handle_frame(frame)?;
            }
        }
        Ok(())
    }

    /// The store refused the room's writes: nothing they caused goes out, the calls that made
    /// them hear `storage unavailable`, and the worker is ended (its memory holds what the
    /// store does not).
    fn storage_failed(&mut self, error: StorageError) -> ExitReason {
        tracing::error!(room = %self.spec.room, pid = self.pid, "{error}; ending the worker, the room restarts from what is stored");
        ::metrics::counter!(crate::gateway::metrics::STORAGE_FAILURES).increment(1);
        for held in std::mem::take(&mut self.gate) {
            if let Held::Frame(FromWorker::Reply { id, .. }) = held {
                if let Some(call) = self.in_flight.remove(&id) {
                    let _ = call.reply.send(Err(RoomError::StorageUnavailable));
                }
            }
        }
        ExitReason::StorageFailed(error.to_string())
    }

    /// After the worker is gone: waits for the commits already with the store, lets out what
    /// each held back once it is durable, and fails the rest if one is not.
    async fn settle_gate_after_exit(&mut self) {
        while !self.gate.is_empty() {
            if let Some(Held::Frame(_)) = self.gate.front() {
                if let Some(Held::Frame(frame)) = self.gate.pop_front() {
                    let _ = self.handle_frame(frame);
                }
                continue;
            }
            match front_commit(&mut self.gate).await {
                Ok(()) => {
                    let _ = self.open_gate();
                }
                Err(e) => {
                    self.storage_failed(e);
                    return;
                }
            }
        }
    }

    fn handle_frame(&mut self, frame: FromWorker) -> Result<(), Violation> {
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
                let _ = ready.send(Err(RoomError::StartFailed(error)));
            }
            FromWorker::Reply { id, result } => {
                let call = self
                    .in_flight
                    .remove(&id)
                    .ok_or_else(|| Violation(format!("a reply to unknown call {id}")))?;
                self.last_answer_at = Instant::now();
                if let Err(error) = &result {
                    tracing::debug!(room = %self.spec.room, pid = self.pid, "call {id} failed: {}", error.message);
                }
                // A caller that timed out is gone; its late answer is dropped.
                let _ = call.reply.send(result.map_err(RoomError::Script));
            }
            FromWorker::HostCall { id, name, args } => {
                let result = self.host_call(&name, &args);
                self.send(ToWorker::HostReply { id, result })
                    .map_err(|_| Violation("it does not read its input".to_owned()))?;
            }
            FromWorker::Post { channel, data } => {
                let raw = RawValue::from_string(data)
                    .map_err(|e| Violation(format!("a post whose data is not JSON: {e}")))?;
                if RoomId::from_topic(&channel).is_ok() {
                    let frame = phoenix::push(None, &channel, NEW_MESSAGE, &*raw);
                    self.pubsub.broadcast(&channel, &frame);
                }
                let message = ChannelMessage { channel: channel.into(), data: raw.get().into() };
                self.pubsub.deliver_to_runtimes(&message, self.spec.runtime);
            }
            FromWorker::Push { conn, event, payload } => {
                let payload = RawValue::from_string(payload)
                    .map_err(|e| Violation(format!("a push whose payload is not JSON: {e}")))?;
                self.pubsub.push(&self.topic, &conn, &event, &payload);
            }
            FromWorker::Broadcast { event, payload, except } => {
                let payload = RawValue::from_string(payload)
                    .map_err(|e| Violation(format!("a broadcast whose payload is not JSON: {e}")))?;
                // Encoded once for every join, as Phoenix's fastlane does.
                let frame = phoenix::push(None, &self.topic, &event, &*payload);
                self.pubsub.broadcast_except(&self.topic, &frame, &except);
            }
            FromWorker::Track { conn, key, meta } => match serde_json::from_str(&meta) {
                Ok(meta) => self.pubsub.presence_track(&self.topic, &conn, key, meta),
                Err(e) => return Err(Violation(format!("a presence meta that is not a JSON object: {e}"))),
            },
            FromWorker::Untrack { conn } => self.pubsub.presence_untrack(&self.topic, &conn),
            FromWorker::Subscribe { channel } => {
                self.pubsub.subscribe_runtime(&channel, self.spec.runtime, self.inbox_tx.clone());
                self.channels.insert(channel);
            }
            FromWorker::Unsubscribe { channel } => {
                self.pubsub.unsubscribe_runtime(&channel, self.spec.runtime);
                self.channels.remove(&channel);
            }
            FromWorker::Stats(stats) => {
                let waiting =
                    self.stats_waiting.pop_front().ok_or_else(|| Violation("unasked stats".to_owned()))?;
                let _ = waiting.send(stats);
            }
            FromWorker::Writes { .. } => return Err(Violation("writes past the output gate".to_owned())),
            FromWorker::Log { level, message } => {
                self.spec.console.lock_or_recover().push(self.pid, level, &message);
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
                let frame = phoenix::push(None, &self.topic, NEW_MESSAGE, &**message);
                self.pubsub.broadcast(&self.topic, &frame);
                Ok("null".to_owned())
            }
            // `Room.presence.list()`.
            "presence_list" => Ok(self.pubsub.presence_list(&self.topic).to_string()),
            other => Err(format!("no host handler named \"{other}\"")),
        }
    }
}

/// Splits a room's entries into `Restore` frames of about `max_bytes` each.
fn chunks(entries: Vec<(String, String)>, max_bytes: usize) -> Vec<Vec<(String, String)>> {
    let mut chunks = Vec::new();
    let (mut chunk, mut bytes) = (Vec::new(), 0);
    for (key, value) in entries {
        let size = key.len() + value.len() + 16;
        if bytes + size > max_bytes && !chunk.is_empty() {
            chunks.push(std::mem::take(&mut chunk));
            bytes = 0;
        }
        bytes += size;
        chunk.push((key, value));
    }
    if !chunk.is_empty() {
        chunks.push(chunk);
    }
    chunks
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
