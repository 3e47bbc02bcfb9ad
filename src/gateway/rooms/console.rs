//! Each room's recent console output, for operators (`GET /api/admin/rooms/{kind}/{id}/logs`):
//! the last lines its script logged, kept across restarts of its worker, bounded in lines and
//! in bytes so that a chatty script costs the gateway a fixed amount.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::RoomId;
use crate::util::{epoch_ms, LockExt};
use crate::wire::LogLevel;

/// Lines kept per room.
const MAX_LINES: usize = 300;
/// Bytes of text kept per room; older lines go first.
const MAX_BYTES: usize = 32 * 1024;
/// A single line longer than this is cut.
const MAX_LINE_BYTES: usize = 1024;

#[derive(Debug, Clone, Serialize)]
pub struct ConsoleLine {
    /// ms since the epoch.
    pub at: u64,
    pub level: &'static str,
    pub message: String,
    /// The worker that wrote it: lines from before a restart say so.
    pub pid: u32,
}

#[derive(Debug, Default)]
pub struct ConsoleLog {
    lines: VecDeque<ConsoleLine>,
    bytes: usize,
}

impl ConsoleLog {
    pub fn push(&mut self, pid: u32, level: LogLevel, message: &str) {
        let mut message = message.to_owned();
        if message.len() > MAX_LINE_BYTES {
            let mut cut = MAX_LINE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        let level = match level {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        };
        self.bytes += message.len();
        self.lines.push_back(ConsoleLine { at: epoch_ms(), level, message, pid });
        while self.lines.len() > MAX_LINES || self.bytes > MAX_BYTES {
            match self.lines.pop_front() {
                Some(old) => self.bytes -= old.message.len(),
                None => break,
            }
        }
    }

    pub fn lines(&self) -> Vec<ConsoleLine> {
        self.lines.iter().cloned().collect()
    }
}

/// Every room's console, by room.
#[derive(Clone, Default)]
pub struct Consoles(Arc<Mutex<HashMap<RoomId, Arc<Mutex<ConsoleLog>>>>>);

impl Consoles {
    /// The room's console, made on its first start and kept across restarts.
    pub fn for_room(&self, room: &RoomId) -> Arc<Mutex<ConsoleLog>> {
        self.0.lock_or_recover().entry(room.clone()).or_default().clone()
    }

    /// The room's lines, oldest first; none for a room never started here.
    pub fn lines(&self, room: &RoomId) -> Vec<ConsoleLine> {
        let log = self.0.lock_or_recover().get(room).cloned();
        log.map(|log| log.lock_or_recover().lines()).unwrap_or_default()
    }

    /// A room that stopped for good (evicted, stopped) takes its console with it.
    pub fn forget(&self, room: &RoomId) {
        self.0.lock_or_recover().remove(room);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines_within_its_bounds() {
        let mut log = ConsoleLog::default();
        for i in 0..400 {
            log.push(7, LogLevel::Info, &format!("line {i}"));
        }
        let lines = log.lines();
        assert_eq!(lines.len(), MAX_LINES);
        assert_eq!(lines[0].message, "line 100");
        log.push(7, LogLevel::Error, &"x".repeat(5000));
        assert!(log.lines().last().is_some_and(|l| l.message.len() <= MAX_LINE_BYTES + '…'.len_utf8()));
        for _ in 0..100 {
            log.push(7, LogLevel::Info, &"y".repeat(1000));
        }
        assert!(log.bytes <= MAX_BYTES, "{}", log.bytes);
    }
}
