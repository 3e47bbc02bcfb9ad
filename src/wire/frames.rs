//! The frames that cross a worker's stdin/stdout, in both directions. JSON payloads travel
//! as strings because bincode cannot encode `serde_json::Value`.

use serde::{Deserialize, Serialize};

/// Which JavaScript engine runs a room (`--engine`, design section 11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum EngineKind {
    /// QuickJS through rquickjs.
    Quickjs,
    /// deno_core, on whichever backend the build selected (QuickJS's v8x, or V8).
    Deno,
}

impl EngineKind {
    /// The engine this build has: one per build (see `worker::engine`).
    pub const BUILT: EngineKind =
        if cfg!(any(feature = "deno", feature = "v8")) { EngineKind::Deno } else { EngineKind::Quickjs };

    /// Whether a prepared runtime of this engine can be forked (the warm pool's template):
    /// QuickJS runs on the worker's one thread; deno_core keeps a watchdog thread, which a
    /// fork would lose.
    pub fn forks(self) -> bool {
        self == EngineKind::Quickjs
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineKind::Quickjs => "quickjs",
            EngineKind::Deno => "deno",
        })
    }
}

/// What the gateway hands to each new runtime: the engine to run it on and its limits. The
/// engine travels here, in the first frame (`Prepare`), so that a worker never guesses it from its
/// environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeLimits {
    pub engine: EngineKind,
    pub heap_bytes: u64,
    pub cpu_ms_per_call: u64,
    pub max_frame_bytes: u64,
}

/// What a durable room's runtime starts with besides its entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageInit {
    pub alarm_at: Option<u64>,
    /// Bytes of keys and JSON values the room may hold.
    pub max_bytes: u64,
    /// `Restore` frames that follow.
    pub chunks: u32,
}

/// Frames the gateway sends to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToWorker {
    /// Always the first frame: the engine and limits to get ready. A worker then waits for
    /// `Start`, which may come much later: a warm worker sits in the gateway's pool, engine
    /// up and prelude loaded, until a room takes it.
    Prepare {
        limits: RuntimeLimits,
    },
    /// Instead of `Prepare`, to the pool's template: get ready, then fork one prepared worker
    /// for each socket handed over (see `worker::template`); never followed by `Start`.
    Template {
        limits: RuntimeLimits,
    },
    /// Which room this runtime is and what it runs; the second frame, after `Prepare`.
    Start {
        room_id: String,
        /// The room's kind (its topic is `kind:room_id`).
        kind: String,
        script_name: String,
        script: String,
        /// JSON object the script reads as `Room.settings` (the chat's limits, say).
        settings: String,
        /// This run's epoch (`Room.epoch`): larger than any earlier run's of the room.
        epoch: u64,
        /// A durable room's storage; `None` for a transient room (`Room.storage` undefined).
        storage: Option<StorageInit>,
    },
    /// Entries of a durable room's storage (key, JSON value), sent right after `Start` in as
    /// many frames as `StorageInit::chunks` says, so that no frame outgrows the limit.
    Restore {
        entries: Vec<(String, String)>,
    },
    /// Invoke a top-level script function; `args` is a JSON array.
    Call {
        id: u64,
        function: String,
        args: String,
    },
    /// The answer to a worker's `HostCall`; `Ok` holds JSON.
    HostReply {
        id: u64,
        result: Result<String, String>,
    },
    /// How much JS heap the runtime uses (for operators); answered with `Stats`.
    Stats,
    /// A BroadcastChannel message posted by another runtime; `data` is JSON.
    Deliver {
        channel: String,
        data: String,
    },
    Shutdown,
}

/// Frames a worker sends to the gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromWorker {
    Ready,
    StartFailed(ScriptError),
    /// The outcome of a `Call`; `Ok` holds JSON.
    Reply {
        id: u64,
        result: Result<String, ScriptError>,
    },
    /// `Beam.call` / `Beam.callSync` from the script; `args` is a JSON array.
    HostCall {
        id: u64,
        name: String,
        args: String,
    },
    /// `BroadcastChannel.postMessage`; `data` is JSON.
    Post {
        channel: String,
        data: String,
    },
    /// `Room.push`: an event for one join of the room; `payload` is JSON.
    Push {
        conn: String,
        event: String,
        payload: String,
    },
    /// `Room.broadcast`: an event for every join of the room but those in `except`.
    Broadcast {
        event: String,
        payload: String,
        except: Vec<String>,
    },
    /// `Room.presence.track`: list a join under `key`; `meta` is a JSON object.
    Track {
        conn: String,
        key: String,
        meta: String,
    },
    /// `Room.presence.untrack`.
    Untrack {
        conn: String,
    },
    /// The runtime opened its first / closed its last BroadcastChannel of this name.
    Subscribe {
        channel: String,
    },
    Unsubscribe {
        channel: String,
    },
    Log {
        level: LogLevel,
        message: String,
    },
    /// The answer to `ToWorker::Stats`.
    Stats(WorkerStats),
    /// The storage writes of the turns since the last `Writes` (durable rooms only). Every
    /// frame after it waits in the gateway until these are durable (the output gate).
    Writes {
        puts: Vec<(String, String)>,
        deletes: Vec<String>,
        /// `Some(None)` deletes the alarm.
        alarm: Option<Option<u64>>,
        /// What the room stores in all, after these writes.
        stored_bytes: u64,
    },
}

/// A runtime's figures, for operators and for hibernation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStats {
    pub heap_used_bytes: u64,
    /// Timers armed (`setTimeout`, `setInterval`): a room with any is not idle.
    pub timers: u32,
    /// Async calls and `Beam.call`s not settled yet.
    pub pending: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScriptError {
    pub kind: ScriptErrorKind,
    pub message: String,
    pub stack: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScriptErrorKind {
    /// The script threw (or a named function does not exist).
    Exception,
    /// The call ran past its CPU budget and was interrupted.
    Timeout,
    /// The runtime hit its heap limit.
    OutOfMemory,
    /// `Room.refuse(reason)`: the script turned the call down; the message is for the client.
    Refused,
    /// A hook named a join this runtime does not know (it started after the join was made).
    UnknownConnection,
}

impl ScriptError {
    pub fn exception(message: impl Into<String>) -> Self {
        ScriptError { kind: ScriptErrorKind::Exception, message: message.into(), stack: None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}
