//! Room calls between nodes: NATS request/reply on the owner node's call subject. The caller
//! waits as long as for a local call, and a room's error arrives as the same kind of error it
//! was on the node that runs the room.

use std::sync::Arc;
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::subjects;
use crate::gateway::rooms::{NodeId, PlacementError, RemoteCallError, RoomError, RoomId, Supervisor};
use crate::wire::ScriptError;

#[derive(Serialize, Deserialize)]
struct CallRequest {
    /// The room's topic, `kind:id`.
    room: String,
    function: String,
    args: String,
}

#[derive(Serialize, Deserialize)]
enum CallReply {
    Ok(String),
    Failed(RemoteRoomError),
    /// The node does not run the room (its lease moved on, or its runtime just ended).
    NotHere,
}

/// A [`RoomError`] as it crosses the cluster: its kind survives; causes that exist only on
/// the node that met them (an I/O error, a NATS error) travel as the reason clients see.
#[derive(Debug, Serialize, Deserialize)]
enum RemoteRoomError {
    RoomLimit,
    CrashLooping,
    Busy,
    Timeout,
    WorkerExited,
    Script(ScriptError),
    StartFailed(ScriptError),
    OwnedElsewhere,
    Unavailable(String),
}

impl From<&RoomError> for RemoteRoomError {
    fn from(error: &RoomError) -> Self {
        match error {
            RoomError::RoomLimit => RemoteRoomError::RoomLimit,
            RoomError::CrashLooping => RemoteRoomError::CrashLooping,
            RoomError::Busy => RemoteRoomError::Busy,
            RoomError::Timeout => RemoteRoomError::Timeout,
            RoomError::WorkerExited => RemoteRoomError::WorkerExited,
            RoomError::Script(e) => RemoteRoomError::Script(e.clone()),
            RoomError::StartFailed(e) => RemoteRoomError::StartFailed(e.clone()),
            RoomError::OwnedElsewhere => RemoteRoomError::OwnedElsewhere,
            other => RemoteRoomError::Unavailable(other.reason()),
        }
    }
}

impl From<RemoteRoomError> for RoomError {
    fn from(error: RemoteRoomError) -> Self {
        match error {
            RemoteRoomError::RoomLimit => RoomError::RoomLimit,
            RemoteRoomError::CrashLooping => RoomError::CrashLooping,
            RemoteRoomError::Busy => RoomError::Busy,
            RemoteRoomError::Timeout => RoomError::Timeout,
            RemoteRoomError::WorkerExited => RoomError::WorkerExited,
            RemoteRoomError::Script(e) => RoomError::Script(e),
            RemoteRoomError::StartFailed(e) => RoomError::StartFailed(e),
            RemoteRoomError::OwnedElsewhere => RoomError::OwnedElsewhere,
            RemoteRoomError::Unavailable(reason) => PlacementError::Remote(reason).into(),
        }
    }
}

fn failed(error: impl std::error::Error + Send + Sync + 'static) -> RemoteCallError {
    RemoteCallError::Room(PlacementError::Failed(Arc::new(error)).into())
}

pub async fn call(
    client: &async_nats::Client,
    node: &NodeId,
    room: &RoomId,
    function: &str,
    args: String,
    timeout: Duration,
) -> Result<String, RemoteCallError> {
    let request = CallRequest { room: room.topic(), function: function.to_owned(), args };
    let body = serde_json::to_vec(&request).map_err(failed)?;
    let request = async_nats::Request::new().payload(Bytes::from(body)).timeout(Some(timeout));
    let answer = match client.send_request(subjects::node_calls(node.as_str()), request).await {
        Ok(answer) => answer,
        Err(e) => {
            return Err(match e.kind() {
                RequestErrorKind::TimedOut => RemoteCallError::Room(RoomError::Timeout),
                // Nobody listens on the node's subject: the node is gone.
                RequestErrorKind::NoResponders => {
                    RemoteCallError::Room(PlacementError::NodeGone(node.clone()).into())
                }
                _ => failed(e),
            });
        }
    };
    match serde_json::from_slice::<CallReply>(&answer.payload) {
        Ok(CallReply::Ok(result)) => Ok(result),
        Ok(CallReply::Failed(error)) => Err(RemoteCallError::Room(error.into())),
        Ok(CallReply::NotHere) => Err(RemoteCallError::NotHere),
        Err(e) => Err(failed(e)),
    }
}

/// Answers calls for the rooms this node runs until the client closes.
pub async fn serve(client: async_nats::Client, node: NodeId, supervisor: Supervisor) {
    let mut requests = match client.subscribe(subjects::node_calls(node.as_str())).await {
        Ok(requests) => requests,
        Err(e) => {
            tracing::error!("cannot serve room calls from other nodes: {e}");
            return;
        }
    };
    while let Some(message) = requests.next().await {
        let Some(reply_to) = message.reply else { continue };
        let (client, supervisor) = (client.clone(), supervisor.clone());
        tokio::spawn(async move {
            let reply = match serde_json::from_slice::<CallRequest>(&message.payload) {
                Ok(request) => match RoomId::from_topic(&request.room) {
                    Ok(room) => {
                        match supervisor.call_here(None, &room, &request.function, request.args).await {
                            Some(Ok(result)) => CallReply::Ok(result),
                            Some(Err(error)) => CallReply::Failed((&error).into()),
                            None => CallReply::NotHere,
                        }
                    }
                    Err(_) => CallReply::Failed(RemoteRoomError::Unavailable("invalid room id".to_owned())),
                },
                Err(e) => CallReply::Failed(RemoteRoomError::Unavailable(format!("unreadable call: {e}"))),
            };
            match serde_json::to_vec(&reply) {
                Ok(body) => {
                    if let Err(e) = client.publish(reply_to, Bytes::from(body)).await {
                        tracing::debug!("cannot answer a call from another node: {e}");
                    }
                }
                Err(e) => tracing::warn!("cannot encode a call answer: {e}"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ScriptErrorKind;

    #[test]
    fn a_room_error_keeps_its_kind_across_nodes() {
        let script = RoomError::Script(ScriptError {
            kind: ScriptErrorKind::Timeout,
            message: "script ran past its CPU budget of 5 ms".to_owned(),
            stack: None,
        });
        for error in [RoomError::CrashLooping, RoomError::Timeout, RoomError::RoomLimit, script] {
            let wire = serde_json::to_vec(&CallReply::Failed((&error).into())).unwrap();
            let Ok(CallReply::Failed(back)) = serde_json::from_slice::<CallReply>(&wire) else {
                panic!("not a failure");
            };
            let back = RoomError::from(back);
            assert_eq!(std::mem::discriminant(&back), std::mem::discriminant(&error));
            assert_eq!(back.reason(), error.reason());
        }
        let unavailable = RoomError::from(RemoteRoomError::from(&RoomError::ShuttingDown));
        assert_eq!(unavailable.reason(), RoomError::ShuttingDown.reason(), "the reason is what clients saw");
    }
}
