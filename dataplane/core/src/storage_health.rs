//! Storage health: free space on the filesystems the node writes to, and whether the store
//! still accepts writes. Sends, uploads, `/readyz` and `/healthz` ask it.
//!
//! - Free space is sampled every [`SAMPLE_INTERVAL`] (statvfs, never per request) for the
//!   embedded store's directory and the local media directory (none for FoundationDB or an S3
//!   bucket: then nothing is refused for space).
//! - Two watermarks, so the store itself never runs out of space: below
//!   `--media-min-free-disk` on the media filesystem uploads are refused; below the lower
//!   `--min-free-disk` on the store's filesystem sends are refused and `/readyz` fails. Both
//!   answer `unavailable` (retry later, or on another node); everything lifts when space
//!   returns. Acks, receipts and membership changes still write: the margin is for them.
//! - A store that halted after a failed write (the embedded engine on a full disk or an I/O
//!   error) accepts nothing until the process restarts: `/readyz` and `/healthz` fail at once,
//!   so the supervisor restarts it. Nothing answered `sent` is lost: it was fsynced, and the
//!   journal is replayed on start.
//!
//! Failure policy: a failed sample is logged and the last one kept (before the first one,
//! space counts as plenty). The sampling loop is owned by the node's [`BackgroundLoops`]; if it
//! panics it is restarted (it keeps no state of its own: the next sample replaces the last).

use crate::error::ApiError;
use crate::loops::BackgroundLoops;
use courier_store::MessageStore;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Time between samples of free space.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// What clients refused for space are told to wait before retrying.
const RETRY_AFTER_MS: u64 = 5000;

/// One filesystem the node writes to, with its watermark.
struct Watched {
    dir: PathBuf,
    min_free: u64,
    free: AtomicU64,
}

impl Watched {
    fn new(dir: Option<PathBuf>, min_free: u64) -> Option<Self> {
        Some(Self {
            dir: dir?,
            min_free,
            free: AtomicU64::new(u64::MAX),
        })
    }

    fn sample(&self) {
        match free_bytes(&self.dir) {
            Ok(free) => self.free.store(free, Ordering::Relaxed),
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read free disk space")
            }
        }
    }

    fn low(&self) -> bool {
        self.free.load(Ordering::Relaxed) < self.min_free
    }
}

/// Bytes an unprivileged writer may still use on the filesystem of `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(dir)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

pub struct StorageHealth {
    store: MessageStore,
    /// The embedded store's filesystem (`--min-free-disk`).
    store_disk: Option<Watched>,
    /// The local media directory's filesystem (`--media-min-free-disk`).
    media_disk: Option<Watched>,
}

impl StorageHealth {
    /// Watches `store_dir` (the embedded store's directory) and `media_dir` (local media),
    /// each `None` when not on a local disk. Nothing is sampled before [`StorageHealth::start`].
    pub fn new(
        store: MessageStore,
        store_dir: Option<PathBuf>,
        min_free: u64,
        media_dir: Option<PathBuf>,
        media_min_free: u64,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            store_disk: Watched::new(store_dir, min_free),
            media_disk: Watched::new(media_dir, media_min_free),
        })
    }

    /// Samples free space now (once the directories exist), before the node says it is ready,
    /// and every [`SAMPLE_INTERVAL`] until `loops` shuts down: sampled first by the loop, a
    /// node on a nearly full disk answered ready and took sends until the loop ran.
    pub fn start(self: &Arc<Self>, loops: &BackgroundLoops) {
        self.sample();
        let health = self.clone();
        loops.spawn("storage free-space watch", move |cancel| {
            let health = health.clone();
            async move {
                let sample = async {
                    let start = tokio::time::Instant::now() + SAMPLE_INTERVAL;
                    let mut tick = tokio::time::interval_at(start, SAMPLE_INTERVAL);
                    loop {
                        tick.tick().await;
                        health.sample();
                    }
                };
                cancel.run_until_cancelled(sample).await;
            }
        });
    }

    fn sample(&self) {
        self.store_disk
            .iter()
            .chain(&self.media_disk)
            .for_each(Watched::sample);
    }

    fn halted(&self) -> Result<(), ApiError> {
        match self.store.halted() {
            Some(_) => Err(ApiError::unavailable(
                "storage is unavailable; retry",
                RETRY_AFTER_MS,
            )),
            None => Ok(()),
        }
    }

    /// Whether a new message may be stored.
    pub fn check_send(&self) -> Result<(), ApiError> {
        self.halted()?;
        if self.store_disk.as_ref().is_some_and(Watched::low) {
            return Err(ApiError::unavailable(
                "the server is low on disk space; retry later",
                RETRY_AFTER_MS,
            ));
        }
        Ok(())
    }

    /// Whether a new upload may be stored.
    pub fn check_upload(&self) -> Result<(), ApiError> {
        self.halted()?;
        if self.media_disk.as_ref().is_some_and(Watched::low) {
            return Err(ApiError::unavailable(
                "the server is low on disk space for media; retry later",
                RETRY_AFTER_MS,
            ));
        }
        Ok(())
    }

    /// Ready for traffic: the store accepts writes and sends are not refused for space.
    pub fn ready(&self) -> bool {
        self.check_send().is_ok()
    }

    /// Alive: the store has not halted (else only a restart helps).
    pub fn alive(&self) -> bool {
        self.store.halted().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_store::embedded::EmbeddedEngine;

    /// The node says it is ready once its roles have started: a disk already below the
    /// watermark refuses sends from then on, not from the loop's first turn.
    #[tokio::test]
    async fn a_disk_below_the_watermark_refuses_sends_as_soon_as_the_watch_starts() {
        let dir = tempfile::tempdir().unwrap();
        let kv = Arc::new(EmbeddedEngine::open(&dir.path().join("s")).unwrap());
        let store = MessageStore::open(kv, b"", 4).await.unwrap();
        let health = StorageHealth::new(store, Some(dir.path().into()), u64::MAX, None, 0);
        assert!(health.check_send().is_ok(), "nothing sampled yet");

        let loops = BackgroundLoops::new();
        health.start(&loops);
        assert!(health.check_send().is_err());
    }
}
