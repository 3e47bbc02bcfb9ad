//! How a worker process comes to exist: exec of the worker executable, or a fork of the
//! warm pool's template (`worker::template` is the other side). Either way the result is a
//! [`NewWorker`]: a child of the gateway, prepared or being prepared for a room, with the
//! gateway's end of its socket pair.
//!
//! One descriptor per worker in the gateway: a socket pair whose other end is the worker's
//! fd 0 carries frames both ways (three pipes capped a gateway at about 5,000 rooms under a
//! 20,000 descriptor limit). The script's console and the worker's own diagnostics travel as
//! `Log` frames; what a worker writes to stderr before the frames are up (the loader, a panic)
//! goes straight to the gateway's own stderr, which it inherits, so it lands in the same log.

use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::BytesMut;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use tokio_util::codec::Encoder;

use super::reap::WorkerProcess;
use crate::wire::{GatewayCodec, RuntimeLimits, ToWorker, DEFAULT_MAX_FRAME_BYTES, PARENT_PID_ENV};

/// How long the template may take to answer a fork request before it is given up as hung.
const FORK_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// The worker executable and the argv[0] it runs under.
#[derive(Clone, Debug)]
pub struct WorkerCommand {
    pub path: PathBuf,
    pub argv0: &'static str,
}

/// A worker process just made: it has its first frame (`Prepare`), and waits for `Start`.
pub(super) struct NewWorker {
    pub process: WorkerProcess,
    pub socket: UnixStream,
}

/// Starts the worker executable with `first` as its first frame.
///
/// PR_SET_PDEATHSIG fires when the spawning *thread* exits, so callers spawn only from
/// threads that live as long as the gateway (a runtime worker thread, the pool's own), never
/// from spawn_blocking, whose threads come and go.
pub(super) fn exec_worker(command: &WorkerCommand, first: ToWorker) -> std::io::Result<NewWorker> {
    let (gateway_end, worker_end) = UnixStream::pair()?;
    let child = Command::new(&command.path)
        .arg0(command.argv0)
        .env(PARENT_PID_ENV, std::process::id().to_string())
        .stdin(Stdio::from(OwnedFd::from(worker_end)))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    // The worker's end closed with the command above, so that the gateway reads end of file
    // once the worker is gone; the room's actor reaps it by pid (see `reap.rs`).
    let mut worker = NewWorker { process: WorkerProcess::new(child.id()), socket: gateway_end };
    match write_frame(&mut worker.socket, first) {
        // The worker is already gone (it exited at start-up): that is an exit for its room to
        // report and for the crash-loop guard to count, as for any worker that dies, not a
        // failure to start one.
        Err(e)
            if matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset) => {}
        written => written?,
    }
    Ok(worker)
}

/// One frame, written blocking: the first frame of a worker is small and its socket's buffer
/// empty, so this never waits on the worker.
fn write_frame(socket: &mut UnixStream, frame: ToWorker) -> std::io::Result<()> {
    let mut bytes = BytesMut::new();
    GatewayCodec::new(DEFAULT_MAX_FRAME_BYTES).encode(frame, &mut bytes).map_err(std::io::Error::other)?;
    socket.write_all(&bytes)
}

/// The warm pool's template: a prepared worker that forks prepared workers on request.
pub(super) struct Template {
    process: WorkerProcess,
    control: UnixStream,
}

impl Template {
    /// Starts the template. Its forks are children of the thread that calls this (see
    /// [`exec_worker`]).
    pub fn start(command: &WorkerCommand, limits: RuntimeLimits) -> std::io::Result<Template> {
        let NewWorker { process, socket } = exec_worker(command, ToWorker::Template { limits })?;
        socket.set_read_timeout(Some(FORK_ANSWER_TIMEOUT))?;
        Ok(Template { process, control: socket })
    }

    /// A prepared worker forked from the template, a child of the gateway. An error means
    /// the template is gone or out of step: drop it.
    pub fn fork(&mut self) -> std::io::Result<NewWorker> {
        let (gateway_end, worker_end) = UnixStream::pair()?;
        let fds = [worker_end.as_raw_fd()];
        let sent = sendmsg::<()>(
            self.control.as_raw_fd(),
            &[IoSlice::new(&[1])],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        );
        // The template holds its own copy now (or never will): the worker's end must close
        // here either way, for end of file to mean the worker is gone.
        drop(worker_end);
        sent.map_err(std::io::Error::from)?;
        let mut answer = [0u8; 4];
        self.control.read_exact(&mut answer)?;
        let pid = i32::from_le_bytes(answer);
        if pid <= 0 {
            return Err(std::io::Error::from_raw_os_error(-pid));
        }
        Ok(NewWorker { process: WorkerProcess::new(pid as u32), socket: gateway_end })
    }

    /// Whether the template process is still running (reaping it if not).
    pub fn is_running(&mut self) -> bool {
        matches!(self.process.try_wait(), Ok(None))
    }

    /// Kills the template and reaps it; its forks are not its children and live on.
    pub fn stop(mut self) {
        self.process.kill_and_reap();
    }
}
