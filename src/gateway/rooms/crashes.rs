//! The crash-loop guard: a room whose runtime dies more than `limit` times within `window`
//! is refused for `cooldown`, so a script that crashes at once cannot make the gateway
//! start processes as fast as clients ask.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::gateway::ids::RoomId;

pub(crate) struct CrashGuard {
    limit: usize,
    window: Duration,
    cooldown: Duration,
    rooms: HashMap<RoomId, CrashRecord>,
}

#[derive(Default)]
struct CrashRecord {
    recent: VecDeque<Instant>,
    cooling_until: Option<Instant>,
}

impl CrashGuard {
    pub fn new(limit: usize, window: Duration, cooldown: Duration) -> CrashGuard {
        CrashGuard { limit, window, cooldown, rooms: HashMap::new() }
    }

    /// Whether the room is refused right now.
    pub fn is_cooling(&self, room: &RoomId, now: Instant) -> bool {
        self.rooms.get(room).and_then(|r| r.cooling_until).is_some_and(|until| until > now)
    }

    /// Counts one crash; true when it starts a cool-down.
    pub fn record(&mut self, room: &RoomId, now: Instant) -> bool {
        let window = self.window;
        let record = self.rooms.entry(room.clone()).or_default();
        record.recent.push_back(now);
        while record.recent.front().is_some_and(|t| now.duration_since(*t) > window) {
            record.recent.pop_front();
        }
        let cooling = record.recent.len() > self.limit;
        if cooling {
            record.recent.clear();
            record.cooling_until = Some(now + self.cooldown);
            tracing::warn!(
                room = %room,
                "room crashed more than {} times in {:?}; refusing it for {:?}",
                self.limit,
                self.window,
                self.cooldown
            );
        }
        // Forget rooms that have been quiet, so the table does not grow with every id ever seen.
        self.rooms.retain(|_, r| {
            r.recent.back().is_some_and(|t| now.duration_since(*t) <= window)
                || r.cooling_until.is_some_and(|until| until > now)
        });
        cooling
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.rooms.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn room(id: &str) -> RoomId {
        RoomId::parse(id).unwrap()
    }

    #[test]
    fn more_than_the_limit_within_the_window_cools_the_room_down() {
        let mut guard = CrashGuard::new(2, 10 * SECOND, 5 * SECOND);
        let t0 = Instant::now();
        assert!(!guard.record(&room("a"), t0));
        assert!(!guard.record(&room("a"), t0 + SECOND));
        assert!(!guard.is_cooling(&room("a"), t0 + SECOND));
        assert!(guard.record(&room("a"), t0 + 2 * SECOND), "the third crash in 10 s");
        assert!(guard.is_cooling(&room("a"), t0 + 2 * SECOND));
        assert!(!guard.is_cooling(&room("b"), t0 + 2 * SECOND), "other rooms are not affected");
        assert!(!guard.is_cooling(&room("a"), t0 + 8 * SECOND), "the cool-down ends");
    }

    #[test]
    fn crashes_spread_wider_than_the_window_never_cool_down() {
        let mut guard = CrashGuard::new(2, 10 * SECOND, 5 * SECOND);
        let t0 = Instant::now();
        for i in 0..10 {
            assert!(!guard.record(&room("a"), t0 + i * 6 * SECOND), "crash {i}");
        }
    }

    #[test]
    fn quiet_rooms_are_forgotten() {
        let mut guard = CrashGuard::new(5, 10 * SECOND, 5 * SECOND);
        let t0 = Instant::now();
        for i in 0..100 {
            guard.record(&room(&format!("r{i}")), t0);
        }
        assert_eq!(guard.tracked(), 100);
        guard.record(&room("late"), t0 + 11 * SECOND);
        assert_eq!(guard.tracked(), 1);
    }
}
