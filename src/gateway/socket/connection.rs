//! The connection task: reads frames, answers heartbeats, routes each frame to its channel's
//! task, enforces the rate limit and the malformed-frame budget, and decides the close code.

use std::collections::HashMap;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::SplitStream;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::channel::{Channel, ChannelEnded, Subscription};
use super::SocketContext;
use crate::gateway::phoenix::{self, Closing, Frame, Outbox, Reply, TokenBucket};
use crate::gateway::rooms::RoomId;

/// Malformed frames tolerated before the socket is closed as broken.
const MAX_MALFORMED_FRAMES: u32 = 10;
/// Frames waiting for one channel's task; past it the client is told the channel is busy.
const CHANNEL_INBOX: usize = 64;

pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    /// The socket's token expired: phoenix.js reconnects, presenting a fresh one.
    pub const TOKEN_EXPIRED: u16 = 4001;
}

pub(super) fn closing(code: u16, reason: &'static str) -> Closing {
    Some(CloseFrame { code, reason: Utf8Bytes::from_static(reason) })
}

struct JoinedChannel {
    id: u64,
    join_ref: Option<String>,
    /// Boxed: tokio allocates a channel's first block of 32 slots up front, and 32 unboxed
    /// frames would add ~3.5 KiB to every joined channel, idle or not.
    inbox: mpsc::Sender<Box<Frame>>,
    /// Tells the channel's task that a new join of its topic replaced it.
    replaced: CancellationToken,
    _subscription: Subscription,
}

pub(super) struct Connection {
    ctx: SocketContext,
    outbox: Outbox,
    channels: HashMap<String, JoinedChannel>,
    next_channel_id: u64,
    ended_tx: mpsc::Sender<ChannelEnded>,
    rate: TokenBucket,
    /// Frames refused by the rate limit since the last one let through.
    rate_limited: u64,
    malformed: u32,
    /// Every channel task still running, replaced ones included.
    tasks: HashMap<u64, AbortHandle>,
    /// `roomvisor_frames_in_total`, looked up once per connection rather than per frame.
    frames_in: ::metrics::Counter,
}

/// A connection that ends takes its channel tasks with it: calls they still wait on lose
/// their caller, so the room drops them unrun instead of computing replies nobody reads.
impl Drop for Connection {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.abort();
        }
    }
}

impl Connection {
    pub(super) fn new(
        ctx: SocketContext,
        outbox: Outbox,
        rate: TokenBucket,
        ended_tx: mpsc::Sender<ChannelEnded>,
    ) -> Connection {
        Connection {
            ctx,
            outbox,
            channels: HashMap::new(),
            next_channel_id: 0,
            ended_tx,
            rate,
            rate_limited: 0,
            malformed: 0,
            tasks: HashMap::new(),
            frames_in: ::metrics::counter!(crate::gateway::metrics::FRAMES_IN),
        }
    }

    pub(super) async fn run(
        &mut self,
        stream: &mut SplitStream<WebSocket>,
        mut ended: mpsc::Receiver<ChannelEnded>,
    ) -> Closing {
        let idle_timeout = self.ctx.config.idle_timeout();
        let mut idle_deadline = Instant::now() + idle_timeout;
        let overflowed = self.outbox.overflowed().clone();
        let shutdown = self.ctx.shutdown.clone();
        let token_expiry = self.ctx.user.as_ref().map(|user| {
            let left = user.expires_at_ms.saturating_sub(crate::util::epoch_ms());
            Instant::now() + std::time::Duration::from_millis(left)
        });
        loop {
            tokio::select! {
                () = shutdown.wait() => return closing(close_code::GOING_AWAY, "server shutting down"),
                () = sleep_until_opt(token_expiry) => {
                    tracing::info!("closing a socket whose token expired");
                    return closing(close_code::TOKEN_EXPIRED, "token expired");
                }
                () = overflowed.cancelled() => {
                    tracing::info!("disconnecting a client that does not keep up with its messages");
                    return closing(close_code::POLICY, "outbound queue full");
                }
                () = tokio::time::sleep_until(idle_deadline) => {
                    return closing(close_code::NORMAL, "idle timeout");
                }
                Some(ChannelEnded { topic, id }) = ended.recv() => {
                    self.tasks.remove(&id);
                    if self.channels.get(&topic).is_some_and(|c| c.id == id) {
                        self.channels.remove(&topic);
                    }
                }
                message = stream.next() => {
                    // Control frames neither keep a socket alive (a Phoenix client proves it is
                    // there with heartbeats) nor go uncounted: each answered ping queues a pong.
                    if matches!(message, Some(Ok(Message::Text(_) | Message::Binary(_)))) {
                        idle_deadline = Instant::now() + idle_timeout;
                    }
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
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                            if !self.rate.take() {
                                tracing::info!("closing a socket that floods control frames");
                                return closing(close_code::POLICY, "rate limited");
                            }
                        }
                        Some(Ok(Message::Close(_))) | None => return None,
                        Some(Err(e)) => return on_read_error(e),
                    }
                }
            }
        }
    }

    fn on_text(&mut self, text: &str) -> Option<Closing> {
        self.frames_in.increment(1);
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
            ::metrics::counter!(crate::gateway::metrics::REFUSALS, "reason" => "rate_limited").increment(1);
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
        self.frames_in.increment(1);
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
        // A topic names a room of a configured kind (`kind:id`); anything else is not served.
        let served = frame.topic.split_once(':').is_some_and(|(kind, _)| self.ctx.config.has_kind(kind));
        if !served {
            self.outbox.send(frame.reply_error("unmatched topic"));
            return;
        }
        let Ok(room) = RoomId::from_topic(&frame.topic) else {
            self.outbox.send(frame.reply_error("invalid room id"));
            return;
        };
        // A second join of a joined topic replaces the first, as in Phoenix.
        if let Some(old) = self.channels.remove(&frame.topic) {
            old.replaced.cancel();
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
        // Subscribed (held) before the room is asked: what the room publishes from then on
        // follows the join's reply, so nothing between the room's answer and the
        // subscription is missed; a refused join drops it unseen.
        let pubsub = self.ctx.supervisor.pubsub().clone();
        let user = self.ctx.user.as_ref().map(|user| user.claims.clone());
        let (subscription_id, join) = pubsub.subscribe_join(
            &topic,
            self.outbox.clone(),
            frame.join_ref.clone(),
            frame.payload.clone(),
            user,
        );
        let subscription = Subscription { pubsub, topic: topic.clone(), id: subscription_id };
        let replaced = CancellationToken::new();
        let joined = JoinedChannel {
            id,
            join_ref: frame.join_ref.clone(),
            inbox,
            replaced: replaced.clone(),
            _subscription: subscription,
        };
        self.channels.insert(topic.clone(), joined);
        let channel = Channel {
            ctx: self.ctx.clone(),
            outbox: self.outbox.clone(),
            room,
            topic,
            join,
            subscription_id,
            replaced,
        };
        let ended = self.ended_tx.clone();
        let task = tokio::spawn(async move {
            let topic = channel.topic.clone();
            channel.run(frame, frames).await;
            let _ = ended.send(ChannelEnded { topic, id }).await;
        });
        self.tasks.insert(id, task.abort_handle());
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

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
