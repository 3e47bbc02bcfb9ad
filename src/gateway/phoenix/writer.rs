//! A socket's outbound side: the bounded queue everyone who sends to the socket shares, and
//! the task that drains it into the WebSocket with batched writes. A client that stops
//! reading fills its queue and is disconnected instead of stalling anyone who broadcasts to
//! it.

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::SplitSink;
use futures_util::SinkExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// A socket's bounded outbound queue.
#[derive(Clone, Debug)]
pub struct Outbox {
    frames: mpsc::Sender<Utf8Bytes>,
    overflowed: CancellationToken,
}

impl Outbox {
    pub fn new(capacity: usize) -> (Outbox, mpsc::Receiver<Utf8Bytes>) {
        let (frames, receiver) = mpsc::channel(capacity.max(1));
        (Outbox { frames, overflowed: CancellationToken::new() }, receiver)
    }

    /// Queues a frame without waiting. A full queue marks the socket as too slow.
    pub fn send(&self, frame: Utf8Bytes) -> bool {
        match self.frames.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.overflowed.cancel();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Cancelled once a frame could not be queued.
    pub fn overflowed(&self) -> &CancellationToken {
        &self.overflowed
    }
}

/// The frame to close with, if the server is the one closing.
pub type Closing = Option<CloseFrame>;

/// Drains the queue into the socket until the queue ends or a close is handed over; the close
/// goes out after nothing but the batch in progress.
pub async fn write_frames(
    mut sink: SplitSink<WebSocket, Message>,
    mut outbound: mpsc::Receiver<Utf8Bytes>,
    mut close: oneshot::Receiver<Closing>,
) {
    loop {
        tokio::select! {
            biased;
            closing = &mut close => {
                if let Ok(Some(frame)) = closing {
                    let _ = sink.send(Message::Close(Some(frame))).await;
                }
                break;
            }
            frame = outbound.recv() => match frame {
                Some(frame) => {
                    if write_batch(&mut sink, frame, || outbound.try_recv().ok()).await.is_err() {
                        break;
                    }
                }
                None => break,
            },
        }
    }
    let _ = sink.close().await;
}

/// Frames written with one flush at most: enough to turn a backlog into few syscalls, few
/// enough that a close waits little behind them.
const MAX_WRITE_BATCH: usize = 64;

/// Writes `first` and whatever else `next_queued` has ready, then flushes once. Under fan-out
/// a socket that falls behind gets its backlog in one write(2) instead of one per frame; a
/// socket that keeps up still gets each frame at once. (The benchmarks' limit server writes
/// with this too, so that the comparison measures processes and JS, not a different writer.)
pub async fn write_batch(
    sink: &mut SplitSink<WebSocket, Message>,
    first: Utf8Bytes,
    mut next_queued: impl FnMut() -> Option<Utf8Bytes>,
) -> Result<(), axum::Error> {
    sink.feed(Message::Text(first)).await?;
    for _ in 1..MAX_WRITE_BATCH {
        match next_queued() {
            Some(frame) => sink.feed(Message::Text(frame)).await?,
            None => break,
        }
    }
    sink.flush().await
}
