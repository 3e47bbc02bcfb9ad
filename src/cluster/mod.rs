//! Several gateways as one cluster over NATS (`--cluster nats://HOST:PORT`).
//!
//! - PubSub across nodes ([`bridge`]): a node subscribes to a topic's subject while any of its
//!   sockets or runtimes is on the topic; the connection is made with `no_echo`, so what a node
//!   publishes reaches the others through NATS and its own subscribers directly, once each.
//! - One owner per room ([`leases`]): claimed in a JetStream key-value bucket whose max age is
//!   the lease.
//! - Calls for a room owned elsewhere ([`calls`]): NATS request/reply to the owner node.
//!
//! The gateway starts whether or not NATS is reachable; the client reconnects by itself, and
//! until the bucket is open, rooms this node does not already run are refused with a clear
//! reason instead of waiting.

mod bridge;
pub mod calls;
pub mod leases;
mod subjects;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::pubsub::PubSub;
use leases::Leases;

#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    node: String,
    client: async_nats::Client,
    leases: Leases,
}

impl Cluster {
    /// Starts connecting; returns at once, even while NATS is unreachable. Fails only on an
    /// address that cannot be used at all.
    pub async fn connect(url: &str, node: String, lease: Duration) -> Result<Cluster, String> {
        let options = async_nats::ConnectOptions::new()
            .name(format!("roomvisor {node}"))
            .no_echo()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .reconnect_delay_callback(|attempts| Duration::from_millis((100 * attempts as u64).min(1_000)))
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("connected to NATS"),
                    async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS; reconnecting"),
                    other => tracing::debug!("NATS: {other}"),
                }
            });
        let client = options.connect(url).await.map_err(|e| format!("cannot use NATS at {url}: {e}"))?;
        Ok(Cluster { inner: Arc::new(Inner { node, client, leases: Leases::new(lease) }) })
    }

    pub fn node(&self) -> &str {
        &self.inner.node
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    pub fn leases(&self) -> &Leases {
        &self.inner.leases
    }

    pub fn is_connected(&self) -> bool {
        self.inner.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Ready to start and reach rooms: connected, with the lease bucket open.
    pub fn is_ready(&self) -> bool {
        self.is_connected() && self.inner.leases.is_ready()
    }

    /// Connects the PubSub to the other nodes.
    pub fn attach(&self, pubsub: Arc<PubSub>) {
        let (commands, received) = mpsc::unbounded_channel();
        pubsub.attach_cluster(commands);
        tokio::spawn(bridge::run(self.inner.client.clone(), pubsub, received));
    }
}

/// A node id from the host name and pid, unique enough for one cluster; `--node-id` names one.
pub fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String =
        host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(32).collect();
    let host = if host.is_empty() { "node".to_owned() } else { host };
    format!("{host}-{}", std::process::id())
}
