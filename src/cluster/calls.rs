//! Room calls between nodes: NATS request/reply on the owner node's call subject. The caller
//! waits as long as for a local call and gets the same error reasons.

use std::time::Duration;

use async_nats::client::RequestErrorKind;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::subjects;
use crate::room::{RoomError, RoomId};
use crate::supervisor::Supervisor;

#[derive(Serialize, Deserialize)]
struct CallRequest {
    room: String,
    function: String,
    args: String,
}

#[derive(Serialize, Deserialize)]
enum CallReply {
    Ok(String),
    /// The room's error, by the reason clients are shown.
    Failed(String),
    /// The node does not run the room (its lease moved on, or its runtime just ended).
    NotHere,
}

/// Why a remote call did not produce the room's answer.
#[derive(Debug)]
pub enum RemoteError {
    /// The node answered that it does not run the room.
    NotHere,
    /// Nobody listens on the node's subject: the node is gone.
    NodeGone,
    Room(RoomError),
}

pub async fn call(
    client: &async_nats::Client,
    node: &str,
    room: &RoomId,
    function: &str,
    args: String,
    timeout: Duration,
) -> Result<String, RemoteError> {
    let request = CallRequest { room: room.to_string(), function: function.to_owned(), args };
    let body =
        serde_json::to_vec(&request).map_err(|e| RemoteError::Room(RoomError::Unavailable(e.to_string())))?;
    let request = async_nats::Request::new().payload(Bytes::from(body)).timeout(Some(timeout));
    let answer = match client.send_request(subjects::node_calls(node), request).await {
        Ok(answer) => answer,
        Err(e) => {
            return Err(match e.kind() {
                RequestErrorKind::TimedOut => RemoteError::Room(RoomError::Timeout),
                RequestErrorKind::NoResponders => RemoteError::NodeGone,
                _ => RemoteError::Room(RoomError::Unavailable(format!("cluster error: {e}"))),
            })
        }
    };
    match serde_json::from_slice::<CallReply>(&answer.payload) {
        Ok(CallReply::Ok(result)) => Ok(result),
        Ok(CallReply::Failed(reason)) => Err(RemoteError::Room(RoomError::Remote(reason))),
        Ok(CallReply::NotHere) => Err(RemoteError::NotHere),
        Err(e) => {
            Err(RemoteError::Room(RoomError::Unavailable(format!("unreadable answer from node {node}: {e}"))))
        }
    }
}

/// Answers calls for the rooms this node runs until the client closes.
pub async fn serve(client: async_nats::Client, node: String, supervisor: Supervisor) {
    let mut requests = match client.subscribe(subjects::node_calls(&node)).await {
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
                Ok(request) => match RoomId::parse(&request.room) {
                    Ok(room) => match supervisor.call_here(&room, &request.function, request.args).await {
                        Some(Ok(result)) => CallReply::Ok(result),
                        Some(Err(error)) => CallReply::Failed(error.reason()),
                        None => CallReply::NotHere,
                    },
                    Err(_) => CallReply::Failed("invalid room id".to_owned()),
                },
                Err(e) => CallReply::Failed(format!("unreadable call: {e}")),
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
