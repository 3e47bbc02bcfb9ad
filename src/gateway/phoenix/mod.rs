//! Phoenix Channels v2 on the gateway's side, below the socket: the frames, the per-socket
//! outbound queue and batched writer, and the inbound rate limit. Nothing here knows rooms.

mod frame;
mod rate;
mod writer;

pub use frame::{
    close, encode, push, Empty, Frame, MalformedFrame, Reply, HEARTBEAT, NEW_MESSAGE, PHOENIX_TOPIC,
    PHX_CLOSE, PHX_JOIN, PHX_LEAVE, PHX_REPLY, PRESENCE_DIFF, PRESENCE_STATE, ROOM_RESET,
};
pub use rate::TokenBucket;
pub use writer::{write_batch, write_frames, Closing, Outbox, OutboxReceiver};
