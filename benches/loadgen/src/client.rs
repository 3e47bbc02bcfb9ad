//! One load-generating WebSocket client: connect, join, ask and wait for replies during
//! set-up, then `drive` it through the traffic phases.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::presence::{View, Wave, WaveClient};
use crate::protocol::{presence_event, Incoming, PresenceEvent, Protocol, Stamp};
use crate::traffic::{Mode, Traffic};

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Set-up steps (connect, join) give up after this long.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
const READ_BUFFER_BYTES: usize = 4 * 1024;
/// phoenix.js's default heartbeat interval.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(30);

pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    protocol: Protocol,
    next_ref: u64,
    pub id: u64,
}

impl Client {
    pub async fn connect(protocol: Protocol, base_url: &str, id: u64) -> Result<Client, Error> {
        let url = protocol.websocket_url(base_url);
        // tungstenite zero-fills its whole read buffer before every read: at the default
        // 128 KiB that memset was the load generator's top cost, taken from the server's cores.
        let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER_BYTES);
        let connecting = tokio_tungstenite::connect_async_with_config(url, Some(config), true);
        let (ws, _) =
            tokio::time::timeout(SETUP_TIMEOUT, connecting).await.map_err(|_| "connect timed out")??;
        let mut client = Client { ws, protocol, next_ref: 0, id };
        if let Some(hello) = protocol.hello() {
            client.ws.send(Message::text(hello)).await?;
            // Socket.IO answers the namespace connect with `40{"sid":…}`.
            client.read_until(|frame| frame.starts_with("40")).await?;
        }
        Ok(client)
    }

    fn take_ref(&mut self) -> u64 {
        self.next_ref += 1;
        self.next_ref
    }

    /// Joins a room and returns the join's ref, which Phoenix pushes on the channel carry.
    pub async fn join(&mut self, room: &str) -> Result<u64, Error> {
        let join_ref = self.take_ref();
        self.ws.send(Message::text(self.protocol.join(room, join_ref))).await?;
        self.await_reply(join_ref).await?.map_err(|reason| format!("join {room} refused: {reason}"))?;
        Ok(join_ref)
    }

    /// Pushes one `send_message` and waits for its reply (in a durable room, the reply comes
    /// once the message is stored).
    pub async fn say(&mut self, room: &str, join_ref: u64, sender: &str, text: &str) -> Result<(), Error> {
        let msg_ref = self.take_ref();
        self.ws.send(Message::text(self.protocol.send(room, join_ref, msg_ref, sender, text))).await?;
        self.await_reply(msg_ref)
            .await?
            .map_err(|reason| format!("send_message in {room} refused: {reason}"))?;
        Ok(())
    }

    /// Sends a leave without waiting for its answer; later waits skip past it.
    pub async fn leave(&mut self, room: &str, join_ref: u64) -> Result<(), Error> {
        let msg_ref = self.take_ref();
        self.ws.send(Message::text(self.protocol.leave(room, join_ref, msg_ref))).await?;
        Ok(())
    }

    async fn await_reply(&mut self, msg_ref: u64) -> Result<Result<(), String>, Error> {
        let protocol = self.protocol;
        let mut outcome = None;
        self.read_until(|frame| match protocol.classify(frame) {
            Incoming::Reply { msg_ref: r, outcome: o } if r == msg_ref => {
                outcome = Some(o);
                true
            }
            _ => false,
        })
        .await?;
        outcome.ok_or_else(|| "no reply".into())
    }

    /// Reads frames, answering pings, until one satisfies `done`.
    async fn read_until(&mut self, mut done: impl FnMut(&str) -> bool) -> Result<(), Error> {
        let deadline = Instant::now() + SETUP_TIMEOUT;
        loop {
            let message =
                tokio::time::timeout_at(deadline, self.ws.next()).await.map_err(|_| "no answer in time")?;
            let text = match message {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Close(frame))) => {
                    return Err(format!("closed by the server: {frame:?}").into())
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => return Err("connection ended".into()),
            };
            if self.protocol.classify(&text) == Incoming::Ping {
                self.ws.send(Message::text(self.protocol.pong())).await?;
            } else if done(&text) {
                return Ok(());
            }
        }
    }

    /// Takes part in the traffic until it stops: receives and times every message, keeps the
    /// connection alive, and, if `sender`, sends as the traffic's mode says.
    pub async fn drive(mut self, room: String, join_ref: u64, sender: bool, traffic: Arc<Traffic>) {
        let mut mode_rx: watch::Receiver<Mode> = traffic.mode();
        let mut mode = *mode_rx.borrow_and_update();
        let mut in_flight = 0usize;
        let mut next_send_at = Instant::now();
        let mut heartbeat = tokio::time::interval_at(Instant::now() + HEARTBEAT_EVERY, HEARTBEAT_EVERY);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let name = format!("client-{}", self.id);
        let stop = traffic.stopped();
        loop {
            let turn = traffic.turn(mode, in_flight, next_send_at);
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                message = self.ws.next() => {
                    let text = match message {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Close(_))) | None => {
                            traffic.error("disconnected by the server");
                            break;
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => {
                            traffic.error(&format!("connection failed: {e}"));
                            break;
                        }
                    };
                    match self.protocol.classify(&text) {
                        Incoming::NewMessage { stamp } => traffic.delivered(self.id, stamp),
                        Incoming::Reply { outcome, .. } => {
                            in_flight = in_flight.saturating_sub(1);
                            traffic.replied(outcome);
                        }
                        Incoming::Ping => {
                            if self.ws.send(Message::text(self.protocol.pong())).await.is_err() {
                                break;
                            }
                        }
                        Incoming::Other => {}
                    }
                }
                changed = mode_rx.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    mode = *mode_rx.borrow_and_update();
                    if let Mode::Paced { interval } = mode {
                        // Spread senders over one interval so they do not all fire at once.
                        next_send_at = Instant::now() + interval.mul_f64(traffic.jitter(self.id));
                    }
                }
                _ = heartbeat.tick() => {
                    let msg_ref = self.take_ref();
                    if let Some(frame) = self.protocol.heartbeat(msg_ref) {
                        if self.ws.send(Message::text(frame)).await.is_err() {
                            break;
                        }
                    }
                }
                () = turn, if sender => {
                    if let Mode::Paced { interval } = mode {
                        next_send_at += interval;
                    }
                    let msg_ref = self.take_ref();
                    let text = Stamp { client: self.id, sent_us: traffic.now_us() }.text();
                    let frame = self.protocol.send(&room, join_ref, msg_ref, &name, &text);
                    traffic.sent();
                    in_flight += 1;
                    if self.ws.send(Message::text(frame)).await.is_err() {
                        traffic.error("send failed");
                        break;
                    }
                }
            }
        }
        let _ = self.ws.close(None).await;
    }

    /// Takes part in a presence wave until it stops: waits for the gate, joins `room` with
    /// `params`, and keeps every `presence_state` and `presence_diff` it receives, from the
    /// join sent until the wave stops; then builds its presence view from them.
    pub async fn presence_wave(
        mut self,
        room: String,
        params: serde_json::Value,
        wave: Arc<Wave>,
    ) -> WaveClient {
        let stop = wave.stopped();
        let mut seen = WaveClient {
            join: None,
            state_frames: 0,
            diff_frames: 0,
            state_bytes: 0,
            diff_bytes: 0,
            view: Ok(View::default()),
        };
        let mut frames = Vec::new();
        // Held from the join sent to its answer: it bounds the joins in flight.
        let mut permit = tokio::select! {
            permit = wave.gate.acquire() => permit.ok(),
            () = stop.cancelled() => None,
        };
        if permit.is_none() {
            return seen;
        }
        let join_ref = self.take_ref();
        let join = self.protocol.join_with(&room, join_ref, &params);
        wave.join_sent();
        let sent_at = Instant::now();
        if let Err(e) = self.ws.send(Message::text(join)).await {
            seen.join = Some(Err(format!("join not sent: {e}")));
            wave.answered();
            return seen;
        }
        let reply_deadline = tokio::time::sleep(SETUP_TIMEOUT);
        tokio::pin!(reply_deadline);
        let mut heartbeat = tokio::time::interval_at(Instant::now() + HEARTBEAT_EVERY, HEARTBEAT_EVERY);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                message = self.ws.next() => {
                    let text = match message {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(_)) => continue,
                        Some(Err(_)) | None => return seen.disconnected(&wave),
                    };
                    if let Some(event) = presence_event(&text) {
                        wave.presence_seen();
                        let bytes = text.len() as u64;
                        match event {
                            PresenceEvent::State => {
                                seen.state_frames += 1;
                                seen.state_bytes += bytes;
                            }
                            PresenceEvent::Diff => {
                                seen.diff_frames += 1;
                                seen.diff_bytes += bytes;
                            }
                        }
                        frames.push(text);
                    } else if let Incoming::Reply { msg_ref, outcome } = self.protocol.classify(&text) {
                        if msg_ref == join_ref && seen.join.is_none() {
                            seen.join = Some(outcome.map(|()| sent_at.elapsed()));
                            wave.answered();
                            permit = None;
                        }
                    }
                }
                () = &mut reply_deadline, if seen.join.is_none() => {
                    seen.join = Some(Err("no join reply in time".to_owned()));
                    wave.answered();
                    permit = None;
                }
                _ = heartbeat.tick() => {
                    let msg_ref = self.take_ref();
                    if let Some(frame) = self.protocol.heartbeat(msg_ref) {
                        if self.ws.send(Message::text(frame)).await.is_err() {
                            return seen.disconnected(&wave);
                        }
                    }
                }
            }
        }
        drop(permit);
        let _ = self.ws.close(None).await;
        let mut view = View::default();
        seen.view = frames.iter().try_for_each(|frame| view.apply(frame)).map(|()| view);
        seen
    }
}

impl WaveClient {
    /// The connection ended during the wave: its join, if unanswered, is given up on.
    fn disconnected(mut self, wave: &Wave) -> WaveClient {
        if self.join.is_none() {
            self.join = Some(Err("disconnected before the join's reply".to_owned()));
            wave.answered();
        }
        self.view = Err("disconnected during the wave".to_owned());
        self
    }
}
