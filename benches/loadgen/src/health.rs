//! What the gateway says of itself at `/healthz` (its live rooms, and with `--data-dir` the
//! rooms its store knows), read with one plain HTTP/1.0 request, and the bytes a directory's
//! files take on disk.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::client::Error;

/// `/healthz` waits up to 2 s for the store; this leaves it room.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    /// `rooms`: the rooms live on this gateway.
    pub live: u64,
    /// `storage.rooms_stored`: the rooms the store knows, live or not; none without a store.
    pub stored: Option<u64>,
}

/// Reads `/healthz` from a server at `base_url` (`http://host:port`).
pub async fn read(base_url: &str) -> Result<Health, Error> {
    tokio::time::timeout(HEALTH_TIMEOUT, get(base_url, "/healthz"))
        .await
        .map_err(|_| "no /healthz answer in time")?
        .and_then(|body| parse(&body))
}

/// The body of a GET; HTTP/1.0, so the server closes the connection after a plain body.
async fn get(base_url: &str, path: &str) -> Result<String, Error> {
    let host = base_url.trim_start_matches("http://").split('/').next().unwrap_or_default();
    let mut stream = TcpStream::connect(host).await?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let response = String::from_utf8(response)?;
    let (_, body) = response.split_once("\r\n\r\n").ok_or("no HTTP response")?;
    Ok(body.to_owned())
}

/// `{"status": …, "rooms": N, "storage": {"rooms_stored": M, …}}`; a 503 has the same body.
fn parse(body: &str) -> Result<Health, Error> {
    let health: serde_json::Value = serde_json::from_str(body)?;
    let live = health["rooms"].as_u64().ok_or_else(|| format!("/healthz has no room count: {body}"))?;
    Ok(Health { live, stored: health["storage"]["rooms_stored"].as_u64() })
}

/// The bytes a data directory's files take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskUse {
    /// Every file under it: SQLite's database, its WAL and shared memory.
    pub total: u64,
    /// The write-ahead logs (`*-wal`) among them: SQLite reuses a WAL after each checkpoint
    /// without shrinking it, so a few MiB of it stay however little is stored.
    pub wal: u64,
}

pub fn disk_use(dir: &Path) -> DiskUse {
    let Ok(entries) = std::fs::read_dir(dir) else { return DiskUse::default() };
    let mut disk = DiskUse::default();
    for entry in entries.filter_map(Result::ok) {
        match entry.metadata() {
            Ok(meta) if meta.is_dir() => {
                let inner = disk_use(&entry.path());
                disk.total += inner.total;
                disk.wal += inner.wal;
            }
            Ok(meta) => {
                disk.total += meta.len();
                if entry.file_name().to_string_lossy().ends_with("-wal") {
                    disk.wal += meta.len();
                }
            }
            Err(_) => {}
        }
    }
    disk
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_bodies_are_read_with_and_without_a_store() {
        let durable = r#"{"status":"ok","rooms":3,"storage":{"rooms_stored":10000,"alarms":0}}"#;
        assert_eq!(parse(durable).unwrap(), Health { live: 3, stored: Some(10_000) });
        let transient = r#"{"status":"ok","rooms":7}"#;
        assert_eq!(parse(transient).unwrap(), Health { live: 7, stored: None });
        assert!(parse(r#"{"status":"ok"}"#).is_err());
    }

    #[test]
    fn a_directory_counts_its_files_and_subdirectories() {
        let dir = std::env::temp_dir().join(format!("loadgen-dir-bytes-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("a"), [0u8; 100]).unwrap();
        std::fs::write(dir.join("sub/b"), [0u8; 23]).unwrap();
        std::fs::write(dir.join("sub/rooms.sqlite3-wal"), [0u8; 7]).unwrap();
        assert_eq!(disk_use(&dir), DiskUse { total: 130, wal: 7 });
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(disk_use(&dir), DiskUse::default());
    }
}
