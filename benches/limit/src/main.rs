//! limit-server: the hardware's limit for roomvisor's benchmarks.
//!
//! It speaks the gateway's Phoenix Channels v2 JSON frames (the root README, "The protocol in
//! brief") but keeps every room in this process: a join subscribes, a message is stored and
//! broadcast under its room's lock. No JS, no worker processes, no rate limit. A load generator
//! drives it exactly as it drives the gateway, so the ratio gateway/limit is the cost of
//! processes + JS.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
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
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
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
}

/// Rooms by topic, created on first join and kept (the gateway keeps a room's history too).
/// The outer lock is taken only to join; a message takes its own room's lock.
#[derive(Default)]
struct Server {
    rooms: Mutex<HashMap<String, Arc<Mutex<Room>>>>,
    next_connection: AtomicU64,
}

/// A panic in one connection must not take every room down with it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
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
        .with_state(Arc::new(Server::default()));
    // Not axum's graceful shutdown: it would wait for every WebSocket client to hang up.
    // Returning drops the runtime, and with it every connection.
    tokio::select! {
        served = axum::serve(listener, app) => served,
        () = terminated() => Ok(()),
    }
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
    // The gateway's write strategy (src/socket.rs): what is already queued goes out with one
    // flush, so the ratio gateway/limit measures processes + JS, not a different writer.
    let mut writer = tokio::spawn(async move {
        while let Some(frame) = outbound.recv().await {
            if write_batch(&mut sink, frame, &mut outbound).await.is_err() {
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

/// As the gateway's: at most this many frames per flush.
const MAX_WRITE_BATCH: usize = 64;

async fn write_batch(
    sink: &mut SplitSink<WebSocket, Message>,
    first: Utf8Bytes,
    outbound: &mut mpsc::UnboundedReceiver<Utf8Bytes>,
) -> Result<(), axum::Error> {
    sink.feed(Message::Text(first)).await?;
    for _ in 1..MAX_WRITE_BATCH {
        match outbound.try_recv() {
            Ok(frame) => sink.feed(Message::Text(frame)).await?,
            Err(_) => break,
        }
    }
    sink.flush().await
}

/// An inbound frame `[join_ref, ref, topic, event, payload]`; the payload stays raw JSON.
struct Frame<'a> {
    join_ref: Option<String>,
    msg_ref: Option<String>,
    topic: String,
    event: String,
    payload: &'a RawValue,
}

impl<'a> Frame<'a> {
    /// Exactly a 5-element array, refs strings or null, as the gateway accepts.
    fn parse(text: &'a str) -> Option<Self> {
        type Wire<'a> = (Option<String>, Option<String>, String, String, &'a RawValue);
        let (join_ref, msg_ref, topic, event, payload): Wire = serde_json::from_str(text).ok()?;
        Some(Frame { join_ref, msg_ref, topic, event, payload })
    }

    fn reply<R: Serialize>(&self, status: &'static str, response: R) -> Utf8Bytes {
        let reply = Reply { status, response };
        encode(self.join_ref.as_deref(), self.msg_ref.as_deref(), &self.topic, "phx_reply", &reply)
    }

    fn ok<R: Serialize>(&self, response: R) -> Utf8Bytes {
        self.reply("ok", response)
    }

    fn error(&self, reason: &str) -> Utf8Bytes {
        self.reply("error", Reason { reason })
    }
}

#[derive(Serialize)]
struct Reply<R> {
    status: &'static str,
    response: R,
}

#[derive(Serialize)]
struct Reason<'a> {
    reason: &'a str,
}

/// Serializes as `{}`.
#[derive(Serialize)]
struct Empty {}

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

#[derive(Deserialize)]
struct SendMessage {
    sender: String,
    text: String,
}

fn encode<P: Serialize + ?Sized>(
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    event: &str,
    payload: &P,
) -> Utf8Bytes {
    // Strings, options and raw JSON always serialize; an empty array is a harmless fallback.
    serde_json::to_string(&(join_ref, msg_ref, topic, event, payload))
        .unwrap_or_else(|_| "[]".to_owned())
        .into()
}

/// `phx_close`, as Phoenix sends it: ref and join_ref both the join's ref.
fn close_frame(join_ref: Option<&str>, topic: &str) -> Utf8Bytes {
    encode(join_ref, join_ref, topic, "phx_close", &Empty {})
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
        let Some(frame) = Frame::parse(text) else { return };
        let reply = match frame.event.as_str() {
            "heartbeat" if frame.topic == "phoenix" => frame.ok(Empty {}),
            "phx_join" => return self.join(&frame),
            // Leaving what is not joined succeeds, as in Phoenix and the gateway.
            "phx_leave" if !self.joined.contains_key(&frame.topic) => frame.ok(Empty {}),
            _ if !self.is_joined(&frame) => frame.error("unmatched topic"),
            "phx_leave" => return self.leave(&frame),
            "send_message" => self.send_message(&frame),
            _ => frame.error("unknown event"),
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
            return self.push(frame.error("unmatched topic"));
        }
        // A second join of a joined topic replaces the first, as in Phoenix; the subscription
        // is keyed by connection id, so it is simply overwritten below.
        if let Some(old) = self.joined.remove(&frame.topic) {
            self.push(close_frame(old.join_ref.as_deref(), &frame.topic));
        }
        let room = lock(&self.server.rooms).entry(frame.topic.clone()).or_default().clone();
        {
            let mut state = lock(&room);
            state.subscribers.insert(self.id, self.outbox.clone());
            // Replying under the room's lock queues the history before any later broadcast:
            // no message is both in the history and pushed, none is missed.
            let skip = state.history.len().saturating_sub(HISTORY_ON_JOIN);
            let messages = state.history.iter().skip(skip).map(|m| &**m).collect();
            self.push(frame.ok(History { messages }));
        }
        self.joined.insert(frame.topic.clone(), Joined { join_ref: frame.join_ref.clone(), room });
    }

    fn leave(&mut self, frame: &Frame) {
        if let Some(joined) = self.joined.remove(&frame.topic) {
            // Unsubscribed first, so no broadcast follows the phx_close.
            lock(&joined.room).subscribers.remove(&self.id);
            self.push(frame.ok(Empty {}));
            self.push(close_frame(joined.join_ref.as_deref(), &frame.topic));
        }
    }

    fn send_message(&self, frame: &Frame) -> Utf8Bytes {
        let input = match validate(frame.payload) {
            Ok(input) => input,
            Err(reason) => return frame.error(&reason),
        };
        let Some(joined) = self.joined.get(&frame.topic) else { return frame.error("unmatched topic") };
        let mut room = lock(&joined.room);
        room.next_id += 1;
        let message =
            ChatMessage { id: room.next_id, sender: &input.sender, text: &input.text, timestamp: now_ms() };
        let message = match to_raw_value(&message) {
            Ok(message) => message,
            Err(e) => return frame.error(&e.to_string()),
        };
        // Encoded once; every subscriber (the sender too) gets a reference-counted clone. Sent
        // under the lock so that every subscriber sees the room's messages in id order.
        let push = encode(None, None, &frame.topic, "new_message", &message);
        for subscriber in room.subscribers.values() {
            let _ = subscriber.send(push.clone());
        }
        let reply = frame.ok(&message);
        room.history.push_back(message);
        if room.history.len() > HISTORY_KEPT {
            room.history.pop_front();
        }
        // The caller queues the reply after the broadcast, as the gateway does.
        reply
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

/// The payload of `send_message`, or why it is refused (the gateway's reasons).
fn validate(payload: &RawValue) -> Result<SendMessage, String> {
    let invalid = || "invalid payload: expected {\"sender\": string, \"text\": string}".to_owned();
    // serde would also read a struct from an array; the protocol's payloads are objects.
    if !payload.get().starts_with('{') {
        return Err(invalid());
    }
    let message: SendMessage = serde_json::from_str(payload.get()).map_err(|_| invalid())?;
    check_field("sender", &message.sender, MAX_SENDER_CHARS)?;
    check_field("text", &message.text, MAX_TEXT_CHARS)?;
    Ok(message)
}

fn check_field(name: &str, value: &str, max_chars: usize) -> Result<(), String> {
    if value.trim().is_empty() {
        return Err(format!("{name} must not be blank"));
    }
    if value.chars().count() > max_chars {
        return Err(format!("{name} is longer than {max_chars} characters"));
    }
    Ok(())
}

fn now_ms() -> u64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}
