//! `--hop`: the limit with one process per room, each message handed to it and back.
//!
//! A room's first join starts an echo process: this same executable run again with
//! `--echo-child`, on a socket pair whose other end is the child's fd 0, as the gateway
//! starts a room worker (src/gateway/rooms/spawn.rs). Frames cross it as they cross the
//! gateway's: a 4-byte big-endian length, then the body. A chat message is checked and
//! numbered here as in the limit, its JSON goes to the room's process, and only once the
//! process has written it back is it broadcast and the sender answered, as the gateway
//! broadcasts a worker's `Broadcast` and then answers the push with its `Reply`. No JS: what
//! separates this from the limit is the cost of the processes and the hop through them.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::{lock, Outbox, Room, Server};

/// The hidden flag a room's process is started with.
pub const ECHO_ARG: &str = "--echo-child";
/// What a room's process is called in `ps`.
const ECHO_ARGV0: &str = "limit-echo";
/// A longer frame is a broken pipe, not a message: the reader gives the process up.
const MAX_FRAME_BYTES: usize = 1024 * 1024;
/// Bytes read at a time, on both sides (the worker's read size).
const READ_BYTES: usize = 64 * 1024;
/// Frames queued for a process go out in one write, up to this many bytes.
const WRITE_BATCH_BYTES: usize = 256 * 1024;
/// How long shutdown waits for the killed processes to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);

/// Tells a room's processes apart, so that a reader whose process is gone never takes the
/// room's next one with it.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// A room's process, held in the room.
pub struct Hop {
    generation: u64,
    /// Framed messages to the process's writer task.
    frames: mpsc::UnboundedSender<Vec<u8>>,
    /// Messages at the process, oldest first: it answers in order.
    pending: VecDeque<Pending>,
    child: Child,
}

/// A message handed to the process: who sent it and their answer, queued once it is back.
pub struct Pending {
    pub outbox: Outbox,
    pub reply: Utf8Bytes,
}

/// The room's process, started if the room has none. Called with the room locked, so a
/// room never has two.
pub fn ensure(state: &mut Room, room: &Arc<Mutex<Room>>, topic: &str, server: &Server) -> Result<(), String> {
    if state.hop.is_some() {
        return Ok(());
    }
    let Some(exe) = &server.hop else { return Ok(()) };
    // Checked under the room's lock: shutdown sets it before it takes every room's process.
    if server.closing.load(Ordering::SeqCst) {
        return Err("the server is shutting down".to_owned());
    }
    let hop = start(exe, room, topic).map_err(|e| format!("cannot start the room's process: {e}"))?;
    state.hop = Some(hop);
    Ok(())
}

/// Hands a numbered message to the room's process; it is broadcast and `pending` answered
/// when the process writes it back.
pub fn send(
    state: &mut Room,
    room: &Arc<Mutex<Room>>,
    topic: &str,
    server: &Server,
    message: &RawValue,
    pending: Pending,
) -> Result<(), String> {
    let body = message.get().as_bytes();
    if body.len() > MAX_FRAME_BYTES {
        return Err("message too large".to_owned());
    }
    // A room whose process died starts another.
    ensure(state, room, topic, server)?;
    let Some(hop) = state.hop.as_mut() else { return Err("the room has no process".to_owned()) };
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(body);
    // Queued under the room's lock, so the pending answers are in the order of the frames.
    hop.frames.send(frame).map_err(|_| "the room's process is gone".to_owned())?;
    hop.pending.push_back(pending);
    Ok(())
}

/// Starts a room's process and the two tasks that write to it and read its answers.
fn start(exe: &Path, room: &Arc<Mutex<Room>>, topic: &str) -> std::io::Result<Hop> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let child = Command::new(exe)
        .arg0(ECHO_ARGV0)
        .arg(ECHO_ARG)
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    // The child's end closed with the command above, so that its exit reads as end of file.
    ours.set_nonblocking(true)?;
    let (reader, writer) = tokio::net::UnixStream::from_std(ours)?.into_split();
    let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
    let (frames, queued) = mpsc::unbounded_channel();
    tokio::spawn(write_frames(writer, queued));
    tokio::spawn(read_echoes(reader, room.clone(), topic.to_owned(), generation));
    Ok(Hop { generation, frames, pending: VecDeque::new(), child })
}

/// What is queued goes out in one write, as the gateway's stdin writer batches.
async fn write_frames(mut socket: OwnedWriteHalf, mut queued: mpsc::UnboundedReceiver<Vec<u8>>) {
    let mut batch = Vec::with_capacity(READ_BYTES);
    while let Some(frame) = queued.recv().await {
        batch.clear();
        batch.extend_from_slice(&frame);
        while batch.len() < WRITE_BATCH_BYTES {
            let Ok(frame) = queued.try_recv() else { break };
            batch.extend_from_slice(&frame);
        }
        if socket.write_all(&batch).await.is_err() {
            return;
        }
    }
    // The room let its process go: dropping this half shuts the socket for writing, and the
    // process, reading end of file, exits.
}

/// Reads the process's answers: each is broadcast to the room and its sender answered.
async fn read_echoes(mut socket: OwnedReadHalf, room: Arc<Mutex<Room>>, topic: String, generation: u64) {
    let mut buffer: Vec<u8> = Vec::with_capacity(READ_BYTES);
    let why = loop {
        buffer.reserve(READ_BYTES);
        match socket.read_buf(&mut buffer).await {
            Ok(0) => break "closed its socket".to_owned(),
            Ok(_) => {}
            Err(e) => break format!("cannot be read: {e}"),
        }
        let (frames, used) = match split_frames(&buffer) {
            Ok(split) => split,
            Err(why) => break why,
        };
        if frames.is_empty() {
            continue;
        }
        let delivered = deliver(&room, &topic, generation, frames.iter().map(|r| &buffer[r.clone()]));
        buffer.drain(..used);
        match delivered {
            Ok(true) => {}
            // The room took its process away (shutdown): nothing is left to answer.
            Ok(false) => return,
            Err(why) => break why,
        }
    };
    // The process died or broke the framing: the room lets it go (its next message starts
    // another), and it is killed and reaped here. Its unanswered messages are lost.
    let hop = {
        let mut state = lock(&room);
        match &state.hop {
            Some(hop) if hop.generation == generation => state.hop.take(),
            _ => None,
        }
    };
    if let Some(mut hop) = hop {
        eprintln!("{topic}: the room's process {why}; {} message(s) unanswered", hop.pending.len());
        let _ = hop.child.start_kill();
        let _ = hop.child.wait().await;
    }
}

/// Broadcasts echoed messages under the room's lock, each followed by its sender's answer.
/// `Ok(false)` when the room's process is no longer this one.
fn deliver<'a>(
    room: &Mutex<Room>,
    topic: &str,
    generation: u64,
    bodies: impl Iterator<Item = &'a [u8]>,
) -> Result<bool, String> {
    let mut state = lock(room);
    for body in bodies {
        let Some(hop) = state.hop.as_mut().filter(|hop| hop.generation == generation) else {
            return Ok(false);
        };
        let pending = hop.pending.pop_front().ok_or("answered a message it was not sent")?;
        // Parsed as the gateway parses a worker's broadcast payload.
        let text = std::str::from_utf8(body).map_err(|_| "answered with a message that is not UTF-8")?;
        let message = RawValue::from_string(text.to_owned())
            .map_err(|e| format!("answered with a message that is not JSON: {e}"))?;
        state.deliver(topic, message);
        let _ = pending.outbox.send(pending.reply);
    }
    Ok(true)
}

/// The byte ranges of the complete frames' bodies at the front of `buffer`, and the bytes
/// they take up; an oversize length is an error.
fn split_frames(buffer: &[u8]) -> Result<(Vec<std::ops::Range<usize>>, usize), String> {
    let mut frames = Vec::new();
    let mut at = 0;
    while let Some(header) = buffer.get(at..at + 4) {
        let length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if length > MAX_FRAME_BYTES {
            return Err(format!("sent a frame of {length} bytes"));
        }
        let end = at + 4 + length;
        if end > buffer.len() {
            break;
        }
        frames.push(at + 4..end);
        at = end;
    }
    Ok((frames, at))
}

/// Server shutdown: no room starts another process, and every room's process is killed and
/// reaped, so none outlives the server or lingers as a zombie.
pub async fn stop_all(server: &Server) {
    server.closing.store(true, Ordering::SeqCst);
    let rooms: Vec<Arc<Mutex<Room>>> = lock(&server.rooms).values().cloned().collect();
    let mut children: Vec<Child> =
        rooms.iter().filter_map(|room| lock(room).hop.take()).map(|hop| hop.child).collect();
    for child in &mut children {
        let _ = child.start_kill();
    }
    let reaped = tokio::time::timeout(REAP_TIMEOUT, async {
        for child in &mut children {
            let _ = child.wait().await;
        }
    });
    if reaped.await.is_err() {
        eprintln!("some room processes were not reaped within {REAP_TIMEOUT:?}");
    }
}

/// The room's process (`--echo-child`): frames on fd 0, each written back unchanged. Reads
/// as much as is there, then writes every complete frame in one go, as a worker batches its
/// answers until it would block. Exits at end of input.
pub fn echo_child() -> std::io::Result<()> {
    let mut input = File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    let mut output = input.try_clone()?;
    // Read into once-zeroed scratch space, then appended: zeroing a fresh buffer per read
    // costs more than the copy.
    let mut scratch = vec![0u8; READ_BYTES];
    let mut buffer: Vec<u8> = Vec::with_capacity(2 * READ_BYTES);
    loop {
        let read = match input.read(&mut scratch) {
            Ok(read) => read,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if read == 0 {
            // End of input: the server let this room go.
            if buffer.is_empty() {
                return Ok(());
            }
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "input ended inside a frame"));
        }
        buffer.extend_from_slice(&scratch[..read]);
        let (_, used) = split_frames(&buffer).map_err(std::io::Error::other)?;
        if used > 0 {
            output.write_all(&buffer[..used])?;
            buffer.drain(..used);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(bodies: &[&[u8]]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for body in bodies {
            bytes.extend_from_slice(&(body.len() as u32).to_be_bytes());
            bytes.extend_from_slice(body);
        }
        bytes
    }

    #[test]
    fn complete_frames_are_split_and_a_partial_one_waits() {
        let mut bytes = framed(&[b"{\"a\":1}", b"", b"[2]"]);
        let whole = bytes.len();
        bytes.extend_from_slice(&[0, 0, 0, 9, b'x']);
        let (frames, used) = split_frames(&bytes).unwrap();
        assert_eq!(used, whole);
        let bodies: Vec<&[u8]> = frames.iter().map(|r| &bytes[r.clone()]).collect();
        assert_eq!(bodies, [&b"{\"a\":1}"[..], b"", b"[2]"]);
        assert_eq!(split_frames(&bytes[..3]).unwrap(), (vec![], 0));
    }

    #[test]
    fn an_oversize_length_is_refused_before_its_body_arrives() {
        let bytes = ((MAX_FRAME_BYTES + 1) as u32).to_be_bytes();
        assert!(split_frames(&bytes).is_err());
    }
}
