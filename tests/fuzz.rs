//! Seeded fuzzing of the Phoenix v2 socket: thousands of random and mutated frames against one
//! gateway (the design's wire protocol and limits contracts, sections 2 and 6). The seed is
//! printed; `FUZZ_SEED=<n>` replays the same inputs (what the gateway answers in a pipelined
//! burst may interleave differently), `FUZZ_FRAMES=<n>` changes the length and
//! `FUZZ_BURST_PERCENT=<n>` how often frames go out in a pipelined burst of 2 to 12 instead of
//! one at a time (default 6; 0 to rule pipelining out of a failure).
//!
//! Every frame is judged against a model of what the gateway must do with it: a frame that is
//! not a 5-element array of the right types is dropped without a reply (and the eleventh such
//! frame on a socket closes it with 1008); every other frame gets exactly one well-formed
//! `phx_reply` echoing its refs and topic, whose status the model predicts where the frame's
//! meaning is known; a frame over 64 KiB closes the socket with 1009. When a socket is closed,
//! the fuzzer opens a new one.

mod common;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Gateway, WsStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// The gateway's defaults that the model relies on.
const MAX_FRAME_BYTES: usize = 64 * 1024;
const MALFORMED_TOLERATED: u32 = 10;
const MAX_SENDER_CHARS: usize = 64;
const MAX_TEXT_CHARS: usize = 4000;
/// Rooms the fuzzer joins and talks in; a few more come from random valid ids.
const ROOMS: [&str; 6] = ["alpha", "beta", "gamma", "d-1", "E_2", "zz"];
/// How long a reply may take.
const REPLY_WAIT: Duration = Duration::from_secs(10);

/// splitmix64: small, fast, and the same sequence for the same seed everywhere.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    fn percent(&mut self, p: usize) -> bool {
        self.below(100) < p
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn seed() -> u64 {
    match std::env::var("FUZZ_SEED") {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).ok(),
                None => s.parse().ok(),
            };
            parsed.unwrap_or_else(|| panic!("FUZZ_SEED={s:?} is not a number"))
        }
        Err(_) => {
            let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
            nanos ^ u64::from(std::process::id()).rotate_left(32)
        }
    }
}

fn frames_to_send() -> usize {
    std::env::var("FUZZ_FRAMES").ok().and_then(|n| n.parse().ok()).unwrap_or(4000)
}

fn js(s: impl AsRef<str>) -> String {
    serde_json::to_string(s.as_ref()).unwrap()
}

fn valid_room_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// What the client sends in one go.
enum Input {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
}

struct Case {
    kind: &'static str,
    input: Input,
    /// The generator mangled the frame blindly: only the form of any reply is checked.
    form_only: bool,
}

/// A frame the gateway must accept: the design's "5-element array of the right types".
struct Parsed {
    join_ref: Option<String>,
    msg_ref: Option<String>,
    topic: String,
    event: String,
    payload: Box<RawValue>,
}

fn parse(text: &str) -> Option<Parsed> {
    type Wire = (Option<String>, Option<String>, String, String, Box<RawValue>);
    let (join_ref, msg_ref, topic, event, payload): Wire = serde_json::from_str(text).ok()?;
    Some(Parsed { join_ref, msg_ref, topic, event, payload })
}

/// What the model predicts for one `phx_reply`.
#[derive(Debug, Clone)]
enum Want {
    /// Only the form is checked.
    Any,
    OkEmpty,
    OkHistory,
    OkMessage {
        sender: String,
        text: String,
    },
    /// An error; with the exact reason when the model knows it.
    Error(Option<&'static str>),
}

#[derive(Debug, Clone)]
enum Expected {
    Reply {
        join_ref: Option<String>,
        msg_ref: Option<String>,
        topic: String,
        want: Want,
        event: String,
        /// Position in the burst, to replay joins and leaves in the order sent.
        seq: usize,
    },
    /// `phx_close` to a channel: `[jr, jr, topic, "phx_close", {}]`.
    Close { join_ref: Option<String>, topic: String },
    /// The sender's own `new_message`.
    Push { topic: String, text: String },
}

/// One socket and what the model knows about it.
struct Sock {
    ws: WsStream,
    malformed: u32,
    /// topic → join_ref of the channel the gateway holds for it.
    joined: HashMap<String, Option<String>>,
}

#[derive(Default)]
struct Stats {
    by_kind: BTreeMap<&'static str, usize>,
    malformed: usize,
    binary_malformed: usize,
    binary_pushes: usize,
    oversize: usize,
    replies_ok: usize,
    replies_error: BTreeMap<String, usize>,
    closes: BTreeMap<u16, usize>,
    sockets: usize,
    new_messages: usize,
    bursts: usize,
    seen_non_json: bool,
    seen_arity: bool,
    seen_wrong_type: bool,
}

struct Fuzzer {
    seed: u64,
    rng: Rng,
    next_ref: u64,
    recent: VecDeque<String>,
    stats: Stats,
    step: usize,
}

fn preview(input: &Input) -> String {
    let text = match input {
        Input::Text(t) => format!("text {} bytes: {t}", t.len()),
        Input::Binary(b) => format!("binary {} bytes", b.len()),
        Input::Ping(p) => format!("ping {} bytes", p.len()),
    };
    if text.chars().count() > 300 {
        let head: String = text.chars().take(300).collect();
        format!("{head}…")
    } else {
        text
    }
}

impl Fuzzer {
    fn fail(&self, what: &str) -> ! {
        let recent: Vec<_> = self.recent.iter().map(|r| format!("  {r}")).collect();
        panic!(
            "fuzz failure at step {} (replay with FUZZ_SEED={}): {what}\nlast frames sent:\n{}",
            self.step,
            self.seed,
            recent.join("\n")
        );
    }

    fn fresh_ref(&mut self, prefix: &str) -> String {
        self.next_ref += 1;
        format!("{prefix}{}", self.next_ref)
    }

    // ---- generators: each returns a JSON text fragment ----

    fn any_string(&mut self) -> String {
        let r = self.rng.below(100);
        match r {
            0..=39 => format!("w{}", self.rng.below(1000)),
            40..=54 => self
                .rng
                .pick(&[
                    "é",
                    "漢字テキスト",
                    "🎉🙂",
                    "עברית",
                    "e\u{301}",
                    "a\u{200d}b",
                    "\u{feff}",
                    "\u{3000}",
                ])
                .to_string(),
            55..=64 => {
                self.rng.pick(&["", " ", "\t\n", "\0", "a\0b", "\u{7f}\u{1b}[31m", "</script>"]).to_string()
            }
            65..=74 => "x".repeat(self.rng.range(65, 5000)),
            75..=79 => "é".repeat(self.rng.range(1, 3000)),
            _ => format!("{}-{}", self.rng.pick(&["room", "phoenix", "phx", "send"]), self.rng.below(50)),
        }
    }

    /// A JSON value of any type, as text; sometimes deeply nested.
    fn any_json(&mut self, depth: usize) -> String {
        let r = self.rng.below(if depth > 3 { 60 } else { 100 });
        match r {
            0..=9 => "null".into(),
            10..=19 => self.rng.pick(&["true", "false"]).to_string(),
            20..=34 => self
                .rng
                .pick(&[
                    "0",
                    "-1",
                    "3.5",
                    "1e300",
                    "1e999",
                    "-0",
                    "18446744073709551616",
                    "123456789012345678901234567890",
                ])
                .to_string(),
            35..=59 => js(self.any_string()),
            60..=79 => {
                let n = self.rng.below(4);
                let items: Vec<String> = (0..n).map(|_| self.any_json(depth + 1)).collect();
                format!("[{}]", items.join(","))
            }
            80..=94 => {
                let n = self.rng.below(4);
                let items: Vec<String> = (0..n)
                    .map(|_| format!("{}:{}", js(self.any_string()), self.any_json(depth + 1)))
                    .collect();
                format!("{{{}}}", items.join(","))
            }
            _ => self.deep(),
        }
    }

    /// Deep nesting, well under the frame limit.
    fn deep(&mut self) -> String {
        let n = self.rng.range(100, 20_000);
        match self.rng.below(4) {
            0 | 1 => format!("{}{}", "[".repeat(n), "]".repeat(n)),
            2 => format!("{}1{}", "{\"a\":".repeat(n.min(10_000)), "}".repeat(n.min(10_000))),
            _ => format!("{}{}", "[{\"a\":".repeat(n / 6), "}]".repeat(n / 6)),
        }
    }

    /// A value that is not a string or null, for the ref, topic and event slots.
    fn wrong_type(&mut self) -> String {
        match self.rng.below(10) {
            0 => "1".into(),
            1 => "0".into(),
            2 => "-7".into(),
            3 => "2.5".into(),
            4 => "true".into(),
            5 => "{}".into(),
            6 => "[]".into(),
            7 => "[\"1\"]".into(),
            8 => "{\"ref\":\"1\"}".into(),
            _ => self.deep(),
        }
    }

    fn field(&mut self, limit: usize) -> String {
        match self.rng.below(100) {
            0..=59 => {
                js(format!("{} {}", self.rng.pick(&["ann", "bob", "hi", "hello"]), self.rng.below(10_000)))
            }
            60..=69 => js(self.rng.pick(&[
                "é漢🎉",
                "a\0b",
                "line\nbreak",
                "<img src=x onerror=alert(1)>",
                "\"quoted\"",
            ])),
            70..=77 => js(self.rng.pick(&["", " ", "\t\n ", "\u{3000}", "\u{a0}\u{2003}"])),
            78..=85 => js("y".repeat(limit + self.rng.range(1, 3))),
            86..=89 => js("é".repeat(limit)),
            90..=93 => js("z".repeat(self.rng.range(limit + 1, 30_000))),
            _ => self.wrong_type(),
        }
    }

    fn send_payload(&mut self) -> String {
        match self.rng.below(100) {
            0..=64 => {
                let sender = self.field(MAX_SENDER_CHARS);
                let text = self.field(MAX_TEXT_CHARS);
                let mut fields = vec![format!("\"sender\":{sender}"), format!("\"text\":{text}")];
                if self.rng.percent(20) {
                    let extra = format!("{}:{}", js(self.any_string()), self.any_json(0));
                    fields.insert(self.rng.below(3), extra);
                }
                if self.rng.percent(10) {
                    fields.swap(0, 1);
                }
                format!("{{{}}}", fields.join(","))
            }
            65..=72 => format!("{{\"sender\":{}}}", self.field(MAX_SENDER_CHARS)),
            73..=78 => format!("{{\"text\":{}}}", self.field(MAX_TEXT_CHARS)),
            79..=82 => format!("[{},{}]", js("ann"), js("array form")),
            83..=88 => format!("{{\"sender\":{},\"text\":{}}}", js("ann"), self.deep()),
            89..=92 => self.deep(),
            _ => self.any_json(0),
        }
    }

    fn topic(&mut self, sock: &Sock) -> String {
        match self.rng.below(100) {
            0..=64 => {
                if !sock.joined.is_empty() && self.rng.percent(75) {
                    let mut topics: Vec<&String> = sock.joined.keys().collect();
                    topics.sort();
                    js(self.rng.pick(&topics))
                } else {
                    js(format!("room:{}", self.rng.pick(&ROOMS)))
                }
            }
            65..=72 => js("phoenix"),
            73..=76 => js(format!("room:r{}", self.rng.below(8))),
            77..=88 => {
                let long = format!("room:{}", "x".repeat(65));
                let bad = [
                    "room:",
                    long.as_str(),
                    "room:../x",
                    "room:é",
                    "room:a b",
                    "room:a\0b",
                    "room:general\n",
                    "lobby:general",
                    "",
                    "room",
                    "ROOM:alpha",
                    "room:alpha:beta",
                ];
                js(self.rng.pick(&bad))
            }
            _ => js(self.any_string()),
        }
    }

    /// `[join_ref, ref, topic, event, payload]` with each slot drawn from valid and invalid
    /// values; some get one slot of the wrong type.
    fn structured(&mut self, sock: &Sock) -> Vec<String> {
        // A fresh socket mostly joins first, so that frames reach rooms, not only refusals.
        if sock.joined.is_empty() && self.rng.percent(40) {
            let join_ref = js(self.fresh_ref("j"));
            let topic = js(format!("room:{}", self.rng.pick(&ROOMS)));
            return vec![join_ref.clone(), join_ref, topic, js("phx_join"), "{}".to_owned()];
        }
        let topic = self.topic(sock);
        let topic_str: Option<String> = serde_json::from_str(&topic).ok();
        let event = match self.rng.below(100) {
            0..=39 => "send_message".to_owned(),
            40..=62 => "phx_join".to_owned(),
            63..=68 => "phx_leave".to_owned(),
            69..=76 => "heartbeat".to_owned(),
            77..=90 => self
                .rng
                .pick(&[
                    "phx_reply",
                    "phx_close",
                    "phx_error",
                    "new_message",
                    "room_reset",
                    "SEND_MESSAGE",
                    "send_message ",
                    "",
                    "join",
                ])
                .to_string(),
            _ => self.any_string(),
        };
        let joined_ref = topic_str.as_ref().and_then(|t| sock.joined.get(t)).cloned();
        let join_ref = match (self.rng.below(100), joined_ref) {
            (0..=69, Some(existing)) => existing.map_or("null".to_owned(), js),
            (0..=29, None) | (70..=79, _) => "null".to_owned(),
            (80..=89, _) => js(self.any_string()),
            _ => js(self.fresh_ref("j")),
        };
        let msg_ref = if self.rng.percent(8) { "null".to_owned() } else { js(self.fresh_ref("f")) };
        let payload = match event.as_str() {
            "send_message" => self.send_payload(),
            _ if self.rng.percent(60) => "{}".to_owned(),
            _ => self.any_json(0),
        };
        let mut slots = vec![join_ref, msg_ref, topic, js(event), payload];
        if self.rng.percent(15) {
            let at = self.rng.below(4);
            slots[at] = self.wrong_type();
            self.stats.seen_wrong_type = true;
        }
        slots
    }

    fn non_json(&mut self) -> String {
        let valid = r#"[null,"1","phoenix","heartbeat",{}]"#;
        match self.rng.below(12) {
            0 => String::new(),
            1 => " \n\t ".into(),
            2 => "not json".into(),
            3 => self
                .rng
                .pick(&["[", "]", "{", "}", "[,]", "[null,]", "nul", "tru", "\"", "'a'", "NaN", "Infinity"])
                .to_string(),
            4 => format!("\u{feff}{valid}"),
            5 => format!("{valid}x"),
            6 => format!("{valid}{valid}"),
            7 => valid.replace('"', "'"),
            8 => valid[..self.rng.range(1, valid.len() - 1)].to_owned(),
            9 => r#"[null,"1","phoenix","heartbeat",{}"#.into(),
            10 => {
                // A lone surrogate, an invalid escape, a short one, an escaped quote.
                let escape = *self.rng.pick(&["\\ud800", "\\x41", "\\u12", "\\"]);
                format!("[null,\"{escape}\",\"phoenix\",\"heartbeat\",{{}}]")
            }
            _ => {
                let n = self.rng.range(1, 300);
                (0..n).map(|_| char::from_u32(self.rng.range(1, 0x2FFF) as u32).unwrap_or('?')).collect()
            }
        }
    }

    /// Blind edits of a well-formed frame: the result may be valid or not.
    fn mutated(&mut self, sock: &Sock) -> String {
        let mut chars: Vec<char> = format!("[{}]", self.structured(sock).join(",")).chars().collect();
        for _ in 0..self.rng.range(1, 4) {
            if chars.is_empty() {
                break;
            }
            let at = self.rng.below(chars.len());
            let junk =
                *self.rng.pick(&['[', ']', '{', '}', '"', ',', ':', '\\', '0', 'a', ' ', 'é', '\0', 'n']);
            match self.rng.below(5) {
                0 => {
                    chars.remove(at);
                }
                1 => chars.insert(at, junk),
                2 => chars[at] = junk,
                3 => {
                    let other = self.rng.below(chars.len());
                    chars.swap(at, other);
                }
                _ => {
                    let end = (at + self.rng.range(1, 8)).min(chars.len());
                    let span: Vec<char> = chars[at..end].to_vec();
                    chars.splice(at..at, span);
                }
            }
        }
        chars.into_iter().collect()
    }

    /// A binary push as phoenix.js encodes one: kind 0, the byte lengths of join_ref, ref,
    /// topic and event, those four strings, then the raw payload.
    fn binary_push(&mut self) -> Vec<u8> {
        let join_ref = if self.rng.percent(30) { String::new() } else { self.fresh_ref("j") };
        let msg_ref = self.fresh_ref("f");
        let mut topic = match self.rng.below(4) {
            0 => format!("room:{}", self.rng.pick(&ROOMS)).into_bytes(),
            1 => b"phoenix".to_vec(),
            2 => "room:é".as_bytes().to_vec(),
            _ => self.any_string().into_bytes(),
        };
        topic.truncate(255);
        if self.rng.percent(10) {
            topic = vec![b'r', 0xff, 0xfe];
        }
        let event = self.rng.pick(&["send_message", "phx_join", "heartbeat", "x"]).as_bytes().to_vec();
        let fields = [join_ref.into_bytes(), msg_ref.into_bytes(), topic, event];
        let mut bytes = vec![0];
        bytes.extend(fields.iter().map(|f| f.len() as u8));
        for field in &fields {
            bytes.extend_from_slice(field);
        }
        bytes.extend((0..self.rng.below(500)).map(|_| self.rng.next_u64() as u8));
        bytes
    }

    fn generate(&mut self, sock: &Sock) -> Case {
        let r = self.rng.below(1000);
        let text = |kind, text: String| Case { kind, input: Input::Text(text), form_only: false };
        match r {
            0..=639 => {
                let slots = self.structured(sock);
                text("structured", format!("[{}]", slots.join(",")))
            }
            640..=699 => {
                let mut slots = self.structured(sock);
                if self.rng.percent(50) && !slots.is_empty() {
                    let keep = self.rng.below(5);
                    slots.truncate(keep);
                } else {
                    for _ in 0..self.rng.range(1, 4) {
                        let extra = self.any_json(2);
                        slots.push(extra);
                    }
                }
                self.stats.seen_arity = true;
                let framed = match self.rng.below(6) {
                    0 => r#"{"join_ref":null,"ref":"1","topic":"phoenix","event":"heartbeat","payload":{}}"#
                        .to_owned(),
                    1 => self.any_json(3),
                    _ => format!("[{}]", slots.join(",")),
                };
                text("arity", framed)
            }
            700..=759 => {
                self.stats.seen_non_json = true;
                text("non-json", self.non_json())
            }
            760..=859 => Case { kind: "mutated", input: Input::Text(self.mutated(sock)), form_only: true },
            860..=894 => {
                let frame = match self.rng.below(4) {
                    0 => self.deep(),
                    1 => format!(
                        "[null,{},\"phoenix\",\"heartbeat\",{}]",
                        js(self.fresh_ref("f")),
                        self.deep()
                    ),
                    2 => format!(
                        "[{},{},\"room:alpha\",\"phx_join\",{}]",
                        self.deep(),
                        js(self.fresh_ref("f")),
                        "{}"
                    ),
                    _ => "[".repeat(self.rng.range(1000, 60_000)),
                };
                text("deep", frame)
            }
            895..=919 => {
                // Near the frame limit: exactly at it is allowed, one byte over is not.
                let head =
                    format!("[null,{},\"phoenix\",\"heartbeat\",{{\"pad\":\"", js(self.fresh_ref("f")));
                let tail = "\"}]";
                let target = match self.rng.below(4) {
                    0 => MAX_FRAME_BYTES,
                    1 => MAX_FRAME_BYTES - self.rng.range(1, 100),
                    2 => MAX_FRAME_BYTES + self.rng.range(1, 3),
                    _ => self.rng.range(10_000, MAX_FRAME_BYTES - 100),
                };
                let pad = target - head.len() - tail.len();
                text("huge", format!("{head}{}{tail}", "p".repeat(pad)))
            }
            920..=969 => {
                let bytes = match self.rng.below(8) {
                    0 => br#"["1","1","room:alpha","phx_join",{}]"#.to_vec(),
                    1 => Vec::new(),
                    2 | 3 => self.binary_push(),
                    4 => {
                        let mut push = self.binary_push();
                        push.truncate(self.rng.below(push.len().min(40)));
                        push
                    }
                    5 => {
                        // A reply or broadcast (kinds 1 and 2) is the server's to send.
                        let mut push = self.binary_push();
                        push[0] = self.rng.range(1, 255) as u8;
                        push
                    }
                    _ => (0..self.rng.range(1, 2000)).map(|_| self.rng.next_u64() as u8).collect(),
                };
                Case { kind: "binary", input: Input::Binary(bytes), form_only: false }
            }
            970..=989 => {
                let n = self.rng.below(126);
                Case {
                    kind: "ping",
                    input: Input::Ping((0..n).map(|_| self.rng.next_u64() as u8).collect()),
                    form_only: false,
                }
            }
            _ => {
                let slots = self.structured(sock);
                text("oversize", format!("[{},\"{}\"]", slots.join(","), "o".repeat(MAX_FRAME_BYTES)))
            }
        }
    }
}

/// The model's prediction for a frame the gateway accepts.
fn predict(frame: &Parsed, sock: &Sock, form_only: bool, seq: usize, expected: &mut Vec<Expected>) {
    let reply = |want: Want| Expected::Reply {
        seq,
        join_ref: frame.join_ref.clone(),
        msg_ref: frame.msg_ref.clone(),
        topic: frame.topic.clone(),
        event: frame.event.clone(),
        want,
    };
    if form_only {
        expected.push(reply(Want::Any));
        return;
    }
    if frame.topic == "phoenix" && frame.event == "heartbeat" {
        expected.push(reply(Want::OkEmpty));
        return;
    }
    if frame.event == "phx_join" {
        match frame.topic.strip_prefix("room:") {
            None => expected.push(reply(Want::Error(Some("unmatched topic")))),
            Some(id) if !valid_room_id(id) => expected.push(reply(Want::Error(Some("invalid room id")))),
            Some(_) => {
                if let Some(old) = sock.joined.get(&frame.topic) {
                    expected.push(Expected::Close { join_ref: old.clone(), topic: frame.topic.clone() });
                }
                expected.push(reply(Want::OkHistory));
            }
        }
        return;
    }
    let Some(channel_ref) = sock.joined.get(&frame.topic) else {
        // Leaving what is not joined succeeds, as in Phoenix (README's protocol table).
        let want =
            if frame.event == "phx_leave" { Want::OkEmpty } else { Want::Error(Some("unmatched topic")) };
        expected.push(reply(want));
        return;
    };
    if frame.join_ref.is_some() && frame.join_ref != *channel_ref {
        expected.push(reply(Want::Error(Some("unmatched topic"))));
        return;
    }
    match frame.event.as_str() {
        "phx_leave" => {
            expected.push(reply(Want::OkEmpty));
            expected.push(Expected::Close { join_ref: channel_ref.clone(), topic: frame.topic.clone() });
        }
        "send_message" => match classify_message(frame.payload.get()) {
            Some(Ok((sender, text))) => {
                expected.push(Expected::Push { topic: frame.topic.clone(), text: text.clone() });
                expected.push(reply(Want::OkMessage { sender, text }));
            }
            Some(Err(())) => expected.push(reply(Want::Error(None))),
            None => expected.push(reply(Want::Any)),
        },
        _ => expected.push(reply(Want::Error(Some("unknown event")))),
    }
}

/// `Some(Ok)` for a payload the gateway must store, `Some(Err)` for one it must refuse, `None`
/// where the model does not say (an array, which serde may read as the struct's fields, or
/// JSON too deep to inspect here).
fn classify_message(payload: &str) -> Option<Result<(String, String), ()>> {
    let value: Value = serde_json::from_str(payload).ok()?;
    if value.is_array() {
        return None;
    }
    let (Some(sender), Some(text)) =
        (value.get("sender").and_then(Value::as_str), value.get("text").and_then(Value::as_str))
    else {
        return Some(Err(()));
    };
    let ok = |s: &str, max: usize| !s.trim().is_empty() && s.chars().count() <= max;
    if ok(sender, MAX_SENDER_CHARS) && ok(text, MAX_TEXT_CHARS) {
        Some(Ok((sender.to_owned(), text.to_owned())))
    } else {
        Some(Err(()))
    }
}

fn opt_str(v: &Value) -> Option<Option<String>> {
    match v {
        Value::Null => Some(None),
        Value::String(s) => Some(Some(s.clone())),
        _ => None,
    }
}

/// Checks that a server frame is a well-formed v2 frame; returns why not.
fn check_form(frame: &Value) -> Result<(), String> {
    let items = frame.as_array().ok_or("not an array")?;
    if items.len() != 5 {
        return Err(format!("{} elements", items.len()));
    }
    opt_str(&items[0]).ok_or("join_ref is not a string or null")?;
    opt_str(&items[1]).ok_or("ref is not a string or null")?;
    items[2].as_str().ok_or("topic is not a string")?;
    let event = items[3].as_str().ok_or("event is not a string")?;
    let payload = items[4].as_object().ok_or("payload is not an object")?;
    match event {
        "phx_reply" => {
            let status = payload.get("status").and_then(Value::as_str).ok_or("reply without a status")?;
            let response = payload.get("response").ok_or("reply without a response")?;
            match status {
                "ok" => {
                    if !response.is_object() {
                        return Err("ok reply whose response is not an object".into());
                    }
                }
                "error" => {
                    let reason = response
                        .get("reason")
                        .and_then(Value::as_str)
                        .ok_or("error reply without a reason")?;
                    if reason.trim().is_empty() || reason.len() > 300 || reason.contains('\n') {
                        return Err(format!("error reason is not short and human-readable: {reason:?}"));
                    }
                }
                other => return Err(format!("reply status {other:?}")),
            }
        }
        "phx_close" => {
            if items[0] != items[1] || !payload.is_empty() {
                return Err("phx_close is not [jr, jr, topic, \"phx_close\", {}]".into());
            }
        }
        "new_message" => {
            if !items[0].is_null() || !items[1].is_null() {
                return Err("a broadcast carries refs".into());
            }
            let ok = payload.get("id").is_some_and(Value::is_u64)
                && payload.get("sender").is_some_and(Value::is_string)
                && payload.get("text").is_some_and(Value::is_string)
                && payload.get("timestamp").is_some_and(Value::is_u64);
            if !ok {
                return Err("new_message is not {id, sender, text, timestamp}".into());
            }
        }
        // The chat tracks each join: its joiner gets the list, the room the diffs.
        "presence_state" => {
            if !items[1].is_null() || !is_presence_list(&items[4]) {
                return Err("presence_state is not [jr, null, topic, _, {key: {metas}}]".into());
            }
        }
        "presence_diff" => {
            if !items[0].is_null() || !items[1].is_null() {
                return Err("a presence_diff carries refs".into());
            }
            let ok = is_presence_list(&items[4]["joins"]) && is_presence_list(&items[4]["leaves"]);
            if !ok || payload.len() != 2 {
                return Err("presence_diff is not {joins, leaves}".into());
            }
        }
        other => return Err(format!("an event the fuzzer never causes: {other:?}")),
    }
    Ok(())
}

fn check_want(want: &Want, payload: &Value) -> Result<(), String> {
    let status = &payload["status"];
    let response = &payload["response"];
    match want {
        Want::Any => Ok(()),
        Want::OkEmpty if status == "ok" && response == &json!({}) => Ok(()),
        Want::OkHistory if status == "ok" && response["messages"].is_array() => Ok(()),
        Want::OkMessage { sender, text }
            if status == "ok"
                && response["sender"] == **sender
                && response["text"] == **text
                && response["id"].is_u64() =>
        {
            Ok(())
        }
        Want::Error(None) if status == "error" => Ok(()),
        Want::Error(Some(reason)) if status == "error" && response["reason"] == *reason => Ok(()),
        _ => Err(format!("expected {want:?}")),
    }
}

enum Read {
    Frame(Value),
    Closed(Option<u16>),
    TimedOut,
}

async fn read(ws: &mut WsStream, deadline: tokio::time::Instant) -> Read {
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Read::TimedOut,
            Ok(None) => return Read::Closed(None),
            Ok(Some(Err(_))) => return Read::Closed(None),
            Ok(Some(Ok(Message::Close(frame)))) => return Read::Closed(frame.map(|f| u16::from(f.code))),
            Ok(Some(Ok(Message::Text(text)))) => match serde_json::from_str(&text) {
                Ok(value) => return Read::Frame(value),
                Err(e) => return Read::Frame(json!({ "not json": e.to_string(), "text": text.to_string() })),
            },
            Ok(Some(Ok(_))) => continue,
        }
    }
}

impl Fuzzer {
    /// Checks one frame from the server against the outstanding expectations; removes the
    /// one it satisfies.
    fn on_frame(
        &mut self,
        frame: Value,
        expected: &mut Vec<Expected>,
        answered: &mut Vec<(Expected, Value)>,
    ) {
        if let Err(why) = check_form(&frame) {
            self.fail(&format!("malformed frame from the server ({why}): {frame}"));
        }
        let event = frame[3].as_str().unwrap_or_default();
        let at = expected.iter().position(|e| match e {
            Expected::Reply { join_ref, msg_ref, topic, .. } => {
                event == "phx_reply"
                    && opt_str(&frame[0]) == Some(join_ref.clone())
                    && opt_str(&frame[1]) == Some(msg_ref.clone())
                    && frame[2] == **topic
            }
            Expected::Close { join_ref, topic } => {
                event == "phx_close" && opt_str(&frame[0]) == Some(join_ref.clone()) && frame[2] == **topic
            }
            Expected::Push { topic, text } => {
                event == "new_message" && frame[2] == **topic && frame[4]["text"] == **text
            }
        });
        match (event, at) {
            (_, Some(at)) => {
                let satisfied = expected.remove(at);
                if let Expected::Reply { want, .. } = &satisfied {
                    if let Err(why) = check_want(want, &frame[4]) {
                        self.fail(&format!("{why}, got {frame}"));
                    }
                    match frame[4]["status"].as_str() {
                        Some("ok") => self.stats.replies_ok += 1,
                        _ => {
                            let reason = frame[4]["response"]["reason"].as_str().unwrap_or_default();
                            let reason: String = reason.chars().take(60).collect();
                            *self.stats.replies_error.entry(reason).or_default() += 1;
                        }
                    }
                    answered.push((satisfied, frame.clone()));
                }
                if event == "new_message" {
                    self.stats.new_messages += 1;
                }
            }
            ("phx_reply", None) => self.fail(&format!("a reply that answers no frame sent: {frame}")),
            ("new_message", None) => self.stats.new_messages += 1,
            // A rejoin can close a channel the model already saw leave.
            ("phx_close", None) => {}
            // Who is online, after each join and as others come and go; shapes checked above.
            ("presence_state" | "presence_diff", None) => {}
            _ => self.fail(&format!("an unexpected frame: {frame}")),
        }
    }

    /// Reads until every expectation is met.
    async fn collect(&mut self, sock: &mut Sock, expected: &mut Vec<Expected>) -> Vec<(Expected, Value)> {
        let mut answered = Vec::new();
        let deadline = tokio::time::Instant::now() + REPLY_WAIT;
        while !expected.is_empty() {
            match read(&mut sock.ws, deadline).await {
                Read::Frame(frame) => self.on_frame(frame, expected, &mut answered),
                Read::Closed(code) => self.fail(&format!(
                    "the server closed the socket ({code:?}) while {expected:?} was outstanding"
                )),
                Read::TimedOut => {
                    self.fail(&format!("no answer within {REPLY_WAIT:?}; still expected: {expected:?}"))
                }
            }
        }
        answered
    }

    /// Reads until the server's close frame, checking what comes before it.
    async fn expect_close(&mut self, sock: &mut Sock, code: u16) {
        let deadline = tokio::time::Instant::now() + REPLY_WAIT;
        let mut none = Vec::new();
        let mut answered = Vec::new();
        loop {
            match read(&mut sock.ws, deadline).await {
                Read::Frame(frame) => self.on_frame(frame, &mut none, &mut answered),
                Read::Closed(got) => {
                    if got != Some(code) {
                        self.fail(&format!("expected close {code}, got {got:?}"));
                    }
                    *self.stats.closes.entry(code).or_default() += 1;
                    return;
                }
                Read::TimedOut => self.fail(&format!("the socket was not closed with {code} in time")),
            }
        }
    }

    async fn send(&mut self, sock: &mut Sock, case: Case) {
        let joined: Vec<_> = sock.joined.iter().map(|(t, r)| format!("{t}={r:?}")).collect();
        self.recent.push_back(format!(
            "#{} socket {} (joined {}) {} {}",
            self.step,
            self.stats.sockets,
            joined.join(" "),
            case.kind,
            preview(&case.input)
        ));
        if self.recent.len() > 40 {
            self.recent.pop_front();
        }
        *self.stats.by_kind.entry(case.kind).or_default() += 1;
        let message = match case.input {
            Input::Text(text) => Message::Text(text.into()),
            Input::Binary(bytes) => Message::Binary(bytes.into()),
            Input::Ping(bytes) => Message::Ping(bytes.into()),
        };
        if let Err(e) = sock.ws.send(message).await {
            self.fail(&format!("sending failed: {e}"));
        }
    }
}

/// What the gateway will do with one input.
enum Fate {
    Nothing,
    Malformed,
    TooBig,
    Frame(Parsed),
    /// A well-formed binary push, refused with an error reply (README's protocol table).
    BinaryPush {
        join_ref: Option<String>,
        msg_ref: String,
        topic: String,
    },
}

/// The routing header of a binary push (the phoenix.js format), if it has one.
fn binary_push_header(bytes: &[u8]) -> Option<Fate> {
    let (&0, rest) = bytes.split_first()? else { return None };
    let (lengths, mut rest) = rest.split_at_checked(4)?;
    let mut fields = Vec::new();
    for &length in lengths {
        let (field, after) = rest.split_at_checked(usize::from(length))?;
        fields.push(std::str::from_utf8(field).ok()?.to_owned());
        rest = after;
    }
    let [join_ref, msg_ref, topic, _event] = <[String; 4]>::try_from(fields).ok()?;
    Some(Fate::BinaryPush { join_ref: Some(join_ref).filter(|r| !r.is_empty()), msg_ref, topic })
}

fn fate(case: &Case) -> Fate {
    match &case.input {
        Input::Ping(_) => Fate::Nothing,
        Input::Binary(b) if b.len() > MAX_FRAME_BYTES => Fate::TooBig,
        Input::Binary(b) => binary_push_header(b).unwrap_or(Fate::Malformed),
        Input::Text(t) if t.len() > MAX_FRAME_BYTES => Fate::TooBig,
        Input::Text(t) => parse(t).map_or(Fate::Malformed, Fate::Frame),
    }
}

/// Applies the answered joins and leaves of a step to the model, in the order sent (replies
/// from different channels may arrive in any order).
fn learn(sock: &mut Sock, answered: &mut [(Expected, Value)]) {
    answered.sort_by_key(|(expected, _)| match expected {
        Expected::Reply { seq, .. } => *seq,
        _ => usize::MAX,
    });
    for (expected, reply) in answered.iter() {
        if let Expected::Reply { join_ref, topic, event, .. } = expected {
            let ok = reply[4]["status"] == "ok";
            match event.as_str() {
                "phx_join" if ok => {
                    sock.joined.insert(topic.clone(), join_ref.clone());
                }
                // A refused join leaves no channel behind.
                "phx_join" => {
                    sock.joined.remove(topic);
                }
                "phx_leave" if ok => {
                    sock.joined.remove(topic);
                }
                _ => {}
            }
        }
    }
}

#[tokio::test]
async fn thousands_of_random_and_mutated_frames_leave_the_gateway_serving() {
    let seed = seed();
    let total = frames_to_send();
    // Pipelined bursts; FUZZ_BURST_PERCENT=0 sends every frame alone, to tell a pipelining
    // failure from another.
    let burst_percent = std::env::var("FUZZ_BURST_PERCENT").ok().and_then(|p| p.parse().ok()).unwrap_or(6);
    println!("fuzz seed: {seed} ({total} frames; replay with FUZZ_SEED={seed})");
    let started = Instant::now();
    let mut gateway = Gateway::start(&["--rate-per-sec", "1000000", "--rate-burst", "1000000"]);
    let mut fuzzer = Fuzzer {
        seed,
        rng: Rng(seed),
        next_ref: 0,
        recent: VecDeque::new(),
        stats: Stats::default(),
        step: 0,
    };
    let mut sock: Option<Sock> = None;
    let mut carried: Option<Case> = None;
    let mut sent = 0;
    while sent < total {
        fuzzer.step = sent;
        if sock.is_none() {
            fuzzer.stats.sockets += 1;
            sock = Some(Sock { ws: gateway.connect_raw().await, malformed: 0, joined: HashMap::new() });
        }
        let s = sock.as_mut().unwrap();
        // Mostly one frame at a time, answered before the next; sometimes a pipelined burst.
        let burst = if fuzzer.rng.percent(burst_percent) { fuzzer.rng.range(2, 12) } else { 1 };
        if burst > 1 {
            fuzzer.stats.bursts += 1;
        }
        let mut expected = Vec::new();
        let mut close_with = None;
        let mut in_burst = 0;
        while in_burst < burst && sent < total {
            let case = carried.take().unwrap_or_else(|| fuzzer.generate(s));
            let fate = fate(&case);
            let closes = match fate {
                Fate::TooBig => Some(1009),
                Fate::Malformed if s.malformed >= MALFORMED_TOLERATED => Some(1008),
                _ => None,
            };
            // A frame that closes the socket goes alone, once everything before it is answered.
            if closes.is_some() && in_burst > 0 {
                carried = Some(case);
                break;
            }
            let form_only = case.form_only || burst > 1;
            let binary = matches!(case.input, Input::Binary(_));
            fuzzer.send(s, case).await;
            sent += 1;
            in_burst += 1;
            match fate {
                Fate::Nothing => {}
                Fate::TooBig => fuzzer.stats.oversize += 1,
                Fate::Malformed => {
                    s.malformed += 1;
                    fuzzer.stats.malformed += 1;
                    if binary {
                        fuzzer.stats.binary_malformed += 1;
                    }
                }
                Fate::Frame(frame) => predict(&frame, s, form_only, in_burst, &mut expected),
                Fate::BinaryPush { join_ref, msg_ref, topic } => {
                    fuzzer.stats.binary_pushes += 1;
                    expected.push(Expected::Reply {
                        join_ref,
                        msg_ref: Some(msg_ref),
                        topic,
                        want: Want::Error(Some("binary payloads are not supported")),
                        event: "(binary push)".to_owned(),
                        seq: in_burst,
                    });
                }
            }
            if closes.is_some() {
                close_with = closes;
                break;
            }
        }
        let mut answered = fuzzer.collect(s, &mut expected).await;
        learn(s, &mut answered);
        if let Some(code) = close_with {
            fuzzer.expect_close(s, code).await;
            sock = None;
        }
    }
    // Whatever is still in flight on the last socket must be well-formed too.
    if let Some(s) = sock.as_mut() {
        let mut none = Vec::new();
        let mut answered = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
        while let Read::Frame(frame) = read(&mut s.ws, deadline).await {
            fuzzer.on_frame(frame, &mut none, &mut answered);
        }
    }
    drop(sock);
    let stats = &fuzzer.stats;
    println!(
        "fuzz: {sent} inputs in {:.1?} over {} sockets ({} pipelined bursts); by kind {:?}",
        started.elapsed(),
        stats.sockets,
        stats.bursts,
        stats.by_kind
    );
    println!(
        "fuzz: {} malformed dropped ({} of them binary), {} binary pushes refused, {} over the size \
         limit, closes by code {:?}, {} ok replies, {} new_message, error replies {:?}",
        stats.malformed,
        stats.binary_malformed,
        stats.binary_pushes,
        stats.oversize,
        stats.closes,
        stats.replies_ok,
        stats.new_messages,
        stats.replies_error
    );

    assert!(gateway.is_running(), "the gateway died (seed {seed})");
    assert!(stats.malformed > total / 10, "too few malformed frames to mean anything: {}", stats.malformed);
    assert!(stats.replies_ok > total / 10, "too few accepted frames to mean anything: {}", stats.replies_ok);

    // A normal client still gets the whole service.
    let mut ann = gateway.connect().await;
    let mut bob = gateway.connect().await;
    let (ann_ref, _) = ann.join_ok("room:after-fuzz").await;
    bob.join_ok("room:after-fuzz").await;
    let reply = ann.send_message(&ann_ref, "room:after-fuzz", "ann", "still here").await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let pushed = bob.next_event("new_message").await;
    assert_eq!(pushed[4], reply["response"]);
    let health = gateway.get_json("/healthz");
    assert_eq!(health["status"], "ok");

    // The log names every frame it dropped, and why.
    let dropped = stats.malformed;
    let logged = common::wait_for(|| {
        let n = gateway.log_count_now("dropped a frame");
        (n >= dropped).then_some(n)
    });
    assert_eq!(logged, Some(dropped), "one log line per dropped frame");
    let mut reasons = vec!["dropped a frame: malformed frame: "];
    if stats.seen_non_json {
        reasons.push("expected value");
    }
    if stats.seen_arity {
        reasons.push("invalid length");
    }
    if stats.seen_wrong_type {
        reasons.push("invalid type");
    }
    if stats.binary_malformed > 0 {
        reasons.push("dropped a frame: malformed frame: binary frame: ");
    }
    if stats.binary_pushes > 0 {
        reasons.push("refused a binary push");
    }
    if stats.oversize > 0 {
        reasons.push("closing a socket that sent a");
    }
    for reason in reasons {
        assert!(gateway.log_contains_now(reason), "the log never says {reason:?}");
    }
    assert!(!gateway.log_contains_now("panicked"), "the gateway logged a panic");
    assert!(!gateway.log_contains_now("room reset"), "fuzzed input crashed a room worker");
}

/// Pipelined frames: a push sent right behind `phx_leave` (or behind a join that fails) on
/// the same topic is still answered, as "unmatched topic", never dropped in silence.
#[tokio::test]
async fn a_push_pipelined_behind_a_leave_or_a_failed_join_still_gets_a_reply() {
    let gateway = Gateway::start(&["--max-rooms", "1"]);
    let mut client = gateway.connect().await;
    let (mut join_ref, _) = client.join_ok("room:only").await;
    for round in 0..5 {
        let leave = client.make_ref();
        let push = client.make_ref();
        let frames = [
            json!([join_ref, leave, "room:only", "phx_leave", {}]).to_string(),
            json!([join_ref, push, "room:only", "send_message", {"sender": "ann", "text": "after leave"}])
                .to_string(),
        ];
        // One write: both frames reach the gateway together.
        for frame in frames {
            client.ws.feed(Message::Text(frame.into())).await.unwrap();
        }
        client.ws.flush().await.unwrap();
        assert_eq!(client.reply_to(&leave).await["status"], "ok");
        let reply =
            tokio::time::timeout(Duration::from_secs(3), client.reply_to(&push)).await.unwrap_or_else(|_| {
                panic!("round {round}: a push sent right after phx_leave got no reply at all")
            });
        assert_eq!(
            reply,
            json!({"status": "error", "response": {"reason": "unmatched topic"}}),
            "round {round}"
        );
        join_ref = client.join_ok("room:only").await.0;
    }

    // A join refused by the room (here: the live-room limit) ends its channel; a push queued
    // behind it is answered too.
    let join = client.make_ref();
    let push = client.make_ref();
    for frame in [
        json!([join, join, "room:second", "phx_join", {}]).to_string(),
        json!([join, push, "room:second", "send_message", {"sender": "ann", "text": "hi"}]).to_string(),
    ] {
        client.ws.feed(Message::Text(frame.into())).await.unwrap();
    }
    client.ws.flush().await.unwrap();
    assert_eq!(client.reply_to(&join).await["response"]["reason"], "room limit reached");
    let reply = tokio::time::timeout(Duration::from_secs(3), client.reply_to(&push))
        .await
        .expect("a push queued behind a refused join got no reply at all");
    assert_eq!(reply, json!({"status": "error", "response": {"reason": "unmatched topic"}}));
}

/// Phoenix Presence's shape: `{key: {metas: [{phx_ref, ...}]}}`.
fn is_presence_list(value: &Value) -> bool {
    value.as_object().is_some_and(|keys| {
        keys.values().all(|entry| {
            entry["metas"].as_array().is_some_and(|metas| metas.iter().all(|m| m["phx_ref"].is_string()))
        })
    })
}
