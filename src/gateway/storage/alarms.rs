//! The alarm schedule of durable rooms (`Room.setAlarm`). The store holds the truth; this is
//! what the gateway wakes up for. A room's committed writes update it; a due alarm is handed
//! to the supervisor, which starts the room if it is stopped and calls `onAlarm()`.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::gateway::ids::RoomId;
use crate::util::{epoch_ms, LockExt};

/// A failed `onAlarm()` is tried again after 1 s, 2 s, 4 s, … this many times (as Durable
/// Objects do), then left until the room sets another or the gateway restarts.
const MAX_RETRIES: u32 = 6;

#[derive(Clone, Default)]
pub struct Alarms {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    schedule: Mutex<Schedule>,
    changed: Notify,
}

#[derive(Default)]
struct Schedule {
    /// When to fire next, by room: (the time to fire, the alarm's own time, retries so far).
    by_room: HashMap<RoomId, Entry>,
    due: BTreeSet<(u64, RoomId)>,
}

#[derive(Clone, Copy)]
struct Entry {
    fire_at: u64,
    alarm_at: u64,
    retries: u32,
}

impl Schedule {
    fn remove(&mut self, room: &RoomId) {
        if let Some(entry) = self.by_room.remove(room) {
            self.due.remove(&(entry.fire_at, room.clone()));
        }
    }

    fn insert(&mut self, room: RoomId, entry: Entry) {
        self.remove(&room);
        self.due.insert((entry.fire_at, room.clone()));
        self.by_room.insert(room, entry);
    }
}

impl Alarms {
    /// The room's alarm is now `at` (`None`: it has none).
    pub fn set(&self, room: &RoomId, at: Option<u64>) {
        let mut schedule = self.inner.schedule.lock_or_recover();
        match at {
            Some(at) => schedule.insert(room.clone(), Entry { fire_at: at, alarm_at: at, retries: 0 }),
            None => schedule.remove(room),
        }
        drop(schedule);
        self.inner.changed.notify_one();
    }

    /// An alarm the store held when the gateway started, read while rooms may already be
    /// running: scheduled unless the room has set its alarm here since, which is newer.
    pub fn set_stored(&self, room: &RoomId, at: u64) {
        let mut schedule = self.inner.schedule.lock_or_recover();
        if schedule.by_room.contains_key(room) {
            return;
        }
        schedule.insert(room.clone(), Entry { fire_at: at, alarm_at: at, retries: 0 });
        drop(schedule);
        self.inner.changed.notify_one();
    }

    /// An alarm another node set, as the cluster's index tells of it: fired `grace` after it
    /// is due, so that the node that runs the room (whose own write scheduled it on time)
    /// fires it first and deletes it, and this node calls the room only if that node is gone.
    /// An entry for the same alarm (the room's own write, here) stands as it is.
    pub fn set_elsewhere(&self, room: &RoomId, at: u64, grace: Duration) {
        let mut schedule = self.inner.schedule.lock_or_recover();
        if schedule.by_room.get(room).is_some_and(|entry| entry.alarm_at == at) {
            return;
        }
        let grace = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        let entry = Entry { fire_at: at.saturating_add(grace), alarm_at: at, retries: 0 };
        schedule.insert(room.clone(), entry);
        drop(schedule);
        self.inner.changed.notify_one();
    }

    /// The room's alarm, as scheduled here.
    pub fn get(&self, room: &RoomId) -> Option<u64> {
        self.inner.schedule.lock_or_recover().by_room.get(room).map(|entry| entry.alarm_at)
    }

    pub fn len(&self) -> usize {
        self.inner.schedule.lock_or_recover().by_room.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fires due alarms until the future is dropped: `fire(room, alarm_at)` runs the room's
    /// `onAlarm()` and says whether it succeeded.
    pub async fn run<F, Fut>(self, fire: F)
    where
        F: Fn(RoomId, u64) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        let fire = Arc::new(fire);
        loop {
            let changed = self.inner.changed.notified();
            let next = self.inner.schedule.lock_or_recover().due.first().map(|(at, _)| *at);
            let now = epoch_ms();
            match next {
                Some(at) if at <= now => {}
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(at - now)) => {}
                        () = changed => continue,
                    }
                }
                None => {
                    changed.await;
                    continue;
                }
            }
            for (room, entry) in self.take_due(epoch_ms()) {
                let (alarms, fire) = (self.clone(), fire.clone());
                tokio::spawn(async move {
                    if !fire(room.clone(), entry.alarm_at).await {
                        alarms.retry(room, entry);
                    }
                });
            }
        }
    }

    /// Takes the alarms due by `now` off the schedule: each fires once; the room's own write
    /// (deleting it, or setting the next) puts it back if it should be.
    fn take_due(&self, now: u64) -> Vec<(RoomId, Entry)> {
        let mut schedule = self.inner.schedule.lock_or_recover();
        let mut due = Vec::new();
        while let Some((at, room)) = schedule.due.first().cloned() {
            if at > now {
                break;
            }
            schedule.due.remove(&(at, room.clone()));
            if let Some(entry) = schedule.by_room.remove(&room) {
                due.push((room, entry));
            }
        }
        due
    }

    fn retry(&self, room: RoomId, entry: Entry) {
        if entry.retries >= MAX_RETRIES {
            tracing::warn!(room = %room, "onAlarm() failed {} times; not trying again", entry.retries + 1);
            return;
        }
        let mut schedule = self.inner.schedule.lock_or_recover();
        // The room set another alarm meanwhile: that one stands.
        if schedule.by_room.contains_key(&room) {
            return;
        }
        let fire_at = epoch_ms() + 1000 * (1 << entry.retries);
        schedule.insert(room, Entry { fire_at, alarm_at: entry.alarm_at, retries: entry.retries + 1 });
        drop(schedule);
        self.inner.changed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn a_due_alarm_fires_once_and_a_failed_one_again() {
        let alarms = Alarms::default();
        let room = RoomId::parse("wake").unwrap();
        let fired = Arc::new(AtomicU32::new(0));
        let counter = fired.clone();
        let task = tokio::spawn(alarms.clone().run(move |_room, _at| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move { n > 0 }
        }));
        alarms.set(&room, Some(epoch_ms() + 20));
        tokio::time::sleep(Duration::from_millis(1300)).await;
        // The first attempt failed, the retry after 1 s succeeded, and nothing is left.
        assert_eq!(fired.load(Ordering::SeqCst), 2);
        assert!(alarms.is_empty());
        task.abort();
    }

    #[test]
    fn an_alarm_set_elsewhere_waits_its_grace_unless_set_here_too() {
        let alarms = Alarms::default();
        let (here, there) = (RoomId::parse("here").unwrap(), RoomId::parse("there").unwrap());
        let fire_at =
            |room: &RoomId| alarms.inner.schedule.lock_or_recover().by_room.get(room).map(|e| e.fire_at);
        alarms.set(&here, Some(1_000));
        alarms.set_elsewhere(&here, 1_000, Duration::from_secs(5));
        assert_eq!(fire_at(&here), Some(1_000), "the room's own write keeps its time");
        alarms.set_elsewhere(&there, 1_000, Duration::from_secs(5));
        assert_eq!(fire_at(&there), Some(6_000));
        alarms.set(&there, Some(1_000));
        assert_eq!(fire_at(&there), Some(1_000), "set here: on time");
        alarms.set_elsewhere(&there, 2_000, Duration::from_secs(5));
        assert_eq!(
            (fire_at(&there), alarms.get(&there)),
            (Some(7_000), Some(2_000)),
            "a newer alarm replaces it"
        );
    }

    #[tokio::test]
    async fn a_deleted_alarm_does_not_fire() {
        let alarms = Alarms::default();
        let room = RoomId::parse("quiet").unwrap();
        let fired = Arc::new(AtomicU32::new(0));
        let counter = fired.clone();
        let task = tokio::spawn(alarms.clone().run(move |_room, _at| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { true }
        }));
        alarms.set(&room, Some(epoch_ms() + 100));
        alarms.set(&room, None);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(fired.load(Ordering::SeqCst), 0);
        task.abort();
    }
}
