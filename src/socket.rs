//! One WebSocket connection speaking Phoenix Channels v2.
//!
//! Like Phoenix, each joined topic is a channel with its own task: it handles its frames one
//! at a time and in order, so a slow room never holds up heartbeats or other channels. The
//! connection task reads frames and routes them; a separate writer task drains the outbound
//! queue, so a client that stops reading fills its queue and is disconnected instead of
//! stalling anyone who broadcasts to it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::config::Config;
use crate::phoenix::{self, Frame, Reply};
use crate::pubsub::{Outbox, PubSub, SubscriptionId};
use crate::room::{RoomId, TOPIC_PREFIX};
use crate::shutdown::Shutdown;
use crate::supervisor::Supervisor;

/// Malformed frames tolerated before the socket is closed as broken.
const MAX_MALFORMED_FRAMES: u32 = 10;
/// Frames waiting for one channel's task; past it the client is told the channel is busy.
const CHANNEL_INBOX: usize = 64;
/// How long the writer gets to flush a close frame before the connection is dropped.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
}

/// What a connection needs from the gateway.
#[derive(Clone)]
pub struct SocketContext {
    pub supervisor: Supervisor,
    pub config: Arc<Config>,
    pub shutdown: Shutdown,
}

/// Serves one upgraded connection until either side closes it.
pub async fn serve(socket: WebSocket, ctx: SocketContext) {
    let (sink, stream) = socket.split();
    let (outbox, outbound) = Outbox::new(ctx.config.outbound_queue);
    let (close_tx, close_rx) = oneshot::channel();
    let writer = tokio::spawn(write_frames(sink, outbound, close_rx));
    let (ended_tx, ended_rx) = mpsc::channel(16);
    let mut connection = Connection {
        rate: TokenBucket::new(ctx.config.rate_per_sec, ctx.config.rate_burst),
        rate_limited: 0,
        ctx,
        outbox,
        channels: HashMap::new(),
        next_channel_id: 0,
        ended_tx,
        malformed: 0,
    };
    let mut stream = stream;
    let close = connection.run(&mut stream, ended_rx).await;
    let server_closing = close.is_some();
    // Hand the writer its close frame before the outbound queue closes (dropping the
    // connection drops its senders): a writer that saw the queue end first would close
    // without our code.
    let _ = close_tx.send(close);
    drop(connection);
    if server_closing {
        // The closing handshake: read (and drop) what the client still sends until its Close
        // arrives. Dropping the TCP connection with unread input would make the kernel send a
        // reset, and the client would never see our close code.
        let _ = tokio::time::timeout(CLOSE_FLUSH, async {
            while let Some(Ok(message)) = stream.next().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
    let mut writer = writer;
    if tokio::time::timeout(CLOSE_FLUSH, &mut writer).await.is_err() {
        writer.abort();
    }
}

/// The frame to close with, if the server is the one closing.
type Closing = Option<CloseFrame>;

fn closing(code: u16, reason: &'static str) -> Closing {
    Some(CloseFrame { code, reason: Utf8Bytes::from_static(reason) })
}

async fn write_frames(
    mut sink: SplitSink<WebSocket, Message>,
    mut outbound: mpsc::Receiver<Utf8Bytes>,
    mut close: oneshot::Receiver<Closing>,
) {
    loop {
        tokio::select! {
            biased;
            closing = &mut close => {
                if let Ok(Some(frame)) = closing {
                    let _ = sink.send(Message::Close(Some(frame))).await;
                }
                break;
            }
            frame = outbound.recv() => match frame {
                Some(frame) => {
                    if write_batch(&mut sink, frame, || outbound.try_recv().ok()).await.is_err() {
                        break;
                    }
                }
                None => break,
            },
        }
    }
    let _ = sink.close().await;
}

/// Frames written with one flush at most: enough to turn a backlog into few syscalls, few
/// enough that a close waits little behind them.
const MAX_WRITE_BATCH: usize = 64;

/// Writes `first` and whatever else `next_queued` has ready, then flushes once. Under fan-out
/// a socket that falls behind gets its backlog in one write(2) instead of one per frame; a
/// socket that keeps up still gets each frame at once. (The benchmarks' limit server writes
/// with this too, so that the comparison measures processes and JS, not a different writer.)
pub async fn write_batch(
    sink: &mut SplitSink<WebSocket, Message>,
    first: Utf8Bytes,
    mut next_queued: impl FnMut() -> Option<Utf8Bytes>,
) -> Result<(), axum::Error> {
    sink.feed(Message::Text(first)).await?;
    for _ in 1..MAX_WRITE_BATCH {
        match next_queued() {
            Some(frame) => sink.feed(Message::Text(frame)).await?,
            None => break,
        }
    }
    sink.flush().await
}

struct JoinedChannel {
    id: u64,
    join_ref: Option<String>,
    /// Boxed: tokio allocates a channel's first block of 32 slots up front, and 32 unboxed
    /// frames would add ~3.5 KiB to every joined channel, idle or not.
    inbox: mpsc::Sender<Box<Frame>>,
    _subscription: Subscription,
}

/// The socket's subscription to a joined topic. It ends when the connection forgets the
/// channel (replaced by a new join, ended, or the socket closed), even while that channel's
/// task still waits on its room: a replaced join must not deliver broadcasts a second time.
struct Subscription {
    pubsub: Arc<PubSub>,
    topic: String,
    id: SubscriptionId,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.pubsub.unsubscribe_socket(&self.topic, self.id);
    }
}

/// A channel task has ended (left, failed to join, or replaced).
struct ChannelEnded {
    topic: String,
    id: u64,
}

struct Connection {
    ctx: SocketContext,
    outbox: Outbox,
    channels: HashMap<String, JoinedChannel>,
    next_channel_id: u64,
    ended_tx: mpsc::Sender<ChannelEnded>,
    rate: TokenBucket,
    /// Frames refused by the rate limit since the last one let through.
    rate_limited: u64,
    malformed: u32,
}

impl Connection {
    async fn run(
        &mut self,
        stream: &mut SplitStream<WebSocket>,
        mut ended: mpsc::Receiver<ChannelEnded>,
    ) -> Closing {
        let idle_timeout = self.ctx.config.idle_timeout();
        let mut idle_deadline = Instant::now() + idle_timeout;
        let overflowed = self.outbox.overflowed().clone();
        let shutdown = self.ctx.shutdown.clone();
        loop {
            tokio::select! {
                () = shutdown.wait() => return closing(close_code::GOING_AWAY, "server shutting down"),
                () = overflowed.cancelled() => {
                    tracing::info!("disconnecting a client that does not keep up with its messages");
                    return closing(close_code::POLICY, "outbound queue full");
                }
                () = tokio::time::sleep_until(idle_deadline) => {
                    return closing(close_code::NORMAL, "idle timeout");
                }
                Some(ChannelEnded { topic, id }) = ended.recv() => {
                    if self.channels.get(&topic).is_some_and(|c| c.id == id) {
                        self.channels.remove(&topic);
                    }
                }
                message = stream.next() => {
                    idle_deadline = Instant::now() + idle_timeout;
                    match message {
                        Some(Ok(Message::Text(text))) => {
                            if let Some(close) = self.on_text(text.as_str()) {
                                return close;
                            }
                        }
                        Some(Ok(Message::Binary(bytes))) => {
                            if let Some(close) = self.on_binary(&bytes) {
                                return close;
                            }
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        Some(Ok(Message::Close(_))) | None => return None,
                        Some(Err(e)) => return on_read_error(e),
                    }
                }
            }
        }
    }

    fn on_text(&mut self, text: &str) -> Option<Closing> {
        let frame = match Frame::parse(text) {
            Ok(frame) => frame,
            Err(e) => return self.on_malformed(&e.to_string()),
        };
        if !self.rate.take() {
            // Logged once per run of refusals: enough to see who floods, without flooding the log.
            if self.rate_limited == 0 {
                tracing::info!("rate limiting a socket past {}/s", self.ctx.config.rate_per_sec);
            }
            self.rate_limited += 1;
            self.outbox.send(frame.reply_error("rate limited"));
            return None;
        }
        if self.rate_limited > 0 {
            tracing::debug!(refused = self.rate_limited, "a socket is back under its rate limit");
            self.rate_limited = 0;
        }
        if frame.topic == phoenix::PHOENIX_TOPIC && frame.event == phoenix::HEARTBEAT {
            self.outbox.send(frame.reply(&Reply::ok_empty()));
        } else if frame.event == phoenix::PHX_JOIN {
            self.join(frame);
        } else {
            self.route(frame);
        }
        None
    }

    /// Rooms speak JSON only; a well-formed binary push is refused with a reply (so the
    /// client is not left waiting), anything else binary counts as malformed.
    fn on_binary(&mut self, bytes: &[u8]) -> Option<Closing> {
        let frame = match Frame::parse_binary_push(bytes) {
            Ok(frame) => frame,
            Err(e) => return self.on_malformed(&e.to_string()),
        };
        tracing::debug!(topic = %frame.topic, event = %frame.event, "refused a binary push");
        if self.rate.take() {
            self.outbox.send(frame.reply_error("binary payloads are not supported"));
        } else {
            self.outbox.send(frame.reply_error("rate limited"));
        }
        None
    }

    fn on_malformed(&mut self, why: &str) -> Option<Closing> {
        self.malformed += 1;
        tracing::warn!(count = self.malformed, "dropped a frame: {why}");
        (self.malformed > MAX_MALFORMED_FRAMES)
            .then(|| closing(close_code::POLICY, "too many malformed frames"))
    }

    fn join(&mut self, frame: Frame) {
        if !frame.topic.starts_with(TOPIC_PREFIX) {
            self.outbox.send(frame.reply_error("unmatched topic"));
            return;
        }
        let Ok(room) = RoomId::from_topic(&frame.topic) else {
            self.outbox.send(frame.reply_error("invalid room id"));
            return;
        };
        // A second join of a joined topic replaces the first, as in Phoenix.
        if let Some(old) = self.channels.remove(&frame.topic) {
            self.outbox.send(phoenix::close(old.join_ref.as_deref(), &frame.topic));
        }
        if self.channels.len() >= self.ctx.config.max_channels_per_socket {
            self.outbox.send(frame.reply_error("too many channels on this socket"));
            return;
        }
        let id = self.next_channel_id;
        self.next_channel_id += 1;
        let (inbox, frames) = mpsc::channel(CHANNEL_INBOX);
        let topic = frame.topic.clone();
        // Subscribed before the history is read: a message sent meanwhile may then arrive
        // twice (clients dedupe by id) but is never missed.
        let pubsub = self.ctx.supervisor.pubsub().clone();
        let subscription_id = pubsub.subscribe_socket(&topic, self.outbox.clone());
        let subscription = Subscription { pubsub, topic: topic.clone(), id: subscription_id };
        let joined =
            JoinedChannel { id, join_ref: frame.join_ref.clone(), inbox, _subscription: subscription };
        self.channels.insert(topic.clone(), joined);
        let channel = Channel {
            ctx: self.ctx.clone(),
            outbox: self.outbox.clone(),
            room,
            topic,
            join_ref: frame.join_ref.clone(),
            subscription_id,
        };
        let ended = self.ended_tx.clone();
        tokio::spawn(async move {
            let topic = channel.topic.clone();
            channel.run(frame, frames).await;
            let _ = ended.send(ChannelEnded { topic, id }).await;
        });
    }

    fn route(&mut self, frame: Frame) {
        let Some(channel) = self.channels.get(&frame.topic) else {
            // Leaving what is already gone succeeds, as in Phoenix: a client whose channel
            // the server closed must not wait out its push timeout to finish leaving.
            if frame.event == phoenix::PHX_LEAVE {
                self.outbox.send(frame.reply(&Reply::ok_empty()));
            } else {
                self.outbox.send(frame.reply_error("unmatched topic"));
            }
            return;
        };
        if frame.join_ref.is_some() && frame.join_ref != channel.join_ref {
            self.outbox.send(frame.reply_error("unmatched topic"));
            return;
        }
        if let Err(e) = channel.inbox.try_send(Box::new(frame)) {
            let (frame, reason) = match e {
                mpsc::error::TrySendError::Full(frame) => (frame, "channel busy"),
                mpsc::error::TrySendError::Closed(frame) => (frame, "unmatched topic"),
            };
            self.outbox.send(frame.reply_error(reason));
        }
    }
}

fn on_read_error(error: axum::Error) -> Closing {
    use tokio_tungstenite::tungstenite::error::{CapacityError, Error};
    let inner = error.into_inner();
    match inner.downcast_ref::<Error>() {
        Some(Error::Capacity(CapacityError::MessageTooLong { size, max_size })) => {
            tracing::warn!("closing a socket that sent a {size}-byte message (limit {max_size})");
            closing(close_code::TOO_BIG, "message too big")
        }
        _ => {
            tracing::debug!("socket read failed: {inner}");
            None
        }
    }
}

/// One joined topic.
struct Channel {
    ctx: SocketContext,
    outbox: Outbox,
    room: RoomId,
    topic: String,
    join_ref: Option<String>,
    subscription_id: SubscriptionId,
}

/// The payload of a `send_message` push.
#[derive(Debug, Deserialize)]
pub struct SendMessage {
    pub sender: String,
    pub text: String,
}

impl SendMessage {
    /// Reads and checks the payload, or says why it is refused: it must be an object with a
    /// non-blank sender and text within their limits (in characters).
    pub fn read(
        payload: &RawValue,
        max_sender_chars: usize,
        max_text_chars: usize,
    ) -> Result<SendMessage, String> {
        let invalid = || "invalid payload: expected {\"sender\": string, \"text\": string}".to_owned();
        // serde would also read a struct from an array; the protocol's payloads are objects.
        if !payload.get().starts_with('{') {
            return Err(invalid());
        }
        let message: SendMessage = serde_json::from_str(payload.get()).map_err(|_| invalid())?;
        check_field("sender", &message.sender, max_sender_chars)?;
        check_field("text", &message.text, max_text_chars)?;
        Ok(message)
    }
}

impl Channel {
    async fn run(self, join: Frame, mut frames: mpsc::Receiver<Box<Frame>>) {
        if self.join(&join).await {
            while let Some(frame) = frames.recv().await {
                if frame.event == phoenix::PHX_LEAVE {
                    self.outbox.send(frame.reply(&Reply::ok_empty()));
                    self.outbox.send(phoenix::close(self.join_ref.as_deref(), &self.topic));
                    break;
                }
                let reply = self.handle(&frame).await;
                self.outbox.send(reply);
            }
        }
        // Frames the connection routed here before it heard that this channel ended (they
        // were right behind a leave or a refused join) still get their answer.
        frames.close();
        while let Ok(frame) = frames.try_recv() {
            if frame.event == phoenix::PHX_LEAVE {
                self.outbox.send(frame.reply(&Reply::ok_empty()));
            } else {
                self.outbox.send(frame.reply_error("unmatched topic"));
            }
        }
        // Unsubscribed here too, before the connection hears that the task ended, so that no
        // broadcast follows the `phx_close` of a leave.
        self.ctx.supervisor.pubsub().unsubscribe_socket(&self.topic, self.subscription_id);
    }

    async fn join(&self, join: &Frame) -> bool {
        // In a cluster, the topic's subscription must reach NATS before the history is read,
        // or a message sent on another node in between would be missed.
        self.ctx.supervisor.pubsub().synced().await;
        let args = format!("[{}]", self.ctx.config.history_on_join);
        let reply = match self.ctx.supervisor.call(&self.room, "getHistory", args).await {
            Ok(history) => match RawValue::from_string(format!(r#"{{"messages":{history}}}"#)) {
                Ok(response) => Ok(join.reply_ok(&response)),
                Err(_) => Err("the room returned a history that is not JSON".to_owned()),
            },
            Err(e) => Err(e.reason()),
        };
        match reply {
            Ok(reply) => {
                self.outbox.send(reply);
                true
            }
            Err(reason) => {
                tracing::info!(room = %self.room, "join refused: {reason}");
                self.outbox.send(join.reply_error(&reason));
                false
            }
        }
    }

    async fn handle(&self, frame: &Frame) -> Utf8Bytes {
        match frame.event.as_str() {
            "send_message" => match self.validate(frame) {
                Ok(args) => match self.ctx.supervisor.call(&self.room, "sendMessage", args).await {
                    Ok(message) => match RawValue::from_string(message) {
                        Ok(message) => frame.reply_ok(&message),
                        Err(_) => frame.reply_error("the room returned a message that is not JSON"),
                    },
                    Err(e) => frame.reply_error(&e.reason()),
                },
                Err(reason) => frame.reply_error(&reason),
            },
            _ => frame.reply_error("unknown event"),
        }
    }

    /// The arguments of `sendMessage`, or why the payload is refused.
    fn validate(&self, frame: &Frame) -> Result<String, String> {
        let config = &self.ctx.config;
        let message = SendMessage::read(&frame.payload, config.max_sender_chars, config.max_text_chars)?;
        serde_json::to_string(&(message.sender, message.text)).map_err(|e| e.to_string())
    }
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

/// Inbound rate limit per socket: `rate` frames per second sustained, `burst` at once.
struct TokenBucket {
    tokens: f64,
    burst: f64,
    per_second: f64,
    refilled_at: Instant,
}

impl TokenBucket {
    fn new(per_second: u32, burst: u32) -> Self {
        TokenBucket {
            tokens: f64::from(burst),
            burst: f64::from(burst),
            per_second: f64::from(per_second),
            refilled_at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled_at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.refilled_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_must_be_present_and_short() {
        assert!(check_field("text", "hi", 10).is_ok());
        assert_eq!(check_field("text", "  \n", 10).unwrap_err(), "text must not be blank");
        assert!(check_field("text", &"é".repeat(10), 10).is_ok(), "limits count characters, not bytes");
        assert!(check_field("text", &"é".repeat(11), 10).is_err());
    }

    #[test]
    fn token_bucket_allows_the_burst_then_refuses() {
        let mut bucket = TokenBucket::new(50, 100);
        assert!((0..100).all(|_| bucket.take()));
        assert!(!bucket.take());
    }
}
