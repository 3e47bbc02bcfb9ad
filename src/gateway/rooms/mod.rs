//! Rooms on the gateway's side: the supervisor that starts each room once and reaps it, the
//! actor that owns a room's worker process, what goes wrong with them, and the seam a cluster
//! plugs into. (Room, runtime and node ids live in `gateway::ids`, below the PubSub.)

mod calls;
mod console;
mod crashes;
mod durable;
mod error;
mod fair;
mod handle;
mod launcher;
mod placement;
mod process;
mod reap;
mod shares;
mod spawn;
mod stdin;
mod supervisor;
#[cfg(test)]
mod tests;
mod warm;

pub use crate::gateway::ids::{InvalidRoomId, NodeId, RoomId, RuntimeId, DEFAULT_KIND};
pub use console::ConsoleLine;
pub use error::{PlacementError, RoomError};
pub use handle::{ExitReason, ExitReport, RoomHandle};
pub use placement::{BoxFuture, Claim, Holder, Placement, RemoteCallError};
pub use shares::{Caller, ClientId};
pub use supervisor::{announce_reset, RoomInfo, Supervisor};
