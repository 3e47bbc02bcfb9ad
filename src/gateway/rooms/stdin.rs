//! The task that writes frames to a worker (its half of the socket pair the worker has as
//! fd 0). The actor hands it frames and goes on reading the worker, so the two never wait on
//! each other: a worker blocked writing a large answer to the gateway is read while the
//! gateway's next frames wait here.

use std::time::Duration;

use futures_util::SinkExt;
use tokio::io::AsyncWrite;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::codec::FramedWrite;
use tokio_util::sync::CancellationToken;

use crate::wire::{GatewayCodec, ToWorker};

/// Frames waiting for the worker to read them.
const STDIN_QUEUE: usize = 1024;
/// Slots a BroadcastChannel delivery must leave free, so that calls and host replies always
/// find room.
const RESERVED_FOR_CALLS: usize = 64;

/// Why a frame could not be queued.
pub(super) enum Refused {
    /// The worker has not read its input for a long while.
    Full,
}

/// The actor's end.
pub(super) struct Stdin {
    frames: Option<mpsc::Sender<ToWorker>>,
    /// Cancelled when one write waited past the hard limit: the worker does not read.
    stalled: CancellationToken,
}

impl Stdin {
    pub fn spawn<W>(stdin: W, max_frame_bytes: usize, hard_timeout: Duration) -> Stdin
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (frames, queued) = mpsc::channel(STDIN_QUEUE);
        let stalled = CancellationToken::new();
        let writer = FramedWrite::new(stdin, GatewayCodec::new(max_frame_bytes));
        tokio::spawn(write_frames(writer, queued, hard_timeout, stalled.clone()));
        Stdin { frames: Some(frames), stalled }
    }

    /// Queues a frame the worker must get (a call, a host reply, the start or the shutdown).
    pub fn send(&self, frame: ToWorker) -> Result<(), Refused> {
        let Some(frames) = &self.frames else { return Ok(()) };
        match frames.try_send(frame) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(Refused::Full),
            // The writer ended: the worker is gone or stalled, and the actor hears of that.
            Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
        }
    }

    /// Queues a frame the worker may miss (a BroadcastChannel delivery); false if dropped.
    pub fn offer(&self, frame: ToWorker) -> bool {
        match &self.frames {
            Some(frames) if frames.capacity() > RESERVED_FOR_CALLS => frames.try_send(frame).is_ok(),
            _ => false,
        }
    }

    /// No more frames: once the queue is written, the gateway shuts its writing side, and the
    /// worker reads the end of its input, drains and exits.
    pub fn close(&mut self) {
        self.frames = None;
    }

    pub fn stalled(&self) -> &CancellationToken {
        &self.stalled
    }
}

async fn write_frames<W: AsyncWrite + Unpin>(
    mut writer: FramedWrite<W, GatewayCodec>,
    mut queued: mpsc::Receiver<ToWorker>,
    hard_timeout: Duration,
    stalled: CancellationToken,
) {
    while let Some(frame) = queued.recv().await {
        match timeout(hard_timeout, writer.send(frame)).await {
            Ok(Ok(())) => {}
            // A broken pipe: the worker died, and the actor's wait on it says how.
            Ok(Err(_)) => return,
            Err(_) => {
                stalled.cancel();
                return;
            }
        }
    }
    let _ = writer.get_mut().shutdown().await;
}
