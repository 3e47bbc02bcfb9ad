//! Calling a room's script through the supervisor: where the room runs here, straight to its
//! handle; in a cluster, wherever its [`Placement`] says, starting it here if it runs nowhere.

use super::error::{PlacementError, RoomError};
use super::placement::{Holder, Placement, RemoteCallError};
use super::shares::{Caller, ClientId};
use super::supervisor::{Slot, Supervisor};
use crate::gateway::ids::RoomId;

impl Supervisor {
    /// Calls a function of the room's script, starting the room if needed (in a cluster:
    /// wherever it runs, starting it here if it runs nowhere).
    pub async fn call(&self, id: &RoomId, function: &str, args_json: String) -> Result<String, RoomError> {
        self.call_from(None, id, function, args_json).await
    }

    /// [`Supervisor::call`] on behalf of a client, whose share of room starts it uses.
    pub async fn call_from(
        &self,
        caller: Option<&Caller>,
        id: &RoomId,
        function: &str,
        args_json: String,
    ) -> Result<String, RoomError> {
        match &self.inner.placement {
            None => self.room_for(caller, id).await?.call_as(caller.map(|c| c.id), function, args_json).await,
            // Boxed: inline, the cluster path's NATS futures made every channel task's
            // future, and so every idle socket, ~5 KiB larger (loadgen idle: 14.4 → 19.3 KiB).
            Some(placement) => {
                Box::pin(self.call_placed(&**placement, caller, id, function, args_json)).await
            }
        }
    }

    /// Calls the room if this node runs it (or is starting it); `None` if it does not.
    /// `caller` is the socket the call is for, if it is on this node.
    pub async fn call_here(
        &self,
        caller: Option<ClientId>,
        id: &RoomId,
        function: &str,
        args_json: String,
    ) -> Option<Result<String, RoomError>> {
        let mut outcome = {
            let state = self.lock();
            match state.rooms.get(id)? {
                Slot::Live(handle) if !handle.is_closed() => Ok(handle.clone()),
                Slot::Live(_) => return None,
                Slot::Starting { outcome, .. } => Err(outcome.clone()),
            }
        };
        let handle = match &mut outcome {
            Ok(handle) => handle.clone(),
            Err(starting) => match starting.wait_for(Option::is_some).await {
                Ok(settled) => match settled.clone() {
                    Some(Ok(handle)) => handle,
                    Some(Err(RoomError::OwnedElsewhere)) => return None,
                    Some(Err(error)) => return Some(Err(error)),
                    None => return Some(Err(RoomError::WorkerExited)),
                },
                Err(_) => return Some(Err(RoomError::WorkerExited)),
            },
        };
        Some(handle.call_as(caller, function, args_json).await)
    }

    /// Calls the room only where it already runs (here or, in a cluster, on its node):
    /// `None` if it runs nowhere. A leave must not start a room just to say goodbye.
    pub async fn call_running(
        &self,
        caller: Option<ClientId>,
        id: &RoomId,
        function: &str,
        args_json: String,
    ) -> Option<Result<String, RoomError>> {
        if let Some(result) = self.call_here(caller, id, function, args_json.clone()).await {
            return Some(result);
        }
        let placement = self.inner.placement.as_ref()?;
        match placement.holder(id).await {
            Ok(Some(holder)) if holder.node != *placement.node() => {
                self.call_holder(&**placement, &holder, id, function, args_json).await
            }
            _ => None,
        }
    }

    /// Calls the room on the node that holds it; `None` if it turned out not to be there.
    async fn call_holder(
        &self,
        placement: &dyn Placement,
        holder: &Holder,
        id: &RoomId,
        function: &str,
        args_json: String,
    ) -> Option<Result<String, RoomError>> {
        let timeout = self.inner.config.call_timeout();
        ::metrics::counter!(crate::gateway::metrics::REMOTE_CALLS).increment(1);
        match placement.call(holder, id, function, args_json, timeout).await {
            Ok(result) => Some(Ok(result)),
            Err(RemoteCallError::Room(error)) => Some(Err(error)),
            Err(RemoteCallError::NotHere) => None,
        }
    }

    async fn call_placed(
        &self,
        placement: &dyn Placement,
        caller: Option<&Caller>,
        id: &RoomId,
        function: &str,
        args_json: String,
    ) -> Result<String, RoomError> {
        // A lease can move between looking it up and using it; a few looks settle it.
        const ATTEMPTS: usize = 3;
        for _ in 0..ATTEMPTS {
            if let Some(result) = self.call_here(caller.map(|c| c.id), id, function, args_json.clone()).await
            {
                return result;
            }
            match placement.holder(id).await? {
                Some(holder) if holder.node != *placement.node() => {
                    match self.call_holder(placement, &holder, id, function, args_json.clone()).await {
                        Some(result) => return result,
                        None => continue,
                    }
                }
                // Nobody's, or a lease of ours on a runtime that is gone: start it here.
                _ => match self.room_for(caller, id).await {
                    Ok(handle) => return handle.call_as(caller.map(|c| c.id), function, args_json).await,
                    Err(RoomError::OwnedElsewhere) => continue,
                    Err(error) => return Err(error),
                },
            }
        }
        Err(PlacementError::Contended.into())
    }
}
