//! Resident memory of the server under test and of its child processes (room workers), read
//! from /proc. RSS counts pages shared between workers (the executable, libc) once per
//! worker; PSS divides each shared page among its users, so the PSS sum is what the workers
//! really cost together.

use std::fs;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    pub rss_kib: u64,
    pub pss_kib: u64,
}

impl std::ops::Add for Memory {
    type Output = Memory;
    fn add(self, other: Memory) -> Memory {
        Memory { rss_kib: self.rss_kib + other.rss_kib, pss_kib: self.pss_kib + other.pss_kib }
    }
}

/// The server process and its direct children, measured at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub server: Memory,
    pub children: Vec<Memory>,
}

impl Snapshot {
    pub fn take(pid: u32) -> Snapshot {
        Snapshot {
            server: memory_of(pid).unwrap_or_default(),
            children: children_of(pid).into_iter().filter_map(memory_of).collect(),
        }
    }

    pub fn children_total(&self) -> Memory {
        self.children.iter().fold(Memory::default(), |sum, m| sum + *m)
    }
}

/// `Rss` and `Pss` from smaps_rollup (one read, kernel ≥ 4.14), falling back to VmRSS.
pub fn memory_of(pid: u32) -> Option<Memory> {
    if let Ok(rollup) = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
        let field = |name: &str| {
            rollup
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        };
        if let (Some(rss_kib), Some(pss_kib)) = (field("Rss:"), field("Pss:")) {
            return Some(Memory { rss_kib, pss_kib });
        }
    }
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())?;
    Some(Memory { rss_kib, pss_kib: rss_kib })
}

/// Direct children, found by scanning every process's parent pid.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| parent_of(*child) == Some(pid))
        .collect()
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields resume after the last ')'.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_and_finds_a_child() {
        let me = memory_of(std::process::id()).expect("our own /proc entry");
        assert!(me.rss_kib > 0 && me.pss_kib > 0);
        let mut child = std::process::Command::new("sleep").arg("5").spawn().expect("sleep runs");
        assert!(children_of(std::process::id()).contains(&child.id()));
        let _ = child.kill();
        let _ = child.wait();
    }
}
