//! The worker's end of the IPC pipe pair: blocking reads under `poll(2)` with the next timer
//! as the timeout, writes batched until the worker would block, and the [`Host`] the engine
//! calls out through.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use bytes::BytesMut;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tokio_util::codec::{Decoder, Encoder};

use super::engine::Host;
use super::protocol_error;
use crate::wire::{
    FromWorker, LogLevel, ScriptError, ScriptErrorKind, ToWorker, WorkerCodec, DEFAULT_MAX_FRAME_BYTES,
};

/// What a caller hears when the script's answer does not fit in one IPC frame.
const REPLY_TOO_LARGE: &str = "reply too large";

#[derive(Debug)]
pub(super) enum Incoming {
    Frame(ToWorker),
    TimedOut,
    Closed,
}

/// The worker's end of the IPC pipe pair, plus frames that arrived while a `Beam.callSync`
/// waited for its answer.
pub(super) struct Pipe {
    input: RefCell<File>,
    output: RefCell<File>,
    buffer: RefCell<BytesMut>,
    /// Where reads land before decoding; allocated once, since zeroing a fresh 64 KiB array
    /// for every read showed up in profiles.
    scratch: RefCell<Box<[u8]>>,
    /// Frames to the gateway, written out in one go before the worker next blocks: a
    /// message's `Post` and `Reply` then cost one write(2) and one wake-up of the gateway.
    pending: RefCell<BytesMut>,
    codec: RefCell<WorkerCodec>,
    pub(super) backlog: RefCell<VecDeque<ToWorker>>,
    next_host_call: Cell<u64>,
    pub(super) closed: Cell<bool>,
    /// Storage writes not yet sealed into a `Writes` frame.
    writes: RefCell<TurnWrites>,
    /// Where in `pending` the frames not yet covered by a seal begin: a `Writes` frame sealed
    /// now goes there, ahead of every frame the same turns produced.
    sealed: Cell<usize>,
    max_frame_bytes: Cell<usize>,
    /// What the room stores in all, as the script last counted it.
    stored_bytes: Cell<u64>,
}

/// The writes of the turns since the last seal; a key written twice keeps its last value.
#[derive(Default)]
struct TurnWrites {
    /// `None`: deleted.
    keys: BTreeMap<String, Option<String>>,
    alarm: Option<Option<u64>>,
    bytes: usize,
}

impl TurnWrites {
    fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.alarm.is_none()
    }

    fn into_frame(self, stored_bytes: u64) -> FromWorker {
        let (mut puts, mut deletes) = (Vec::new(), Vec::new());
        for (key, value) in self.keys {
            match value {
                Some(value) => puts.push((key, value)),
                None => deletes.push(key),
            }
        }
        FromWorker::Writes { puts, deletes, alarm: self.alarm, stored_bytes }
    }
}

impl Pipe {
    /// Takes fd 0, the worker's end of the socket pair the gateway made, for frames both
    /// ways, unbuffered (std's stdin buffer would hide bytes from `poll`), and points fd 1 at
    /// stderr (the gateway's own) so a stray print lands in the gateway's log.
    pub(super) fn from_stdio() -> io::Result<Pipe> {
        let input: OwnedFd = io::stdin().as_fd().try_clone_to_owned()?;
        let output: OwnedFd = input.try_clone()?;
        nix::unistd::dup2_stdout(io::stderr().as_fd()).map_err(io::Error::from)?;
        Ok(Pipe {
            input: RefCell::new(File::from(input)),
            output: RefCell::new(File::from(output)),
            buffer: RefCell::new(BytesMut::with_capacity(16 * 1024)),
            scratch: RefCell::new(vec![0; 64 * 1024].into_boxed_slice()),
            pending: RefCell::new(BytesMut::new()),
            codec: RefCell::new(WorkerCodec::new(DEFAULT_MAX_FRAME_BYTES)),
            backlog: RefCell::new(VecDeque::new()),
            next_host_call: Cell::new(1),
            closed: Cell::new(false),
            writes: RefCell::new(TurnWrites::default()),
            sealed: Cell::new(0),
            max_frame_bytes: Cell::new(DEFAULT_MAX_FRAME_BYTES),
            stored_bytes: Cell::new(0),
        })
    }

    /// Reads exactly one frame, without reading ahead: the first frame, before the worker
    /// knows whether it forks (a template's later messages carry descriptors, which a read
    /// ahead would swallow). `None` at end of input.
    pub(super) fn read_first(&self) -> io::Result<Option<ToWorker>> {
        let mut input = self.input.borrow_mut();
        let mut length = [0u8; 4];
        match input.read_exact(&mut length) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            read => read?,
        }
        let length = u32::from_be_bytes(length) as usize;
        if length > self.max_frame_bytes.get() {
            return Err(protocol_error(format!("a first frame of {length} bytes")));
        }
        let mut body = vec![0; length];
        input.read_exact(&mut body)?;
        crate::wire::decode(&body).map(Some).map_err(|e| protocol_error(e.to_string()))
    }

    /// Makes `socket` this worker's end of the pipe pair, as fd 0 too: a worker forked from
    /// the template starts with the template's control socket there, which must not stay
    /// open in a room (the gateway learns that the template died from its end of file).
    pub(super) fn rebind(&self, socket: OwnedFd) -> io::Result<()> {
        nix::unistd::dup2_stdin(&socket).map_err(io::Error::from)?;
        *self.input.borrow_mut() = File::from(socket.try_clone()?);
        *self.output.borrow_mut() = File::from(socket);
        Ok(())
    }

    pub(super) fn set_max_frame_bytes(&self, max: usize) {
        *self.codec.borrow_mut() = WorkerCodec::new(max);
        self.max_frame_bytes.set(max);
    }

    /// Ends the writes of the turns run since the last seal: if they wrote, their `Writes`
    /// frame goes ahead of every frame they produced, so that the gateway holds those frames
    /// until the writes are durable.
    pub(super) fn seal(&self) {
        let writes = std::mem::take(&mut *self.writes.borrow_mut());
        let mut pending = self.pending.borrow_mut();
        if !writes.is_empty() {
            let mut frame = BytesMut::new();
            if let Err(e) =
                self.codec.borrow_mut().encode(writes.into_frame(self.stored_bytes.get()), &mut frame)
            {
                // Cannot happen under the per-turn cap; should it, the turns' effects must not
                // leave without their writes, and this runtime's memory no longer matches the
                // store: end it, and the gateway restarts the room from what is stored.
                eprintln!("room-worker {}: cannot send storage writes: {e}", std::process::id());
                pending.truncate(self.sealed.get());
                self.closed.set(true);
                return;
            }
            let effects = pending.split_off(self.sealed.get());
            pending.extend_from_slice(&frame);
            pending.extend_from_slice(&effects);
        }
        self.sealed.set(pending.len());
    }

    /// The next frame, or `TimedOut` once `deadline` passes.
    pub(super) fn read(&self, deadline: Option<Instant>) -> io::Result<Incoming> {
        let mut buffer = self.buffer.borrow_mut();
        loop {
            if let Some(frame) =
                self.codec.borrow_mut().decode(&mut buffer).map_err(|e| protocol_error(e.to_string()))?
            {
                return Ok(Incoming::Frame(frame));
            }
            self.flush();
            let input = self.input.borrow();
            // With no timer to wake up for, a blocking read saves the poll(2).
            if let Some(deadline) = deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(Incoming::TimedOut);
                }
                // Round up: a 0 ms poll would spin until the deadline.
                let ms = left.as_micros().div_ceil(1000);
                let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
                let mut fds = [PollFd::new(input.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, timeout) {
                    Ok(0) => return Ok(Incoming::TimedOut),
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            if self.read_more(&input, &mut buffer)? {
                return Ok(Incoming::Closed);
            }
        }
    }

    /// Appends what one read(2) returns to `buffer`; true at the end of input.
    fn read_more(&self, input: &File, buffer: &mut BytesMut) -> io::Result<bool> {
        let mut scratch = self.scratch.borrow_mut();
        let n = loop {
            match (&*input).read(&mut scratch) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                read => break read?,
            }
        };
        if n == 0 {
            self.closed.set(true);
            return Ok(true);
        }
        buffer.extend_from_slice(&scratch[..n]);
        Ok(false)
    }

    /// Writes every queued frame.
    pub(super) fn flush(&self) {
        self.seal();
        self.sealed.set(0);
        let mut pending = self.pending.borrow_mut();
        if pending.is_empty() {
            return;
        }
        // A failed write means the gateway is gone; the loop ends on the closed flag.
        if self.output.borrow_mut().write_all(&pending).is_err() {
            self.closed.set(true);
        }
        pending.clear();
    }

    /// Queues a frame; it goes out at the next flush, at the latest before the worker blocks.
    /// A reply too large for the pipe becomes an error reply, so the caller hears why and the
    /// runtime, which did nothing wrong, stays up.
    pub(super) fn send(&self, frame: FromWorker) {
        let reply_to = match &frame {
            FromWorker::Reply { id, .. } => Some(*id),
            _ => None,
        };
        let mut codec = self.codec.borrow_mut();
        let mut pending = self.pending.borrow_mut();
        let Err(e) = codec.encode(frame, &mut pending) else { return };
        // Into the gateway's log as a frame, under this room and pid.
        let line = FromWorker::Log {
            level: LogLevel::Error,
            message: format!("room-worker cannot send a frame: {e}"),
        };
        if codec.encode(line, &mut pending).is_err() {
            eprintln!("room-worker {}: cannot send a frame: {e}", std::process::id());
        }
        if let Some(id) = reply_to {
            // Refused, not an exception: the script did nothing wrong, and the client hears why.
            let error = ScriptError {
                kind: ScriptErrorKind::Refused,
                message: REPLY_TOO_LARGE.to_owned(),
                stack: None,
            };
            let refusal = FromWorker::Reply { id, result: Err(error) };
            if let Err(e) = codec.encode(refusal, &mut pending) {
                eprintln!("room-worker {}: cannot send a frame: {e}", std::process::id());
            }
        }
    }

    fn next_id(&self) -> u64 {
        let id = self.next_host_call.get();
        self.next_host_call.set(id + 1);
        id
    }
}

/// The last frames (a `StartFailed`, a final reply) must reach the gateway however the
/// worker ends.
impl Drop for Pipe {
    fn drop(&mut self) {
        self.flush();
    }
}

impl Host for Pipe {
    fn host_call_sync(&self, name: &str, args_json: &str) -> Result<String, String> {
        let id = self.next_id();
        self.send(FromWorker::HostCall { id, name: name.to_owned(), args: args_json.to_owned() });
        loop {
            match self.read(None) {
                Ok(Incoming::Frame(ToWorker::HostReply { id: answered, result })) if answered == id => {
                    return result
                }
                Ok(Incoming::Frame(other)) => self.backlog.borrow_mut().push_back(other),
                Ok(Incoming::TimedOut) => continue,
                Ok(Incoming::Closed) => return Err("the gateway closed the connection".to_owned()),
                Err(e) => {
                    self.closed.set(true);
                    return Err(format!("reading the gateway's reply failed: {e}"));
                }
            }
        }
    }

    fn host_call_async(&self, name: &str, args_json: &str) -> u64 {
        let id = self.next_id();
        self.send(FromWorker::HostCall { id, name: name.to_owned(), args: args_json.to_owned() });
        id
    }

    fn post(&self, channel: &str, data_json: &str) {
        self.send(FromWorker::Post { channel: channel.to_owned(), data: data_json.to_owned() });
    }

    fn push(&self, conn: &str, event: &str, payload_json: &str) {
        let (conn, event, payload) = (conn.to_owned(), event.to_owned(), payload_json.to_owned());
        self.send(FromWorker::Push { conn, event, payload });
    }

    fn broadcast(&self, event: &str, payload_json: &str, except: Vec<String>) {
        let (event, payload) = (event.to_owned(), payload_json.to_owned());
        self.send(FromWorker::Broadcast { event, payload, except });
    }

    fn track(&self, conn: &str, key: &str, meta_json: &str) {
        let (conn, key, meta) = (conn.to_owned(), key.to_owned(), meta_json.to_owned());
        self.send(FromWorker::Track { conn, key, meta });
    }

    fn untrack(&self, conn: &str) {
        self.send(FromWorker::Untrack { conn: conn.to_owned() });
    }

    fn subscribe(&self, channel: &str) {
        self.send(FromWorker::Subscribe { channel: channel.to_owned() });
    }

    fn unsubscribe(&self, channel: &str) {
        self.send(FromWorker::Unsubscribe { channel: channel.to_owned() });
    }

    fn log(&self, level: LogLevel, message: &str) {
        self.send(FromWorker::Log { level, message: message.to_owned() });
    }

    fn reply(&self, call_id: u64, result: Result<String, ScriptError>) {
        self.send(FromWorker::Reply { id: call_id, result });
    }

    fn storage_put(&self, key: &str, value_json: &str, stored_bytes: u64) -> Result<(), String> {
        let mut writes = self.writes.borrow_mut();
        // Half a frame: the turn's writes must fit in one, with room to spare.
        let cap = self.max_frame_bytes.get() / 2;
        let bytes = writes.bytes + key.len() + value_json.len();
        if bytes > cap {
            return Err(format!("one turn may write at most {cap} bytes to storage"));
        }
        writes.bytes = bytes;
        self.stored_bytes.set(stored_bytes);
        writes.keys.insert(key.to_owned(), Some(value_json.to_owned()));
        Ok(())
    }

    fn storage_delete(&self, key: &str, stored_bytes: u64) {
        let mut writes = self.writes.borrow_mut();
        writes.bytes += key.len();
        self.stored_bytes.set(stored_bytes);
        writes.keys.insert(key.to_owned(), None);
    }

    fn set_alarm(&self, at: Option<u64>) {
        self.writes.borrow_mut().alarm = Some(at);
    }
}
