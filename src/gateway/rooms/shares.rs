//! Fair shares of the room limit. A client (one socket) may have started only so many live
//! rooms; and when the limit forces an eviction, rooms that only their own creator has used
//! lately go before rooms another client used in the last minute, so one client creating
//! rooms by the thousand evicts its own rooms first.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::gateway::ids::{RoomId, RuntimeId};

/// How long another client's use protects a room from eviction.
pub const SHARED_USE_PROTECTS_FOR: Duration = Duration::from_secs(60);

/// One client of the rooms: a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientId(u64);

impl ClientId {
    pub fn next() -> ClientId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ClientId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// Who is calling, and how many live rooms it may have started.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub id: ClientId,
    pub max_started: usize,
}

#[derive(Default)]
pub(crate) struct Shares {
    /// The client that started each runtime, while it lives.
    starters: HashMap<RuntimeId, ClientId>,
    /// Live (or starting) rooms each client started.
    started: HashMap<ClientId, usize>,
    /// When a client other than the starter last used each room.
    shared_use: HashMap<RoomId, Instant>,
}

impl Shares {
    /// Whether the caller may start one more room.
    pub fn may_start(&self, caller: Option<&Caller>) -> bool {
        caller.is_none_or(|c| self.started.get(&c.id).copied().unwrap_or(0) < c.max_started)
    }

    /// Counts a start against the caller.
    pub fn started(&mut self, runtime: RuntimeId, caller: Option<&Caller>) {
        if let Some(caller) = caller {
            self.starters.insert(runtime, caller.id);
            *self.started.entry(caller.id).or_default() += 1;
        }
    }

    /// A runtime ended (or never started): its starter may start another.
    pub fn ended(&mut self, runtime: RuntimeId) {
        let Some(client) = self.starters.remove(&runtime) else { return };
        if let Some(count) = self.started.get_mut(&client) {
            *count -= 1;
            if *count == 0 {
                self.started.remove(&client);
            }
        }
    }

    /// A call reached the room's runtime; a caller other than its starter (or one nobody
    /// knows, such as another node) protects it from eviction for a while.
    pub fn used(&mut self, room: &RoomId, runtime: RuntimeId, caller: Option<&Caller>, now: Instant) {
        let starter = self.starters.get(&runtime);
        if caller.map(|c| c.id).as_ref() != starter || starter.is_none() {
            // Every message of a shared room passes here: update in place, no key clone.
            match self.shared_use.get_mut(room) {
                Some(at) => *at = now,
                None => {
                    self.shared_use.insert(room.clone(), now);
                }
            }
        }
    }

    /// Whether another client used the room lately.
    pub fn is_shared(&self, room: &RoomId, now: Instant) -> bool {
        self.shared_use.get(room).is_some_and(|at| now.duration_since(*at) < SHARED_USE_PROTECTS_FOR)
    }

    /// The room is gone; its shared use is forgotten.
    pub fn forget(&mut self, room: &RoomId) {
        self.shared_use.remove(room);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_starts_only_its_share_and_gets_it_back_as_rooms_end() {
        let mut shares = Shares::default();
        let caller = Caller { id: ClientId::next(), max_started: 2 };
        for runtime in [1, 2] {
            assert!(shares.may_start(Some(&caller)));
            shares.started(RuntimeId::new(runtime), Some(&caller));
        }
        assert!(!shares.may_start(Some(&caller)));
        assert!(
            shares.may_start(Some(&Caller { id: ClientId::next(), max_started: 2 })),
            "others have their own"
        );
        assert!(shares.may_start(None), "the gateway's own calls are not counted");
        shares.ended(RuntimeId::new(1));
        assert!(shares.may_start(Some(&caller)));
    }

    #[test]
    fn only_another_clients_use_protects_a_room() {
        let mut shares = Shares::default();
        let (creator, other) = (
            Caller { id: ClientId::next(), max_started: 9 },
            Caller { id: ClientId::next(), max_started: 9 },
        );
        let room = RoomId::parse("r").unwrap();
        let now = Instant::now();
        shares.started(RuntimeId::new(1), Some(&creator));
        shares.used(&room, RuntimeId::new(1), Some(&creator), now);
        assert!(!shares.is_shared(&room, now), "its creator's own use does not protect it");
        shares.used(&room, RuntimeId::new(1), Some(&other), now);
        assert!(shares.is_shared(&room, now + Duration::from_secs(59)));
        assert!(!shares.is_shared(&room, now + Duration::from_secs(61)), "for a minute");
    }
}
