//! Test harness: a real `gateway` process on port 0, WebSocket clients speaking Phoenix v2
//! frames, a tiny HTTP GET, and a look at the process table.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

pub const WAIT: Duration = Duration::from_secs(10);

pub struct Gateway {
    pub child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    log_reader: Option<std::thread::JoinHandle<()>>,
}

impl Gateway {
    pub fn start(args: &[&str]) -> Gateway {
        Gateway::start_binary(Path::new(env!("CARGO_BIN_EXE_gateway")), args)
    }

    /// Starts a gateway executable with `--port 0` and reads the address it prints.
    pub fn start_binary(binary: &Path, args: &[&str]) -> Gateway {
        let mut child = Command::new(binary)
            .args(["--port", "0"])
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("RUST_LOG", "roomvisor=debug,info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the gateway starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        let log_reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[gateway] {line}");
                sink.lock().unwrap().push(line);
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("the gateway prints its address");
        let addr = line
            .trim()
            .rsplit("http://")
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        // Keep draining stdout so the gateway never blocks on a full pipe.
        std::thread::spawn(move || for _ in stdout.lines() {});
        Gateway { child, addr, log, log_reader: Some(log_reader) }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn connect(&self) -> Client {
        let url = format!("ws://{}/socket/websocket?vsn=2.0.0", self.addr);
        let (ws, _) =
            tokio_tungstenite::connect_async_with_config(url, None, true).await.expect("websocket connects");
        Client { ws, next_ref: 0, presence: false, skipped: Default::default() }
    }

    /// Connects with a query string (after `vsn=2.0.0&`) and, optionally, the subprotocols to
    /// offer; a refused upgrade gives its HTTP status.
    pub async fn connect_with(&self, query: &str, protocols: Option<&str>) -> Result<Client, u16> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = format!("ws://{}/socket/websocket?vsn=2.0.0&{query}", self.addr);
        let mut request = url.into_client_request().expect("a valid request");
        if let Some(protocols) = protocols {
            request
                .headers_mut()
                .insert("Sec-WebSocket-Protocol", protocols.parse().expect("a header value"));
        }
        match tokio_tungstenite::connect_async_with_config(request, None, true).await {
            Ok((ws, _)) => Ok(Client { ws, next_ref: 0, presence: false, skipped: Default::default() }),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
            Err(e) => panic!("the upgrade failed without an HTTP answer: {e}"),
        }
    }

    /// GET a path and parse the JSON body.
    pub fn get_json(&self, path: &str) -> Value {
        let (status, body) = http_get(self.addr, path, &[]);
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path} is not JSON ({e}): {body}"))
    }

    pub fn rooms(&self) -> Vec<Value> {
        self.get_json("/api/rooms").as_array().cloned().expect("rooms is an array")
    }

    pub fn room_pid(&self, id: &str) -> Option<u32> {
        self.rooms().iter().find(|r| r["id"] == id).and_then(|r| r["pid"].as_u64()).map(|p| p as u32)
    }

    /// Waits until the registry shows the room with a worker, and returns its pid.
    pub fn wait_room_pid(&self, id: &str) -> u32 {
        wait_for(|| self.room_pid(id)).unwrap_or_else(|| panic!("room {id} never showed up"))
    }

    /// Waits (up to [`WAIT`]) for a log line containing `needle`: lines arrive through a
    /// reader thread, a little after the event they describe.
    pub fn log_contains(&self, needle: &str) -> bool {
        wait_for(|| self.log_contains_now(needle).then_some(())).is_some()
    }

    /// Whether the whole log, once the gateway has exited and its stderr is drained, lacks
    /// `needle`.
    pub fn log_lacks_after_exit(&mut self, needle: &str) -> bool {
        assert!(self.child.try_wait().expect("try_wait").is_some(), "the gateway is still running");
        if let Some(reader) = self.log_reader.take() {
            reader.join().expect("the log reader ends at EOF");
        }
        !self.log_contains_now(needle)
    }

    /// Whether a line containing `needle` has been read so far.
    pub fn log_contains_now(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), signal).expect("signal sent");
    }

    /// Waits for the gateway to exit and returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            assert!(Instant::now() < deadline, "the gateway did not exit within {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a GET and returns the open stream.
fn send_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> TcpStream {
    send_request(addr, "GET", path, headers)
}

fn send_request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    stream
}

fn status_of(response: &str) -> u16 {
    response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// A minimal HTTP/1.1 POST without a body; returns the status code and the body.
pub fn http_post(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut with_close = headers.to_vec();
    with_close.extend([("Connection", "close"), ("Content-Length", "0")]);
    let mut response = String::new();
    send_request(addr, "POST", path, &with_close).read_to_string(&mut response).unwrap();
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status_of(&response), body)
}

/// A minimal HTTP/1.1 POST of a JSON body; returns the status code and the body.
pub fn http_post_json(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
    let length = body.len().to_string();
    let headers =
        [("Connection", "close"), ("Content-Type", "application/json"), ("Content-Length", length.as_str())];
    let mut stream = send_request(addr, "POST", path, &headers);
    stream.write_all(body.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let reply = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status_of(&response), reply)
}

/// A minimal HTTP/1.1 GET; returns the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut with_close = headers.to_vec();
    with_close.push(("Connection", "close"));
    let mut response = String::new();
    send_get(addr, path, &with_close).read_to_string(&mut response).unwrap();
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status_of(&response), body)
}

/// Like [`http_get`], but reads only the status line and headers (for 101 responses, whose
/// connection stays open).
pub fn http_get_head(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut stream = send_get(addr, path, headers);
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    (status_of(&head), head)
}

pub fn wait_for<T>(mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Some(value) = probe() {
            return Some(value);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

pub async fn wait_for_async<T, F: std::future::Future<Output = Option<T>>>(
    mut probe: impl FnMut() -> F,
) -> Option<T> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Some(value) = probe().await {
            return Some(value);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

pub struct Client {
    pub ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    next_ref: u64,
    /// Whether `presence_state` / `presence_diff` frames are kept; most tests are about
    /// something else and never see them.
    pub presence: bool,
    /// Frames that arrived while waiting for another; pushes and replies may interleave.
    skipped: std::collections::VecDeque<Value>,
}

impl Client {
    pub fn make_ref(&mut self) -> String {
        self.next_ref += 1;
        self.next_ref.to_string()
    }

    pub async fn send_raw(&mut self, text: impl Into<String>) {
        self.ws.send(Message::Text(text.into().into())).await.expect("send");
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.ws.send(Message::Binary(bytes.into())).await.expect("send");
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_raw(frame.to_string()).await;
    }

    /// Sends an event and returns its ref.
    pub async fn push(&mut self, join_ref: Option<&str>, topic: &str, event: &str, payload: Value) -> String {
        let msg_ref = self.make_ref();
        self.send(json!([join_ref, msg_ref, topic, event, payload])).await;
        msg_ref
    }

    /// Joins a topic; returns the join_ref and the reply's payload.
    pub async fn join(&mut self, topic: &str) -> (String, Value) {
        self.join_with(topic, json!({})).await
    }

    /// Joins a topic with a join payload; returns the join_ref and the reply's payload.
    pub async fn join_with(&mut self, topic: &str, params: Value) -> (String, Value) {
        let join_ref = self.make_ref();
        self.send(json!([join_ref, join_ref, topic, "phx_join", params])).await;
        let reply = self.reply_to(&join_ref).await;
        (join_ref, reply)
    }

    /// Joins and asserts the join succeeded; returns the join_ref and the history.
    pub async fn join_ok(&mut self, topic: &str) -> (String, Vec<Value>) {
        let (join_ref, reply) = self.join(topic).await;
        assert_eq!(reply["status"], "ok", "join {topic}: {reply}");
        let history = reply["response"]["messages"].as_array().cloned().expect("history");
        (join_ref, history)
    }

    pub async fn send_message(&mut self, join_ref: &str, topic: &str, sender: &str, text: &str) -> Value {
        let msg_ref =
            self.push(Some(join_ref), topic, "send_message", json!({"sender": sender, "text": text})).await;
        self.reply_to(&msg_ref).await
    }

    /// The next text frame, parsed.
    pub async fn recv(&mut self) -> Value {
        self.try_recv(WAIT).await.expect("a frame arrives in time")
    }

    pub async fn try_recv(&mut self, within: Duration) -> Option<Value> {
        if let Some(frame) = self.skipped.pop_front() {
            return Some(frame);
        }
        self.recv_from_socket(within).await
    }

    async fn recv_from_socket(&mut self, within: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let message = tokio::time::timeout_at(deadline, self.ws.next()).await.ok()??;
            match message {
                Ok(Message::Text(text)) => {
                    let frame: Value = serde_json::from_str(&text).expect("frames are JSON");
                    let is_presence = frame[3] == "presence_state" || frame[3] == "presence_diff";
                    if is_presence && !self.presence {
                        continue;
                    }
                    return Some(frame);
                }
                Ok(Message::Close(frame)) => panic!("socket closed: {frame:?}"),
                Ok(_) => continue,
                Err(e) => panic!("socket error: {e}"),
            }
        }
    }

    /// The first frame that matches, earlier skipped ones included; others are kept for later.
    pub async fn recv_until(&mut self, mut matches: impl FnMut(&Value) -> bool) -> Value {
        if let Some(at) = self.skipped.iter().position(&mut matches) {
            return self.skipped.remove(at).expect("position is in range");
        }
        loop {
            let frame = self.recv_from_socket(WAIT).await.expect("a matching frame arrives in time");
            if matches(&frame) {
                return frame;
            }
            self.skipped.push_back(frame);
        }
    }

    /// The payload of the `phx_reply` to `msg_ref`.
    pub async fn reply_to(&mut self, msg_ref: &str) -> Value {
        let frame = self.recv_until(|f| f[3] == "phx_reply" && f[1] == msg_ref).await;
        frame[4].clone()
    }

    pub async fn next_event(&mut self, event: &str) -> Value {
        self.recv_until(|f| f[3] == event).await
    }

    /// Asserts that no frame with this event arrives within `within`.
    pub async fn assert_no_event(&mut self, event: &str, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while let Some(frame) =
            self.try_recv(deadline.saturating_duration_since(tokio::time::Instant::now())).await
        {
            assert_ne!(frame[3], event, "unexpected {event}: {frame}");
        }
    }

    /// Waits for the server to close the socket; returns the close code.
    pub async fn closed(&mut self) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => {
                    eprintln!("socket ended with an error instead of a close frame: {e}");
                    return None;
                }
                Ok(None) => return None,
                Err(_) => panic!("the socket was not closed in time"),
            }
        }
    }
}

/// A process as `/proc` shows it.
#[derive(Debug, Clone)]
pub struct ProcessInfo {
    pub pid: u32,
    pub ppid: u32,
    pub state: char,
    /// The kernel's name for the process (`comm`): the file name of the executable it ran,
    /// cut to 15 bytes, whatever argv[0] says. Unlike argv0 it is still there for a zombie.
    pub comm: String,
    /// From `/proc/PID/cmdline`; empty for a zombie, whose memory is gone.
    pub argv0: String,
}

pub fn process(pid: u32) -> Option<ProcessInfo> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (comm, state, ppid) = parse_stat(&stat)?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let argv0 = String::from_utf8_lossy(cmdline.split(|b| *b == 0).next().unwrap_or_default()).into_owned();
    Some(ProcessInfo { pid, ppid, state, comm, argv0 })
}

/// `(comm, state, ppid)` from a `/proc/PID/stat` line, `pid (comm) state ppid ...`. comm may
/// itself contain spaces and parentheses, so it runs from the first `(` to the last `)`.
pub fn parse_stat(stat: &str) -> Option<(String, char, u32)> {
    let (head, after) = stat.rsplit_once(')')?;
    let (_, comm) = head.split_once('(')?;
    let mut fields = after.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((comm.to_owned(), state, ppid))
}

/// Alive means present and not a zombie.
pub fn is_alive(pid: u32) -> bool {
    process(pid).is_some_and(|p| p.state != 'Z')
}

pub fn children_of(parent: u32) -> Vec<ProcessInfo> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(process)
        .filter(|p| p.ppid == parent)
        .collect()
}

/// The `comm` of a worker started from the `room-worker` binary beside the gateway.
pub const WORKER_COMM: &str = "room-worker";

/// Room workers the gateway has started and not yet reaped (zombies included).
///
/// Matched on parent and `comm`, not argv[0]: a zombie's cmdline is empty. A worker is the
/// `room-worker` binary or, when none sits beside the gateway, the gateway's own executable
/// (run with argv[0] `room-worker`), whose `comm` is the gateway's.
pub fn workers_of(gateway: u32) -> Vec<ProcessInfo> {
    let own_comm = process(gateway).map(|p| p.comm);
    children_of(gateway)
        .into_iter()
        .filter(|p| p.comm == WORKER_COMM || own_comm.as_ref() == Some(&p.comm))
        .collect()
}

/// The `comm` of a warm pool's prepared worker that no room has taken yet.
pub const SPARE_COMM: &str = "room-spare";
/// The `comm` of the warm pool's template, which forks the spares.
pub const TEMPLATE_COMM: &str = "room-template";

/// The warm pool's processes (spares and template): children of the gateway, not rooms.
pub fn pool_of(gateway: u32) -> Vec<ProcessInfo> {
    children_of(gateway).into_iter().filter(|p| p.comm == SPARE_COMM || p.comm == TEMPLATE_COMM).collect()
}

/// Live (not defunct) room workers of the gateway.
pub fn live_workers_of(gateway: u32) -> Vec<ProcessInfo> {
    workers_of(gateway).into_iter().filter(|p| p.state != 'Z').collect()
}

pub fn kill9(pid: u32) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL)
        .expect("kill -9");
}

/// Writes a room script to a fresh temporary file.
pub fn script_file(name: &str, source: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("roomvisor-test-{}-{}", std::process::id(), unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, source).unwrap();
    path
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A supervisor in this test process, running real room-worker processes: the library API
/// without sockets.
pub fn supervisor(script: &Path, js_cpu_ms: u64) -> roomvisor::gateway::rooms::Supervisor {
    let config = roomvisor::gateway::config::Config {
        worker_bin: Some(PathBuf::from(env!("CARGO_BIN_EXE_room-worker"))),
        room_script: Some(script.to_path_buf()),
        js_cpu_ms,
        ..Default::default()
    };
    roomvisor::gateway::rooms::Supervisor::new(Arc::new(config), roomvisor::gateway::pubsub::PubSub::new())
}

/// A gateway whose chat script spins forever on the text "spin", with the CPU, call and hard
/// limits at a minute, so a spinning worker stays busy in JavaScript for the whole test.
pub fn start_with_spinning_chat() -> Gateway {
    let chat = std::fs::read_to_string(chat_script()).expect("the chat script");
    let opening = "function sendMessage(sender, text) {";
    assert!(chat.contains(opening), "the chat script changed shape");
    let script = chat.replace(opening, &format!("{opening}\n  if (text === \"spin\") {{ for (;;) {{}} }}"));
    let script = script_file("spinning-chat.js", &script);
    let minute = "60000";
    Gateway::start(&[
        "--room-script",
        script.to_str().unwrap(),
        "--js-cpu-ms",
        minute,
        "--call-timeout-ms",
        minute,
        "--hard-timeout-ms",
        minute,
    ])
}

pub fn chat_script() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/rooms/chat-room.js"))
}

// Helpers for the hard-edges tests (fuzz, chaos, zombies).

/// The WebSocket stream under a [`Client`], for tests that read raw frames and closes.
pub type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl Gateway {
    /// How many log lines read so far contain `needle`.
    pub fn log_count_now(&self, needle: &str) -> usize {
        self.log.lock().unwrap().iter().filter(|l| l.contains(needle)).count()
    }

    /// Every log line read so far.
    pub fn log_lines_now(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// How many "room worker started" lines have been read so far: every worker the gateway
    /// spawned, including any that died before a test could see it in the process table.
    pub fn worker_starts_now(&self) -> usize {
        self.log_lines_now().iter().filter(|l| l.contains(WORKER_STARTED)).count()
    }

    /// Waits (up to [`WAIT`]) for the line that says worker `pid` is gone (logged once it is
    /// reaped), and returns it. Not the start line, and `pid=12` is not `pid=123`.
    pub fn worker_exit_line(&self, pid: u32) -> Option<String> {
        wait_for(|| {
            self.log_lines_now().into_iter().find(|l| {
                has_field(l, "pid", pid)
                    && WORKER_EXITS.iter().any(|exit| l.contains(&format!("room worker {exit}")))
            })
        })
    }

    /// Whether the gateway process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// A raw WebSocket to the Phoenix endpoint.
    pub async fn connect_raw(&self) -> WsStream {
        self.connect().await.ws
    }
}

/// `(room id, pid)` of every live room of the gateway at `addr`, from `/api/rooms`. Blocking;
/// needs no `&Gateway`, so a plain thread can poll it.
pub fn room_pids_at(addr: SocketAddr) -> Vec<(String, u32)> {
    let (status, body) = http_get(addr, "/api/rooms", &[]);
    assert_eq!(status, 200, "GET /api/rooms: {body}");
    let rooms: Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/api/rooms is not JSON ({e}): {body}"));
    rooms
        .as_array()
        .expect("rooms is an array")
        .iter()
        .filter_map(|r| Some((r["id"].as_str()?.to_owned(), u32::try_from(r["pid"].as_u64()?).ok()?)))
        .collect()
}

/// SIGKILL that tolerates a process already gone; returns whether the signal was sent.
pub fn try_kill9(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).is_ok()
}

/// Like [`wait_for`], with its own time limit.
pub fn wait_for_within<T>(within: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Defunct (state Z) children of `parent`.
pub fn zombies_of(parent: u32) -> Vec<ProcessInfo> {
    children_of(parent).into_iter().filter(|p| p.state == 'Z').collect()
}

/// The gateway's log message for a worker it spawned.
pub const WORKER_STARTED: &str = "room worker started";
/// How the gateway's "room worker ..." exit messages begin (room::ExitReason's Display).
const WORKER_EXITS: [&str; 5] =
    ["shut down on request", "exited unexpectedly", "protocol violation", "unresponsive past", "killed: "];

/// Whether a log line carries the field `name=value` as a whole token.
pub fn has_field(line: &str, name: &str, value: impl std::fmt::Display) -> bool {
    let wanted = format!("{name}={value}");
    line.split_whitespace().any(|token| token == wanted)
}

/// An address of this machine other than loopback, if it has one.
pub fn non_loopback_address() -> Option<std::net::IpAddr> {
    // Connecting a UDP socket sends nothing; it only picks the route and so the source address.
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("10.255.255.255:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// A durable room whose alarm counts how often it fired, in storage; a join reports the count
/// and the alarm, the event `arm` `{in: ms}` sets it (tests/durable.rs, tests/cluster.rs).
pub const ALARM_ROOM: &str = r#"
function onJoin(conn, params) {
  return { fired: Room.storage.get("fired") ?? 0, alarm: Room.getAlarm() };
}
function onEvent(conn, event, payload) {
  if (event === "arm") Room.setAlarm(Date.now() + payload.in);
  return { alarm: Room.getAlarm() };
}
function onAlarm() {
  Room.storage.put("fired", (Room.storage.get("fired") ?? 0) + 1);
  console.log("alarm fired");
}
"#;
