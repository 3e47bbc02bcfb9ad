//! Several gateways as one cluster over NATS (`--cluster nats://HOST:PORT`).
//!
//! - PubSub across nodes ([`bridge`]): a node subscribes to a topic's subject while any of its
//!   sockets or runtimes is on the topic; the connection is made with `no_echo`, so what a node
//!   publishes reaches the others through NATS and its own subscribers directly, once each.
//! - One owner per room ([`leases`]): claimed in a JetStream key-value bucket whose max age is
//!   the lease; renewed, and other nodes' rooms watched, by [`upkeep`].
//! - Calls for a room owned elsewhere ([`calls`]): NATS request/reply to the owner node.
//!
//! The supervisor reaches all of this only through the [`Placement`] trait ([`placement`]).
//! The gateway starts whether or not NATS is reachable; the client reconnects by itself, and
//! until the bucket is open, rooms this node does not already run are refused with a clear
//! reason instead of waiting.

mod bridge;
mod calls;
mod leases;
mod placement;
mod subjects;
mod upkeep;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::gateway::pubsub::PubSub;
use crate::gateway::rooms::{Holder, NodeId, Placement, RoomId, RoomInfo, Supervisor};
use leases::Leases;

#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    node: NodeId,
    client: async_nats::Client,
    leases: Leases,
    pubsub: Arc<PubSub>,
    /// Rooms this node's subscribers use on other nodes, by the holder last seen: when that
    /// runtime ends, they are told as after a crash.
    remote_rooms: Mutex<HashMap<RoomId, Holder>>,
    /// Whether rooms keep their state (the supervisor has storage): a room that moved to
    /// another node comes back with it, and its clients hear `restored: true`.
    durable: AtomicBool,
}

impl Cluster {
    /// Starts connecting and joins the PubSub to the other nodes; returns at once, even while
    /// NATS is unreachable. Fails only on an address that cannot be used at all.
    pub async fn connect(
        url: &str,
        node: NodeId,
        lease: Duration,
        pubsub: Arc<PubSub>,
    ) -> Result<Cluster, String> {
        let options = async_nats::ConnectOptions::new()
            .name(format!("roomvisor {node}"))
            .no_echo()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .reconnect_delay_callback(|attempts| Duration::from_millis((100 * attempts as u64).min(1_000)))
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => {
                        ::metrics::gauge!(crate::gateway::metrics::NATS_CONNECTED).set(1.0);
                        tracing::info!("connected to NATS")
                    }
                    async_nats::Event::Disconnected => {
                        ::metrics::gauge!(crate::gateway::metrics::NATS_CONNECTED).set(0.0);
                        tracing::warn!("disconnected from NATS; reconnecting")
                    }
                    other => tracing::debug!("NATS: {other}"),
                }
            });
        let client = options.connect(url).await.map_err(|e| format!("cannot use NATS at {url}: {e}"))?;
        let (commands, received) = mpsc::unbounded_channel();
        pubsub.attach_cluster(node.as_str(), commands);
        tokio::spawn(bridge::run(client.clone(), pubsub.clone(), received, lease));
        let inner = Inner {
            node,
            client,
            leases: Leases::new(lease),
            pubsub,
            remote_rooms: Mutex::default(),
            durable: AtomicBool::new(false),
        };
        Ok(Cluster { inner: Arc::new(inner) })
    }

    pub fn node(&self) -> &NodeId {
        &self.inner.node
    }

    /// The connection to NATS, which the cluster's storage shares.
    pub fn client(&self) -> async_nats::Client {
        self.inner.client.clone()
    }

    /// Whether rooms that move between nodes keep their state.
    fn is_durable(&self) -> bool {
        self.inner.durable.load(Ordering::Relaxed)
    }

    pub fn is_connected(&self) -> bool {
        self.inner.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Ready to start and reach rooms: connected, with the lease bucket open.
    pub fn is_ready(&self) -> bool {
        self.is_connected() && self.inner.leases.is_ready()
    }

    /// What the supervisor asks where rooms run.
    pub fn placement(&self) -> Arc<dyn Placement> {
        Arc::new(self.clone())
    }

    /// Starts the cluster's background work for this node's supervisor: answering calls from
    /// other nodes, and the upkeep of leases.
    pub fn start(&self, supervisor: Supervisor) {
        self.inner.durable.store(supervisor.is_durable(), Ordering::Relaxed);
        tokio::spawn(calls::serve(self.inner.client.clone(), self.inner.node.clone(), supervisor.clone()));
        upkeep::start(self.clone(), supervisor);
    }

    /// This node's rooms and every room other nodes hold a lease on.
    pub async fn rooms(&self, supervisor: &Supervisor) -> Vec<RoomInfo> {
        let mut rooms = supervisor.rooms();
        let Ok(leases) = self.inner.leases.all().await else { return rooms };
        for (key, holder) in leases {
            let Ok(room) = RoomId::from_key(&key) else { continue };
            let listed = rooms.iter().any(|r| r.id == room.as_str() && r.kind == room.kind());
            if holder.node == self.inner.node || listed {
                continue;
            }
            rooms.push(RoomInfo {
                id: room.as_str().to_owned(),
                kind: room.kind().to_owned(),
                node: holder.node.to_string(),
                pid: None,
                started_at: None,
                subscribers: self.inner.pubsub.socket_count(&room.topic()),
                calls: None,
                durable: supervisor.is_durable(),
                stored_bytes: None,
            });
        }
        rooms.sort_by(|a, b| (&a.kind, &a.id).cmp(&(&b.kind, &b.id)));
        rooms
    }
}

/// A node id from the host name and pid, unique enough for one cluster; `--node-id` names one.
pub fn default_node_id() -> NodeId {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String =
        host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(32).collect();
    let host = if host.is_empty() { "node".to_owned() } else { host };
    NodeId::new(&format!("{host}-{}", std::process::id()))
}
