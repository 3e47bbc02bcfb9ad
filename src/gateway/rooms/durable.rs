//! What the supervisor does for durable rooms beyond starting them: stopping idle ones
//! (hibernation) and running due alarms, which start a stopped room.

use std::time::Duration;

use tokio::task::JoinHandle;

use super::handle::RoomHandle;
use super::supervisor::{Slot, Supervisor};
use crate::gateway::hooks;
use crate::gateway::ids::RoomId;
use crate::gateway::metrics;
use crate::gateway::storage::Storage;
use crate::util::epoch_ms;

/// How long a room gets to say whether it has timers or calls pending.
const STATS_WAIT: Duration = Duration::from_secs(1);

impl Supervisor {
    /// Starts the durable rooms' background work: alarms (loaded from the store) and
    /// hibernation. Nothing to start without storage.
    pub async fn start_durable_tasks(&self) -> Vec<JoinHandle<()>> {
        let Some(storage) = self.storage().cloned() else { return Vec::new() };
        let supervisor = self.clone();
        // The stored alarms are read in the alarm task, not before the gateway listens: a
        // cluster's store opens only once NATS is reachable (and then schedules them itself).
        let alarms = tokio::spawn(async move {
            schedule_stored_alarms(&storage).await;
            storage
                .alarms
                .clone()
                .run(move |room, at| {
                    let supervisor = supervisor.clone();
                    async move { supervisor.fire_alarm(&room, at).await }
                })
                .await
        });
        let supervisor = self.clone();
        let hibernation = tokio::spawn(async move { supervisor.hibernate_idle_rooms().await });
        vec![alarms, hibernation]
    }

    /// Runs the room's `onAlarm()` for the alarm set for `at`, starting the room if it is
    /// stopped; true if it ran (or the room no longer wants it).
    async fn fire_alarm(&self, room: &RoomId, at: u64) -> bool {
        let args = serde_json::json!([at]).to_string();
        match self.call(room, hooks::ALARM, args).await {
            Ok(_) => {
                ::metrics::counter!(metrics::ALARMS_FIRED, "result" => "ok").increment(1);
                true
            }
            Err(error) => {
                ::metrics::counter!(metrics::ALARMS_FIRED, "result" => "failed").increment(1);
                tracing::warn!(room = %room, "alarm for {at} failed: {}", error.detail());
                false
            }
        }
    }

    /// Stops durable rooms that nobody has joined or called for `--room-idle-ms` and that
    /// have no timers or calls pending: their state is stored, and their next use (a join, a
    /// call, an alarm) starts them again.
    async fn hibernate_idle_rooms(&self) {
        let idle = self.inner.config.room_idle();
        let every = (idle / 4).clamp(Duration::from_millis(25), Duration::from_secs(5));
        let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
        loop {
            tokio::time::sleep(every).await;
            let now = epoch_ms();
            let candidates: Vec<RoomHandle> = {
                let state = self.lock();
                state
                    .rooms
                    .values()
                    .filter_map(|slot| match slot {
                        Slot::Live(handle)
                            if handle.durable
                                && now.saturating_sub(handle.last_used_ms()) >= idle_ms
                                && self.inner.pubsub.joins(&handle.room.topic()).is_empty() =>
                        {
                            Some(handle.clone())
                        }
                        _ => None,
                    })
                    .collect()
            };
            for handle in candidates {
                let used = handle.last_used_ms();
                let Some(stats) = handle.stats(STATS_WAIT).await else { continue };
                if stats.timers == 0 && stats.pending == 0 && handle.last_used_ms() == used {
                    self.hibernate(&handle);
                }
            }
        }
    }

    fn hibernate(&self, handle: &RoomHandle) {
        {
            let mut state = self.lock();
            let still_live =
                matches!(state.rooms.get(&handle.room), Some(Slot::Live(h)) if h.runtime == handle.runtime);
            if !still_live || !self.inner.pubsub.joins(&handle.room.topic()).is_empty() {
                return;
            }
            state.rooms.remove(&handle.room);
            state.stopped.insert(handle.runtime, "hibernated");
            state.shares.forget(&handle.room);
        }
        ::metrics::counter!(metrics::HIBERNATIONS).increment(1);
        tracing::info!(room = %handle.room, pid = handle.pid, "hibernating: idle, its state is stored");
        let handle = handle.clone();
        tokio::spawn(async move { handle.shutdown().await });
    }
}

/// Schedules the alarms the store holds (those set before this gateway started).
async fn schedule_stored_alarms(storage: &Storage) {
    match storage.store.alarms().await {
        Ok(Ok(alarms)) => {
            for (topic, at) in alarms {
                match RoomId::from_topic(&topic) {
                    Ok(room) => storage.alarms.set_stored(&room, at),
                    Err(_) => {
                        tracing::warn!("the store holds an alarm for {topic:?}, not a room id; ignored")
                    }
                }
            }
            tracing::info!("{} alarms scheduled", storage.alarms.len());
        }
        Ok(Err(e)) => tracing::error!("cannot read the stored alarms: {e}"),
        Err(_) => tracing::error!("cannot read the stored alarms: the store stopped"),
    }
}
