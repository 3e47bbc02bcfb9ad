//! The cluster's store (design §10): durable rooms keep their data in NATS JetStream, so a
//! room that moves to another node (its owner died, or gave it up) comes back there with it.
//!
//! What is stored where:
//! - Each room is a short journal on a subject of its own in the stream [`STREAM`],
//!   `roomvisor.storage.<kind>.<id>`: a snapshot of the room's whole state, then one record per
//!   committed turn (its puts, deletes and alarm) and one per run started (its epoch). A turn's
//!   writes are one message, so they are stored whole or not at all, and a commit costs what
//!   the turn wrote, not what the room holds (a chat room of 1,000 messages writes one message
//!   per message, not all 1,000). Once the records after the snapshot outweigh it, the next
//!   write is a new snapshot with `Nats-Rollup: sub`, which drops everything before it: a load
//!   reads about twice what the room holds at most. A room's whole state must fit in one NATS
//!   message (the server's `max_payload`); a write that would make it larger fails as "full".
//! - Every write names the sequence of the room's last message as this node knows it
//!   (`Nats-Expected-Last-Subject-Sequence`), and a load that finds data writes too (a
//!   snapshot, or an epoch record). So once a room has started on a new node, a node that still
//!   runs it (its lease ran out, but it has not noticed yet) fails its next write instead of
//!   overwriting the new owner's: its run ends, and the calls behind the write hear "storage
//!   unavailable", as after any failed write.
//! - Alarms are indexed in the key-value bucket [`ALARMS_BUCKET`] (room → due time) beside the
//!   journal, which holds the truth. Every node watches the bucket and schedules every alarm:
//!   the node whose room set it on time, the others a lease later (by then the room's node has
//!   run and deleted it, unless that node died, and then its lease is gone and the room can
//!   start elsewhere). A call for an alarm goes to the room where it runs (or starts it), and
//!   the worker runs `onAlarm()` only while the alarm it was called for is still set, so it
//!   runs once however many nodes call. A room's load puts the index right if a crash between
//!   the two writes left it wrong.
//!
//! Requests of one room run one at a time, in the order made (each waits for the one before);
//! different rooms' run side by side. Until the stream is open (NATS unreachable at start, or
//! without JetStream), requests fail at once with "not connected" instead of waiting.
//!
//! Durability is the server's: an acknowledged write is in the stream leader's file store and,
//! with `--cluster-replicas` above 1, on a quorum of replicas. nats-server writes its files
//! through the page cache and syncs them every `sync_interval` (2 minutes by default;
//! `jetstream { sync_interval: always }` syncs every write): a killed nats-server loses nothing
//! acknowledged, a power cut of a single server can lose what it had not synced yet.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream::consumer::{push, DeliverPolicy, ReplayPolicy};
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, LastRawMessageErrorKind};
use async_nats::jetstream::{self, kv, ErrorCode};
use futures_util::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::oneshot::error::TryRecvError;
use tokio::sync::{oneshot, watch};

use super::{next_epoch, Alarms, Batch, Reply, RoomData, StorageError, Store, StoredRoom};
use crate::gateway::ids::RoomId;
use crate::util::LockExt;

/// The stream that holds every room's journal, one subject per room.
pub const STREAM: &str = "ROOMVISOR_STORAGE";
/// A room's subject is this and its [`storage_key`].
const SUBJECT_PREFIX: &str = "roomvisor.storage.";
/// The index of alarms: room ([`storage_key`]) → due time in ms since the Unix epoch.
pub const ALARMS_BUCKET: &str = "roomvisor-alarms";
/// Each NATS request gives up after this long: a lost connection is an error, not a hang.
const NATS_TIMEOUT: Duration = Duration::from_secs(5);
/// A request made while the connection is up but the stream is still being opened waits this
/// long for it (the gateway's first seconds), then fails.
const OPEN_WAIT: Duration = Duration::from_secs(2);
/// Reading the alarms at start-up waits longer: nothing else waits on it.
const ALARMS_WAIT: Duration = Duration::from_secs(10);
/// How often a store that is not open tries again.
const REOPEN_EVERY: Duration = Duration::from_millis(500);
/// The records after a snapshot may take this much before a snapshot replaces them, however
/// small the room: snapshots of tiny rooms on every write would cost more than they save.
const COMPACT_MIN_BYTES: usize = 64 * 1024;
/// Room left in a message for its headers (the expected sequence, the rollup).
const HEADER_ROOM: usize = 1024;
/// What a NATS server takes by default, when its own figure is not known.
const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;
/// A room's cached state is dropped after this long unused (its next write reads it back).
const EVICT_AFTER: Duration = Duration::from_secs(120);
const EVICT_EVERY: Duration = Duration::from_secs(30);
/// Rooms read at once by `rooms()` and `alarms()`.
const READS_AT_ONCE: usize = 16;

/// A room's name in the store: `kind.id`. It is a valid key-value key and subject tail (kinds
/// and ids are made of `[A-Za-z0-9_-]` only, so the one dot cannot be ambiguous), and keeps
/// rooms of one kind under one subject prefix.
pub fn storage_key(room: &RoomId) -> String {
    format!("{}.{}", room.kind(), room.as_str())
}

/// The room a [`storage_key`] names; `None` for anything else.
pub fn room_of_key(key: &str) -> Option<RoomId> {
    let (kind, id) = key.split_once('.')?;
    RoomId::in_kind(kind, id).ok()
}

fn subject_of(key: &str) -> String {
    format!("{SUBJECT_PREFIX}{key}")
}

/// One message of a room's journal, as JSON. Stored values are JSON already and go in as they
/// are (not as escaped strings), so a record is readable with `nats stream get` and no larger
/// than what it holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Record {
    /// The room's whole state; written with `Nats-Rollup: sub`, so it is the subject's first.
    Snapshot { epoch: u64, alarm_at: Option<u64>, entries: BTreeMap<String, Box<RawValue>> },
    /// One turn's writes: puts first, then deletes, as the SQLite store applies them.
    Writes {
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        puts: Vec<(String, Box<RawValue>)>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        deletes: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        alarm: Option<AlarmChange>,
    },
    /// A run of the room started with this epoch.
    Epoch { epoch: u64 },
}

/// [`Record::Snapshot`] borrowing the state, so writing one copies nothing.
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum SnapshotRef<'a> {
    Snapshot { epoch: u64, alarm_at: Option<u64>, entries: &'a BTreeMap<String, Box<RawValue>> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum AlarmChange {
    Set(u64),
    Deleted,
}

/// A room's state as its journal builds it.
#[derive(Debug, Default)]
struct RoomState {
    /// The epoch of the last run stored.
    epoch: u64,
    alarm_at: Option<u64>,
    entries: BTreeMap<String, Box<RawValue>>,
    /// What `entries` take in a snapshot, kept as they change: whether the next write still
    /// fits in a message is known without writing the snapshot out.
    entries_bytes: usize,
}

/// A snapshot's bytes besides its entries: `{"snapshot":{"epoch":…,"alarm_at":…,"entries":{}}}`
/// with both numbers at their longest.
const SNAPSHOT_OVERHEAD: usize = 128;

/// What one entry takes in a snapshot's `entries` object: the key as a JSON string, a colon,
/// the value, a comma.
fn entry_bytes(key: &str, value: &RawValue) -> usize {
    let key_bytes = serde_json::to_string(key).map(|k| k.len()).unwrap_or(key.len() * 6 + 2);
    key_bytes + value.get().len() + 2
}

impl RoomState {
    fn apply(&mut self, record: Record) {
        match record {
            Record::Snapshot { epoch, alarm_at, entries } => {
                let entries_bytes = entries.iter().map(|(k, v)| entry_bytes(k, v)).sum();
                *self = RoomState { epoch, alarm_at, entries, entries_bytes };
            }
            Record::Writes { puts, deletes, alarm } => {
                for (key, value) in puts {
                    self.entries_bytes += entry_bytes(&key, &value);
                    if let Some(old) = self.entries.insert(key.clone(), value) {
                        self.entries_bytes = self.entries_bytes.saturating_sub(entry_bytes(&key, &old));
                    }
                }
                for key in deletes {
                    if let Some(old) = self.entries.remove(&key) {
                        self.entries_bytes = self.entries_bytes.saturating_sub(entry_bytes(&key, &old));
                    }
                }
                match alarm {
                    Some(AlarmChange::Set(at)) => self.alarm_at = Some(at),
                    Some(AlarmChange::Deleted) => self.alarm_at = None,
                    None => {}
                }
            }
            Record::Epoch { epoch } => self.epoch = self.epoch.max(epoch),
        }
    }

    /// At least the length of [`RoomState::snapshot`]'s bytes.
    fn snapshot_estimate(&self) -> usize {
        self.entries_bytes + SNAPSHOT_OVERHEAD
    }

    fn snapshot(&self) -> Result<Vec<u8>, StorageError> {
        let record =
            SnapshotRef::Snapshot { epoch: self.epoch, alarm_at: self.alarm_at, entries: &self.entries };
        serde_json::to_vec(&record)
            .map_err(|e| StorageError::Failed(format!("cannot encode a snapshot: {e}")))
    }

    /// Nothing worth keeping: the room's journal can go (its epoch with it, as the SQLite
    /// store forgets an empty room's row; the clock keeps the next epoch larger anyway).
    fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.alarm_at.is_none()
    }

    fn data(&self, epoch: u64) -> RoomData {
        RoomData {
            epoch,
            alarm_at: self.alarm_at,
            entries: self.entries.iter().map(|(k, v)| (k.clone(), v.get().to_owned())).collect(),
        }
    }
}

fn encode(record: &Record) -> Result<Vec<u8>, StorageError> {
    serde_json::to_vec(record).map_err(|e| StorageError::Failed(format!("cannot encode a record: {e}")))
}

fn decode(payload: &[u8]) -> Result<Record, StorageError> {
    serde_json::from_slice(payload).map_err(|e| {
        StorageError::Failed(format!("the room's journal holds a record this gateway cannot read: {e}"))
    })
}

/// A room as read back from its journal.
#[derive(Debug, Default)]
struct Loaded {
    state: RoomState,
    /// The sequence of the subject's last message (0: the room has none): every write expects it.
    seq: u64,
    /// Bytes of the subject's snapshot (0: it has none).
    snapshot_bytes: usize,
    /// Bytes of the records after the snapshot (all of them, without one).
    journal_bytes: usize,
}

impl Loaded {
    fn apply(&mut self, record: Record, seq: u64, bytes: usize) {
        if matches!(record, Record::Snapshot { .. }) {
            (self.snapshot_bytes, self.journal_bytes) = (bytes, 0);
        } else {
            self.journal_bytes += bytes;
        }
        self.state.apply(record);
        self.seq = seq;
    }

    /// Whether a write of `bytes` should be a snapshot instead: once the records after the
    /// snapshot would outweigh it, so a load reads at most about twice the room, and a room
    /// that only grows writes each byte about three times in all (once in its record, twice
    /// in snapshots as they double).
    fn compacts(&self, bytes: usize) -> bool {
        self.journal_bytes + bytes > self.snapshot_bytes.max(COMPACT_MIN_BYTES)
    }

    /// Appends `payload` (or, when [`Loaded::compacts`] or `compact` says so, a snapshot of
    /// the state, which must already include it) and keeps the books.
    async fn write(
        &mut self,
        inner: &Inner,
        opened: &Opened,
        key: &str,
        payload: Vec<u8>,
        compact: bool,
    ) -> Result<(), StorageError> {
        let compact = (compact || self.compacts(payload.len()))
            && self.state.snapshot_estimate() <= snapshot_limit(opened);
        let payload = if compact { self.state.snapshot()? } else { payload };
        let written = payload.len();
        self.seq = inner.append(opened, key, payload, self.seq, compact).await?;
        if compact {
            (self.snapshot_bytes, self.journal_bytes) = (written, 0);
        } else {
            self.journal_bytes += written;
        }
        Ok(())
    }
}

/// What this node knows of a room between its requests.
#[derive(Debug, Default)]
enum Cached {
    /// Not loaded here (or loading failed): only a load can follow.
    #[default]
    Unknown,
    Loaded(Box<Loaded>),
    /// Loaded, then dropped while unused; the next write reads it back and checks that
    /// nobody wrote meanwhile.
    Evicted {
        seq: u64,
    },
    /// A write of this run failed, or a request was lost half-way: whether it reached the
    /// stream is not known, so nothing more is written for this run. The room restarts and
    /// loads what is there.
    Failed,
}

struct Slot {
    /// Done when the room's latest request is: the next one waits for it.
    tail: Option<oneshot::Receiver<()>>,
    /// Taken by the request that runs (which leaves [`Cached::Failed`] until it puts it back).
    cached: Cached,
    used: Instant,
}

/// The stream, the bucket and the server's limit, once open.
#[derive(Clone)]
struct Opened {
    jetstream: jetstream::Context,
    stream: stream::Stream,
    alarms: kv::Store,
    /// The largest message the server takes: a room's snapshot must fit in one.
    max_payload: usize,
}

pub struct JetStreamStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    url: String,
    replicas: usize,
    /// `--room-storage-bytes`, only to warn when the server's message limit is lower.
    room_max_bytes: u64,
    /// The schedule every node keeps of every room's alarm, fed by the bucket's watch.
    alarms: Alarms,
    /// How long after an alarm set on another node this node fires it: the cluster's lease.
    grace: Duration,
    opened: watch::Sender<Option<Opened>>,
    /// Why opening failed last, for the "not connected" answer.
    open_error: Mutex<Option<String>>,
    rooms: Mutex<HashMap<String, Slot>>,
}

impl JetStreamStore {
    /// A store over the cluster's NATS connection; returns at once, even while NATS is
    /// unreachable. Opens (creating if needed) the stream and the alarm bucket, with
    /// `replicas` replicas each, as soon as it can, and watches the alarms into `alarms`,
    /// those of rooms set on other nodes `grace` late (see the module's comment).
    pub fn start(
        client: async_nats::Client,
        url: &str,
        replicas: usize,
        room_max_bytes: u64,
        alarms: Alarms,
        grace: Duration,
    ) -> JetStreamStore {
        let inner = Arc::new(Inner {
            client,
            url: url.to_owned(),
            replicas,
            room_max_bytes,
            alarms,
            grace,
            opened: watch::Sender::new(None),
            open_error: Mutex::new(None),
            rooms: Mutex::new(HashMap::new()),
        });
        // The background work holds the store weakly, and ends once it is dropped.
        tokio::spawn(keep_open(Arc::downgrade(&inner)));
        tokio::spawn(watch_alarms(Arc::downgrade(&inner)));
        tokio::spawn(evict_idle(Arc::downgrade(&inner)));
        JetStreamStore { inner }
    }

    /// Runs `work` on the room after every request made for it before, with what this node
    /// knows of the room; `work` hands back what it knows after.
    fn in_order<T, F, Fut>(&self, room: &RoomId, work: F) -> Reply<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>, String, Cached) -> Fut + Send + 'static,
        Fut: Future<Output = (Result<T, StorageError>, Cached)> + Send + 'static,
    {
        let key = storage_key(room);
        let (reply, answer) = oneshot::channel();
        let (done, done_here) = oneshot::channel::<()>();
        // Taken now, not in the task: the order is the order of the calls, whichever task
        // the runtime happens to start first.
        let before = {
            let mut rooms = self.inner.rooms.lock_or_recover();
            let slot = rooms.entry(key.clone()).or_insert_with(|| Slot {
                tail: None,
                cached: Cached::Unknown,
                used: Instant::now(),
            });
            slot.used = Instant::now();
            slot.tail.replace(done_here)
        };
        let inner = self.inner.clone();
        tokio::spawn(async move {
            if let Some(before) = before {
                // Err: the request before ended without a word (it panicked); go on.
                let _ = before.await;
            }
            let cached = inner.take_cached(&key);
            let (result, cached) = work(inner.clone(), key.clone(), cached).await;
            inner.put_cached(&key, cached);
            drop(done);
            let _ = reply.send(result);
        });
        answer
    }

    /// Drops the cached state of rooms unused for `unused_for` (done every half minute for
    /// two minutes unused): hibernated and moved rooms must not keep their data in this
    /// gateway's memory.
    pub fn evict_unused(&self, unused_for: Duration) {
        self.inner.evict_unused(unused_for);
    }

    /// The store's own request, in no room's order.
    fn spawn<T, Fut>(&self, work: impl FnOnce(Arc<Inner>) -> Fut) -> Reply<T>
    where
        T: Send + 'static,
        Fut: Future<Output = Result<T, StorageError>> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let work = work(self.inner.clone());
        tokio::spawn(async move {
            let _ = reply.send(work.await);
        });
        answer
    }
}

impl Store for JetStreamStore {
    fn load(&self, room: &RoomId) -> Reply<RoomData> {
        let topic = room.topic();
        self.in_order(room, move |inner, key, _| async move {
            match load(&inner, &key).await {
                Ok((data, loaded)) => (Ok(data), Cached::Loaded(loaded)),
                Err(e) => {
                    tracing::warn!(room = %topic, "cannot load the room's storage: {e}");
                    (Err(e), Cached::Unknown)
                }
            }
        })
    }

    fn commit(&self, room: &RoomId, batch: Batch) -> Reply<()> {
        let topic = room.topic();
        self.in_order(room, move |inner, key, cached| async move {
            match commit(&inner, &key, &topic, cached, batch).await {
                Ok(loaded) => (Ok(()), Cached::Loaded(loaded)),
                Err(e) => (Err(e), Cached::Failed),
            }
        })
    }

    fn alarms(&self) -> Reply<Vec<(String, u64)>> {
        self.spawn(|inner| async move { alarms(&inner).await })
    }

    fn rooms(&self, limit: usize) -> Reply<(u64, Vec<StoredRoom>)> {
        self.spawn(move |inner| async move { rooms(&inner, limit).await })
    }

    fn describe(&self) -> String {
        let replicas = self.inner.replicas;
        format!(
            "NATS JetStream at {}: stream {STREAM} (file storage, {replicas} replica{}), alarms in the key-value bucket {ALARMS_BUCKET}",
            self.inner.url,
            if replicas == 1 { "" } else { "s" }
        )
    }

    fn is_ready(&self) -> bool {
        self.inner.connected() && self.inner.opened.borrow().is_some()
    }
}

impl Inner {
    /// Drops the state of rooms unused for `unused_for`, keeping where their journal ended (a
    /// live room's next write reads it back and checks that), and forgets rooms whose run is
    /// over here.
    fn evict_unused(&self, unused_for: Duration) {
        self.rooms.lock_or_recover().retain(|_, slot| {
            // A request still running (or waiting) holds the room's state and its place in line.
            // One that is done leaves nothing to wait for (and a receiver that has answered
            // must not be awaited again).
            match slot.tail.as_mut().map(|tail| tail.try_recv()) {
                Some(Err(TryRecvError::Empty)) => return true,
                Some(_) => slot.tail = None,
                None => {}
            }
            if slot.used.elapsed() < unused_for {
                return true;
            }
            match &slot.cached {
                Cached::Loaded(loaded) => {
                    slot.cached = Cached::Evicted { seq: loaded.seq };
                    true
                }
                Cached::Evicted { .. } => true,
                // Nothing to remember: no load, or a failed run (which ended at its failure).
                Cached::Unknown | Cached::Failed => false,
            }
        });
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    fn not_connected(&self) -> StorageError {
        let why = self.open_error.lock_or_recover().clone();
        let why = why.map(|e| format!(": {e}")).unwrap_or_default();
        StorageError::Failed(format!(
            "not connected to the cluster's storage (NATS JetStream at {}){why}",
            self.url
        ))
    }

    /// The open stream; waits up to `wait` for one being opened, and fails at once while
    /// NATS is unreachable.
    async fn opened(&self, wait: Duration) -> Result<Opened, StorageError> {
        if !self.connected() {
            return Err(self.not_connected());
        }
        let mut opened = self.opened.subscribe();
        let waited =
            tokio::time::timeout(wait, async { opened.wait_for(Option::is_some).await.ok()?.clone() });
        waited.await.ok().flatten().ok_or_else(|| self.not_connected())
    }

    fn take_cached(&self, key: &str) -> Cached {
        match self.rooms.lock_or_recover().get_mut(key) {
            Some(slot) => std::mem::replace(&mut slot.cached, Cached::Failed),
            None => Cached::Unknown,
        }
    }

    fn put_cached(&self, key: &str, cached: Cached) {
        if let Some(slot) = self.rooms.lock_or_recover().get_mut(key) {
            slot.cached = cached;
        }
    }

    /// Appends `payload` to the room's journal if its last message is still `expected`;
    /// returns the new message's sequence.
    async fn append(
        &self,
        opened: &Opened,
        key: &str,
        payload: Vec<u8>,
        expected: u64,
        rollup: bool,
    ) -> Result<u64, StorageError> {
        let mut publish =
            PublishMessage::build().payload(payload.into()).expected_last_subject_sequence(expected);
        if rollup {
            publish = publish.header("Nats-Rollup", "sub");
        }
        let acked = async { opened.jetstream.send_publish(subject_of(key), publish).await?.await }.await;
        match acked {
            Ok(ack) => Ok(ack.sequence),
            Err(e) => {
                if e.kind() == PublishErrorKind::StreamNotFound {
                    // The server lost the stream (it restarted without its store): open it again.
                    self.opened.send_replace(None);
                }
                Err(publish_error(&e))
            }
        }
    }
}

fn publish_error(error: &PublishError) -> StorageError {
    match error.kind() {
        PublishErrorKind::WrongLastSequence => StorageError::Failed(
            "another node wrote the room since this node loaded it (the room moved); this run of it ends"
                .to_owned(),
        ),
        PublishErrorKind::MaxPayloadExceeded => StorageError::Full,
        _ => {
            let source = std::error::Error::source(error);
            let code = source.and_then(|s| s.downcast_ref::<jetstream::Error>()).map(|e| e.error_code());
            if code == Some(ErrorCode::INSUFFICIENT_RESOURCES) {
                return StorageError::Full;
            }
            StorageError::Failed(format!("cannot write to NATS JetStream: {error}"))
        }
    }
}

fn failed(what: &str, error: impl std::fmt::Display) -> StorageError {
    StorageError::Failed(format!("{what}: {error}"))
}

/// The most a room's snapshot may take.
fn snapshot_limit(opened: &Opened) -> usize {
    opened.max_payload.saturating_sub(HEADER_ROOM)
}

/// Reads the room's journal from the stream leader.
async fn read_room(opened: &Opened, key: &str) -> Result<Loaded, StorageError> {
    let subject = subject_of(key);
    let mut loaded = Loaded::default();
    // The common case first, in one request: nothing written since the room last started (a
    // room that wakes from hibernation, say), so its last message is a snapshot, and a
    // snapshot is its subject's only message.
    match opened.stream.get_last_raw_message_by_subject(&subject).await {
        Ok(message) => {
            let record = decode(&message.payload)?;
            if matches!(record, Record::Snapshot { .. }) {
                loaded.apply(record, message.sequence, message.payload.len());
                return Ok(loaded);
            }
        }
        Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => return Ok(loaded),
        Err(e) => return Err(failed("cannot read the room's storage", e)),
    }
    let consumer = opened
        .stream
        .create_consumer(push::OrderedConfig {
            deliver_subject: opened.jetstream.client().new_inbox(),
            description: Some("roomvisor: a room's load".to_owned()),
            filter_subject: subject,
            replay_policy: ReplayPolicy::Instant,
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| failed("cannot read the room's storage", e))?;
    let mut pending = consumer.cached_info().num_pending;
    let mut messages = consumer.messages().await.map_err(|e| failed("cannot read the room's storage", e))?;
    while pending > 0 {
        let message = match tokio::time::timeout(NATS_TIMEOUT, messages.next()).await {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(e))) => return Err(failed("reading the room's storage failed", e)),
            Ok(None) => {
                return Err(StorageError::Failed("reading the room's storage ended early".to_owned()))
            }
            Err(_) => return Err(StorageError::Failed("reading the room's storage timed out".to_owned())),
        };
        let info = message.info().map_err(|e| failed("a journal message without its metadata", e))?;
        let (seq, left) = (info.stream_sequence, info.pending);
        loaded.apply(decode(&message.payload)?, seq, message.payload.len());
        pending = left;
    }
    Ok(loaded)
}

/// Loads the room for a run that starts now: its data and a new epoch. A room with data gets
/// a write now (which also fences off any node still running it): a snapshot if records
/// followed the last one, which also keeps the next load to one read; else an epoch record.
async fn load(inner: &Inner, key: &str) -> Result<(RoomData, Box<Loaded>), StorageError> {
    let opened = inner.opened(OPEN_WAIT).await?;
    let mut loaded = Box::new(read_room(&opened, key).await?);
    let epoch = next_epoch(loaded.state.epoch);
    loaded.state.epoch = epoch;
    if loaded.seq > 0 {
        // Records after the snapshot are compacted now, whatever their weight.
        let compact = loaded.journal_bytes > 0;
        loaded.write(inner, &opened, key, encode(&Record::Epoch { epoch })?, compact).await?;
    }
    reconcile_alarm(&opened, key, loaded.state.alarm_at).await;
    Ok((loaded.state.data(epoch), loaded))
}

async fn commit(
    inner: &Inner,
    key: &str,
    topic: &str,
    cached: Cached,
    batch: Batch,
) -> Result<Box<Loaded>, StorageError> {
    let opened = inner.opened(OPEN_WAIT).await?;
    let mut loaded = match cached {
        Cached::Loaded(loaded) => loaded,
        Cached::Evicted { seq } => {
            let loaded = read_room(&opened, key).await?;
            if loaded.seq != seq {
                return Err(StorageError::Failed(
                    "the room's storage changed since this node loaded it (the room moved); this run of it ends"
                        .to_owned(),
                ));
            }
            Box::new(loaded)
        }
        Cached::Unknown => {
            return Err(StorageError::Failed("a write to a room this node has not loaded".to_owned()))
        }
        Cached::Failed => {
            return Err(StorageError::Failed(
                "an earlier write of this run failed; the room restarts from what is stored".to_owned(),
            ))
        }
    };
    let Batch { puts, deletes, alarm } = batch;
    let puts = puts
        .into_iter()
        .map(|(key, value)| RawValue::from_string(value).map(|value| (key, value)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| failed("a value to store is not JSON", e))?;
    let alarm = alarm.map(|at| at.map_or(AlarmChange::Deleted, AlarmChange::Set));
    let record = Record::Writes { puts, deletes, alarm };
    let payload = encode(&record)?;
    loaded.state.apply(record);
    let (needed, limit) = (loaded.state.snapshot_estimate(), snapshot_limit(&opened));
    if needed > limit {
        tracing::error!(
            room = %topic,
            "the room's storage would take {needed} bytes, more than the {limit} one NATS message \
             may carry (the server's max_payload, less headers); the write is refused"
        );
        return Err(StorageError::Full);
    }
    // The index learns of a new alarm before the journal does: should this node die between
    // the two, the alarm still fires (and a room that does not have it ignores it), where the
    // other order could lose it.
    if let Some(AlarmChange::Set(at)) = alarm {
        let put = opened.alarms.put(key, at.to_string().into()).await;
        put.map_err(|e| failed("cannot index the room's alarm", e))?;
    }
    loaded.write(inner, &opened, key, payload, false).await?;
    if alarm == Some(AlarmChange::Deleted) {
        // After the journal: a deleted alarm left in the index only wakes the room for nothing
        // (its load then deletes it).
        if let Err(e) = opened.alarms.delete(key).await {
            tracing::warn!(room = %topic, "cannot remove the room's alarm from the index: {e}");
        }
    }
    if loaded.state.is_empty() {
        // A room that holds nothing is forgotten, so the stream stays the size of what rooms
        // keep. Only the messages up to this write: one written after it (the room moved
        // meanwhile) stays, and this run's next write, which expects none, fails.
        let purged = opened.stream.purge().filter(subject_of(key)).sequence(loaded.seq + 1).await;
        match purged {
            Ok(_) => *loaded = Loaded::default(),
            Err(e) => tracing::debug!(room = %topic, "cannot forget the empty room: {e}"),
        }
    }
    Ok(loaded)
}

/// Puts the alarm index right for the room (a crash between the index and the journal can
/// leave it wrong). Best effort: the room's own writes keep it right otherwise.
async fn reconcile_alarm(opened: &Opened, key: &str, alarm_at: Option<u64>) {
    let indexed = match opened.alarms.get(key).await {
        Ok(value) => value.as_deref().and_then(parse_alarm),
        Err(e) => {
            tracing::debug!("cannot read the alarm index for {key}: {e}");
            return;
        }
    };
    if indexed == alarm_at {
        return;
    }
    let fixed = match alarm_at {
        Some(at) => opened.alarms.put(key, at.to_string().into()).await.map(drop).map_err(|e| e.to_string()),
        None => opened.alarms.delete(key).await.map_err(|e| e.to_string()),
    };
    if let Err(e) = fixed {
        tracing::debug!("cannot correct the alarm index for {key}: {e}");
    }
}

fn parse_alarm(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

async fn alarms(inner: &Inner) -> Result<Vec<(String, u64)>, StorageError> {
    // Asked once, as the gateway starts: first give the connection its chance.
    let mut open = inner.opened.subscribe();
    let _ = tokio::time::timeout(ALARMS_WAIT, open.wait_for(Option::is_some)).await;
    let opened = inner.opened(Duration::ZERO).await?;
    let keys: Vec<String> = opened
        .alarms
        .keys()
        .await
        .map_err(|e| failed("cannot list the alarms", e))?
        .try_collect()
        .await
        .map_err(|e| failed("cannot list the alarms", e))?;
    let store = &opened.alarms;
    let mut alarms: Vec<(String, u64)> = futures_util::stream::iter(keys)
        .map(|key| async move {
            let at = store.get(&key).await.ok().flatten().as_deref().and_then(parse_alarm)?;
            Some((room_of_key(&key)?.topic(), at))
        })
        .buffer_unordered(READS_AT_ONCE)
        .filter_map(std::future::ready)
        .collect()
        .await;
    alarms.sort_by_key(|(_, at)| *at);
    Ok(alarms)
}

async fn rooms(inner: &Inner, limit: usize) -> Result<(u64, Vec<StoredRoom>), StorageError> {
    let opened = inner.opened(OPEN_WAIT).await?;
    if limit == 0 {
        // The count alone (`/healthz` asks for it every time): one request, however many rooms.
        let info = opened.stream.get_info().await.map_err(|e| failed("cannot count the rooms", e))?;
        return Ok((info.state.subjects_count, Vec::new()));
    }
    let mut subjects: Vec<String> = opened
        .stream
        .info_with_subjects(format!("{SUBJECT_PREFIX}>"))
        .await
        .map_err(|e| failed("cannot list the rooms", e))?
        .map_ok(|(subject, _)| subject)
        .try_collect()
        .await
        .map_err(|e| failed("cannot list the rooms", e))?;
    let count = subjects.len() as u64;
    subjects.sort();
    subjects.truncate(limit);
    let opened = &opened;
    let listed: Vec<Result<Option<StoredRoom>, StorageError>> = futures_util::stream::iter(subjects)
        .map(|subject| async move {
            let Some(key) = subject.strip_prefix(SUBJECT_PREFIX) else { return Ok(None) };
            let Some(room) = room_of_key(key) else { return Ok(None) };
            let state = read_room(opened, key).await?.state;
            let bytes = state.entries.iter().map(|(k, v)| (k.len() + v.get().len()) as u64).sum();
            Ok(Some(StoredRoom {
                room: room.topic(),
                keys: state.entries.len() as u64,
                bytes,
                alarm_at: state.alarm_at,
            }))
        })
        .buffered(READS_AT_ONCE)
        .collect()
        .await;
    let mut rooms = Vec::with_capacity(listed.len());
    for room in listed {
        rooms.extend(room?);
    }
    Ok((count, rooms))
}

/// Opens the stream and the bucket whenever NATS is connected and they are not open.
async fn keep_open(inner: Weak<Inner>) {
    let mut reported: Option<String> = None;
    loop {
        let Some(inner) = inner.upgrade() else { return };
        if inner.connected() && inner.opened.borrow().is_none() {
            match open(&inner).await {
                Ok(opened) => {
                    let max_payload = opened.max_payload;
                    tracing::info!(
                        "cluster storage open: stream {STREAM} and bucket {ALARMS_BUCKET}; a room stores at \
                         most about {max_payload} bytes (the NATS server's max_payload)"
                    );
                    if inner.room_max_bytes > max_payload as u64 {
                        // Said, not warned: the defaults (16 MiB, 1 MiB) differ so.
                        tracing::info!(
                            "--room-storage-bytes is {} but a room's storage must fit in one NATS message: \
                             writes past about {max_payload} bytes fail as full (raise max_payload in the \
                             nats-server configuration to allow more)",
                            inner.room_max_bytes
                        );
                    }
                    *inner.open_error.lock_or_recover() = None;
                    reported = None;
                    inner.opened.send_replace(Some(opened));
                }
                Err(e) => {
                    if reported.as_ref() != Some(&e) {
                        tracing::warn!("cannot open the cluster's storage: {e}");
                        reported = Some(e.clone());
                    }
                    *inner.open_error.lock_or_recover() = Some(e);
                }
            }
        }
        drop(inner);
        tokio::time::sleep(REOPEN_EVERY).await;
    }
}

async fn open(inner: &Inner) -> Result<Opened, String> {
    let mut jetstream = jetstream::new(inner.client.clone());
    jetstream.set_timeout(NATS_TIMEOUT);
    let config = stream::Config {
        name: STREAM.to_owned(),
        description: Some("roomvisor: durable rooms, one journal subject per room".to_owned()),
        subjects: vec![format!("{SUBJECT_PREFIX}>")],
        storage: stream::StorageType::File,
        num_replicas: inner.replicas,
        // Snapshots replace what came before them on their subject.
        allow_rollup: true,
        max_messages: -1,
        max_bytes: -1,
        max_messages_per_subject: -1,
        ..Default::default()
    };
    let stream = match jetstream.create_stream(config.clone()).await {
        Ok(stream) => stream,
        // It exists with other settings (another node made it, or other replicas were asked for).
        Err(create) => jetstream
            .get_stream(STREAM)
            .await
            .map_err(|get| format!("cannot create the stream {STREAM} ({create}) nor open it ({get})"))?,
    };
    let replicas = stream.cached_info().config.num_replicas;
    if replicas != inner.replicas {
        match jetstream.update_stream(config).await {
            Ok(_) => tracing::info!("stream {STREAM}: {replicas} replicas, now {}", inner.replicas),
            Err(e) => tracing::warn!(
                "stream {STREAM} has {replicas} replicas, not the {} asked for, and cannot be changed: {e}",
                inner.replicas
            ),
        }
    }
    let bucket = kv::Config {
        bucket: ALARMS_BUCKET.to_owned(),
        description: "roomvisor: when each durable room's alarm is due".to_owned(),
        history: 1,
        storage: stream::StorageType::File,
        num_replicas: inner.replicas,
        ..Default::default()
    };
    let alarms = match jetstream.create_key_value(bucket).await {
        Ok(alarms) => alarms,
        Err(create) => jetstream.get_key_value(ALARMS_BUCKET).await.map_err(|get| {
            format!("cannot create the key-value bucket {ALARMS_BUCKET} ({create}) nor open it ({get})")
        })?,
    };
    let max_payload = match inner.client.server_info().max_payload {
        0 => DEFAULT_MAX_PAYLOAD,
        known => known,
    };
    Ok(Opened { jetstream, stream, alarms, max_payload })
}

/// Keeps this node's alarm schedule in step with the index: every room's alarm, whichever
/// node set it, including those set before this node started.
async fn watch_alarms(inner: Weak<Inner>) {
    loop {
        let (opened, schedule, grace) = {
            let Some(inner) = inner.upgrade() else { return };
            let opened = inner.opened.borrow().clone();
            (opened, inner.alarms.clone(), inner.grace)
        };
        let Some(opened) = opened else {
            tokio::time::sleep(REOPEN_EVERY).await;
            continue;
        };
        match opened.alarms.watch_with_history(">").await {
            Ok(mut entries) => loop {
                // Checked now and then, so the watch ends with the store.
                let next = match tokio::time::timeout(Duration::from_secs(5), entries.next()).await {
                    Ok(next) => next,
                    Err(_) if inner.strong_count() == 0 => return,
                    Err(_) => continue,
                };
                match next {
                    Some(Ok(entry)) => schedule_entry(&schedule, &entry, grace),
                    Some(Err(e)) => {
                        tracing::warn!("watching the alarm index failed: {e}; watching again");
                        break;
                    }
                    None => break,
                }
            },
            Err(e) => tracing::debug!("cannot watch the alarm index yet: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn schedule_entry(schedule: &Alarms, entry: &kv::Entry, grace: Duration) {
    let Some(room) = room_of_key(&entry.key) else {
        tracing::warn!("the alarm index holds {:?}, not a room; ignored", entry.key);
        return;
    };
    match entry.operation {
        kv::Operation::Put => match parse_alarm(&entry.value) {
            Some(at) => schedule.set_elsewhere(&room, at, grace),
            None => tracing::warn!(room = %room, "the alarm index holds no time for the room; ignored"),
        },
        kv::Operation::Delete | kv::Operation::Purge => schedule.set(&room, None),
    }
}

/// Drops, every [`EVICT_EVERY`], the state of rooms unused for [`EVICT_AFTER`].
async fn evict_idle(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(EVICT_EVERY).await;
        let Some(inner) = inner.upgrade() else { return };
        inner.evict_unused(EVICT_AFTER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).expect("JSON")
    }

    /// Characters a NATS key-value key may hold.
    fn kv_safe(key: &str) -> bool {
        !key.is_empty()
            && !key.starts_with('.')
            && !key.ends_with('.')
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b))
    }

    #[test]
    fn storage_keys_are_kv_safe_and_name_their_room_back() {
        for topic in ["room:lobby", "alarm:a", "tic-tac-toe:Game_1-x", "k_9:-", "room:A-b_C"] {
            let room = RoomId::from_topic(topic).expect("a room");
            let key = storage_key(&room);
            assert!(kv_safe(&key), "{key}");
            assert_eq!(key, topic.replacen(':', ".", 1));
            assert_eq!(room_of_key(&key), Some(room), "{key}");
            assert!(subject_of(&key).starts_with(SUBJECT_PREFIX));
        }
        // Different rooms, different keys: the default kind is named too.
        let plain = RoomId::parse("x").expect("a room");
        let other = RoomId::in_kind("x", "room").expect("a room");
        assert_ne!(storage_key(&plain), storage_key(&other));
        for not_a_room in ["lobby", "room.", ".lobby", "room.a.b", "Room.a", "room.a b", ""] {
            assert_eq!(room_of_key(not_a_room), None, "{not_a_room:?}");
        }
    }

    fn replay(messages: &[Vec<u8>]) -> Loaded {
        let mut loaded = Loaded::default();
        for (seq, payload) in messages.iter().enumerate() {
            loaded.apply(decode(payload).expect("a record"), seq as u64 + 1, payload.len());
        }
        loaded
    }

    #[test]
    fn a_journal_replays_to_the_state_and_a_snapshot_of_it_replays_the_same() {
        let writes = |puts: &[(&str, &str)], deletes: &[&str], alarm| {
            encode(&Record::Writes {
                puts: puts.iter().map(|(k, v)| (k.to_string(), raw(v))).collect(),
                deletes: deletes.iter().map(|k| k.to_string()).collect(),
                alarm,
            })
            .expect("encodes")
        };
        let journal = vec![
            writes(&[("b", "2"), ("a", r#"{"text":"hé \"quoted\"\n"}"#), ("c", "[3]")], &["c"], None),
            encode(&Record::Epoch { epoch: 7 }).expect("encodes"),
            writes(&[("b", r#""two""#), ("msg:\u{1F600}", "null")], &["gone"], Some(AlarmChange::Set(42))),
            writes(&[], &[], Some(AlarmChange::Deleted)),
            writes(&[], &[], Some(AlarmChange::Set(99))),
        ];
        let loaded = replay(&journal);
        assert_eq!(loaded.seq, 5);
        assert_eq!(loaded.journal_bytes, journal.iter().map(Vec::len).sum::<usize>());
        let data = loaded.state.data(8);
        assert_eq!(data.epoch, 8);
        assert_eq!(data.alarm_at, Some(99));
        let expected = [("a", r#"{"text":"hé \"quoted\"\n"}"#), ("b", r#""two""#), ("msg:\u{1F600}", "null")];
        let expected: Vec<(String, String)> =
            expected.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(data.entries, expected, "puts then deletes, values as written, in key order");
        assert_eq!(loaded.state.epoch, 7);

        // A snapshot holds the same state, and the journal after it starts from it.
        let snapshot = loaded.state.snapshot().expect("encodes");
        assert!(
            loaded.state.snapshot_estimate() >= snapshot.len(),
            "the estimate ({}) is at least the snapshot ({})",
            loaded.state.snapshot_estimate(),
            snapshot.len()
        );
        let text = String::from_utf8(snapshot.clone()).expect("UTF-8");
        assert!(
            text.contains(r#""a":{"text":"hé \"quoted\"\n"}"#),
            "values are stored as JSON, not as strings: {text}"
        );
        let mut compacted = vec![snapshot, writes(&[("z", "true")], &["a"], None)];
        let again = replay(&compacted);
        assert_eq!(again.journal_bytes, compacted[1].len(), "only what follows the snapshot");
        assert_eq!(again.state.alarm_at, Some(99));
        assert_eq!(again.state.epoch, 7);
        let keys: Vec<String> = again.state.data(0).entries.into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["b", "msg:\u{1F600}", "z"]);
        let exact: usize = again.state.entries.iter().map(|(k, v)| entry_bytes(k, v)).sum();
        assert_eq!(again.state.entries_bytes, exact, "the running size matches a recount");

        // Deleting everything leaves nothing to keep.
        compacted.push(writes(&[], &["b", "msg:\u{1F600}", "z"], Some(AlarmChange::Deleted)));
        let emptied = replay(&compacted);
        assert!(emptied.state.is_empty());
        assert_eq!(emptied.state.entries_bytes, 0);
    }

    #[test]
    fn a_record_of_another_shape_is_an_error_not_a_panic() {
        assert!(matches!(decode(b"{\"unheard_of\":{}}"), Err(StorageError::Failed(_))));
        assert!(matches!(decode(b"not json"), Err(StorageError::Failed(_))));
    }

    #[test]
    fn an_alarm_change_is_set_or_deleted_in_the_record() {
        let set = encode(&Record::Writes { puts: vec![], deletes: vec![], alarm: Some(AlarmChange::Set(5)) });
        assert_eq!(
            String::from_utf8(set.expect("encodes")).expect("UTF-8"),
            r#"{"writes":{"alarm":{"set":5}}}"#
        );
        let deleted =
            encode(&Record::Writes { puts: vec![], deletes: vec![], alarm: Some(AlarmChange::Deleted) });
        assert_eq!(
            String::from_utf8(deleted.expect("encodes")).expect("UTF-8"),
            r#"{"writes":{"alarm":"deleted"}}"#
        );
        assert_eq!(parse_alarm(b"1700000000000"), Some(1_700_000_000_000));
        assert_eq!(parse_alarm(b"soon"), None);
    }
}
