//! The names things go by on the gateway: a room, one runtime of a room, and a gateway node.

use std::sync::Arc;

/// The kind of room a topic without another configured prefix names: `room:<id>`.
pub const DEFAULT_KIND: &str = "room";
const MAX_ROOM_ID_LEN: usize = 64;
const MAX_KIND_LEN: usize = 32;

/// A room: its kind (the topic's prefix, which picks the script) and its id
/// (`^[A-Za-z0-9_-]{1,64}$`). Its topic is `kind:id`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomId {
    kind: Arc<str>,
    id: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRoomId;

/// Whether `kind` can prefix a topic: `^[a-z][a-z0-9_-]{0,31}$`.
pub fn is_valid_kind(kind: &str) -> bool {
    let mut bytes = kind.bytes();
    kind.len() <= MAX_KIND_LEN
        && bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

impl RoomId {
    /// A room of the default kind.
    pub fn parse(id: &str) -> Result<RoomId, InvalidRoomId> {
        RoomId::in_kind(DEFAULT_KIND, id)
    }

    pub fn in_kind(kind: &str, id: &str) -> Result<RoomId, InvalidRoomId> {
        let valid_id = !id.is_empty()
            && id.len() <= MAX_ROOM_ID_LEN
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if valid_id && is_valid_kind(kind) {
            Ok(RoomId { kind: kind.into(), id: id.into() })
        } else {
            Err(InvalidRoomId)
        }
    }

    /// The room of a `kind:id` topic.
    pub fn from_topic(topic: &str) -> Result<RoomId, InvalidRoomId> {
        let (kind, id) = topic.split_once(':').ok_or(InvalidRoomId)?;
        RoomId::in_kind(kind, id)
    }

    /// The id within its kind (what the script sees as `Room.id`).
    pub fn as_str(&self) -> &str {
        &self.id
    }

    pub fn kind(&self) -> &str {
        &self.kind
    }

    pub fn topic(&self) -> String {
        format!("{}:{}", self.kind, self.id)
    }

    /// A name unique across kinds in the characters a NATS key-value key allows: the id for
    /// the default kind (as before kinds existed), `kind.id` for the others.
    pub fn key(&self) -> String {
        if &*self.kind == DEFAULT_KIND {
            self.id.to_string()
        } else {
            format!("{}.{}", self.kind, self.id)
        }
    }

    /// The room a [`RoomId::key`] names.
    pub fn from_key(key: &str) -> Result<RoomId, InvalidRoomId> {
        match key.split_once('.') {
            Some((kind, id)) => RoomId::in_kind(kind, id),
            None => RoomId::parse(key),
        }
    }
}

/// The id alone for the default kind (as log lines read before kinds), the topic otherwise.
impl std::fmt::Display for RoomId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if &*self.kind == DEFAULT_KIND {
            f.write_str(&self.id)
        } else {
            write!(f, "{}:{}", self.kind, self.id)
        }
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
        assert!(RoomId::from_topic("general").is_err());
        assert!(RoomId::from_topic("Lobby:general").is_err(), "kinds are lower case");
        assert!(RoomId::from_topic("room:a:b").is_err());
    }

    #[test]
    fn kinds_name_topics_and_keys() {
        let game = RoomId::from_topic("tic-tac-toe:g1").unwrap();
        assert_eq!(
            (game.kind(), game.as_str(), game.topic()),
            ("tic-tac-toe", "g1", "tic-tac-toe:g1".to_owned())
        );
        assert_eq!(game.key(), "tic-tac-toe.g1");
        assert_eq!(RoomId::from_key(&game.key()), Ok(game.clone()));
        let chat = RoomId::parse("general").unwrap();
        assert_eq!((chat.key(), chat.to_string()), ("general".to_owned(), "general".to_owned()));
        assert_eq!(RoomId::from_key("general"), Ok(chat.clone()));
        assert_ne!(
            chat,
            RoomId::in_kind("game", "general").unwrap(),
            "the same id in two kinds is two rooms"
        );
        assert!(!is_valid_kind("") && !is_valid_kind("1x") && !is_valid_kind(&"k".repeat(33)));
    }
}
