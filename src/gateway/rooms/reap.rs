//! A worker process as the actor holds it: its pid, killing it, and reaping it.
//!
//! Not tokio's `Child`: on Linux it holds a pidfd per child, a second descriptor per room
//! beside the socket pair, and descriptors are what cap the rooms a gateway can hold. The
//! actor knows a worker is gone when its socket reaches end of file (the kernel closes the
//! worker's end as it exits); `wait` then reaps it with `waitpid`, polling briefly, since by
//! then it has exited or is about to.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// The longest pause between two looks at a worker that has not exited yet.
const MAX_POLL: Duration = Duration::from_millis(50);

pub(super) struct WorkerProcess {
    pid: Pid,
    /// Set once reaped: the pid may belong to another process after that.
    status: Option<ExitStatus>,
}

impl WorkerProcess {
    pub fn new(pid: u32) -> WorkerProcess {
        WorkerProcess { pid: Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX)), status: None }
    }

    pub fn pid(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    /// Kills it and waits for it, blocking: for workers that never ran a room (the pool's
    /// spares and template), off the async runtime. SIGKILL makes the wait short.
    pub fn kill_and_reap(&mut self) {
        if self.status.is_none() {
            self.kill();
            if waitpid(self.pid, None).is_ok() {
                self.status = Some(ExitStatus::from_raw(Signal::SIGKILL as i32));
            }
        }
    }

    pub fn kill(&self) {
        if self.status.is_none() {
            let _ = kill(self.pid, Signal::SIGKILL);
        }
    }

    /// Its exit status if it has exited (and is reaped now), without waiting.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let raw = match waitpid(self.pid, Some(WaitPidFlag::WNOHANG)).map_err(std::io::Error::from)? {
            WaitStatus::Exited(_, code) => (code & 0xff) << 8,
            WaitStatus::Signaled(_, signal, core) => signal as i32 | if core { 0x80 } else { 0 },
            _ => return Ok(None),
        };
        let status = ExitStatus::from_raw(raw);
        self.status = Some(status);
        Ok(Some(status))
    }

    /// Waits until it exits, and reaps it.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        let mut pause = Duration::from_micros(200);
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_POLL);
        }
    }
}

/// An actor dropped before it reaped its worker (the runtime shutting down) still takes the
/// worker down, as `kill_on_drop` did.
impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.kill();
            let _ = waitpid(self.pid, Some(WaitPidFlag::WNOHANG));
        }
    }
}
