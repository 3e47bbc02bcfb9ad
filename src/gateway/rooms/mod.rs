//! Rooms on the gateway's side: their names, the supervisor that starts each room once and
//! reaps it, the actor that owns a room's worker process, and the seam a cluster plugs into.

mod crashes;
mod error;
mod handle;
mod ids;
mod placement;
mod process;
mod supervisor;
#[cfg(test)]
mod tests;

pub use error::{PlacementError, RoomError};
pub use handle::{ExitReason, ExitReport, RoomHandle};
pub use ids::{InvalidRoomId, NodeId, RoomId, RuntimeId, TOPIC_PREFIX};
pub use placement::{BoxFuture, Claim, Holder, Placement, RemoteCallError};
pub use supervisor::{announce_reset, RoomInfo, Supervisor};
