//! Durable rooms (design §10): the store a room's writes go to, and what the rest of the
//! gateway sees of it.
//!
//! A room's storage is served from its worker's memory; the gateway only loads it when the
//! room starts and commits each turn's writes. Commits from every room go through one queue,
//! so a store can make many rooms' writes durable with one sync (group commit). The output
//! gate itself (nothing a turn caused leaves before its writes are durable) is the room
//! actor's, in `rooms/process.rs`.
//!
//! Two stores: SQLite in `--data-dir` on a single node ([`sqlite`]), NATS JetStream in a
//! cluster ([`jetstream`]), where a room that moves to another node must find its data there.

mod alarms;
mod jetstream;
mod sqlite;

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::oneshot;

pub use alarms::Alarms;
pub use jetstream::{room_of_key, storage_key, JetStreamStore, ALARMS_BUCKET, STREAM};
pub use sqlite::SqliteStore;

use crate::gateway::ids::RoomId;

/// What a room had stored when it starts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RoomData {
    /// This run's epoch: larger than every earlier run's.
    pub epoch: u64,
    pub alarm_at: Option<u64>,
    /// Every key with its JSON value, in key order.
    pub entries: Vec<(String, String)>,
}

/// One turn's writes to one room.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Batch {
    pub puts: Vec<(String, String)>,
    pub deletes: Vec<String>,
    /// `Some(None)` deletes the alarm.
    pub alarm: Option<Option<u64>>,
}

/// Why the store could not do what was asked. Carried to logs; clients hear only
/// "storage unavailable".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageError {
    /// The store's size limit (`--data-max-bytes`) or the disk is full; in a cluster, the
    /// room's state would not fit in one NATS message, or JetStream is out of space.
    Full,
    /// Anything else the store reported (a read-only file, an I/O error, a lost connection).
    Failed(String),
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageError::Full => f.write_str("storage is full"),
            StorageError::Failed(why) => write!(f, "storage failed: {why}"),
        }
    }
}

/// A room the store knows, live or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRoom {
    pub room: String,
    pub keys: u64,
    pub bytes: u64,
    pub alarm_at: Option<u64>,
}

pub type Reply<T> = oneshot::Receiver<Result<T, StorageError>>;

/// Where durable rooms keep their data. Every request is answered through a channel, in the
/// order made: a load asked after a commit sees that commit.
pub trait Store: Send + Sync + 'static {
    /// The room's data, and a new epoch for the run that is starting.
    fn load(&self, room: &RoomId) -> Reply<RoomData>;
    fn commit(&self, room: &RoomId, batch: Batch) -> Reply<()>;
    /// Every room with an alarm set, and when it is due.
    fn alarms(&self) -> Reply<Vec<(String, u64)>>;
    /// How many rooms the store knows, and what each holds (`limit` rooms at most).
    fn rooms(&self, limit: usize) -> Reply<(u64, Vec<StoredRoom>)>;
    /// What and where, for the start-up log line.
    fn describe(&self) -> String;
    /// Whether requests can succeed now; `/healthz` says not ready while they cannot (a
    /// cluster's store before NATS is reachable).
    fn is_ready(&self) -> bool {
        true
    }
}

/// The storage of this gateway's durable rooms: the store and its alarm schedule.
#[derive(Clone)]
pub struct Storage {
    pub store: Arc<dyn Store>,
    pub alarms: Alarms,
    /// Bytes one room may store (keys and JSON values).
    pub room_max_bytes: u64,
}

impl Storage {
    pub fn new(store: Arc<dyn Store>, room_max_bytes: u64) -> Storage {
        Storage { store, alarms: Alarms::default(), room_max_bytes }
    }

    /// The cluster's store, on its NATS connection (see [`JetStreamStore::start`]): returns at
    /// once, and opens when NATS is reachable. Alarms set on other nodes fire here a `lease`
    /// late: only if the room's node did not run them (it died).
    pub fn in_cluster(
        client: async_nats::Client,
        url: &str,
        replicas: usize,
        room_max_bytes: u64,
        lease: std::time::Duration,
    ) -> Storage {
        // One schedule, shared: the store feeds it every node's alarms.
        let alarms = Alarms::default();
        let store = JetStreamStore::start(client, url, replicas, room_max_bytes, alarms.clone(), lease);
        Storage { store: Arc::new(store), alarms, room_max_bytes }
    }

    /// Opens the embedded store in `dir`; `max_bytes` caps the database's size.
    pub fn open_dir(dir: &Path, max_bytes: Option<u64>, room_max_bytes: u64) -> Result<Storage, String> {
        let store = SqliteStore::open(dir, max_bytes)?;
        Ok(Storage::new(Arc::new(store), room_max_bytes))
    }
}

/// The epoch of a run that starts now after one of `last`: the clock in ms, unless that would
/// not be larger (a clock set back).
pub fn next_epoch(last: u64) -> u64 {
    crate::util::epoch_ms().max(last.saturating_add(1))
}
