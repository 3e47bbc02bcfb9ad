//! The room-worker process: one room's runtime, driven by frames on stdin.
//!
//! Single-threaded on purpose: a runtime is an actor, so a second thread or an async runtime
//! would only cost memory. The event loop is `poll(2)` on stdin with the next timer as its
//! timeout.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::os::fd::{AsFd, OwnedFd};
use std::process::ExitCode;
use std::rc::Rc;
use std::time::Instant;

use bytes::BytesMut;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tokio_util::codec::{Decoder, Encoder};

use crate::engine::{Engine, Host};
use crate::ipc::{FromWorker, LogLevel, ScriptError, ToWorker, WorkerCodec, DEFAULT_MAX_FRAME_BYTES};

/// The gateway passes its pid so that a worker whose gateway died before `PR_SET_PDEATHSIG`
/// took effect notices and exits instead of running on as an orphan.
pub const PARENT_PID_ENV: &str = "ROOMVISOR_GATEWAY_PID";
/// The name a worker runs under, in `ps` and as the fallback's argv[0].
pub const WORKER_ARGV0: &str = "room-worker";

/// True when this executable was started as a room worker (the gateway's fallback when no
/// `room-worker` binary sits beside it).
pub fn invoked_as_worker() -> bool {
    std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n == WORKER_ARGV0))
        .unwrap_or(false)
}

pub fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("room-worker {}: {e}", std::process::id());
            ExitCode::FAILURE
        }
    }
}

fn run() -> io::Result<()> {
    die_with_gateway()?;
    let io = Rc::new(Pipe::from_stdio()?);

    let (room_id, script_name, script, limits) = match io.read(None)? {
        Incoming::Frame(ToWorker::Start { room_id, script_name, script, limits }) => {
            (room_id, script_name, script, limits)
        }
        Incoming::Closed => return Ok(()),
        other => return Err(protocol_error(format!("expected Start, got {other:?}"))),
    };
    io.set_max_frame_bytes(usize::try_from(limits.max_frame_bytes).unwrap_or(DEFAULT_MAX_FRAME_BYTES));

    let engine = match Engine::start(&room_id, &script_name, &script, &limits, io.clone()) {
        Ok(engine) => engine,
        Err(error) => {
            io.send(FromWorker::StartFailed(error));
            return Ok(());
        }
    };
    io.send(FromWorker::Ready);

    while !io.closed.get() {
        let timer_due = engine.next_timer_at();
        let incoming = match io.backlog.borrow_mut().pop_front() {
            Some(frame) => Incoming::Frame(frame),
            None => io.read(timer_due)?,
        };
        match incoming {
            Incoming::Frame(ToWorker::Call { id, function, args }) => engine.call(id, &function, &args),
            Incoming::Frame(ToWorker::HostReply { id, result }) => engine.settle_host_call(id, result),
            Incoming::Frame(ToWorker::Deliver { channel, data }) => engine.deliver(&channel, &data),
            Incoming::Frame(ToWorker::Shutdown) | Incoming::Closed => break,
            Incoming::Frame(ToWorker::Start { .. }) => {
                return Err(protocol_error("a second Start frame".to_owned()))
            }
            Incoming::TimedOut => {}
        }
        if timer_due.is_some_and(|due| due <= Instant::now()) {
            engine.run_due_timers();
        }
    }
    Ok(())
}

fn protocol_error(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// `PR_SET_PDEATHSIG` kills this process when the gateway dies, even by `kill -9`.
fn die_with_gateway() -> io::Result<()> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(io::Error::from)?;
    let expected = std::env::var(PARENT_PID_ENV).ok().and_then(|p| p.parse::<i32>().ok());
    if let Some(expected) = expected {
        if nix::unistd::getppid().as_raw() != expected {
            return Err(io::Error::other("the gateway exited before this worker started"));
        }
    }
    Ok(())
}

#[derive(Debug)]
enum Incoming {
    Frame(ToWorker),
    TimedOut,
    Closed,
}

/// The worker's end of the IPC pipe pair, plus frames that arrived while a `Beam.callSync`
/// waited for its answer.
struct Pipe {
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
    backlog: RefCell<VecDeque<ToWorker>>,
    next_host_call: Cell<u64>,
    closed: Cell<bool>,
}

impl Pipe {
    /// Takes stdin/stdout for frames, unbuffered (std's stdin buffer would hide bytes from
    /// `poll`), and points fd 1 at stderr so a stray print can never corrupt the frame stream.
    fn from_stdio() -> io::Result<Pipe> {
        let input: OwnedFd = io::stdin().as_fd().try_clone_to_owned()?;
        let output: OwnedFd = io::stdout().as_fd().try_clone_to_owned()?;
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
        })
    }

    fn set_max_frame_bytes(&self, max: usize) {
        *self.codec.borrow_mut() = WorkerCodec::new(max);
    }

    /// The next frame, or `TimedOut` once `deadline` passes.
    fn read(&self, deadline: Option<Instant>) -> io::Result<Incoming> {
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
    fn flush(&self) {
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
    fn send(&self, frame: FromWorker) {
        if let Err(e) = self.codec.borrow_mut().encode(frame, &mut self.pending.borrow_mut()) {
            eprintln!("room-worker {}: cannot encode a frame: {e}", std::process::id());
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
}
