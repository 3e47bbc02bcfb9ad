//! The cluster's periodic work: opening the lease bucket once NATS is reachable and renewing
//! this node's leases; and, apart from that so it can never delay a renewal, watching the
//! leases of rooms this node's subscribers use elsewhere.

use std::time::Duration;

use futures_util::StreamExt;

use super::Cluster;
use crate::gateway::rooms::{announce_reset, Holder, RoomId, Supervisor};
use crate::util::LockExt;

/// Remote leases looked up at once by the watch.
const LOOKUPS_AT_ONCE: usize = 64;

pub(super) fn start(cluster: Cluster, supervisor: Supervisor) {
    let every = cluster.inner.leases.lease() / 3;
    every_until_shutdown(every, &supervisor, {
        let cluster = cluster.clone();
        move |supervisor| {
            let cluster = cluster.clone();
            async move { renew_leases(&cluster, &supervisor).await }
        }
    });
    every_until_shutdown(every, &supervisor, move |_| {
        let cluster = cluster.clone();
        async move { watch_remote_rooms(&cluster).await }
    });
}

/// Runs `work` every `period` until the supervisor shuts down, never two at once.
fn every_until_shutdown<F, Fut>(period: Duration, supervisor: &Supervisor, work: F)
where
    F: Fn(Supervisor) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let supervisor = supervisor.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if supervisor.is_shutting_down() {
                return;
            }
            work(supervisor.clone()).await;
        }
    });
}

async fn renew_leases(cluster: &Cluster, supervisor: &Supervisor) {
    let leases = &cluster.inner.leases;
    if !leases.is_ready() {
        if cluster.is_connected() {
            match leases.open(&cluster.inner.client).await {
                Ok(()) => tracing::info!(node = %cluster.node(), "cluster ready"),
                Err(e) => tracing::warn!("cannot open the cluster's lease bucket: {e}"),
            }
        }
        return;
    }
    match leases.renew().await {
        Ok(lost) => {
            for (room, holder) in lost {
                tracing::warn!(room = %room, "another node took the room's lease; stopping it here");
                if holder.node == *cluster.node() {
                    supervisor.kill_runtime(&room, holder.runtime);
                }
            }
        }
        // Most likely a restarted NATS server without the bucket: open it again.
        Err(e) => {
            tracing::warn!("renewing room leases failed ({e}); reopening the lease bucket");
            leases.close();
        }
    }
}

/// Tells this node's subscribers of each room they use elsewhere whose lease has ended or
/// moved on (its runtime is gone), once.
async fn watch_remote_rooms(cluster: &Cluster) {
    let inner = &cluster.inner;
    let watched: Vec<(RoomId, Holder)> = {
        let mut remote_rooms = inner.remote_rooms.lock_or_recover();
        remote_rooms.retain(|room, _| inner.pubsub.socket_count(&room.topic()) > 0);
        remote_rooms.iter().map(|(room, holder)| (room.clone(), holder.clone())).collect()
    };
    let ended: Vec<(RoomId, Holder)> = futures_util::stream::iter(watched)
        .map(|(room, seen)| async move {
            match inner.leases.holder(&room).await {
                Ok(now) if now.as_ref() != Some(&seen) => Some((room, seen)),
                _ => None,
            }
        })
        .buffer_unordered(LOOKUPS_AT_ONCE)
        .filter_map(std::future::ready)
        .collect()
        .await;
    for (room, seen) in ended {
        let removed = {
            let mut remote_rooms = inner.remote_rooms.lock_or_recover();
            remote_rooms.get(&room) == Some(&seen) && remote_rooms.remove(&room).is_some()
        };
        if removed {
            let detail = format!("its runtime on node {} ended", seen.node);
            announce_reset(&inner.pubsub, &room, &detail, cluster.is_durable());
        }
    }
}
