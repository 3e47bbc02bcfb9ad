//! The cluster as the supervisor sees it: [`Placement`] over the lease bucket and node-to-node
//! calls.

use std::time::Duration;

use super::{calls, Cluster};
use crate::gateway::rooms::{
    announce_reset, BoxFuture, Claim, Holder, NodeId, Placement, PlacementError, RemoteCallError, RoomId,
    RuntimeId,
};
use crate::util::LockExt;

impl Placement for Cluster {
    fn node(&self) -> &NodeId {
        &self.inner.node
    }

    fn claim<'a>(
        &'a self,
        room: &'a RoomId,
        runtime: RuntimeId,
    ) -> BoxFuture<'a, Result<Claim, PlacementError>> {
        Box::pin(async move {
            let holder = Holder { node: self.inner.node.clone(), runtime };
            let claim = self.inner.leases.claim(room, holder).await?;
            if matches!(claim, Claim::Ours) {
                // This node's subscribers used the room on another node; that runtime is gone
                // (its lease ended), so they are told, as after a crash.
                let previous = self.inner.remote_rooms.lock_or_recover().remove(room);
                if let Some(previous) = previous {
                    let detail = format!("its runtime on node {} ended", previous.node);
                    announce_reset(&self.inner.pubsub, room, &detail, self.is_durable());
                }
            }
            Ok(claim)
        })
    }

    fn release<'a>(&'a self, room: &'a RoomId, runtime: RuntimeId) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let holder = Holder { node: self.inner.node.clone(), runtime };
            self.inner.leases.release(room, &holder).await;
        })
    }

    fn holder<'a>(&'a self, room: &'a RoomId) -> BoxFuture<'a, Result<Option<Holder>, PlacementError>> {
        Box::pin(async move { Ok(self.inner.leases.holder(room).await?) })
    }

    fn call<'a>(
        &'a self,
        holder: &'a Holder,
        room: &'a RoomId,
        function: &'a str,
        args_json: String,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<String, RemoteCallError>> {
        Box::pin(async move {
            self.inner.remote_rooms.lock_or_recover().insert(room.clone(), holder.clone());
            calls::call(&self.inner.client, &holder.node, room, function, args_json, timeout).await
        })
    }
}
