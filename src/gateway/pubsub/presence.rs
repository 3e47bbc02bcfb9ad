//! The PubSub's side of Presence: `Room.presence` calls from rooms, the frames to this node's
//! joins, and the news between nodes (see [`PresenceOp`]). The bookkeeping itself, without
//! I/O, is `gateway::presence`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;

use super::{ClusterCommand, PubSub, PRESENCE_FLUSH};
use crate::gateway::phoenix;
use crate::gateway::presence::Changed;
use crate::util::LockExt;

/// Presence between nodes. Each entry belongs to the node that holds its join: only that
/// node changes it and tells the others, so no join is ever listed twice, and when a node
/// goes quiet its entries go with it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum PresenceOp {
    /// For the node that holds `conn`: track it (the room that asked runs elsewhere).
    Track { conn: String, key: String, meta: Meta },
    /// For the node that holds `conn`: untrack it.
    Untrack { conn: String },
    /// From the node that holds `conn`: its entry, for the other nodes' copies.
    Joined { conn: String, key: String, meta: Meta, phx_ref: String },
    /// From the node that holds `conn`: its entry is gone.
    Left { conn: String },
    /// A node opened the topic: each node sends its own entries again.
    Sync,
}

pub(super) type Meta = serde_json::Map<String, serde_json::Value>;

impl PubSub {
    /// `Room.presence.track`: lists the join under `key` with `meta`. Only a join that is
    /// still here is tracked: checked under the presence lock, which a leave takes after the
    /// member is gone, so a track that loses the race to a leave cannot leave a ghost entry.
    pub fn presence_track(&self, topic: &str, conn: &str, key: String, meta: Meta) {
        if !self.is_local(conn) {
            let op = PresenceOp::Track { conn: conn.to_owned(), key, meta };
            self.tell_cluster(ClusterCommand::PublishPresence { topic: topic.to_owned(), op });
            return;
        }
        let (changed, joined) = {
            let mut presence = self.presence.lock_or_recover();
            let Some(id) = self.local_subscription(conn) else { return };
            let Some(conn) = self.read(topic, |t| t.sockets.get(&id).map(|m| m.join.conn.clone())) else {
                return;
            };
            let n = self.next_presence_ref.fetch_add(1, Ordering::Relaxed);
            let phx_ref = format!("{}{n}", self.node_name());
            let joined = PresenceOp::Joined {
                conn: conn.to_string(),
                key: key.clone(),
                meta: meta.clone(),
                phx_ref: phx_ref.clone(),
            };
            (presence.track(topic, conn, key, meta, phx_ref), joined)
        };
        if changed != Changed::No {
            self.tell_cluster(ClusterCommand::PublishPresence { topic: topic.to_owned(), op: joined });
        }
        self.after_presence_change(topic, changed);
    }

    /// `Room.presence.untrack`, and every join that ends.
    pub fn presence_untrack(&self, topic: &str, conn: &str) {
        if !self.is_local(conn) {
            let op = PresenceOp::Untrack { conn: conn.to_owned() };
            self.tell_cluster(ClusterCommand::PublishPresence { topic: topic.to_owned(), op });
            return;
        }
        let changed = self.presence.lock_or_recover().untrack(topic, conn);
        if changed != Changed::No {
            let op = PresenceOp::Left { conn: conn.to_owned() };
            self.tell_cluster(ClusterCommand::PublishPresence { topic: topic.to_owned(), op });
        }
        self.after_presence_change(topic, changed);
    }

    /// Presence news from another node about a topic this node has open.
    pub fn presence_from_cluster(&self, topic: &str, op: PresenceOp) {
        match op {
            PresenceOp::Track { conn, key, meta } => {
                if self.is_local(&conn) {
                    self.presence_track(topic, &conn, key, meta);
                }
            }
            PresenceOp::Untrack { conn } => {
                if self.is_local(&conn) {
                    self.presence_untrack(topic, &conn);
                }
            }
            PresenceOp::Joined { conn, key, meta, phx_ref } if !self.is_local(&conn) => {
                self.node_seen(node_of(&conn));
                let changed = self.presence.lock_or_recover().track(topic, conn.into(), key, meta, phx_ref);
                self.after_presence_change(topic, changed);
            }
            PresenceOp::Left { conn } if !self.is_local(&conn) => {
                let changed = self.presence.lock_or_recover().untrack(topic, &conn);
                self.after_presence_change(topic, changed);
            }
            PresenceOp::Joined { .. } | PresenceOp::Left { .. } => {}
            PresenceOp::Sync => {
                let own = self.presence.lock_or_recover().entries_where(topic, |conn| self.is_local(conn));
                for (conn, key, meta, phx_ref) in own {
                    let op = PresenceOp::Joined { conn: conn.to_string(), key, meta, phx_ref };
                    self.tell_cluster(ClusterCommand::PublishPresence { topic: topic.to_owned(), op });
                }
            }
        }
    }

    /// Another node (by its conn prefix) is alive.
    pub fn node_seen(&self, node: &str) {
        if !node.is_empty() && node != self.node_name() {
            self.nodes_seen.lock_or_recover().insert(node.to_owned(), std::time::Instant::now());
        }
    }

    /// This node's conn prefix in a cluster (empty outside one): how other nodes know it.
    pub fn node_name(&self) -> &str {
        self.conn_prefix.get().map(String::as_str).unwrap_or_default()
    }

    /// Drops the presence entries of nodes not heard of for `ttl`: a node that died takes its
    /// entries with it.
    pub fn expire_nodes(&self, ttl: Duration) {
        let gone: Vec<String> = {
            let mut seen = self.nodes_seen.lock_or_recover();
            let gone =
                seen.iter().filter(|(_, at)| at.elapsed() > ttl).map(|(node, _)| node.clone()).collect();
            seen.retain(|_, at| at.elapsed() <= ttl);
            gone
        };
        if gone.is_empty() {
            return;
        }
        tracing::info!(nodes = ?gone, "dropping the presence of nodes not heard of for {ttl:?}");
        let changed = self
            .presence
            .lock_or_recover()
            .remove_where(None, |conn| gone.iter().any(|n| n == node_of(conn)));
        for (topic, changed) in changed {
            self.after_presence_change(&topic, changed);
        }
    }

    /// `Room.presence.list()`: `{key: {metas: [...]}}`.
    pub fn presence_list(&self, topic: &str) -> serde_json::Value {
        self.presence.lock_or_recover().list(topic)
    }

    /// `presence_state` for a join that was just accepted, on its own join_ref.
    pub fn presence_state_frame(&self, topic: &str, join_ref: Option<&str>) -> Utf8Bytes {
        let list = self.presence_list(topic);
        phoenix::push(join_ref, topic, phoenix::PRESENCE_STATE, &list)
    }

    /// A new runtime replays these joins: their entries wait to be tracked again.
    pub fn presence_begin_replay(&self, topic: &str, conns: impl IntoIterator<Item = Arc<str>>) {
        self.presence.lock_or_recover().begin_replay(topic, conns);
    }

    /// The replay is over: what the new runtime did not track again leaves.
    pub fn presence_end_replay(&self, topic: &str) {
        let changed = self.presence.lock_or_recover().end_replay(topic);
        self.after_presence_change(topic, changed);
    }

    fn after_presence_change(&self, topic: &str, changed: Changed) {
        if changed != Changed::ScheduleFlush {
            return;
        }
        match self.me.upgrade() {
            Some(me) => {
                let topic = topic.to_owned();
                tokio::spawn(async move {
                    tokio::time::sleep(PRESENCE_FLUSH).await;
                    me.flush_presence(&topic);
                });
            }
            // A PubSub made without `new` (a unit test's) has no task to flush later.
            None => self.flush_presence(topic),
        }
    }

    /// Sends the changes of the last interval to this node's joins, as one frame.
    fn flush_presence(&self, topic: &str) {
        let diff = self.presence.lock_or_recover().take_diff(topic);
        if let Some(diff) = diff {
            let frame = phoenix::push(None, topic, phoenix::PRESENCE_DIFF, &diff);
            self.broadcast_local(topic, &frame);
        }
    }
}

/// The node part of a conn id (`<node>~<boot>.`), by which its liveness is known.
fn node_of(conn: &str) -> &str {
    conn.rfind('.').map_or("", |dot| &conn[..=dot])
}
