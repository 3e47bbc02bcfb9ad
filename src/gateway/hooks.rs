//! The calls the gateway makes into a room's script for its joins (design §8): a join runs
//! `onJoin`, a client event `onEvent`, a leave `onLeave`. The prelude answers these names (no
//! script function can be called `@join`) and falls back to the original design's mapping
//! (`getHistory`, `sendMessage`) for scripts without hooks. What a join or an event means is
//! the script's business; the gateway only carries it.

use serde::Serialize;
use serde_json::value::RawValue;

use crate::gateway::config::Config;
use crate::gateway::rooms::RoomError;

pub const JOIN: &str = "@join";
pub const EVENT: &str = "@event";
pub const LEAVE: &str = "@leave";
/// A durable room's due alarm: `onAlarm()`.
pub const ALARM: &str = "@alarm";

/// Why a join ended, as `onLeave` hears it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaveReason {
    /// The client sent `phx_leave`.
    Leave,
    /// The client joined the same topic again on the same socket.
    Rejoin,
    /// The socket closed.
    Closed,
}

impl LeaveReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LeaveReason::Leave => "leave",
            LeaveReason::Rejoin => "rejoin",
            LeaveReason::Closed => "closed",
        }
    }
}

/// `onJoin(conn, params)`'s arguments; `user` is the verified identity, if any.
pub fn join_args(conn: &str, user: Option<&RawValue>, params: &RawValue) -> String {
    to_json(&(conn, user, params))
}

/// `onEvent(conn, event, payload)`'s arguments.
pub fn event_args(conn: &str, event: &str, payload: &RawValue) -> String {
    to_json(&(conn, event, payload))
}

/// `onLeave(conn, why)`'s arguments.
pub fn leave_args(conn: &str, why: LeaveReason) -> String {
    to_json(&(conn, why.as_str()))
}

/// A hook's answer as a reply's `response`.
pub fn response(answer: String) -> Result<Box<RawValue>, String> {
    RawValue::from_string(answer).map_err(|_| "the room answered with something that is not JSON".to_owned())
}

/// `Room.settings`: the gateway's flags a room script may want (the chat's limits).
pub fn settings(config: &Config) -> String {
    serde_json::json!({
        "historyOnJoin": config.history_on_join,
        "maxSenderChars": config.max_sender_chars,
        "maxTextChars": config.max_text_chars,
    })
    .to_string()
}

/// `room_reset` for a join a new runtime took again: why the old one went, and the join's
/// new response, so the client can redraw from it.
#[derive(Serialize)]
pub struct RoomReset<'a> {
    pub reason: String,
    pub detail: &'a str,
    pub response: &'a RawValue,
    /// A durable room came back with its storage: only what was not stored is gone.
    pub restored: bool,
}

impl<'a> RoomReset<'a> {
    pub fn restarted(detail: &'a str, response: &'a RawValue, restored: bool) -> RoomReset<'a> {
        RoomReset { reason: RoomError::WorkerExited.reason(), detail, response, restored }
    }
}

/// Strings and raw JSON always serialize; the fallback only keeps this total.
fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "[]".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).unwrap()
    }

    #[test]
    fn arguments_are_json_arrays_in_the_hooks_order() {
        assert_eq!(join_args("7", None, &raw(r#"{"a":1}"#)), r#"["7",null,{"a":1}]"#);
        assert_eq!(event_args("7", "say \"hi\"", &raw("[1]")), r#"["7","say \"hi\"",[1]]"#);
        assert_eq!(leave_args("7", LeaveReason::Rejoin), r#"["7","rejoin"]"#);
    }

    #[test]
    fn settings_carry_the_chat_flags() {
        let config = Config { history_on_join: 7, max_text_chars: 9, ..Config::default() };
        let settings: serde_json::Value = serde_json::from_str(&settings(&config)).unwrap();
        assert_eq!(settings["historyOnJoin"], 7);
        assert_eq!(settings["maxTextChars"], 9);
        assert!(response("{".to_owned()).is_err());
    }
}
