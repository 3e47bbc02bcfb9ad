//! Gateway configuration: every limit of the design's "Limits and bad input" contract (section
//! 6 of design.md) is a flag with an environment variable.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::gateway::ids::{is_valid_kind, DEFAULT_KIND};
use crate::gateway::typescript::strip_types;
use crate::wire::{EngineKind, RuntimeLimits, DEFAULT_MAX_FRAME_BYTES, WORKER_ARGV0};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "gateway",
    version,
    about = "roomvisor gateway: every chat room a JavaScript runtime in its own process"
)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "ROOMVISOR_BIND", default_value = "127.0.0.1")]
    pub bind: IpAddr,

    /// Port to listen on; 0 picks a free one (the chosen address is printed on stdout).
    #[arg(long, env = "PORT", default_value_t = 4000)]
    pub port: u16,

    /// The script of the default kind, `room:<id>` (the same as `--room room=PATH`). Default:
    /// rooms/chat-room.js. Scripts are read again at each room start.
    #[arg(long, env = "ROOMVISOR_ROOM_SCRIPT")]
    pub room_script: Option<PathBuf>,

    /// A room kind: topics `PREFIX:ID` run the script at PATH (repeatable; the environment
    /// variable takes a comma-separated list). The `room` kind is always there.
    #[arg(long = "room", value_name = "PREFIX=PATH", env = "ROOMVISOR_ROOMS", value_delimiter = ',', value_parser = parse_room_kind)]
    pub rooms: Vec<RoomKind>,

    /// The room-worker executable. Default: `room-worker` beside the gateway, else the
    /// gateway itself in worker mode.
    #[arg(long, env = "ROOMVISOR_WORKER_BIN")]
    pub worker_bin: Option<PathBuf>,

    /// Largest WebSocket message accepted; larger ones close the socket with 1009.
    #[arg(long, value_parser = ranged::<usize>(256..=16_777_216), env = "ROOMVISOR_MAX_FRAME_BYTES", default_value_t = 64 * 1024)]
    pub max_frame_bytes: usize,

    /// Longest sender name, in characters.
    #[arg(long, value_parser = ranged::<usize>(1..=65_536), env = "ROOMVISOR_MAX_SENDER_CHARS", default_value_t = 64)]
    pub max_sender_chars: usize,

    /// Longest message text, in characters.
    #[arg(long, value_parser = ranged::<usize>(1..=1_000_000), env = "ROOMVISOR_MAX_TEXT_CHARS", default_value_t = 4000)]
    pub max_text_chars: usize,

    /// Most rooms live at once.
    #[arg(long, value_parser = ranged::<usize>(1..=1_000_000), env = "ROOMVISOR_MAX_ROOMS", default_value_t = 1024)]
    pub max_rooms: usize,

    /// Live rooms one socket may have started (joining a running room is not counted).
    #[arg(long, value_parser = ranged::<usize>(1..=1_000_000), env = "ROOMVISOR_MAX_ROOMS_STARTED_PER_SOCKET", default_value_t = 10)]
    pub max_rooms_started_per_socket: usize,

    /// Most channels one socket may have joined.
    #[arg(long, value_parser = ranged::<usize>(1..=10_000), env = "ROOMVISOR_MAX_CHANNELS_PER_SOCKET", default_value_t = 100)]
    pub max_channels_per_socket: usize,

    /// Sustained inbound frames per second per socket.
    #[arg(long, value_parser = ranged::<u32>(1..=1_000_000), env = "ROOMVISOR_RATE_PER_SEC", default_value_t = 50)]
    pub rate_per_sec: u32,

    /// Inbound frames a socket may send in a burst above the sustained rate.
    #[arg(long, value_parser = ranged::<u32>(1..=1_000_000), env = "ROOMVISOR_RATE_BURST", default_value_t = 100)]
    pub rate_burst: u32,

    /// Frames queued for one socket before it counts as too slow and is disconnected.
    #[arg(long, value_parser = ranged::<usize>(1..=1_000_000), env = "ROOMVISOR_OUTBOUND_QUEUE", default_value_t = 1024)]
    pub outbound_queue: usize,

    /// Bytes queued for one socket before it counts as too slow; a single reply larger than
    /// this is refused with `reply too large` instead.
    #[arg(long, value_parser = ranged::<usize>(65_536..=1_073_741_824), env = "ROOMVISOR_OUTBOUND_QUEUE_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub outbound_queue_bytes: usize,

    /// Largest IPC frame from a worker; larger is a protocol violation.
    #[arg(long, value_parser = ranged::<usize>(65_536..=1_073_741_824), env = "ROOMVISOR_MAX_IPC_FRAME_BYTES", default_value_t = DEFAULT_MAX_FRAME_BYTES)]
    pub max_ipc_frame_bytes: usize,

    /// Open connections at most; past it new connections are closed at once. Default: as
    /// many as the open-files limit holds beside the room workers.
    #[arg(long, value_parser = ranged::<usize>(2..=10_000_000), env = "ROOMVISOR_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// WebSockets one client address may hold open; past it upgrades get 429.
    #[arg(long, value_parser = ranged::<usize>(1..=10_000_000), env = "ROOMVISOR_MAX_SOCKETS_PER_ADDRESS", default_value_t = 256)]
    pub max_sockets_per_address: usize,

    /// `GET /api/rooms` answers this machine only, and anyone sending
    /// `Authorization: Bearer <token>` when a token is set.
    #[arg(long, env = "ROOMVISOR_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,

    /// The operators' admin API (`/api/admin/...`) answers this machine only, and anyone
    /// sending `Authorization: Bearer <token>` when a token is set.
    #[arg(long, env = "ROOMVISOR_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Secret (16 bytes or more) for HS256 JSON Web Tokens: with it, every socket must present
    /// a token it signed (`?token=` or phoenix.js's `authToken`), and its claims are
    /// `conn.user` in the rooms; without it, sockets are anonymous.
    #[arg(long, env = "ROOMVISOR_AUTH_SECRET", hide_env_values = true, global = true, value_parser = parse_secret)]
    pub auth_secret: Option<Secret>,

    /// Log lines as `text` for people or `json` (one object per line) for log shippers.
    #[arg(long, env = "ROOMVISOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Option<Command>,

    /// A connection must send its whole request head within this time.
    #[arg(long, value_parser = ranged::<u64>(100..=600_000), env = "ROOMVISOR_REQUEST_HEAD_TIMEOUT_MS", default_value_t = 10_000)]
    pub request_head_timeout_ms: u64,

    /// Origins allowed to open a WebSocket besides the gateway's own (http and https on
    /// localhost, 127.0.0.1, [::1] and the bound address, at the bound port); repeatable.
    #[arg(long = "allowed-origin", env = "ROOMVISOR_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Worker processes kept started and prepared (engine up, prelude loaded) for rooms not
    /// yet asked for: a new room takes one instead of starting a process. Refilled in the
    /// background, by forks of a prepared template where the engine allows; 0 turns the pool
    /// (and the template) off.
    #[arg(long, value_parser = ranged::<usize>(0..=1024), env = "ROOMVISOR_WARM_WORKERS", default_value_t = 8)]
    pub warm_workers: usize,

    /// Calls that may wait for one room; past it callers get `room busy` at once.
    #[arg(long, value_parser = ranged::<usize>(1..=65_536), env = "ROOMVISOR_MAX_QUEUED_CALLS", default_value_t = 256)]
    pub max_queued_calls: usize,

    /// A caller waits this long for a room's answer before getting `timeout`.
    #[arg(long, value_parser = ranged::<u64>(1..=3_600_000), env = "ROOMVISOR_CALL_TIMEOUT_MS", default_value_t = 5_000)]
    pub call_timeout_ms: u64,

    /// A worker that leaves a call unanswered this long is killed as unresponsive.
    #[arg(long, value_parser = ranged::<u64>(1..=3_600_000), env = "ROOMVISOR_HARD_TIMEOUT_MS", default_value_t = 10_000)]
    pub hard_timeout_ms: u64,

    /// The JavaScript engine every room runs on (design section 11): `quickjs` in the default
    /// build, `deno` in a build with the cargo feature `deno` or `v8` (one engine per build).
    #[arg(long, env = "ROOMVISOR_ENGINE", default_value_t = EngineKind::BUILT, value_parser = parse_engine)]
    pub engine: EngineKind,

    /// JS heap per room.
    #[arg(long, value_parser = ranged::<u64>(1_048_576..=17_179_869_184), env = "ROOMVISOR_JS_HEAP_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub js_heap_bytes: u64,

    /// CPU time one call (or timer, or delivery) may use before it is interrupted.
    #[arg(long, value_parser = ranged::<u64>(1..=3_600_000), env = "ROOMVISOR_JS_CPU_MS", default_value_t = 1_000)]
    pub js_cpu_ms: u64,

    /// A room whose worker dies more than this many times within the window is cooled down.
    #[arg(long, env = "ROOMVISOR_CRASH_LIMIT", default_value_t = 5)]
    pub crash_limit: usize,

    #[arg(long, value_parser = ranged::<u64>(1..=86_400_000), env = "ROOMVISOR_CRASH_WINDOW_MS", default_value_t = 10_000)]
    pub crash_window_ms: u64,

    /// How long a crash-looping room is refused.
    #[arg(long, value_parser = ranged::<u64>(0..=86_400_000), env = "ROOMVISOR_CRASH_COOLDOWN_MS", default_value_t = 10_000)]
    pub crash_cooldown_ms: u64,

    /// Messages a join returns.
    #[arg(long, value_parser = ranged::<usize>(0..=1_000), env = "ROOMVISOR_HISTORY_ON_JOIN", default_value_t = 100)]
    pub history_on_join: usize,

    /// A socket that sends nothing (not even a heartbeat) this long is closed.
    #[arg(long, value_parser = ranged::<u64>(1_000..=86_400_000), env = "ROOMVISOR_IDLE_TIMEOUT_MS", default_value_t = 60_000)]
    pub idle_timeout_ms: u64,

    /// Join a cluster of gateways through this NATS server (JetStream enabled); alone without.
    #[arg(long, env = "ROOMVISOR_CLUSTER", value_name = "nats://HOST:PORT")]
    pub cluster: Option<String>,

    /// This gateway's name in the cluster. Default: host name and pid.
    #[arg(long, env = "ROOMVISOR_NODE_ID")]
    pub node_id: Option<String>,

    /// A room's lease in the cluster: a node that stops renewing (it died) loses its rooms
    /// after this long, and they start fresh elsewhere on next use.
    #[arg(long, value_parser = ranged::<u64>(1_000..=600_000), env = "ROOMVISOR_CLUSTER_LEASE_MS", default_value_t = 5_000)]
    pub cluster_lease_ms: u64,

    /// Replicas of the cluster's storage (durable rooms' JetStream stream and alarm bucket):
    /// 1 on a single nats-server; 3 on a NATS cluster keeps every acknowledged write on a
    /// quorum of servers. Used when the stream is created (or changed, when it differs).
    #[arg(long, value_parser = ranged::<usize>(1..=5), env = "ROOMVISOR_CLUSTER_REPLICAS", default_value_t = 1)]
    pub cluster_replicas: usize,

    /// Durable rooms: each room's `Room.storage` and alarms are kept in a SQLite database in
    /// this directory, and survive restarts of the room and of the gateway. Without it (and
    /// outside a cluster) rooms are transient and `Room.storage` is undefined. Not with
    /// `--cluster`, where rooms are durable in NATS JetStream.
    #[arg(long, env = "ROOMVISOR_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// The database may grow to this many bytes; writes past it fail with `storage
    /// unavailable` (reads go on). Default: as large as the disk allows.
    #[arg(long, value_parser = ranged::<u64>(65_536..=u64::MAX), env = "ROOMVISOR_DATA_MAX_BYTES")]
    pub data_max_bytes: Option<u64>,

    /// Bytes one durable room may store (keys and JSON values); a write past it throws a
    /// RangeError in the script.
    #[arg(long, value_parser = ranged::<u64>(1024..=1_073_741_824), env = "ROOMVISOR_ROOM_STORAGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub room_storage_bytes: u64,

    /// A durable room with no joins, no timers and no calls for this long is stopped
    /// (hibernates); its next use starts it again from its storage.
    #[arg(long, value_parser = ranged::<u64>(100..=604_800_000), env = "ROOMVISOR_ROOM_IDLE_MS", default_value_t = 300_000)]
    pub room_idle_ms: u64,

    /// On SIGTERM/SIGINT, workers get this long to exit before they are killed.
    #[arg(long, value_parser = ranged::<u64>(0..=600_000), env = "ROOMVISOR_SHUTDOWN_GRACE_MS", default_value_t = 5_000)]
    pub shutdown_grace_ms: u64,
}

/// A parser that accepts integers in `range` only; clap's error then names the flag and the
/// range, and the gateway exits with status 2 before it binds anything.
fn ranged<T>(range: std::ops::RangeInclusive<u64>) -> clap::builder::RangedU64ValueParser<T>
where
    T: TryFrom<u64> + Clone + Send + Sync + 'static,
    <T as TryFrom<u64>>::Error: Send + Sync + 'static + std::error::Error + ToString,
{
    clap::builder::RangedU64ValueParser::<T>::new().range(range)
}

/// What the gateway binary can do besides serving.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Prints a token signed with --auth-secret (ROOMVISOR_AUTH_SECRET), for development and
    /// tests: `gateway token --sub ann --name Ann --ttl 1h`.
    Token {
        /// The user's id (`sub`): what rooms and Presence know them by.
        #[arg(long)]
        sub: String,
        /// A display name (`name`), which the chat shows as the sender.
        #[arg(long)]
        name: Option<String>,
        /// How long the token is good for: `90s`, `30m`, `1h`, `7d`.
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: Duration,
        /// More claims, as a JSON object, e.g. `{"rooms":["vip"]}`.
        #[arg(long, value_parser = parse_claims)]
        claims: Option<serde_json::Map<String, serde_json::Value>>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A secret that `Debug` (and so any log of the configuration) does not show.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// Short HMAC keys can be brute-forced offline from one token.
const MIN_SECRET_BYTES: usize = 16;

fn parse_secret(value: &str) -> Result<Secret, String> {
    if value.len() < MIN_SECRET_BYTES {
        return Err(format!("the secret must be at least {MIN_SECRET_BYTES} bytes"));
    }
    Ok(Secret(value.to_owned()))
}

fn parse_ttl(value: &str) -> Result<Duration, String> {
    let split = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let n: u64 =
        number.parse().map_err(|_| format!("expected a duration like 90s, 30m, 1h or 7d, not {value:?}"))?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("unknown unit {unit:?}: use s, m, h or d")),
    };
    Ok(Duration::from_secs(n.saturating_mul(seconds)))
}

fn parse_claims(value: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    serde_json::from_str(value).map_err(|e| format!("expected a JSON object: {e}"))
}

pub const DEFAULT_ROOM_SCRIPT: &str = "rooms/chat-room.js";
/// The second kind served out of the box, so the game page works with `cargo run`.
pub const GAME_KIND: &str = "game";
pub const DEFAULT_GAME_SCRIPT: &str = "rooms/tic-tac-toe.js";
const BUILTIN_GAME_SCRIPT: &str = include_str!("../../rooms/tic-tac-toe.js");

const BOTH_NAME_THE_DEFAULT_KIND: &str = "--room-script and --room room=PATH both name the room kind's \
     script; keep --room room=PATH, which replaces --room-script";

/// One kind of room: its topic prefix and its script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomKind {
    pub prefix: String,
    pub script: PathBuf,
}

/// Refuses at start-up an engine this build lacks, rather than failing every room later.
fn parse_engine(value: &str) -> Result<EngineKind, String> {
    let engine = <EngineKind as clap::ValueEnum>::from_str(value, true)?;
    if engine != EngineKind::BUILT {
        return Err(format!(
            "this gateway was built with the {} engine only; `deno` needs a build with `--features deno` \
             (scripts/deno-setup.sh sets up what it needs), `quickjs` one without",
            EngineKind::BUILT
        ));
    }
    Ok(engine)
}

fn parse_room_kind(value: &str) -> Result<RoomKind, String> {
    let (prefix, script) = value.split_once('=').ok_or("expected PREFIX=PATH")?;
    if !is_valid_kind(prefix) {
        return Err(format!("the prefix {prefix:?} is not ^[a-z][a-z0-9_-]{{0,31}}$"));
    }
    if script.is_empty() {
        return Err("the script path is empty".to_owned());
    }
    Ok(RoomKind { prefix: prefix.to_owned(), script: PathBuf::from(script) })
}
/// The chat script, built in so that the default works from any directory.
pub const BUILTIN_CHAT_SCRIPT: &str = include_str!("../../rooms/chat-room.js");

impl Default for Config {
    fn default() -> Self {
        Config::parse_from(["gateway"])
    }
}

impl Config {
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }

    pub fn hard_timeout(&self) -> Duration {
        Duration::from_millis(self.hard_timeout_ms)
    }

    pub fn crash_window(&self) -> Duration {
        Duration::from_millis(self.crash_window_ms)
    }

    pub fn crash_cooldown(&self) -> Duration {
        Duration::from_millis(self.crash_cooldown_ms)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    pub fn cluster_lease(&self) -> Duration {
        Duration::from_millis(self.cluster_lease_ms)
    }

    pub fn request_head_timeout(&self) -> Duration {
        Duration::from_millis(self.request_head_timeout_ms)
    }

    pub fn room_idle(&self) -> Duration {
        Duration::from_millis(self.room_idle_ms)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    pub fn runtime_limits(&self) -> RuntimeLimits {
        RuntimeLimits {
            engine: self.engine,
            heap_bytes: self.js_heap_bytes,
            cpu_ms_per_call: self.js_cpu_ms,
            max_frame_bytes: self.max_ipc_frame_bytes as u64,
        }
    }

    /// Where durable rooms are kept, checked before anything starts. `--data-dir` with
    /// `--cluster` is refused rather than ignored: in a cluster rooms are kept in NATS
    /// JetStream, and a gateway that started anyway would serve rooms without the data the
    /// directory holds (and write new data elsewhere) with no more than a log line to say so.
    pub fn storage_choice(&self) -> Result<(), String> {
        match (&self.cluster, &self.data_dir) {
            (Some(_), Some(dir)) => Err(format!(
                "--data-dir {} cannot be used with --cluster: in a cluster, durable rooms are kept in \
                 NATS JetStream (so that a room that moves to another node keeps its data), and the \
                 SQLite database in that directory would not be used; leave out --data-dir \
                 (ROOMVISOR_DATA_DIR)",
                dir.display()
            )),
            _ => Ok(()),
        }
    }

    /// The room kinds served: those of `--room`, the default kind from `--room-script` unless
    /// `--room room=PATH` names it, and the game unless `--room game=PATH` names it. Fails on a
    /// kind named twice.
    pub fn kinds(&self) -> Result<Vec<RoomKind>, String> {
        let mut kinds = self.rooms.clone();
        for (i, kind) in kinds.iter().enumerate() {
            if kinds[..i].iter().any(|earlier| earlier.prefix == kind.prefix) {
                return Err(format!("--room: the kind {:?} is given twice", kind.prefix));
            }
        }
        let names_default_kind = kinds.iter().any(|k| k.prefix == DEFAULT_KIND);
        if names_default_kind && self.room_script.is_some() {
            return Err(BOTH_NAME_THE_DEFAULT_KIND.to_owned());
        }
        if !names_default_kind {
            kinds.insert(0, RoomKind { prefix: DEFAULT_KIND.to_owned(), script: self.default_kind_script() });
        }
        if !kinds.iter().any(|k| k.prefix == GAME_KIND) {
            kinds.push(RoomKind { prefix: GAME_KIND.to_owned(), script: PathBuf::from(DEFAULT_GAME_SCRIPT) });
        }
        Ok(kinds)
    }

    /// The `room` kind's script when `--room room=PATH` does not name it.
    fn default_kind_script(&self) -> PathBuf {
        self.room_script.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_ROOM_SCRIPT))
    }

    /// Whether topics with this prefix are rooms this gateway serves (the built-in kinds always).
    pub fn has_kind(&self, prefix: &str) -> bool {
        prefix == DEFAULT_KIND || prefix == GAME_KIND || self.rooms.iter().any(|k| k.prefix == prefix)
    }

    /// The kind's script: its name (for stack traces) and source. The default paths fall back
    /// to the built-in chat and game, so `cargo run` works from any directory. A `.ts` script
    /// comes back as JavaScript with every position kept and its own name, so traces still say
    /// `game.ts:9`.
    pub fn load_script(&self, kind: &str) -> std::io::Result<(String, String)> {
        let script = match self.rooms.iter().find(|k| k.prefix == kind) {
            Some(room_kind) => room_kind.script.clone(),
            None if kind == DEFAULT_KIND => self.default_kind_script(),
            None if kind == GAME_KIND => PathBuf::from(DEFAULT_GAME_SCRIPT),
            None => return Err(std::io::Error::other(format!("no room kind {kind:?}"))),
        };
        let name = script
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "room.js".to_owned());
        match std::fs::read_to_string(&script) {
            // InvalidData: the file was read; it is what it says that the room cannot run.
            Ok(source) if script.extension().is_some_and(|e| e == "ts") => {
                strip_types(&name, &source).map(|javascript| (name, javascript)).map_err(|e| {
                    let message = format!("cannot load room script {}: {e}", script.display());
                    std::io::Error::new(std::io::ErrorKind::InvalidData, message)
                })
            }
            Ok(source) => Ok((name, source)),
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound && script.as_os_str() == DEFAULT_ROOM_SCRIPT =>
            {
                Ok((name, BUILTIN_CHAT_SCRIPT.to_owned()))
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound && script.as_os_str() == DEFAULT_GAME_SCRIPT =>
            {
                Ok((name, BUILTIN_GAME_SCRIPT.to_owned()))
            }
            Err(e) => Err(std::io::Error::new(
                e.kind(),
                format!("cannot read room script {}: {e}", script.display()),
            )),
        }
    }

    /// Where the worker executable is, and the argv[0] to start it with.
    pub fn worker_command(&self) -> std::io::Result<(PathBuf, &'static str)> {
        if let Some(path) = &self.worker_bin {
            return Ok((path.clone(), WORKER_ARGV0));
        }
        let me = std::env::current_exe()?;
        let sibling = me.with_file_name(WORKER_ARGV0);
        if sibling.is_file() {
            Ok((sibling, WORKER_ARGV0))
        } else {
            Ok((me, WORKER_ARGV0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chat_and_the_game_are_served_unless_replaced() {
        let prefixes = |config: &Config| -> Vec<(String, PathBuf)> {
            config.kinds().unwrap().into_iter().map(|k| (k.prefix, k.script)).collect()
        };
        let defaults = Config::default();
        assert_eq!(
            prefixes(&defaults),
            [
                ("room".to_owned(), PathBuf::from(DEFAULT_ROOM_SCRIPT)),
                ("game".to_owned(), PathBuf::from(DEFAULT_GAME_SCRIPT))
            ]
        );
        assert!(defaults.has_kind("game") && !defaults.has_kind("chess"));
        let chess = RoomKind { prefix: "game".to_owned(), script: PathBuf::from("chess.js") };
        let replaced = Config { rooms: vec![chess], ..Config::default() };
        assert_eq!(prefixes(&replaced)[1], ("game".to_owned(), PathBuf::from("chess.js")));
        assert_eq!(prefixes(&replaced).len(), 2, "--room game=PATH replaces the built-in game");
        // Run from another directory, the built-in scripts stand in for the missing files.
        let (name, source) = defaults.load_script("game").unwrap();
        assert_eq!(name, "tic-tac-toe.js");
        assert!(source.contains("onJoin"));
    }

    #[test]
    fn defaults_are_the_limits_of_design_section_6() {
        let config = Config::parse_from(["gateway"]);
        assert_eq!(config.max_frame_bytes, 64 * 1024);
        assert_eq!((config.max_sender_chars, config.max_text_chars), (64, 4000));
        assert_eq!(config.max_rooms, 1024);
        assert_eq!(config.max_channels_per_socket, 100);
        assert_eq!((config.rate_per_sec, config.rate_burst), (50, 100));
        assert_eq!(config.outbound_queue, 1024);
        assert_eq!(config.max_ipc_frame_bytes, 8 * 1024 * 1024);
        assert!(config.allowed_origins.is_empty(), "only the request's own host by default");
        assert_eq!((config.call_timeout_ms, config.hard_timeout_ms), (5_000, 10_000));
        assert_eq!((config.js_heap_bytes, config.js_cpu_ms), (64 * 1024 * 1024, 1_000));
        assert_eq!((config.crash_limit, config.crash_window_ms), (5, 10_000));
        assert_eq!(config.shutdown_grace_ms, 5_000);
    }

    #[test]
    fn every_limit_has_a_flag() {
        let config = Config::parse_from([
            "gateway",
            "--max-frame-bytes=1001",
            "--max-sender-chars=2",
            "--max-text-chars=3",
            "--max-rooms=4",
            "--max-channels-per-socket=5",
            "--rate-per-sec=6",
            "--rate-burst=7",
            "--outbound-queue=8",
            "--max-ipc-frame-bytes=100009",
            "--allowed-origin=https://a.example,https://b.example",
        ]);
        assert_eq!(
            (config.max_frame_bytes, config.max_sender_chars, config.max_text_chars, config.max_rooms),
            (1001, 2, 3, 4)
        );
        assert_eq!((config.max_channels_per_socket, config.rate_per_sec, config.rate_burst), (5, 6, 7));
        assert_eq!((config.outbound_queue, config.max_ipc_frame_bytes), (8, 100_009));
        assert_eq!(config.allowed_origins, ["https://a.example", "https://b.example"]);
    }

    #[test]
    fn a_data_directory_is_refused_in_a_cluster() {
        let both =
            Config::parse_from(["gateway", "--cluster", "nats://127.0.0.1:4222", "--data-dir", "/tmp/x"]);
        let error = both.storage_choice().expect_err("refused");
        assert!(error.contains("--data-dir /tmp/x cannot be used with --cluster"), "{error}");
        let cluster =
            Config::parse_from(["gateway", "--cluster", "nats://127.0.0.1:4222", "--cluster-replicas", "3"]);
        assert_eq!((cluster.storage_choice(), cluster.cluster_replicas), (Ok(()), 3));
        let alone = Config::parse_from(["gateway", "--data-dir", "/tmp/x"]);
        assert_eq!((alone.storage_choice(), alone.cluster_replicas), (Ok(()), 1));
    }

    #[test]
    fn values_that_would_make_the_service_unusable_are_refused_with_the_range() {
        for flag in [
            "--idle-timeout-ms=0",
            "--max-frame-bytes=0",
            "--rate-burst=0",
            "--max-rooms=0",
            "--max-channels-per-socket=0",
            "--js-heap-bytes=0",
            "--history-on-join=5000",
            "--cluster-replicas=0",
            "--cluster-replicas=6",
        ] {
            let error = Config::try_parse_from(["gateway", flag]).expect_err(flag).to_string();
            let name = flag.split('=').next().unwrap_or_default();
            assert!(error.contains(name), "{flag}: {error}");
            assert!(error.contains("is not in"), "{flag}: the message names the range: {error}");
        }
    }
}
