//! Phoenix Channels v2 JSON frames: `[join_ref, ref, topic, event, payload]`, and the event
//! names the gateway speaks.

use axum::extract::ws::Utf8Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

pub const PHX_JOIN: &str = "phx_join";
pub const PHX_LEAVE: &str = "phx_leave";
pub const PHX_REPLY: &str = "phx_reply";
pub const PHX_CLOSE: &str = "phx_close";
pub const HEARTBEAT: &str = "heartbeat";
pub const PHOENIX_TOPIC: &str = "phoenix";

/// Pushed to a room's sockets when its runtime ended and its state started over.
pub const ROOM_RESET: &str = "room_reset";
/// Phoenix Presence's events, which phoenix.js's `Presence` listens for.
pub const PRESENCE_STATE: &str = "presence_state";
pub const PRESENCE_DIFF: &str = "presence_diff";
/// A room's broadcast (`Beam.call("broadcast", ...)`, or a post on the room's own topic).
pub const NEW_MESSAGE: &str = "new_message";

/// An inbound frame. The payload stays raw JSON until an event handler needs its fields.
#[derive(Debug)]
pub struct Frame {
    pub join_ref: Option<String>,
    pub msg_ref: Option<String>,
    pub topic: String,
    pub event: String,
    pub payload: Box<RawValue>,
}

/// Why an inbound text was not a frame.
#[derive(Debug)]
pub struct MalformedFrame(pub String);

impl std::fmt::Display for MalformedFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed frame: {}", self.0)
    }
}

impl std::error::Error for MalformedFrame {}

impl Frame {
    /// Accepts exactly a 5-element array: refs are strings or null, topic and event are
    /// strings, payload is any JSON value.
    pub fn parse(text: &str) -> Result<Frame, MalformedFrame> {
        type Wire = (Option<String>, Option<String>, String, String, Box<RawValue>);
        let (join_ref, msg_ref, topic, event, payload): Wire =
            serde_json::from_str(text).map_err(|e| MalformedFrame(e.to_string()))?;
        Ok(Frame { join_ref, msg_ref, topic, event, payload })
    }

    /// The routing header of a binary v2 push (phoenix.js `binaryEncode`: kind 0, the lengths
    /// of join_ref, ref, topic and event in one byte each, those four strings, then the raw
    /// payload). The payload is not kept: the gateway only answers binary pushes with an
    /// error reply, so that the client's push gets an answer instead of its timeout.
    pub fn parse_binary_push(bytes: &[u8]) -> Result<Frame, MalformedFrame> {
        const PUSH: u8 = 0;
        let malformed = |why: &str| MalformedFrame(format!("binary frame: {why}"));
        let (&kind, rest) = bytes.split_first().ok_or_else(|| malformed("empty"))?;
        if kind != PUSH {
            return Err(malformed(&format!("kind {kind} is not a push")));
        }
        let (lengths, mut rest) = rest.split_at_checked(4).ok_or_else(|| malformed("truncated header"))?;
        let mut fields = Vec::with_capacity(4);
        for &length in lengths {
            let (field, after) =
                rest.split_at_checked(usize::from(length)).ok_or_else(|| malformed("truncated header"))?;
            let field = std::str::from_utf8(field).map_err(|_| malformed("header is not UTF-8"))?;
            fields.push(field.to_owned());
            rest = after;
        }
        let [join_ref, msg_ref, topic, event] =
            <[String; 4]>::try_from(fields).map_err(|_| malformed("header needs four fields"))?;
        Ok(Frame {
            join_ref: Some(join_ref).filter(|r| !r.is_empty()),
            msg_ref: Some(msg_ref),
            topic,
            event,
            payload: RawValue::from_string("null".to_owned()).map_err(|e| malformed(&e.to_string()))?,
        })
    }

    /// A reply to this frame.
    pub fn reply(&self, reply: &Reply<'_>) -> Utf8Bytes {
        encode(self.join_ref.as_deref(), self.msg_ref.as_deref(), &self.topic, PHX_REPLY, reply)
    }

    pub fn reply_ok(&self, response: &RawValue) -> Utf8Bytes {
        self.reply(&Reply::ok(response))
    }

    pub fn reply_error(&self, reason: &str) -> Utf8Bytes {
        self.reply(&Reply::error(reason))
    }
}

/// The payload of a `phx_reply`.
#[derive(Debug, Serialize)]
pub struct Reply<'a> {
    status: &'static str,
    response: ReplyBody<'a>,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum ReplyBody<'a> {
    Raw(&'a RawValue),
    Reason { reason: &'a str },
    Empty(Empty),
}

/// Serializes as `{}`: the payload of heartbeats replies and `phx_close`.
#[derive(Debug, Serialize)]
pub struct Empty {}

impl<'a> Reply<'a> {
    pub fn ok(response: &'a RawValue) -> Self {
        Reply { status: "ok", response: ReplyBody::Raw(response) }
    }

    pub fn ok_empty() -> Self {
        Reply { status: "ok", response: ReplyBody::Empty(Empty {}) }
    }

    /// Error replies always carry a short, human-readable reason.
    pub fn error(reason: &'a str) -> Self {
        Reply { status: "error", response: ReplyBody::Reason { reason } }
    }
}

/// Encodes one frame. Broadcasts call this once and share the bytes with every subscriber.
pub fn encode<P: Serialize + ?Sized>(
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    event: &str,
    payload: &P,
) -> Utf8Bytes {
    // Serializing strings, options and raw JSON into a Vec cannot fail; an empty array is a
    // harmless fallback that clients drop.
    serde_json::to_string(&(join_ref, msg_ref, topic, event, payload))
        .unwrap_or_else(|_| "[]".to_owned())
        .into()
}

/// A server push: no ref; `join_ref` null for broadcasts shared by all subscribers.
pub fn push<P: Serialize + ?Sized>(
    join_ref: Option<&str>,
    topic: &str,
    event: &str,
    payload: &P,
) -> Utf8Bytes {
    encode(join_ref, None, topic, event, payload)
}

/// `phx_close` to a channel, as Phoenix sends it: ref and join_ref both the join's ref.
pub fn close(join_ref: Option<&str>, topic: &str) -> Utf8Bytes {
    encode(join_ref, join_ref, topic, PHX_CLOSE, &Empty {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_header_of_a_binary_push() {
        let mut bytes = vec![0, 1, 2, 12, 12];
        bytes.extend_from_slice(b"312room:generalsend_message");
        bytes.extend_from_slice(&[0xff, 0x00, 0x01]);
        let frame = Frame::parse_binary_push(&bytes).unwrap();
        assert_eq!(frame.join_ref.as_deref(), Some("3"));
        assert_eq!(frame.msg_ref.as_deref(), Some("12"));
        assert_eq!((frame.topic.as_str(), frame.event.as_str()), ("room:general", "send_message"));
        for bad in [&[][..], &[1, 0, 0, 0, 0], &[0, 1, 1], &[0, 5, 0, 0, 0, b'x']] {
            assert!(Frame::parse_binary_push(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_a_join() {
        let frame = Frame::parse(r#"["1","1","room:general","phx_join",{}]"#).unwrap();
        assert_eq!(frame.join_ref.as_deref(), Some("1"));
        assert_eq!(frame.topic, "room:general");
        assert_eq!(frame.event, PHX_JOIN);
        assert_eq!(frame.payload.get(), "{}");
    }

    #[test]
    fn rejects_wrong_arity_and_types() {
        for bad in [
            r#"["1","1","room:a","phx_join"]"#,
            r#"["1","1","room:a","phx_join",{},1]"#,
            r#"[1,"1","room:a","phx_join",{}]"#,
            r#"["1","1",null,"phx_join",{}]"#,
            r#"{"topic":"room:a"}"#,
            "not json",
            "",
        ] {
            assert!(Frame::parse(bad).is_err(), "accepted {bad}");
        }
    }

    #[test]
    fn replies_echo_refs_and_topic() {
        let frame = Frame::parse(r#"[null,"7","phoenix","heartbeat",{}]"#).unwrap();
        assert_eq!(
            frame.reply(&Reply::ok_empty()).as_str(),
            r#"[null,"7","phoenix","phx_reply",{"status":"ok","response":{}}]"#
        );
        assert_eq!(
            frame.reply_error("unmatched topic").as_str(),
            r#"[null,"7","phoenix","phx_reply",{"status":"error","response":{"reason":"unmatched topic"}}]"#
        );
    }

    #[test]
    fn close_uses_the_join_ref_twice() {
        assert_eq!(close(Some("3"), "room:a").as_str(), r#"["3","3","room:a","phx_close",{}]"#);
    }
}
