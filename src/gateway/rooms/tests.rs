//! The supervisor with a stand-in launcher: start-once races, the crash-loop guard and
//! eviction, decided without starting a process. (The same behaviour over real worker
//! processes is in `tests/rooms.rs` and `tests/limits.rs`.)

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::handle::{ExitReason, ExitReport, HandleEnds, Request, RoomHandle};
use super::launcher::{Launched, Launcher};
use super::{RoomError, RoomId, RuntimeId, Supervisor};
use crate::gateway::config::Config;
use crate::gateway::phoenix::Outbox;
use crate::gateway::pubsub::PubSub;
use crate::wire::ScriptError;

#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    /// Answers every call with the function's name.
    Healthy,
    /// Never becomes ready: its script throws at start-up.
    FailsToStart,
    /// Dies (as if killed) on its first call.
    DiesOnCall,
}

struct StandIn {
    behaviour: Behaviour,
    start_delay: Duration,
    launches: Arc<AtomicUsize>,
}

impl Launcher for StandIn {
    fn launch(&self, room: &RoomId, runtime: RuntimeId) -> Result<Launched, RoomError> {
        self.launches.fetch_add(1, Ordering::SeqCst);
        let (handle, ends) = RoomHandle::new(room.clone(), runtime, 0, Duration::from_secs(5), 64, false);
        let (ready_tx, ready) = oneshot::channel();
        let actor = run_stand_in(room.clone(), runtime, self.behaviour, self.start_delay, ends, ready_tx);
        Ok(Launched { handle, ready, actor: Box::pin(actor) })
    }
}

async fn run_stand_in(
    room: RoomId,
    runtime: RuntimeId,
    behaviour: Behaviour,
    start_delay: Duration,
    ends: HandleEnds,
    ready: oneshot::Sender<Result<(), RoomError>>,
) -> ExitReport {
    let report = |reason, was_ready| ExitReport { room: room.clone(), runtime, pid: 0, reason, was_ready };
    let killed_by_signal = ExitStatus::from_raw(9);
    tokio::time::sleep(start_delay).await;
    if behaviour == Behaviour::FailsToStart {
        let _ = ready.send(Err(RoomError::StartFailed(ScriptError::exception("SyntaxError: at start"))));
        return report(ExitReason::Exited(ExitStatus::from_raw(0)), false);
    }
    let _ = ready.send(Ok(()));
    let HandleEnds { mut commands, kill, .. } = ends;
    loop {
        tokio::select! {
            () = kill.cancelled() => return report(ExitReason::Killed("asked to stop"), true),
            command = commands.recv() => match command {
                Some(Request::Call(_)) if behaviour == Behaviour::DiesOnCall => {
                    return report(ExitReason::Exited(killed_by_signal), true);
                }
                Some(Request::Call(call)) => {
                    let _ = call.reply.send(Ok(format!("\"{}\"", call.function)));
                }
                Some(Request::Stats(reply)) => {
                    let _ = reply.send(Default::default());
                }
                Some(Request::Shutdown) | None => return report(ExitReason::Requested, true),
            },
        }
    }
}

fn supervisor(behaviour: Behaviour, start_delay: Duration, config: Config) -> (Supervisor, Arc<AtomicUsize>) {
    let launches = Arc::new(AtomicUsize::new(0));
    let launcher = StandIn { behaviour, start_delay, launches: launches.clone() };
    let supervisor = Supervisor::with_launcher(
        Arc::new(config),
        PubSub::new(),
        None,
        Box::new(launcher),
        Default::default(),
        None,
    );
    (supervisor, launches)
}

fn room(id: &str) -> RoomId {
    RoomId::parse(id).unwrap()
}

/// Waits (bounded) until the supervisor has reaped every runtime that ended.
async fn settled(supervisor: &Supervisor, live: usize) {
    for _ in 0..200 {
        if supervisor.live_room_count() == live {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("expected {live} live rooms, have {}", supervisor.live_room_count());
}

#[tokio::test]
async fn racing_first_uses_start_the_room_once() {
    let (supervisor, launches) = supervisor(Behaviour::Healthy, Duration::from_millis(50), Config::default());
    let calls = (0..50).map(|_| {
        let supervisor = supervisor.clone();
        tokio::spawn(async move { supervisor.call(&room("a"), "hello", "[]".to_owned()).await })
    });
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap(), "\"hello\"");
    }
    assert_eq!(launches.load(Ordering::SeqCst), 1);
    assert_eq!(supervisor.live_room_count(), 1);
}

#[tokio::test]
async fn a_room_that_keeps_dying_is_refused_for_the_cool_down() {
    let config =
        Config { crash_limit: 2, crash_window_ms: 60_000, crash_cooldown_ms: 60_000, ..Config::default() };
    let (supervisor, launches) = supervisor(Behaviour::DiesOnCall, Duration::ZERO, config);
    for crash in 1..=3 {
        let result = supervisor.call(&room("a"), "hello", "[]".to_owned()).await;
        assert!(matches!(result, Err(RoomError::WorkerExited)), "crash {crash}: {result:?}");
        settled(&supervisor, 0).await;
    }
    let refused = supervisor.call(&room("a"), "hello", "[]".to_owned()).await;
    assert!(matches!(refused, Err(RoomError::CrashLooping)), "{refused:?}");
    assert_eq!(launches.load(Ordering::SeqCst), 3, "no start while cooling down");
    let other = supervisor.call(&room("b"), "hello", "[]".to_owned()).await;
    assert!(matches!(other, Err(RoomError::WorkerExited)), "other rooms still start: {other:?}");
}

#[tokio::test]
async fn failed_starts_count_before_anyone_hears_of_them() {
    let config =
        Config { crash_limit: 1, crash_window_ms: 60_000, crash_cooldown_ms: 60_000, ..Config::default() };
    let (supervisor, launches) = supervisor(Behaviour::FailsToStart, Duration::ZERO, config);
    for attempt in 1..=2 {
        let result = supervisor.call(&room("a"), "hello", "[]".to_owned()).await;
        assert!(matches!(result, Err(RoomError::StartFailed(_))), "attempt {attempt}: {result:?}");
    }
    // No wait: the retry comes at once, as a client's would.
    let refused = supervisor.call(&room("a"), "hello", "[]".to_owned()).await;
    assert!(matches!(refused, Err(RoomError::CrashLooping)), "{refused:?}");
    assert_eq!(launches.load(Ordering::SeqCst), 2);
}

fn live_rooms(supervisor: &Supervisor) -> Vec<String> {
    supervisor.rooms().into_iter().map(|r| r.id).collect()
}

#[tokio::test]
async fn the_room_limit_evicts_the_least_recently_used_idle_room() {
    let config = Config { max_rooms: 2, ..Config::default() };
    let (supervisor, launches) = supervisor_with_rooms(config, &["first", "second"]).await;
    // Used again, "first" is now the more recent of the two.
    supervisor.call(&room("first"), "f", "[]".to_owned()).await.unwrap();
    supervisor.call(&room("third"), "f", "[]".to_owned()).await.unwrap();
    settled(&supervisor, 2).await;
    assert_eq!(live_rooms(&supervisor), ["first", "third"]);
    assert_eq!(launches.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_room_someone_has_joined_is_never_evicted() {
    let config = Config { max_rooms: 2, ..Config::default() };
    let (supervisor, _) = supervisor_with_rooms(config, &["joined", "idle"]).await;
    let (outbox, _frames) = Outbox::new(8);
    supervisor.pubsub().subscribe_socket("room:joined", outbox);
    supervisor.call(&room("new"), "f", "[]".to_owned()).await.unwrap();
    settled(&supervisor, 2).await;
    assert_eq!(live_rooms(&supervisor), ["joined", "new"], "the older room stays: someone is in it");

    let (outbox, _more_frames) = Outbox::new(8);
    supervisor.pubsub().subscribe_socket("room:new", outbox);
    let refused = supervisor.call(&room("third"), "f", "[]".to_owned()).await;
    assert!(matches!(refused, Err(RoomError::RoomLimit)), "{refused:?}");
    assert_eq!(live_rooms(&supervisor), ["joined", "new"]);
}

/// A supervisor whose rooms `ids` were started in that order, a few ms apart.
async fn supervisor_with_rooms(config: Config, ids: &[&str]) -> (Supervisor, Arc<AtomicUsize>) {
    let (supervisor, launches) = supervisor(Behaviour::Healthy, Duration::ZERO, config);
    for id in ids {
        supervisor.call(&room(id), "f", "[]".to_owned()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (supervisor, launches)
}
