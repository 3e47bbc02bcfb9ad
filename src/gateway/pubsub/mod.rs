//! In-process PubSub keyed by topic.
//!
//! Two kinds of subscriber share a topic's name: sockets, which receive frames that were
//! encoded once for all of them, and runtimes, which receive BroadcastChannel messages.
//! Nothing here awaits: a publisher never waits for a slow subscriber. A socket whose queue
//! is full is flagged as overflowed and its connection closes itself.
//!
//! Every socket subscriber is a join of the topic (a [`Join`], with the conn id its room's
//! script knows it by), so a room can speak to one join (`push`), to all but some
//! (`broadcast_except`), and the supervisor can replay a room's joins into a new runtime. A
//! join is *held* until its room accepts it: what is published meanwhile waits, and is sent
//! after the join's reply or dropped with a refused join, so a refused client sees nothing of
//! the room.
//!
//! In a cluster, the PubSub also tells the cluster bridge which topics this node has open and
//! hands it what is published here; what other nodes publish comes back through the
//! `*_from_cluster` entry points and is delivered locally only, so nothing is delivered twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::gateway::ids::RuntimeId;
use crate::gateway::phoenix::{self, Outbox};
use crate::gateway::presence::PresenceState;
use crate::util::{LockExt, RwLockExt};

mod presence;

pub use presence::PresenceOp;

/// Frames held for a join its room has not accepted yet; past either bound the socket is
/// treated as one that does not keep up.
const MAX_HELD_FRAMES: usize = 1024;
const MAX_HELD_BYTES: usize = 4 * 1024 * 1024;

/// One socket's join of a topic.
#[derive(Debug)]
pub struct Join {
    /// The id the room's script knows this join by (`conn.id`); unique in the cluster.
    pub conn: Arc<str>,
    pub join_ref: Option<String>,
    /// The join's payload, handed to `onJoin` again when a new runtime replays the join.
    pub params: Box<RawValue>,
    /// The socket's verified user (its token's claims), `conn.user` in the room.
    pub user: Option<Arc<RawValue>>,
    /// Cancelled when the gateway ends this join itself (a new runtime refused its replay).
    pub closed: CancellationToken,
}

struct Member {
    outbox: Outbox,
    join: Arc<Join>,
    /// Frames published before the room accepted the join; `None` once it has.
    held: Option<Mutex<Held>>,
    /// A listener that never joined a room (see `subscribe_socket`): never replayed.
    listener: bool,
}

#[derive(Default)]
struct Held {
    frames: Vec<Utf8Bytes>,
    bytes: usize,
}

impl Member {
    fn send(&self, frame: &Utf8Bytes) -> bool {
        let Some(held) = &self.held else { return self.outbox.send(frame.clone()) };
        let mut held = held.lock_or_recover();
        if held.frames.len() >= MAX_HELD_FRAMES || held.bytes + frame.len() > MAX_HELD_BYTES {
            self.outbox.overflowed().cancel();
            return false;
        }
        held.bytes += frame.len();
        held.frames.push(frame.clone());
        true
    }

    fn is_admitted(&self) -> bool {
        self.held.is_none()
    }
}

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
    sockets: HashMap<SubscriptionId, Member>,
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
    /// A frame for the topic's sockets but the joins named in `except`.
    PublishFrameExcept { topic: String, frame: Utf8Bytes, except: Vec<String> },
    /// An event for one join of the topic, on whichever node holds it.
    PublishPush { topic: String, conn: String, event: String, payload: Box<RawValue> },
    /// A BroadcastChannel post, for the runtimes with the channel open.
    PublishPost(ChannelMessage),
    /// Presence news for the other nodes with the topic open.
    PublishPresence { topic: String, op: PresenceOp },
    /// Answered once everything before it, subscriptions included, has reached NATS.
    Synced(oneshot::Sender<()>),
}

#[derive(Default)]
pub struct PubSub {
    topics: RwLock<HashMap<String, Topic>>,
    next_id: AtomicU64,
    cluster: OnceLock<mpsc::UnboundedSender<ClusterCommand>>,
    /// In a cluster, `"<node>."`: conn ids (and presence refs) name the node that made them.
    conn_prefix: OnceLock<String>,
    /// Who is in each room, by the room script's own account (`Room.presence`).
    presence: Mutex<PresenceState>,
    next_presence_ref: AtomicU64,
    /// This PubSub, for the tasks that flush presence diffs a little later.
    me: std::sync::Weak<PubSub>,
    /// In a cluster: when each other node (by conn prefix) was last heard of.
    nodes_seen: Mutex<HashMap<String, std::time::Instant>>,
}

/// Presence changes within this interval go out as one `presence_diff`.
const PRESENCE_FLUSH: Duration = Duration::from_millis(50);

/// How long a join waits for its topic's cluster subscription before it goes on anyway.
const SYNC_TIMEOUT: Duration = Duration::from_secs(2);

impl PubSub {
    pub fn new() -> Arc<PubSub> {
        Arc::new_cyclic(|me| PubSub { me: me.clone(), ..PubSub::default() })
    }

    /// Joins this PubSub to a cluster: from now on it reports topics opened and closed and
    /// hands over what is published here. Topics already open are reported at once.
    pub fn attach_cluster(&self, node: &str, commands: mpsc::UnboundedSender<ClusterCommand>) {
        // The boot time tells this run of the node from an earlier one of the same name, whose
        // presence entries other nodes may still hold until they expire.
        let boot = crate::util::epoch_ms();
        let _ = self.conn_prefix.set(format!("{node}~{boot}."));
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

    /// Subscribes a socket that listens without joining a room (tests, tools): admitted at
    /// once, with a conn id no room knows.
    pub fn subscribe_socket(&self, topic: &str, outbox: Outbox) -> SubscriptionId {
        let (id, _) = self.subscribe(topic, outbox, None, RawValue::NULL.to_owned(), None, true);
        self.admit(topic, id);
        id
    }

    /// Subscribes a socket's join of the topic, held until [`PubSub::admit`]: the room has not
    /// accepted it yet.
    pub fn subscribe_join(
        &self,
        topic: &str,
        outbox: Outbox,
        join_ref: Option<String>,
        params: Box<RawValue>,
        user: Option<Arc<RawValue>>,
    ) -> (SubscriptionId, Arc<Join>) {
        self.subscribe(topic, outbox, join_ref, params, user, false)
    }

    fn subscribe(
        &self,
        topic: &str,
        outbox: Outbox,
        join_ref: Option<String>,
        params: Box<RawValue>,
        user: Option<Arc<RawValue>>,
        listener: bool,
    ) -> (SubscriptionId, Arc<Join>) {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let id = SubscriptionId(n);
        let prefix = self.conn_prefix.get().map(String::as_str).unwrap_or_default();
        let conn: Arc<str> = format!("{prefix}{n}").into();
        let join = Arc::new(Join { conn, join_ref, params, user, closed: CancellationToken::new() });
        let member = Member { outbox, join: join.clone(), held: Some(Mutex::default()), listener };
        self.add(topic, |t| {
            t.sockets.insert(id, member);
        });
        (id, join)
    }

    /// The room accepted the join (its reply is queued): what was held for it follows the
    /// reply, and from now on frames go straight to the socket.
    pub fn admit(&self, topic: &str, id: SubscriptionId) {
        // Under the write lock, so no publisher can slip a frame in between the held ones.
        self.write(|topics| {
            let Some(member) = topics.get_mut(topic).and_then(|t| t.sockets.get_mut(&id)) else { return };
            if let Some(held) = member.held.take() {
                let held = held.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner());
                for frame in held.frames {
                    member.outbox.send(frame);
                }
            }
        })
    }

    /// This node's admitted joins of the topic, in the order they were made.
    pub fn joins(&self, topic: &str) -> Vec<Arc<Join>> {
        let mut joins: Vec<(SubscriptionId, Arc<Join>)> = self.read(topic, |t| {
            t.sockets
                .iter()
                .filter(|(_, m)| m.is_admitted() && !m.listener)
                .map(|(id, m)| (*id, m.join.clone()))
                .collect()
        });
        joins.sort_by_key(|(id, _)| id.0);
        joins.into_iter().map(|(_, join)| join).collect()
    }

    /// Ends a join from the server's side: the client gets `phx_close` and the join's task
    /// hears of it through [`Join::closed`].
    pub fn close_join(&self, topic: &str, conn: &str) {
        let Some(id) = self.local_subscription(conn) else { return };
        let mut removed = None;
        self.remove(topic, |t| removed = t.sockets.remove(&id));
        if let Some(member) = removed {
            member.outbox.send(phoenix::close(member.join.join_ref.as_deref(), topic));
            member.join.closed.cancel();
            self.presence_untrack(topic, &member.join.conn);
        }
    }

    /// Whether this node holds the join (always, outside a cluster).
    fn is_local(&self, conn: &str) -> bool {
        self.local_subscription(conn).is_some()
    }

    /// The subscription behind a conn id of this node.
    fn local_subscription(&self, conn: &str) -> Option<SubscriptionId> {
        let prefix = self.conn_prefix.get().map(String::as_str).unwrap_or_default();
        conn.strip_prefix(prefix)?.parse().ok().map(SubscriptionId)
    }

    /// Sends an event to one join, wherever in the cluster it is; the frame carries that
    /// join's `join_ref`, as Phoenix's `push/3` does. Returns whether this node delivered it.
    pub fn push(&self, topic: &str, conn: &str, event: &str, payload: &RawValue) -> bool {
        if self.local_subscription(conn).is_some() {
            return self.push_local(topic, conn, event, payload);
        }
        self.tell_cluster(ClusterCommand::PublishPush {
            topic: topic.to_owned(),
            conn: conn.to_owned(),
            event: event.to_owned(),
            payload: payload.to_owned(),
        });
        false
    }

    /// [`PubSub::push`] to a join of this node only.
    pub fn push_local<P: serde::Serialize + ?Sized>(
        &self,
        topic: &str,
        conn: &str,
        event: &str,
        payload: &P,
    ) -> bool {
        let Some(id) = self.local_subscription(conn) else { return false };
        self.read(topic, |t| {
            t.sockets.get(&id).is_some_and(|member| {
                let frame = phoenix::push(member.join.join_ref.as_deref(), topic, event, payload);
                member.send(&frame)
            })
        })
    }

    pub fn unsubscribe_socket(&self, topic: &str, id: SubscriptionId) {
        let mut removed = None;
        self.remove(topic, |t| removed = t.sockets.remove(&id));
        // A join's presence leaves with it (after it is gone, so a track racing the leave
        // finds no member; see `presence_track`).
        if let Some(member) = removed {
            self.presence_untrack(topic, &member.join.conn);
        }
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
        self.read(topic, |t| t.sockets.values().filter(|member| member.send(frame)).count())
    }

    /// [`PubSub::broadcast`] to every join but those in `except` (conn ids).
    pub fn broadcast_except(&self, topic: &str, frame: &Utf8Bytes, except: &[String]) -> usize {
        if except.is_empty() {
            return self.broadcast(topic, frame);
        }
        self.tell_cluster(ClusterCommand::PublishFrameExcept {
            topic: topic.to_owned(),
            frame: frame.clone(),
            except: except.to_vec(),
        });
        self.broadcast_local_except(topic, frame, except)
    }

    /// [`PubSub::broadcast_except`] to this node's sockets only.
    pub fn broadcast_local_except(&self, topic: &str, frame: &Utf8Bytes, except: &[String]) -> usize {
        self.read(topic, |t| {
            t.sockets
                .values()
                .filter(|member| !except.iter().any(|conn| **conn == *member.join.conn))
                .filter(|member| member.send(frame))
                .count()
        })
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
                // Once subscribed, ask the other nodes who they have here.
                let op = PresenceOp::Sync;
                self.tell_cluster(ClusterCommand::PublishPresence { topic: topic.to_owned(), op });
            }
            f(entry);
        })
    }

    fn remove(&self, topic: &str, f: impl FnOnce(&mut Topic)) {
        let mut closed = false;
        self.write(|topics| {
            if let Some(t) = topics.get_mut(topic) {
                f(t);
                if t.is_empty() {
                    topics.remove(topic);
                    self.tell_cluster(ClusterCommand::Close(topic.to_owned()));
                    closed = true;
                }
            }
        });
        // No longer hearing about the topic, this node's copy of other nodes' entries would
        // go stale. (After the write lock: presence is locked before topics elsewhere.)
        if closed && self.cluster.get().is_some() {
            let mut presence = self.presence.lock_or_recover();
            presence.remove_where(Some(topic), |conn| !self.is_local(conn));
            let _ = presence.take_diff(topic);
        }
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
