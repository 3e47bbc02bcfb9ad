//! A socket's outbound side: the bounded queue everyone who sends to the socket shares, and
//! the task that drains it into the WebSocket with batched writes. A client that stops
//! reading fills its queue and is disconnected instead of stalling anyone who broadcasts to
//! it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::SplitSink;
use futures_util::SinkExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// A socket's outbound queue, bounded in frames and in bytes. Everyone who sends to the socket
/// holds a clone; nobody waits on it.
#[derive(Clone, Debug)]
pub struct Outbox {
    frames: mpsc::Sender<Utf8Bytes>,
    overflowed: CancellationToken,
    queued_bytes: Arc<AtomicUsize>,
    max_bytes: usize,
}

/// The writer's end of an [`Outbox`].
#[derive(Debug)]
pub struct OutboxReceiver {
    frames: mpsc::Receiver<Utf8Bytes>,
    queued_bytes: Arc<AtomicUsize>,
}

impl Outbox {
    /// A queue bounded in frames only (for tests and tools that read every frame).
    pub fn new(capacity: usize) -> (Outbox, OutboxReceiver) {
        Outbox::bounded(capacity, usize::MAX)
    }

    /// A queue of at most `capacity` frames and `max_bytes` bytes.
    pub fn bounded(capacity: usize, max_bytes: usize) -> (Outbox, OutboxReceiver) {
        let (frames, receiver) = mpsc::channel(capacity.max(1));
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let outbox = Outbox {
            frames,
            overflowed: CancellationToken::new(),
            queued_bytes: queued_bytes.clone(),
            max_bytes,
        };
        (outbox, OutboxReceiver { frames: receiver, queued_bytes })
    }

    /// Queues a frame without waiting. A full queue (in frames or bytes) marks the socket as
    /// too slow.
    pub fn send(&self, frame: Utf8Bytes) -> bool {
        let size = frame.len();
        let before = self.queued_bytes.fetch_add(size, Ordering::AcqRel);
        if before.saturating_add(size) > self.max_bytes {
            self.queued_bytes.fetch_sub(size, Ordering::AcqRel);
            self.overflowed.cancel();
            return false;
        }
        match self.frames.try_send(frame) {
            Ok(()) => true,
            Err(e) => {
                self.queued_bytes.fetch_sub(size, Ordering::AcqRel);
                if matches!(e, mpsc::error::TrySendError::Full(_)) {
                    self.overflowed.cancel();
                }
                false
            }
        }
    }

    /// Queues a reply, or `refusal()` in its place when the reply alone is larger than the
    /// queue may ever hold: a client asking for too much hears so instead of being cut off.
    pub fn send_reply(&self, reply: Utf8Bytes, refusal: impl FnOnce() -> Utf8Bytes) -> bool {
        if !self.fits(&reply) {
            return self.send(refusal());
        }
        self.send(reply)
    }

    /// Whether the frame could ever fit in the queue's byte limit.
    pub fn fits(&self, frame: &Utf8Bytes) -> bool {
        frame.len() <= self.max_bytes
    }

    /// Cancelled once a frame could not be queued.
    pub fn overflowed(&self) -> &CancellationToken {
        &self.overflowed
    }
}

impl OutboxReceiver {
    pub async fn recv(&mut self) -> Option<Utf8Bytes> {
        let frame = self.frames.recv().await?;
        self.queued_bytes.fetch_sub(frame.len(), Ordering::AcqRel);
        Some(frame)
    }

    pub fn try_recv(&mut self) -> Option<Utf8Bytes> {
        let frame = self.frames.try_recv().ok()?;
        self.queued_bytes.fetch_sub(frame.len(), Ordering::AcqRel);
        Some(frame)
    }
}

/// The frame to close with, if the server is the one closing.
pub type Closing = Option<CloseFrame>;

/// Drains the queue into the socket until the queue ends or a close is handed over; the close
/// goes out after nothing but the batch in progress.
pub async fn write_frames(
    mut sink: SplitSink<WebSocket, Message>,
    mut outbound: OutboxReceiver,
    mut close: oneshot::Receiver<Closing>,
) {
    let frames_out = ::metrics::counter!(crate::gateway::metrics::FRAMES_OUT);
    let bytes_out = ::metrics::counter!(crate::gateway::metrics::BYTES_OUT);
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
                    let (mut frames, mut bytes) = (1u64, frame.len() as u64);
                    let next = || {
                        let frame = outbound.try_recv()?;
                        frames += 1;
                        bytes += frame.len() as u64;
                        Some(frame)
                    };
                    let written = write_batch(&mut sink, frame, next).await;
                    frames_out.increment(frames);
                    bytes_out.increment(bytes);
                    if written.is_err() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_queue_is_bounded_in_bytes_and_frees_what_the_writer_takes() {
        let (outbox, mut frames) = Outbox::bounded(100, 10);
        assert!(outbox.send(Utf8Bytes::from_static("12345")));
        assert!(outbox.send(Utf8Bytes::from_static("12345")));
        assert!(!outbox.overflowed().is_cancelled());
        assert_eq!(frames.recv().await.as_ref().map(Utf8Bytes::as_str), Some("12345"));
        assert!(outbox.send(Utf8Bytes::from_static("123")), "taken frames no longer count");
        assert!(!outbox.send(Utf8Bytes::from_static("123")), "5 + 3 + 3 bytes is over 10");
        assert!(outbox.overflowed().is_cancelled(), "the slow socket is flagged");
    }

    #[test]
    fn a_reply_larger_than_the_queue_is_refused_instead() {
        let (outbox, mut frames) = Outbox::bounded(100, 10);
        assert!(outbox.send_reply(Utf8Bytes::from_static("far too large"), || Utf8Bytes::from_static("no")));
        assert_eq!(frames.try_recv().as_ref().map(Utf8Bytes::as_str), Some("no"));
        assert!(!outbox.overflowed().is_cancelled());
    }
}
