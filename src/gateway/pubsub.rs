//! In-process PubSub keyed by topic.
//!
//! Two kinds of subscriber share a topic's name: sockets, which receive frames that were
//! encoded once for all of them, and runtimes, which receive BroadcastChannel messages.
//! Nothing here awaits: a publisher never waits for a slow subscriber. A socket whose queue
//! is full is flagged as overflowed and its connection closes itself.
//!
//! In a cluster, the PubSub also tells the cluster bridge which topics this node has open and
//! hands it what is published here; what other nodes publish comes back through the
//! `*_from_cluster` entry points and is delivered locally only, so nothing is delivered twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::gateway::ids::RuntimeId;
use crate::gateway::phoenix::Outbox;
use crate::util::RwLockExt;

/// A BroadcastChannel message on its way to a runtime.
#[derive(Clone, Debug)]
pub struct ChannelMessage {
    pub channel: Arc<str>,
    /// JSON.
    pub data: Arc<str>,
}

pub type RuntimeInbox = mpsc::Sender<ChannelMessage>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubscriptionId(u64);

#[derive(Default)]
struct Topic {
    sockets: HashMap<SubscriptionId, Outbox>,
    runtimes: HashMap<RuntimeId, RuntimeInbox>,
}

impl Topic {
    fn is_empty(&self) -> bool {
        self.sockets.is_empty() && self.runtimes.is_empty()
    }
}

/// What the PubSub asks of the cluster bridge, in the order it happened.
#[derive(Debug)]
pub enum ClusterCommand {
    /// This node has its first subscriber (socket or runtime) on the topic.
    Open(String),
    /// This node's last subscriber left the topic.
    Close(String),
    /// A frame for the topic's sockets, encoded once.
    PublishFrame { topic: String, frame: Utf8Bytes },
    /// A BroadcastChannel post, for the runtimes with the channel open.
    PublishPost(ChannelMessage),
    /// Answered once everything before it, subscriptions included, has reached NATS.
    Synced(oneshot::Sender<()>),
}

#[derive(Default)]
pub struct PubSub {
    topics: RwLock<HashMap<String, Topic>>,
    next_id: AtomicU64,
    cluster: OnceLock<mpsc::UnboundedSender<ClusterCommand>>,
}

/// How long a join waits for its topic's cluster subscription before it goes on anyway.
const SYNC_TIMEOUT: Duration = Duration::from_secs(2);

impl PubSub {
    pub fn new() -> Arc<PubSub> {
        Arc::new(PubSub::default())
    }

    /// Joins this PubSub to a cluster: from now on it reports topics opened and closed and
    /// hands over what is published here. Topics already open are reported at once.
    pub fn attach_cluster(&self, commands: mpsc::UnboundedSender<ClusterCommand>) {
        let open: Vec<String> = self.topics.read_or_recover().keys().cloned().collect();
        for topic in open {
            let _ = commands.send(ClusterCommand::Open(topic));
        }
        let _ = self.cluster.set(commands);
    }

    fn tell_cluster(&self, command: ClusterCommand) {
        if let Some(cluster) = self.cluster.get() {
            let _ = cluster.send(command);
        }
    }

    /// Resolves once the cluster has every subscription made so far, so that a join reads
    /// its history only after it can no longer miss a message from another node.
    pub async fn synced(&self) {
        let Some(cluster) = self.cluster.get() else { return };
        let (done, synced) = oneshot::channel();
        if cluster.send(ClusterCommand::Synced(done)).is_ok() {
            let _ = tokio::time::timeout(SYNC_TIMEOUT, synced).await;
        }
    }

    pub fn subscribe_socket(&self, topic: &str, outbox: Outbox) -> SubscriptionId {
        let id = SubscriptionId(self.next_id.fetch_add(1, Ordering::Relaxed));
        self.add(topic, |t| {
            t.sockets.insert(id, outbox);
        });
        id
    }

    pub fn unsubscribe_socket(&self, topic: &str, id: SubscriptionId) {
        self.remove(topic, |t| {
            t.sockets.remove(&id);
        });
    }

    pub fn subscribe_runtime(&self, channel: &str, runtime: RuntimeId, inbox: RuntimeInbox) {
        self.add(channel, |t| {
            t.runtimes.insert(runtime, inbox);
        });
    }

    pub fn unsubscribe_runtime(&self, channel: &str, runtime: RuntimeId) {
        self.remove(channel, |t| {
            t.runtimes.remove(&runtime);
        });
    }

    /// Sends one pre-encoded frame to every socket on the topic, in the whole cluster;
    /// returns how many sockets of this node took it.
    pub fn broadcast(&self, topic: &str, frame: &Utf8Bytes) -> usize {
        self.tell_cluster(ClusterCommand::PublishFrame { topic: topic.to_owned(), frame: frame.clone() });
        self.broadcast_local(topic, frame)
    }

    /// Sends one pre-encoded frame to this node's sockets on the topic only.
    pub fn broadcast_local(&self, topic: &str, frame: &Utf8Bytes) -> usize {
        self.read(topic, |t| t.sockets.values().filter(|outbox| outbox.send(frame.clone())).count())
    }

    /// Delivers a BroadcastChannel post to every runtime with the channel open, in the whole
    /// cluster, except the poster's own. Returns how many runtimes of this node took it.
    pub fn deliver_to_runtimes(&self, message: &ChannelMessage, except_runtime: RuntimeId) -> usize {
        self.tell_cluster(ClusterCommand::PublishPost(message.clone()));
        self.deliver_locally(message, Some(except_runtime))
    }

    /// A BroadcastChannel post another node published.
    pub fn post_from_cluster(&self, message: &ChannelMessage) -> usize {
        self.deliver_locally(message, None)
    }

    fn deliver_locally(&self, message: &ChannelMessage, except_runtime: Option<RuntimeId>) -> usize {
        self.read(&message.channel, |t| {
            t.runtimes
                .iter()
                .filter(|(runtime, _)| Some(**runtime) != except_runtime)
                .filter(|(runtime, inbox)| match inbox.try_send(message.clone()) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(channel = %message.channel, runtime = %runtime, "BroadcastChannel message dropped: {e}");
                        false
                    }
                })
                .count()
        })
    }

    pub fn socket_count(&self, topic: &str) -> usize {
        self.read(topic, |t| t.sockets.len())
    }

    fn read<T: Default>(&self, topic: &str, f: impl FnOnce(&Topic) -> T) -> T {
        let topics = self.topics.read_or_recover();
        topics.get(topic).map(f).unwrap_or_default()
    }

    fn write(&self, f: impl FnOnce(&mut HashMap<String, Topic>)) {
        let mut topics = self.topics.write_or_recover();
        f(&mut topics)
    }

    /// Adds a subscriber with `f`; the first on a topic opens it in the cluster.
    fn add(&self, topic: &str, f: impl FnOnce(&mut Topic)) {
        self.write(|topics| {
            let entry = topics.entry(topic.to_owned()).or_default();
            if entry.is_empty() {
                self.tell_cluster(ClusterCommand::Open(topic.to_owned()));
            }
            f(entry);
        })
    }

    fn remove(&self, topic: &str, f: impl FnOnce(&mut Topic)) {
        self.write(|topics| {
            if let Some(t) = topics.get_mut(topic) {
                f(t);
                if t.is_empty() {
                    topics.remove(topic);
                    self.tell_cluster(ClusterCommand::Close(topic.to_owned()));
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn broadcast_reaches_each_socket_once_and_flags_full_queues() {
        let pubsub = PubSub::new();
        let (fast, mut fast_rx) = Outbox::new(8);
        let (slow, _slow_rx) = Outbox::new(1);
        pubsub.subscribe_socket("room:a", fast);
        pubsub.subscribe_socket("room:a", slow.clone());
        let frame = Utf8Bytes::from_static("x");
        assert_eq!(pubsub.broadcast("room:a", &frame), 2);
        assert_eq!(pubsub.broadcast("room:a", &frame), 1);
        assert!(slow.overflowed().is_cancelled());
        assert_eq!(fast_rx.recv().await.as_ref().map(|f| f.as_str()), Some("x"));
        assert_eq!(pubsub.broadcast("room:b", &frame), 0);
    }

    #[tokio::test]
    async fn runtime_posts_skip_the_poster() {
        let pubsub = PubSub::new();
        let (a, mut a_rx) = mpsc::channel(4);
        let (b, mut b_rx) = mpsc::channel(4);
        let (one, two) = (RuntimeId::new(1), RuntimeId::new(2));
        pubsub.subscribe_runtime("chat", one, a);
        pubsub.subscribe_runtime("chat", two, b);
        let message = ChannelMessage { channel: "chat".into(), data: "1".into() };
        assert_eq!(pubsub.deliver_to_runtimes(&message, one), 1);
        assert!(a_rx.try_recv().is_err());
        assert_eq!(b_rx.recv().await.map(|m| m.data), Some("1".into()));
        pubsub.unsubscribe_runtime("chat", two);
        assert_eq!(pubsub.deliver_to_runtimes(&message, one), 0);
        assert_eq!(
            pubsub.post_from_cluster(&message),
            1,
            "a post from another node reaches every runtime here"
        );
    }
}
