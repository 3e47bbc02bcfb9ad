//! The room-worker process: one room's runtime, driven by frames on stdin.
//!
//! Single-threaded on purpose: a runtime is an actor, so a second thread or an async runtime
//! would only cost memory. The event loop is `poll(2)` on stdin with the next timer as its
//! timeout.

mod engine;
mod pipe;
mod template;

use std::io;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::Instant;

use engine::{Durable, Engine, RoomInit};
use pipe::{Incoming, Pipe};

use crate::wire::{FromWorker, StorageInit, ToWorker, DEFAULT_MAX_FRAME_BYTES, PARENT_PID_ENV};

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
    close_inherited_descriptors();
    let io = Rc::new(Pipe::from_stdio()?);

    let (limits, prepared) = match io.read_first()? {
        Some(ToWorker::Prepare { limits }) => {
            name_process(c"room-spare");
            (limits, Engine::prepare(&limits, io.clone()))
        }
        Some(ToWorker::Template { limits }) => {
            name_process(c"room-template");
            if !limits.engine.forks() {
                return Err(protocol_error("this engine cannot be forked from a template".to_owned()));
            }
            let prepared = Engine::prepare(&limits, io.clone())
                .map_err(|e| io::Error::other(format!("cannot prepare the engine: {}", e.message)))?;
            match template::serve()? {
                // The gateway closed the template's socket: the pool is gone.
                None => return Ok(()),
                Some(socket) => {
                    // A fork's first moments: the parent-death signal is not inherited.
                    die_with_gateway()?;
                    name_process(c"room-spare");
                    io.rebind(socket)?;
                    (limits, Ok(prepared))
                }
            }
        }
        None => return Ok(()),
        Some(other) => return Err(protocol_error(format!("expected Prepare, got {other:?}"))),
    };
    io.set_max_frame_bytes(usize::try_from(limits.max_frame_bytes).unwrap_or(DEFAULT_MAX_FRAME_BYTES));

    let (room_id, kind, script_name, script, settings, epoch, storage) = match io.read(None)? {
        Incoming::Frame(ToWorker::Start { room_id, kind, script_name, script, settings, epoch, storage }) => {
            (room_id, kind, script_name, script, settings, epoch, storage)
        }
        Incoming::Closed => return Ok(()),
        other => return Err(protocol_error(format!("expected Start, got {other:?}"))),
    };
    name_process(c"room-worker");
    let storage = match storage {
        Some(init) => Some(restore(&io, init)?),
        None => None,
    };
    let room = RoomInit {
        room_id: &room_id,
        kind: &kind,
        script_name: &script_name,
        script: &script,
        settings_json: &settings,
        epoch,
        storage,
    };

    let engine = match prepared.and_then(|prepared| prepared.start(&room)) {
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
            Incoming::Frame(ToWorker::Stats) => io.send(FromWorker::Stats(engine.stats())),
            Incoming::Frame(ToWorker::Shutdown) | Incoming::Closed => break,
            Incoming::Frame(
                ToWorker::Prepare { .. }
                | ToWorker::Template { .. }
                | ToWorker::Start { .. }
                | ToWorker::Restore { .. },
            ) => return Err(protocol_error("a start-up frame after the start".to_owned())),
            Incoming::TimedOut => {}
        }
        // Each turn's writes apart, so the gateway holds only what they caused.
        io.seal();
        if timer_due.is_some_and(|due| due <= Instant::now()) {
            engine.run_due_timers();
            io.seal();
        }
    }
    Ok(())
}

/// Reads a durable room's entries, which follow `Start` in `init.chunks` frames.
fn restore(io: &Pipe, init: StorageInit) -> io::Result<Durable> {
    let mut entries = Vec::new();
    for _ in 0..init.chunks {
        match io.read(None)? {
            Incoming::Frame(ToWorker::Restore { entries: chunk }) => entries.extend(chunk),
            other => return Err(protocol_error(format!("expected Restore, got {other:?}"))),
        }
    }
    Ok(Durable { alarm_at: init.alarm_at, max_bytes: init.max_bytes, entries })
}

fn protocol_error(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Closes every descriptor but stdin, stdout and stderr: whatever the gateway's own parent
/// left open without close-on-exec (a shell's, a test harness's pipe) has no business in a
/// room's process, and would keep those open as long as any room runs.
fn close_inherited_descriptors() {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else { return };
    let fds: Vec<i32> =
        entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).filter(|fd| *fd > 2).collect();
    for fd in fds {
        // The directory's own descriptor is among them, closed already by then: EBADF.
        let _ = nix::unistd::close(fd);
    }
}

/// What `ps` and `/proc/PID/comm` show: a pool's template and spares apart from the
/// workers that run rooms, whatever executable they are.
fn name_process(name: &std::ffi::CStr) {
    let _ = nix::sys::prctl::set_name(name);
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
