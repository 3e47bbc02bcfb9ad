//! One joined topic's task: the join (the room's `onJoin`), then the channel's frames one at
//! a time and in order (each an `onEvent`), until a leave, a re-join, the socket closing, or
//! the gateway closing the join; then the room hears `onLeave`. What a join or an event means
//! is the room script's business (`gateway::hooks`).

use std::sync::Arc;

use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::SocketContext;
use crate::gateway::hooks::{self, LeaveReason, RoomReset};
use crate::gateway::phoenix::{self, Frame, Outbox, Reply, ROOM_RESET};
use crate::gateway::pubsub::{Join, PubSub, SubscriptionId};
use crate::gateway::rooms::{ClientId, RoomError, RoomId, Supervisor};
use crate::wire::ScriptErrorKind;

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
    pub join: Arc<Join>,
    pub subscription_id: SubscriptionId,
    /// Cancelled by the connection when a new join of the same topic replaces this one.
    pub replaced: CancellationToken,
}

/// How handling a frame left the channel.
enum Handled {
    Open,
    /// The room no longer has this join (a new runtime refused it): the channel is over.
    Closed,
}

impl Channel {
    pub(super) async fn run(self, join: Frame, mut frames: mpsc::Receiver<Box<Frame>>) {
        // Armed before the join's call: a socket that closes while the join is on its way
        // must still tell the room, or the room would keep a join nobody holds.
        let mut leave = LeaveNotice {
            supervisor: self.ctx.supervisor.clone(),
            room: self.room.clone(),
            conn: self.join.conn.clone(),
            caller: self.ctx.caller.id,
            why: Some(LeaveReason::Closed),
        };
        match self.join(&join).await {
            Joined::Yes => loop {
                tokio::select! {
                    biased;
                    () = self.join.closed.cancelled() => {
                        leave.why = None;
                        break;
                    }
                    () = self.replaced.cancelled() => {
                        leave.why = Some(LeaveReason::Rejoin);
                        break;
                    }
                    frame = frames.recv() => {
                        let Some(frame) = frame else { break };
                        if frame.event == phoenix::PHX_LEAVE {
                            self.outbox.send(frame.reply(&Reply::ok_empty()));
                            self.outbox.send(phoenix::close(self.join.join_ref.as_deref(), &self.topic));
                            leave.why = Some(LeaveReason::Leave);
                            break;
                        }
                        if let Handled::Closed = self.handle(&frame).await {
                            leave.why = None;
                            break;
                        }
                    }
                }
            },
            Joined::Refused => leave.why = None,
            Joined::Unanswered => {}
        }
        drop(leave);
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

    async fn join(&self, frame: &Frame) -> Joined {
        // In a cluster, the topic's subscription must reach NATS before the room is asked,
        // or a message sent on another node in between would be missed.
        self.ctx.supervisor.pubsub().synced().await;
        let args = hooks::join_args(&self.join.conn, self.join.user.as_deref(), &self.join.params);
        match self.call(hooks::JOIN, args).await {
            Ok(response) => {
                let reply = frame.reply_ok(&response);
                if !self.outbox.fits(&reply) {
                    self.outbox.send(frame.reply_error(REPLY_TOO_LARGE));
                    // The room did take the join: it hears the leave.
                    return Joined::Unanswered;
                }
                self.outbox.send(reply);
                ::metrics::counter!(crate::gateway::metrics::JOINS, "result" => "ok").increment(1);
                // As Phoenix Presence does: the joiner learns who is there right after its
                // reply, then hears the diffs (those held during the join follow).
                let pubsub = self.ctx.supervisor.pubsub();
                self.outbox.send(pubsub.presence_state_frame(&self.topic, self.join.join_ref.as_deref()));
                pubsub.admit(&self.topic, self.subscription_id);
                Joined::Yes
            }
            Err(e) => {
                let result = if matches!(e, RoomError::Script(_)) { "refused" } else { "failed" };
                ::metrics::counter!(crate::gateway::metrics::JOINS, "result" => result).increment(1);
                self.outbox.send(frame.reply_error(&self.refusal("join", &e)));
                match e {
                    RoomError::Script(_) => Joined::Refused,
                    _ => Joined::Unanswered,
                }
            }
        }
    }

    async fn handle(&self, frame: &Frame) -> Handled {
        let args = hooks::event_args(&self.join.conn, &frame.event, &frame.payload);
        let mut answer = self.call(hooks::EVENT, args.clone()).await;
        if is_unknown_connection(&answer) {
            // The runtime that took this join is gone and its successor never heard of it
            // (it started on another node, or could not replay the join): join it again, as a
            // replay would have, then send the event.
            if let Handled::Closed = self.rejoin().await {
                self.outbox.send(frame.reply_error("unmatched topic"));
                return Handled::Closed;
            }
            answer = self.call(hooks::EVENT, args).await;
        }
        let reply = match answer {
            Ok(response) => frame.reply_ok(&response),
            Err(e) => frame.reply_error(&self.refusal(&frame.event, &e)),
        };
        self.outbox.send_reply(reply, || frame.reply_error(REPLY_TOO_LARGE));
        Handled::Open
    }

    /// Replays this join into a runtime that does not know it; the client gets `room_reset`
    /// with its new join response, or `phx_close` if the room no longer takes it.
    async fn rejoin(&self) -> Handled {
        let args = hooks::join_args(&self.join.conn, self.join.user.as_deref(), &self.join.params);
        match self.call(hooks::JOIN, args).await {
            Ok(response) => {
                let reset =
                    RoomReset::restarted("the room restarted", &response, self.ctx.supervisor.is_durable());
                self.outbox.send(phoenix::push(
                    self.join.join_ref.as_deref(),
                    &self.topic,
                    ROOM_RESET,
                    &reset,
                ));
                Handled::Open
            }
            Err(e) => {
                tracing::info!(room = %self.room, conn = %self.join.conn, "a join was not taken again: {}", e.detail());
                self.outbox.send(phoenix::close(self.join.join_ref.as_deref(), &self.topic));
                Handled::Closed
            }
        }
    }

    async fn call(&self, function: &str, args: String) -> Result<Box<RawValue>, RoomError> {
        let caller = Some(&self.ctx.caller);
        let answer = self.ctx.supervisor.call_from(caller, &self.room, function, args).await?;
        hooks::response(answer).map_err(|why| RoomError::Script(crate::wire::ScriptError::exception(why)))
    }

    /// What the client is told when the room did not take a join or an event; a script's
    /// own bug goes to the log with its stack, since the client only hears "internal error".
    fn refusal(&self, what: &str, error: &RoomError) -> String {
        match error {
            RoomError::Script(e) if e.kind == ScriptErrorKind::Exception => {
                tracing::warn!(room = %self.room, "the room script failed on {what}: {}", error.detail());
            }
            RoomError::Script(_) => {}
            _ => tracing::info!(room = %self.room, "{what} refused: {}", error.detail()),
        }
        error.reason()
    }
}

enum Joined {
    Yes,
    /// The room refused the join (or its script failed on it): the room does not hold it.
    Refused,
    /// No answer the client can use (the room was unavailable, or the reply too large): the
    /// room may hold the join, so it hears the leave.
    Unanswered,
}

fn is_unknown_connection(answer: &Result<Box<RawValue>, RoomError>) -> bool {
    matches!(answer, Err(RoomError::Script(e)) if e.kind == ScriptErrorKind::UnknownConnection)
}

/// Tells the room that a join ended, when the channel task ends (or is dropped with its
/// socket): `onLeave` must run however the channel goes, and never start a room to do it.
struct LeaveNotice {
    supervisor: Supervisor,
    room: RoomId,
    conn: Arc<str>,
    caller: ClientId,
    /// `None`: the room does not hold this join (refused, or closed by the gateway).
    why: Option<LeaveReason>,
}

impl Drop for LeaveNotice {
    fn drop(&mut self) {
        let Some(why) = self.why else { return };
        // Dropped inside the runtime, except when the runtime itself is being torn down.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (supervisor, room, caller) = (self.supervisor.clone(), self.room.clone(), self.caller);
        let args = hooks::leave_args(&self.conn, why);
        runtime.spawn(async move {
            if let Some(Err(e)) = supervisor.call_running(Some(caller), &room, hooks::LEAVE, args).await {
                tracing::debug!(room = %room, "onLeave failed: {}", e.detail());
            }
        });
    }
}
