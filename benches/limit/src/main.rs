//! limit-server: the hardware's limit for roomvisor's benchmarks.
//!
//! It speaks the gateway's Phoenix Channels v2 JSON frames (the root README, "The protocol in
//! brief") but keeps every room in this process: a join subscribes, a message is stored and
//! broadcast under its room's lock. No JS, no worker processes, no rate limit. A load generator
//! drives it exactly as it drives the gateway, so the ratio gateway/limit is the cost of
//! processes + JS.
//!
//! With `--hop` (the hop limit, `hop` in benches/run.sh) each room also gets one process of
//! its own, which every message goes through before it is broadcast (see `hop.rs`): still no
//! JS, so gateway/hop is the cost of JS and hop/limit the cost of the processes.

mod hop;

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use roomvisor::gateway::phoenix::{self, Frame, Reply};
use serde::Serialize;
use serde_json::value::{to_raw_value, RawValue};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

// The gateway's default limits, so both servers accept and refuse the same frames.
const MAX_FRAME_BYTES: usize = 64 * 1024;
const MAX_SENDER_CHARS: usize = 64;
const MAX_TEXT_CHARS: usize = 4000;
const HISTORY_KEPT: usize = 1000;
const HISTORY_ON_JOIN: usize = 100;
const TOPIC_PREFIX: &str = "room:";
/// How long the writer gets to flush what is queued once the client has gone.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

#[derive(Parser)]
#[command(about = "Minimal in-process Phoenix Channels chat server: the benchmarks' upper bound")]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// 0 picks a free port; the address is printed on stdout.
    #[arg(long, default_value_t = 4000)]
    port: u16,
    /// One echo process per room: every message goes to its room's process and back before
    /// it is broadcast, as the gateway's go through its room workers (no JS).
    #[arg(long)]
    hop: bool,
    /// Run as a room's echo process (what --hop starts): frames on fd 0, written back.
    #[arg(long = "echo-child", hide = true)]
    echo_child: bool,
}

/// A connection's queue of encoded frames. Unbounded, so a broadcast never waits on a client.
type Outbox = mpsc::UnboundedSender<Utf8Bytes>;

#[derive(Default)]
struct Room {
    /// Connection id -> its queue.
    subscribers: HashMap<u64, Outbox>,
    /// Each message's JSON, encoded once when it was sent.
    history: VecDeque<Box<RawValue>>,
    next_id: u64,
    /// The room's process under --hop, started by its first join.
    hop: Option<hop::Hop>,
}

impl Room {
    /// Broadcasts a message to every subscriber (the sender too) and keeps it in the history.
    /// Encoded once; every subscriber gets a reference-counted clone. Called under the room's
    /// lock, so that every subscriber sees the room's messages in id order.
    fn deliver(&mut self, topic: &str, message: Box<RawValue>) {
        let push = phoenix::push(None, topic, phoenix::NEW_MESSAGE, &*message);
        for subscriber in self.subscribers.values() {
            let _ = subscriber.send(push.clone());
        }
        self.history.push_back(message);
        if self.history.len() > HISTORY_KEPT {
            self.history.pop_front();
        }
    }
}

/// Rooms by topic, created on first join and kept (the gateway keeps a room's history too).
/// The outer lock is taken only to join; a message takes its own room's lock.
#[derive(Default)]
struct Server {
    rooms: Mutex<HashMap<String, Arc<Mutex<Room>>>>,
    next_connection: AtomicU64,
    /// Under --hop, the executable each room's process runs (this one).
    hop: Option<PathBuf>,
    /// Shutting down: no room starts a process any more.
    closing: AtomicBool,
}

/// A panic in one connection must not take every room down with it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    if args.echo_child {
        return hop::echo_child();
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(args))
}

async fn run(args: Args) -> std::io::Result<()> {
    // Resolved once: a rebuild during a run must not change what rooms start.
    let hop = if args.hop { Some(std::env::current_exe()?) } else { None };
    let server = Arc::new(Server { hop, ..Server::default() });
    let listener = TcpListener::bind((args.bind, args.port)).await?;
    let address = listener.local_addr()?;
    // The load generator reads this line to learn the port when started with --port 0.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "limit-server listening on http://{address}")?;
    stdout.flush()?;
    drop(stdout);
    // As in the gateway: without TCP_NODELAY, Nagle's algorithm meets delayed ACKs and a small
    // frame can wait ~40 ms.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            eprintln!("cannot set TCP_NODELAY: {e}");
        }
    });
    let app = Router::new()
        .route("/socket/websocket", get(upgrade))
        .route("/healthz", get(healthz))
        .with_state(server.clone());
    // Not axum's graceful shutdown: it would wait for every WebSocket client to hang up.
    // Returning drops the runtime, and with it every connection.
    let result = tokio::select! {
        served = axum::serve(listener, app) => served,
        () = terminated() => Ok(()),
    };
    hop::stop_all(&server).await;
    result
}

/// SIGINT or SIGTERM: exit 0 at once, so scripts that stop the server see a clean exit.
async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn healthz() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], r#"{"status":"ok"}"#)
}

async fn upgrade(State(server): State<Arc<Server>>, ws: WebSocketUpgrade) -> Response {
    // The gateway's 4 KiB read buffer too, so idle-socket memory compares like with like.
    ws.max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .read_buffer_size(4 * 1024)
        .on_upgrade(|ws| serve(ws, server))
}

/// One connection: this task reads and handles frames; a writer task drains the outbox, so
/// that broadcasts from other connections only ever enqueue.
async fn serve(socket: WebSocket, server: Arc<Server>) {
    let (mut sink, mut stream) = socket.split();
    let (outbox, mut outbound) = mpsc::unbounded_channel::<Utf8Bytes>();
    // The gateway's write strategy (src/gateway/phoenix/writer.rs): what is already queued goes out with one
    // flush, so the ratio gateway/limit measures processes + JS, not a different writer.
    let mut writer = tokio::spawn(async move {
        while let Some(frame) = outbound.recv().await {
            if phoenix::write_batch(&mut sink, frame, || outbound.try_recv().ok()).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let id = server.next_connection.fetch_add(1, Ordering::Relaxed);
    let mut connection = Connection { id, server, outbox, joined: HashMap::new() };
    while let Some(Ok(message)) = stream.next().await {
        match message {
            Message::Text(text) => connection.on_text(text.as_str()),
            Message::Close(_) => break,
            // Pings are answered by the library; binary frames are not part of this protocol.
            _ => {}
        }
    }
    // Unsubscribing drops the rooms' copies of the outbox; with ours gone the writer ends.
    drop(connection);
    if tokio::time::timeout(CLOSE_FLUSH, &mut writer).await.is_err() {
        writer.abort();
    }
}

#[derive(Serialize)]
struct History<'a> {
    messages: Vec<&'a RawValue>,
}

#[derive(Serialize)]
struct ChatMessage<'a> {
    id: u64,
    sender: &'a str,
    text: &'a str,
    timestamp: u64,
}

struct Joined {
    join_ref: Option<String>,
    room: Arc<Mutex<Room>>,
}

struct Connection {
    id: u64,
    server: Arc<Server>,
    outbox: Outbox,
    joined: HashMap<String, Joined>,
}

impl Connection {
    fn push(&self, frame: Utf8Bytes) {
        // Fails only once the writer has stopped, i.e. the client is gone.
        let _ = self.outbox.send(frame);
    }

    fn on_text(&mut self, text: &str) {
        // Unparseable frames are dropped, as the gateway drops them.
        let Ok(frame) = Frame::parse(text) else { return };
        let reply = match frame.event.as_str() {
            phoenix::HEARTBEAT if frame.topic == phoenix::PHOENIX_TOPIC => frame.reply(&Reply::ok_empty()),
            phoenix::PHX_JOIN => return self.join(&frame),
            // Leaving what is not joined succeeds, as in Phoenix and the gateway.
            phoenix::PHX_LEAVE if !self.joined.contains_key(&frame.topic) => frame.reply(&Reply::ok_empty()),
            _ if !self.is_joined(&frame) => frame.reply_error("unmatched topic"),
            phoenix::PHX_LEAVE => return self.leave(&frame),
            SEND_MESSAGE => match self.send_message(&frame) {
                Some(reply) => reply,
                // Under --hop the answer follows the message's return from the room's process.
                None => return,
            },
            _ => frame.reply_error("unknown event"),
        };
        self.push(reply);
    }

    /// A frame naming an older join of its topic does not reach the current one.
    fn is_joined(&self, frame: &Frame) -> bool {
        self.joined
            .get(&frame.topic)
            .is_some_and(|j| frame.join_ref.is_none() || frame.join_ref == j.join_ref)
    }

    fn join(&mut self, frame: &Frame) {
        if !frame.topic.starts_with(TOPIC_PREFIX) {
            return self.push(frame.reply_error("unmatched topic"));
        }
        // A second join of a joined topic replaces the first, as in Phoenix; the subscription
        // is keyed by connection id, so it is simply overwritten below.
        if let Some(old) = self.joined.remove(&frame.topic) {
            self.push(phoenix::close(old.join_ref.as_deref(), &frame.topic));
        }
        let room = lock(&self.server.rooms).entry(frame.topic.clone()).or_default().clone();
        {
            let mut state = lock(&room);
            // Under --hop a room's first join starts its process, as a gateway room's starts
            // its worker.
            if let Err(reason) = hop::ensure(&mut state, &room, &frame.topic, &self.server) {
                return self.push(frame.reply_error(&reason));
            }
            state.subscribers.insert(self.id, self.outbox.clone());
            // Replying under the room's lock queues the history before any later broadcast:
            // no message is both in the history and pushed, none is missed.
            let skip = state.history.len().saturating_sub(HISTORY_ON_JOIN);
            let messages = state.history.iter().skip(skip).map(|m| &**m).collect();
            match to_raw_value(&History { messages }) {
                Ok(history) => self.push(frame.reply_ok(&history)),
                Err(e) => self.push(frame.reply_error(&e.to_string())),
            }
        }
        self.joined.insert(frame.topic.clone(), Joined { join_ref: frame.join_ref.clone(), room });
    }

    fn leave(&mut self, frame: &Frame) {
        if let Some(joined) = self.joined.remove(&frame.topic) {
            // Unsubscribed first, so no broadcast follows the phx_close.
            lock(&joined.room).subscribers.remove(&self.id);
            self.push(frame.reply(&Reply::ok_empty()));
            self.push(phoenix::close(joined.join_ref.as_deref(), &frame.topic));
        }
    }

    /// The answer to a `send_message`, or `None` under --hop, where it is queued once the
    /// message is back from the room's process.
    fn send_message(&self, frame: &Frame) -> Option<Utf8Bytes> {
        let input = match SendMessage::read(&frame.payload) {
            Ok(input) => input,
            Err(reason) => return Some(frame.reply_error(&reason)),
        };
        let Some(joined) = self.joined.get(&frame.topic) else {
            return Some(frame.reply_error("unmatched topic"));
        };
        let mut room = lock(&joined.room);
        room.next_id += 1;
        let message =
            ChatMessage { id: room.next_id, sender: &input.sender, text: &input.text, timestamp: now_ms() };
        let message = match to_raw_value(&message) {
            Ok(message) => message,
            Err(e) => return Some(frame.reply_error(&e.to_string())),
        };
        let reply = frame.reply_ok(&message);
        if self.server.hop.is_some() {
            let pending = hop::Pending { outbox: self.outbox.clone(), reply };
            return match hop::send(&mut room, &joined.room, &frame.topic, &self.server, &message, pending) {
                Ok(()) => None,
                Err(reason) => Some(frame.reply_error(&reason)),
            };
        }
        room.deliver(&frame.topic, message);
        // The caller queues the reply after the broadcast, as the gateway does.
        Some(reply)
    }
}

impl Drop for Connection {
    /// A closed connection leaves every room it joined.
    fn drop(&mut self) {
        for joined in self.joined.values() {
            lock(&joined.room).subscribers.remove(&self.id);
        }
    }
}

fn now_ms() -> u64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

/// The one client event the chat answers.
const SEND_MESSAGE: &str = "send_message";

/// A `send_message` payload, checked as the chat room script checks it (rooms/chat-room.js):
/// the same work per message, done in process.
#[derive(serde::Deserialize)]
struct SendMessage {
    sender: String,
    text: String,
}

impl SendMessage {
    fn read(payload: &serde_json::value::RawValue) -> Result<SendMessage, String> {
        let invalid = || "invalid payload: expected {\"sender\": string, \"text\": string}".to_owned();
        if !payload.get().starts_with('{') {
            return Err(invalid());
        }
        let message: SendMessage = serde_json::from_str(payload.get()).map_err(|_| invalid())?;
        for (name, value, max) in
            [("sender", &message.sender, MAX_SENDER_CHARS), ("text", &message.text, MAX_TEXT_CHARS)]
        {
            if value.trim().is_empty() {
                return Err(format!("{name} must not be blank"));
            }
            if value.chars().count() > max {
                return Err(format!("{name} is longer than {max} characters"));
            }
        }
        Ok(message)
    }
}
