//! Carries PubSub traffic between nodes: one NATS subscription per topic this node has a
//! subscriber on, and what this node publishes. One task handles every command in order, so
//! publishes keep the order they were made in, and a `Synced` answer means every subscription
//! asked for before it is in place.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::subjects;
use crate::gateway::pubsub::{ChannelMessage, ClusterCommand, PubSub};

/// The first byte of every message on a topic subject says what follows.
const FRAME: u8 = b'F';
const POST: u8 = b'P';
/// A frame for all but some joins: the JSON array of their conn ids, a newline, the frame.
const FRAME_EXCEPT: u8 = b'E';
/// An event for one join: the JSON array `[conn, event, payload]`.
const PUSH: u8 = b'T';
/// Presence news: a `PresenceOp` as JSON.
const PRESENCE: u8 = b'Q';

/// How long a `Synced` waits for NATS to confirm; a join must not hang on a lost connection.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

pub async fn run(
    client: async_nats::Client,
    pubsub: Arc<PubSub>,
    mut commands: mpsc::UnboundedReceiver<ClusterCommand>,
    presence_ttl: Duration,
) {
    let _liveness = tokio::spawn(liveness(client.clone(), pubsub.clone(), presence_ttl));
    let mut open: HashMap<String, JoinHandle<()>> = HashMap::new();
    while let Some(command) = commands.recv().await {
        match command {
            ClusterCommand::Open(topic) => {
                if open.contains_key(&topic) {
                    continue;
                }
                match client.subscribe(subjects::topic(&topic)).await {
                    Ok(subscriber) => {
                        let forward = tokio::spawn(forward(subscriber, topic.clone(), pubsub.clone()));
                        open.insert(topic, forward);
                    }
                    Err(e) => tracing::warn!(topic, "cannot subscribe to the topic in the cluster: {e}"),
                }
            }
            // Dropping the subscriber (with its task) unsubscribes.
            ClusterCommand::Close(topic) => {
                if let Some(forward) = open.remove(&topic) {
                    forward.abort();
                }
            }
            ClusterCommand::PublishFrame { topic, frame } => {
                publish(&client, &topic, FRAME, frame.as_str().as_bytes()).await;
            }
            ClusterCommand::PublishFrameExcept { topic, frame, except } => {
                let mut body = serde_json::to_string(&except).unwrap_or_else(|_| "[]".to_owned());
                body.push('\n');
                body.push_str(frame.as_str());
                publish(&client, &topic, FRAME_EXCEPT, body.as_bytes()).await;
            }
            ClusterCommand::PublishPush { topic, conn, event, payload } => {
                if let Ok(body) = serde_json::to_string(&(conn, event, payload)) {
                    publish(&client, &topic, PUSH, body.as_bytes()).await;
                }
            }
            ClusterCommand::PublishPresence { topic, op } => {
                if let Ok(body) = serde_json::to_vec(&op) {
                    publish(&client, &topic, PRESENCE, &body).await;
                }
            }
            ClusterCommand::PublishPost(message) => {
                publish(&client, &message.channel, POST, message.data.as_bytes()).await;
            }
            ClusterCommand::Synced(done) => {
                let _ = tokio::time::timeout(FLUSH_TIMEOUT, client.flush()).await;
                let _ = done.send(());
            }
        }
    }
}

async fn publish(client: &async_nats::Client, topic: &str, kind: u8, body: &[u8]) {
    let mut payload = BytesMut::with_capacity(1 + body.len());
    payload.put_u8(kind);
    payload.put_slice(body);
    // Only fails when the client is closed for good; a disconnected client buffers.
    if let Err(e) = client.publish(subjects::topic(topic), payload.freeze()).await {
        tracing::debug!(topic, "cannot publish to the cluster: {e}");
    }
}

/// Hands what other nodes publish on one topic to this node's subscribers.
async fn forward(mut subscriber: async_nats::Subscriber, topic: String, pubsub: Arc<PubSub>) {
    while let Some(message) = subscriber.next().await {
        deliver(&pubsub, &topic, &message.payload);
    }
}

fn deliver(pubsub: &PubSub, topic: &str, payload: &Bytes) {
    let Some((&kind, body)) = payload.split_first() else { return };
    let Ok(body) = std::str::from_utf8(body) else {
        tracing::warn!(topic, "dropped a cluster message that is not UTF-8");
        return;
    };
    match kind {
        FRAME => {
            pubsub.broadcast_local(topic, &body.to_owned().into());
        }
        FRAME_EXCEPT => {
            let Some((except, frame)) = body.split_once('\n') else { return };
            match serde_json::from_str::<Vec<String>>(except) {
                Ok(except) => {
                    pubsub.broadcast_local_except(topic, &frame.to_owned().into(), &except);
                }
                Err(e) => tracing::warn!(topic, "dropped a cluster frame with a bad except list: {e}"),
            }
        }
        PUSH => match serde_json::from_str::<(String, String, Box<RawValue>)>(body) {
            Ok((conn, event, payload)) => {
                pubsub.push_local(topic, &conn, &event, &*payload);
            }
            Err(e) => tracing::warn!(topic, "dropped a cluster push that does not parse: {e}"),
        },
        PRESENCE => match serde_json::from_str(body) {
            Ok(op) => pubsub.presence_from_cluster(topic, op),
            Err(e) => tracing::warn!(topic, "dropped presence news that does not parse: {e}"),
        },
        POST => {
            let message = ChannelMessage { channel: topic.into(), data: body.into() };
            pubsub.post_from_cluster(&message);
        }
        other => tracing::warn!(topic, "dropped a cluster message of unknown kind {other}"),
    }
}

/// Each node says it is alive a few times per `ttl`, hears the others, and drops the
/// presence entries of nodes it has not heard of for `ttl`: a node killed with `kill -9`
/// takes its entries with it within that time.
async fn liveness(client: async_nats::Client, pubsub: Arc<PubSub>, ttl: Duration) {
    let mut heard = match client.subscribe(subjects::presence_alive()).await {
        Ok(subscriber) => subscriber,
        Err(e) => {
            tracing::warn!("cannot hear other nodes' liveness: {e}");
            return;
        }
    };
    let listener = pubsub.clone();
    let _hearing = tokio::spawn(async move {
        while let Some(message) = heard.next().await {
            if let Ok(node) = std::str::from_utf8(&message.payload) {
                listener.node_seen(node);
            }
        }
    });
    let mut tick = tokio::time::interval(ttl / 3);
    loop {
        tick.tick().await;
        let me = Bytes::copy_from_slice(pubsub.node_name().as_bytes());
        if let Err(e) = client.publish(subjects::presence_alive(), me).await {
            tracing::debug!("cannot say this node is alive: {e}");
        }
        pubsub.expire_nodes(ttl);
    }
}
