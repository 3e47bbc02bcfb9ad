//! The two wire protocols the load generator speaks: Phoenix Channels v2 (roomvisor and the
//! limit server) and Socket.IO v5 over Engine.IO v4's WebSocket transport (the peer).
//!
//! Both are reduced to the same few operations (join, send, leave, keep-alive) and the same
//! few kinds of incoming frame, so a scenario never knows which server it drives. Incoming
//! `new_message` pushes are by far the most frequent frame, so they are recognised by a
//! substring search instead of a full JSON parse: the load generator shares the CPU with the
//! server it measures.

use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    Phoenix,
    #[value(name = "socketio")]
    SocketIo,
}

/// One incoming text frame, as far as a scenario cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A `new_message` push; `stamp` is the load generator's marker in its text, if any.
    NewMessage { stamp: Option<Stamp> },
    /// The answer to a join, send or leave.
    Reply { msg_ref: u64, outcome: Result<(), String> },
    /// Socket.IO's server ping, which must be answered with a pong.
    Ping,
    /// Anything else: handshakes, heartbeat replies, `phx_close`, resets.
    Other,
}

/// Who sent a message and when, written into its text by the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub client: u64,
    /// Microseconds since the run's clock started.
    pub sent_us: u64,
}

/// Message texts are padded to a typical chat line so frames have a realistic size.
const FILLER: &str = "the quick brown fox jumps over the lazy dog, again and again";

impl Stamp {
    pub fn text(&self) -> String {
        format!("c={} t={} {FILLER}", self.client, self.sent_us)
    }

    /// Finds the stamp in a raw frame without parsing it.
    fn find(frame: &str) -> Option<Stamp> {
        let at = frame.find("c=")?;
        let rest = &frame[at + 2..];
        let (client, rest) = split_number(rest)?;
        let rest = rest.strip_prefix(" t=")?;
        let (sent_us, _) = split_number(rest)?;
        Some(Stamp { client, sent_us })
    }
}

fn split_number(s: &str) -> Option<(u64, &str)> {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    Some((s[..end].parse().ok()?, &s[end..]))
}

impl Protocol {
    pub fn websocket_url(&self, base: &str) -> String {
        let base = base.trim_end_matches('/').replacen("http://", "ws://", 1);
        match self {
            Protocol::Phoenix => format!("{base}/socket/websocket?vsn=2.0.0"),
            Protocol::SocketIo => format!("{base}/socket.io/?EIO=4&transport=websocket"),
        }
    }

    /// The frame a client sends right after the WebSocket opens, if the protocol has one.
    /// Socket.IO needs a namespace connect (`40`); the server's open packet can be ignored.
    pub fn hello(&self) -> Option<String> {
        match self {
            Protocol::Phoenix => None,
            Protocol::SocketIo => Some("40".to_owned()),
        }
    }

    pub fn join(&self, room: &str, msg_ref: u64) -> String {
        self.join_with(room, msg_ref, &json!({}))
    }

    /// A join with a payload (Phoenix's join params, e.g. the chat's `{"name": …}`); Socket.IO's
    /// `join` event has no params, so there it is the plain join.
    pub fn join_with(&self, room: &str, msg_ref: u64, params: &Value) -> String {
        match self {
            Protocol::Phoenix => {
                let r = msg_ref.to_string();
                json!([r, r, topic(room), "phx_join", params]).to_string()
            }
            Protocol::SocketIo => format!("42{msg_ref}{}", json!(["join", room])),
        }
    }

    /// A push of `send_message`. Phoenix pushes carry the ref of the channel's join.
    pub fn send(&self, room: &str, join_ref: u64, msg_ref: u64, sender: &str, text: &str) -> String {
        match self {
            Protocol::Phoenix => json!([
                join_ref.to_string(),
                msg_ref.to_string(),
                topic(room),
                "send_message",
                {"sender": sender, "text": text}
            ])
            .to_string(),
            Protocol::SocketIo => {
                format!(
                    "42{msg_ref}{}",
                    json!(["send_message", {"room": room, "sender": sender, "text": text}])
                )
            }
        }
    }

    pub fn leave(&self, room: &str, join_ref: u64, msg_ref: u64) -> String {
        match self {
            Protocol::Phoenix => {
                json!([join_ref.to_string(), msg_ref.to_string(), topic(room), "phx_leave", {}]).to_string()
            }
            Protocol::SocketIo => format!("42{msg_ref}{}", json!(["leave", room])),
        }
    }

    /// The client-initiated keep-alive: Phoenix clients heartbeat every 30 s; Socket.IO
    /// clients only answer the server's pings.
    pub fn heartbeat(&self, msg_ref: u64) -> Option<String> {
        match self {
            Protocol::Phoenix => {
                Some(json!([null, msg_ref.to_string(), "phoenix", "heartbeat", {}]).to_string())
            }
            Protocol::SocketIo => None,
        }
    }

    pub fn pong(&self) -> &'static str {
        "3"
    }

    pub fn classify(&self, frame: &str) -> Incoming {
        match self {
            Protocol::Phoenix => classify_phoenix(frame),
            Protocol::SocketIo => classify_socketio(frame),
        }
    }
}

fn topic(room: &str) -> String {
    format!("room:{room}")
}

fn classify_phoenix(frame: &str) -> Incoming {
    // Pushes start `[null,null,"room:…","new_message",`; only the event field can hold
    // this quoted string before the payload.
    if let Some(at) = frame.find(r#","new_message","#) {
        return Incoming::NewMessage { stamp: Stamp::find(&frame[at..]) };
    }
    if !frame.contains(r#""phx_reply""#) {
        return Incoming::Other;
    }
    let Ok(Value::Array(fields)) = serde_json::from_str::<Value>(frame) else {
        return Incoming::Other;
    };
    let Some(msg_ref) = fields.get(1).and_then(Value::as_str).and_then(|r| r.parse().ok()) else {
        return Incoming::Other;
    };
    let payload = fields.get(4).unwrap_or(&Value::Null);
    Incoming::Reply { msg_ref, outcome: outcome(&payload["status"], &payload["response"]["reason"]) }
}

/// A Phoenix Presence push: the joiner's `presence_state` or a room's `presence_diff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceEvent {
    State,
    Diff,
}

/// Recognises a Presence push without parsing it: the event is the last field before the
/// payload object (`[join_ref,null,"room:…","presence_diff",{…}]`).
pub fn presence_event(frame: &str) -> Option<PresenceEvent> {
    let head = &frame[..frame.find('{')?];
    if head.ends_with(r#","presence_diff","#) {
        Some(PresenceEvent::Diff)
    } else if head.ends_with(r#","presence_state","#) {
        Some(PresenceEvent::State)
    } else {
        None
    }
}

fn classify_socketio(frame: &str) -> Incoming {
    if frame == "2" {
        return Incoming::Ping;
    }
    if let Some(event) = frame.strip_prefix("42") {
        if event.starts_with(r#"["new_message""#) {
            return Incoming::NewMessage { stamp: Stamp::find(event) };
        }
        return Incoming::Other;
    }
    let Some(ack) = frame.strip_prefix("43") else { return Incoming::Other };
    let Some((msg_ref, args)) = split_number(ack) else { return Incoming::Other };
    let Ok(Value::Array(args)) = serde_json::from_str::<Value>(args) else { return Incoming::Other };
    let answer = args.first().unwrap_or(&Value::Null);
    Incoming::Reply { msg_ref, outcome: outcome(&answer["status"], &answer["reason"]) }
}

fn outcome(status: &Value, reason: &Value) -> Result<(), String> {
    if status == "ok" {
        Ok(())
    } else {
        Err(reason.as_str().unwrap_or("error without a reason").to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_survive_both_protocols() {
        let stamp = Stamp { client: 7, sent_us: 123456 };
        let message = json!({"id": 1, "sender": "s", "text": stamp.text(), "timestamp": 1});
        let phoenix = json!([null, null, "room:a", "new_message", message]).to_string();
        assert_eq!(Protocol::Phoenix.classify(&phoenix), Incoming::NewMessage { stamp: Some(stamp) });
        let socketio = format!("42{}", json!(["new_message", message]));
        assert_eq!(Protocol::SocketIo.classify(&socketio), Incoming::NewMessage { stamp: Some(stamp) });
    }

    #[test]
    fn replies_carry_their_ref_and_reason() {
        let ok = r#"["1","5","room:a","phx_reply",{"status":"ok","response":{"messages":[]}}]"#;
        assert_eq!(Protocol::Phoenix.classify(ok), Incoming::Reply { msg_ref: 5, outcome: Ok(()) });
        let error =
            r#"["1","6","room:a","phx_reply",{"status":"error","response":{"reason":"rate limited"}}]"#;
        assert_eq!(
            Protocol::Phoenix.classify(error),
            Incoming::Reply { msg_ref: 6, outcome: Err("rate limited".to_owned()) }
        );
        let ack = r#"4312[{"status":"error","reason":"invalid room id"}]"#;
        assert_eq!(
            Protocol::SocketIo.classify(ack),
            Incoming::Reply { msg_ref: 12, outcome: Err("invalid room id".to_owned()) }
        );
        assert_eq!(Protocol::SocketIo.classify("2"), Incoming::Ping);
        assert_eq!(Protocol::Phoenix.classify(r#"["1","1","room:a","phx_close",{}]"#), Incoming::Other);
    }

    #[test]
    fn presence_pushes_are_told_apart_from_the_rest() {
        let state = r#"["1",null,"room:a","presence_state",{"u1":{"metas":[{"phx_ref":"1"}]}}]"#;
        assert_eq!(presence_event(state), Some(PresenceEvent::State));
        let diff = r#"[null,null,"room:a","presence_diff",{"joins":{},"leaves":{}}]"#;
        assert_eq!(presence_event(diff), Some(PresenceEvent::Diff));
        let reply = r#"["1","1","room:a","phx_reply",{"status":"ok","response":{"messages":[]}}]"#;
        assert_eq!(presence_event(reply), None);
        // A chat line that mentions the event is not one.
        let message = r#"[null,null,"room:a","new_message",{"text":",\"presence_diff\","}]"#;
        assert_eq!(presence_event(message), None);
        assert_eq!(presence_event("[]"), None);
    }

    #[test]
    fn frames_match_what_the_servers_expect() {
        assert_eq!(Protocol::Phoenix.join("a", 3), r#"["3","3","room:a","phx_join",{}]"#);
        assert_eq!(Protocol::SocketIo.join("a", 3), r#"423["join","a"]"#);
        assert_eq!(
            Protocol::Phoenix.join_with("a", 4, &json!({"name": "u7"})),
            r#"["4","4","room:a","phx_join",{"name":"u7"}]"#
        );
        assert_eq!(
            Protocol::Phoenix.websocket_url("http://127.0.0.1:4000/"),
            "ws://127.0.0.1:4000/socket/websocket?vsn=2.0.0"
        );
    }
}
