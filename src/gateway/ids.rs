//! The names things go by on the gateway: a room, one runtime of a room, and a gateway node.

use std::sync::Arc;

/// Topics of rooms are `room:<id>`.
pub const TOPIC_PREFIX: &str = "room:";
const MAX_ROOM_ID_LEN: usize = 64;

/// A room id: `^[A-Za-z0-9_-]{1,64}$`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomId(Arc<str>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRoomId;

impl RoomId {
    pub fn parse(id: &str) -> Result<RoomId, InvalidRoomId> {
        let valid = !id.is_empty()
            && id.len() <= MAX_ROOM_ID_LEN
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if valid {
            Ok(RoomId(id.into()))
        } else {
            Err(InvalidRoomId)
        }
    }

    /// The room of a `room:<id>` topic.
    pub fn from_topic(topic: &str) -> Result<RoomId, InvalidRoomId> {
        topic.strip_prefix(TOPIC_PREFIX).ok_or(InvalidRoomId).and_then(RoomId::parse)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn topic(&self) -> String {
        format!("{TOPIC_PREFIX}{}", self.0)
    }
}

impl std::fmt::Display for RoomId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One start of a room, unique within this gateway: tells a restarted room's worker (and its
/// lease, and its BroadcastChannel subscriptions) from the one it replaced. Counts from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuntimeId(u64);

impl RuntimeId {
    pub const FIRST: RuntimeId = RuntimeId(1);

    pub fn new(id: u64) -> RuntimeId {
        RuntimeId(id)
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for RuntimeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A gateway's name: the cluster node id, or `local` for a gateway on its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeId(Arc<str>);

impl NodeId {
    pub fn new(name: &str) -> NodeId {
        NodeId(name.into())
    }

    /// The name a gateway outside any cluster goes by in `/api/rooms`.
    pub fn local() -> NodeId {
        NodeId::new("local")
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_ids_follow_the_design_pattern() {
        assert!(RoomId::parse("general").is_ok());
        assert!(RoomId::parse("a-b_C9").is_ok());
        assert!(RoomId::parse(&"x".repeat(64)).is_ok());
        for bad in ["", &"x".repeat(65), "../x", "a b", "é", "a\0b", "room:a"] {
            assert!(RoomId::parse(bad).is_err(), "accepted {bad:?}");
        }
        assert_eq!(RoomId::from_topic("room:general").unwrap().as_str(), "general");
        assert!(RoomId::from_topic("lobby:general").is_err());
    }
}
