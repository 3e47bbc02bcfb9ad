//! The embedded store: SQLite in WAL mode, one writer thread, group commit.
//!
//! Every request goes to the writer thread; it takes what has queued up (up to
//! [`MAX_GROUP`]), runs it in one transaction, each request in a savepoint of its own (one
//! room's failed write does not fail the others), and commits once. With
//! `synchronous=FULL` a commit returns only after the WAL is on disk, so an acknowledged write
//! survives a power cut as well as `kill -9`; the group is what makes that affordable: one sync
//! for every room that wrote meanwhile.

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use rusqlite::{params, Connection, ErrorCode, OptionalExtension};
use tokio::sync::oneshot;

use super::{next_epoch, Batch, Reply, RoomData, StorageError, Store, StoredRoom};
use crate::gateway::ids::RoomId;

/// Requests one transaction takes at most: enough that a burst of rooms shares one sync,
/// few enough that the first of them does not wait long for the last.
const MAX_GROUP: usize = 1024;
const FILE_NAME: &str = "rooms.sqlite3";

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS rooms (
        room TEXT PRIMARY KEY,
        epoch INTEGER NOT NULL,
        alarm_at INTEGER
    );
    CREATE TABLE IF NOT EXISTS entries (
        room TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (room, key)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS rooms_by_alarm ON rooms (alarm_at) WHERE alarm_at IS NOT NULL;
";

pub struct SqliteStore {
    jobs: mpsc::Sender<Job>,
    path: PathBuf,
}

enum Job {
    Load { room: String, reply: oneshot::Sender<Result<RoomData, StorageError>> },
    Commit { room: String, batch: Batch, reply: oneshot::Sender<Result<(), StorageError>> },
    Alarms { reply: oneshot::Sender<Result<Vec<(String, u64)>, StorageError>> },
    Rooms { limit: usize, reply: oneshot::Sender<Result<(u64, Vec<StoredRoom>), StorageError>> },
}

/// A job's outcome, held until the group's commit says whether it stands.
enum Done {
    Load(oneshot::Sender<Result<RoomData, StorageError>>, Result<RoomData, StorageError>),
    Commit(oneshot::Sender<Result<(), StorageError>>, Result<(), StorageError>),
    Alarms(
        oneshot::Sender<Result<Vec<(String, u64)>, StorageError>>,
        Result<Vec<(String, u64)>, StorageError>,
    ),
    Rooms(
        oneshot::Sender<Result<(u64, Vec<StoredRoom>), StorageError>>,
        Result<(u64, Vec<StoredRoom>), StorageError>,
    ),
}

impl SqliteStore {
    /// Opens (or creates) the database in `dir`, and proves it can write there: a read-only
    /// directory fails here, with its reason, not at the first room's first write.
    pub fn open(dir: &Path, max_bytes: Option<u64>) -> Result<SqliteStore, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create the data directory {}: {e}", dir.display()))?;
        let path = dir.join(FILE_NAME);
        let connection = open_connection(&path, max_bytes)
            .map_err(|e| format!("cannot open the database {}: {e}", path.display()))?;
        let (jobs, queue) = mpsc::channel();
        std::thread::Builder::new()
            .name("storage".to_owned())
            .spawn(move || writer(connection, queue))
            .map_err(|e| format!("cannot start the storage thread: {e}"))?;
        Ok(SqliteStore { jobs, path })
    }

    fn submit<T>(&self, job: impl FnOnce(oneshot::Sender<Result<T, StorageError>>) -> Job) -> Reply<T> {
        let (reply, answer) = oneshot::channel();
        // If the writer thread is gone, the reply is dropped and the caller hears RecvError.
        let _ = self.jobs.send(job(reply));
        answer
    }
}

impl Store for SqliteStore {
    fn load(&self, room: &RoomId) -> Reply<RoomData> {
        let room = room.topic();
        self.submit(|reply| Job::Load { room, reply })
    }

    fn commit(&self, room: &RoomId, batch: Batch) -> Reply<()> {
        let room = room.topic();
        self.submit(|reply| Job::Commit { room, batch, reply })
    }

    fn alarms(&self) -> Reply<Vec<(String, u64)>> {
        self.submit(|reply| Job::Alarms { reply })
    }

    fn rooms(&self, limit: usize) -> Reply<(u64, Vec<StoredRoom>)> {
        self.submit(|reply| Job::Rooms { limit, reply })
    }

    fn describe(&self) -> String {
        format!(
            "SQLite {} (WAL, synchronous=FULL, group commit) at {}",
            rusqlite::version(),
            self.path.display()
        )
    }
}

fn open_connection(path: &Path, max_bytes: Option<u64>) -> rusqlite::Result<Connection> {
    let connection = Connection::open(path)?;
    let mode: String = connection.query_row("PRAGMA journal_mode=WAL", [], |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidParameterName(format!("journal_mode is {mode}, not wal")));
    }
    connection.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=OFF;")?;
    if let Some(max_bytes) = max_bytes {
        let page_size: u64 = connection.query_row("PRAGMA page_size", [], |row| row.get(0))?;
        let pages = (max_bytes / page_size.max(512)).max(16);
        connection.query_row(&format!("PRAGMA max_page_count={pages}"), [], |_| Ok(()))?;
    }
    connection.execute_batch(SCHEMA)?;
    // A write that always happens: a read-only file or directory fails here.
    connection.execute_batch("PRAGMA user_version=1")?;
    Ok(connection)
}

fn writer(mut connection: Connection, queue: mpsc::Receiver<Job>) {
    while let Ok(first) = queue.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        run_group(&mut connection, jobs);
    }
}

fn run_group(connection: &mut Connection, jobs: Vec<Job>) {
    let mut done = Vec::with_capacity(jobs.len());
    let mut in_transaction = false;
    for job in jobs {
        if !in_transaction {
            if let Err(e) = connection.execute_batch("BEGIN IMMEDIATE") {
                let error = storage_error(&e);
                tracing::error!("storage: cannot begin a transaction: {error}");
                done.push(Done::failed(job, error));
                continue;
            }
            in_transaction = true;
        }
        let outcome = run_job(connection, job);
        // Some errors (a full disk among them) roll the whole transaction back, not just the
        // job's savepoint: the writes done before it in this group are gone too.
        if connection.is_autocommit() {
            in_transaction = false;
            let error =
                outcome.error().unwrap_or(StorageError::Failed("the transaction was rolled back".to_owned()));
            for earlier in done.iter_mut().filter(|d| d.wrote()) {
                earlier.fail(error.clone());
            }
        }
        done.push(outcome);
    }
    if in_transaction {
        if let Err(e) = connection.execute_batch("COMMIT") {
            let error = storage_error(&e);
            tracing::error!("storage: commit failed: {error}");
            let _ = connection.execute_batch("ROLLBACK");
            for outcome in done.iter_mut().filter(|d| d.wrote()) {
                outcome.fail(error.clone());
            }
        }
    }
    for outcome in done {
        outcome.deliver();
    }
}

/// Runs one job in a savepoint of the group's transaction: rolled back alone if it fails.
fn run_job(connection: &Connection, job: Job) -> Done {
    fn guarded<T>(
        connection: &Connection,
        work: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StorageError> {
        connection.execute_batch("SAVEPOINT job").map_err(|e| storage_error(&e))?;
        match work(connection) {
            Ok(value) => {
                connection.execute_batch("RELEASE job").map_err(|e| storage_error(&e))?;
                Ok(value)
            }
            Err(e) => {
                if !connection.is_autocommit() {
                    let _ = connection.execute_batch("ROLLBACK TO job; RELEASE job");
                }
                Err(storage_error(&e))
            }
        }
    }
    match job {
        Job::Load { room, reply } => Done::Load(reply, guarded(connection, |c| load(c, &room))),
        Job::Commit { room, batch, reply } => {
            Done::Commit(reply, guarded(connection, |c| commit(c, &room, &batch)))
        }
        Job::Alarms { reply } => Done::Alarms(reply, guarded(connection, alarms)),
        Job::Rooms { limit, reply } => Done::Rooms(reply, guarded(connection, |c| rooms(c, limit))),
    }
}

impl Done {
    fn failed(job: Job, error: StorageError) -> Done {
        match job {
            Job::Load { reply, .. } => Done::Load(reply, Err(error)),
            Job::Commit { reply, .. } => Done::Commit(reply, Err(error)),
            Job::Alarms { reply } => Done::Alarms(reply, Err(error)),
            Job::Rooms { reply, .. } => Done::Rooms(reply, Err(error)),
        }
    }

    /// Whether its success rests on the group's commit: a load's reads stand either way (only
    /// its new epoch, which the clock keeps larger anyway, would be lost).
    fn wrote(&self) -> bool {
        matches!(self, Done::Commit(_, Ok(())))
    }

    fn error(&self) -> Option<StorageError> {
        match self {
            Done::Load(_, Err(e))
            | Done::Commit(_, Err(e))
            | Done::Alarms(_, Err(e))
            | Done::Rooms(_, Err(e)) => Some(e.clone()),
            _ => None,
        }
    }

    fn fail(&mut self, error: StorageError) {
        if let Done::Commit(_, result) = self {
            *result = Err(error);
        }
    }

    fn deliver(self) {
        match self {
            Done::Load(reply, result) => drop(reply.send(result)),
            Done::Commit(reply, result) => drop(reply.send(result)),
            Done::Alarms(reply, result) => drop(reply.send(result)),
            Done::Rooms(reply, result) => drop(reply.send(result)),
        }
    }
}

fn load(connection: &Connection, room: &str) -> rusqlite::Result<RoomData> {
    let row: Option<(u64, Option<u64>)> = connection
        .prepare_cached("SELECT epoch, alarm_at FROM rooms WHERE room = ?1")?
        .query_row(params![room], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    let Some((last_epoch, alarm_at)) = row else {
        // A room that never wrote has no row, and gets none just for being visited: a flood
        // of made-up room ids must not fill the disk.
        return Ok(RoomData { epoch: next_epoch(0), alarm_at: None, entries: Vec::new() });
    };
    let mut statement =
        connection.prepare_cached("SELECT key, value FROM entries WHERE room = ?1 ORDER BY key")?;
    let entries = statement
        .query_map(params![room], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<rusqlite::Result<Vec<(String, String)>>>()?;
    let epoch = next_epoch(last_epoch);
    connection
        .prepare_cached("UPDATE rooms SET epoch = ?2 WHERE room = ?1")?
        .execute(params![room, epoch])?;
    Ok(RoomData { epoch, alarm_at, entries })
}

fn commit(connection: &Connection, room: &str, batch: &Batch) -> rusqlite::Result<()> {
    connection
        .prepare_cached("INSERT INTO rooms (room, epoch) VALUES (?1, 0) ON CONFLICT (room) DO NOTHING")?
        .execute(params![room])?;
    let mut put = connection.prepare_cached(
        "INSERT INTO entries (room, key, value) VALUES (?1, ?2, ?3)
         ON CONFLICT (room, key) DO UPDATE SET value = excluded.value",
    )?;
    for (key, value) in &batch.puts {
        put.execute(params![room, key, value])?;
    }
    let mut delete = connection.prepare_cached("DELETE FROM entries WHERE room = ?1 AND key = ?2")?;
    for key in &batch.deletes {
        delete.execute(params![room, key])?;
    }
    if let Some(alarm) = batch.alarm {
        connection
            .prepare_cached("UPDATE rooms SET alarm_at = ?2 WHERE room = ?1")?
            .execute(params![room, alarm])?;
    }
    if !batch.deletes.is_empty() || batch.alarm == Some(None) {
        // A room that holds nothing any more is forgotten, so the store stays the size of
        // what rooms keep.
        connection
            .prepare_cached(
                "DELETE FROM rooms WHERE room = ?1 AND alarm_at IS NULL
                 AND NOT EXISTS (SELECT 1 FROM entries WHERE room = ?1)",
            )?
            .execute(params![room])?;
    }
    Ok(())
}

fn alarms(connection: &Connection) -> rusqlite::Result<Vec<(String, u64)>> {
    let mut statement = connection
        .prepare_cached("SELECT room, alarm_at FROM rooms WHERE alarm_at IS NOT NULL ORDER BY alarm_at")?;
    let alarms = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?.collect();
    alarms
}

fn rooms(connection: &Connection, limit: usize) -> rusqlite::Result<(u64, Vec<StoredRoom>)> {
    let count: u64 = connection.query_row("SELECT count(*) FROM rooms", [], |row| row.get(0))?;
    let mut statement = connection.prepare_cached(
        "SELECT r.room, count(e.key), coalesce(sum(length(CAST(e.key AS BLOB)) + length(CAST(e.value AS BLOB))), 0), r.alarm_at
         FROM rooms r LEFT JOIN entries e ON e.room = r.room
         GROUP BY r.room ORDER BY r.room LIMIT ?1",
    )?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rooms = statement
        .query_map(params![limit], |row| {
            Ok(StoredRoom { room: row.get(0)?, keys: row.get(1)?, bytes: row.get(2)?, alarm_at: row.get(3)? })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok((count, rooms))
}

fn storage_error(error: &rusqlite::Error) -> StorageError {
    match error.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => StorageError::Full,
        _ => StorageError::Failed(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(name: &str) -> RoomId {
        RoomId::parse(name).expect("a valid room id")
    }

    async fn store() -> (SqliteStore, tempdir::Dir) {
        let dir = tempdir::Dir::new();
        (SqliteStore::open(dir.path(), None).expect("opens"), dir)
    }

    mod tempdir {
        pub struct Dir(std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let path = std::env::temp_dir().join(format!("roomvisor-store-{}-{n}", std::process::id()));
                let _ = std::fs::remove_dir_all(&path);
                Dir(path)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[tokio::test]
    async fn commits_are_loaded_back_in_key_order_with_a_larger_epoch() {
        let (store, _dir) = store().await;
        let lobby = room("lobby");
        let first = store.load(&lobby).await.unwrap().unwrap();
        assert!(first.entries.is_empty());
        let batch = Batch {
            puts: vec![("b".into(), "2".into()), ("a".into(), "1".into()), ("c".into(), "3".into())],
            deletes: vec!["c".into()],
            alarm: Some(Some(42)),
        };
        store.commit(&lobby, batch).await.unwrap().unwrap();
        let second = store.load(&lobby).await.unwrap().unwrap();
        assert_eq!(second.entries, vec![("a".to_owned(), "1".to_owned()), ("b".to_owned(), "2".to_owned())]);
        assert_eq!(second.alarm_at, Some(42));
        assert!(second.epoch > first.epoch || second.epoch >= crate::util::epoch_ms() - 1000);
        let third = store.load(&lobby).await.unwrap().unwrap();
        assert!(third.epoch > second.epoch, "{} then {}", second.epoch, third.epoch);
        assert_eq!(store.alarms().await.unwrap().unwrap(), vec![("room:lobby".to_owned(), 42)]);
    }

    #[tokio::test]
    async fn a_room_that_holds_nothing_is_forgotten() {
        let (store, _dir) = store().await;
        let lobby = room("lobby");
        store
            .commit(&lobby, Batch { puts: vec![("k".into(), "1".into())], ..Batch::default() })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(store.rooms(10).await.unwrap().unwrap().0, 1);
        store.commit(&lobby, Batch { deletes: vec!["k".into()], ..Batch::default() }).await.unwrap().unwrap();
        assert_eq!(store.rooms(10).await.unwrap().unwrap().0, 0);
    }

    #[tokio::test]
    async fn a_full_store_fails_the_write_that_does_not_fit_and_keeps_the_others() {
        let dir = tempdir::Dir::new();
        let store = SqliteStore::open(dir.path(), Some(256 * 1024)).expect("opens");
        let lobby = room("lobby");
        let big = format!("\"{}\"", "x".repeat(16 * 1024));
        let mut stored = 0;
        let error = loop {
            let batch = Batch { puts: vec![(format!("k{stored}"), big.clone())], ..Batch::default() };
            match store.commit(&lobby, batch).await.unwrap() {
                Ok(()) => stored += 1,
                Err(error) => break error,
            }
            assert!(stored < 1000, "a 256 KiB store took {stored} values of 16 KiB");
        };
        assert_eq!(error, StorageError::Full);
        let loaded = store.load(&lobby).await.unwrap().unwrap();
        assert_eq!(loaded.entries.len(), stored, "every acknowledged write, and nothing else");
    }
}
