//! One joined topic's task: the join's call to the room, then the channel's frames one at a
//! time and in order, until a leave or the connection drops the channel. What each call is
//! and how its answer becomes a reply is the chat's business (`gateway::chat`).

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc;

use super::SocketContext;
use crate::gateway::phoenix::{self, Frame, Outbox, Reply};
use crate::gateway::pubsub::{PubSub, SubscriptionId};
use crate::gateway::rooms::RoomId;

/// The reason given for a reply that would not fit in the socket's outbound queue.
const REPLY_TOO_LARGE: &str = "reply too large";

/// The socket's subscription to a joined topic. It ends when the connection forgets the
/// channel (replaced by a new join, ended, or the socket closed), even while that channel's
/// task still waits on its room: a replaced join must not deliver broadcasts a second time.
pub(super) struct Subscription {
    pub pubsub: Arc<PubSub>,
    pub topic: String,
    pub id: SubscriptionId,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.pubsub.unsubscribe_socket(&self.topic, self.id);
    }
}

/// A channel task has ended (left, failed to join, or replaced).
pub(super) struct ChannelEnded {
    pub topic: String,
    pub id: u64,
}

/// One joined topic.
pub(super) struct Channel {
    pub ctx: SocketContext,
    pub outbox: Outbox,
    pub room: RoomId,
    pub topic: String,
    pub join_ref: Option<String>,
    pub subscription_id: SubscriptionId,
}

impl Channel {
    pub(super) async fn run(self, join: Frame, mut frames: mpsc::Receiver<Box<Frame>>) {
        if self.join(&join).await {
            while let Some(frame) = frames.recv().await {
                if frame.event == phoenix::PHX_LEAVE {
                    self.outbox.send(frame.reply(&Reply::ok_empty()));
                    self.outbox.send(phoenix::close(self.join_ref.as_deref(), &self.topic));
                    break;
                }
                let reply = self.handle(&frame).await;
                self.outbox.send_reply(reply, || frame.reply_error(REPLY_TOO_LARGE));
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
        let chat = &self.ctx.chat;
        let call = chat.on_join();
        let caller = Some(&self.ctx.caller);
        let reply =
            match self.ctx.supervisor.call_from(caller, &self.room, call.function, call.args_json).await {
                Ok(answer) => chat.join_reply(&answer).map(|response| join.reply_ok(&response)),
                Err(e) => {
                    tracing::info!(room = %self.room, "join refused: {}", e.detail());
                    Err(e.reason())
                }
            };
        match reply {
            Ok(reply) => {
                self.outbox.send_reply(reply, || join.reply_error(REPLY_TOO_LARGE));
                true
            }
            Err(reason) => {
                self.outbox.send(join.reply_error(&reason));
                false
            }
        }
    }

    async fn handle(&self, frame: &Frame) -> Utf8Bytes {
        let chat = &self.ctx.chat;
        let call = match chat.on_push(&frame.event, &frame.payload) {
            Ok(call) => call,
            Err(reason) => return frame.reply_error(&reason),
        };
        let caller = Some(&self.ctx.caller);
        let answer = self.ctx.supervisor.call_from(caller, &self.room, call.function, call.args_json).await;
        match answer.map_err(|e| e.reason()).and_then(|answer| chat.push_reply(answer)) {
            Ok(response) => frame.reply_ok(&response),
            Err(reason) => frame.reply_error(&reason),
        }
    }
}
