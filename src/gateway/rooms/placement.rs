//! Where a room runs when gateways form a cluster. The supervisor asks through this trait
//! and knows nothing of how the answer is found (NATS, in `gateway::cluster`); a gateway on
//! its own has no placement and runs every room itself.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use super::error::{PlacementError, RoomError};
use crate::gateway::ids::{NodeId, RoomId, RuntimeId};

/// Boxed so the trait can be used as `dyn Placement`; the cost is one allocation per room
/// start or remote call, not per message of a local room.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Who runs a room: a node and which of its runtimes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Holder {
    pub node: NodeId,
    pub runtime: RuntimeId,
}

/// The outcome of claiming a room before starting it.
#[derive(Debug)]
pub enum Claim {
    /// This node may start it.
    Ours,
    /// Another node runs it.
    Held(Holder),
}

/// Why a call to a room on another node did not produce the room's answer.
#[derive(Debug)]
pub enum RemoteCallError {
    /// That node does not run the room (any more): look again.
    NotHere,
    Room(RoomError),
}

pub trait Placement: Send + Sync + 'static {
    /// This node's name.
    fn node(&self) -> &NodeId;

    /// Claims the room for one of this node's runtimes, unless another node holds it.
    fn claim<'a>(
        &'a self,
        room: &'a RoomId,
        runtime: RuntimeId,
    ) -> BoxFuture<'a, Result<Claim, PlacementError>>;

    /// Gives the room up, if that runtime still holds it.
    fn release<'a>(&'a self, room: &'a RoomId, runtime: RuntimeId) -> BoxFuture<'a, ()>;

    /// Who holds the room now, if anyone.
    fn holder<'a>(&'a self, room: &'a RoomId) -> BoxFuture<'a, Result<Option<Holder>, PlacementError>>;

    /// Calls a function of the room's script on the node that holds it.
    fn call<'a>(
        &'a self,
        holder: &'a Holder,
        room: &'a RoomId,
        function: &'a str,
        args_json: String,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<String, RemoteCallError>>;
}
