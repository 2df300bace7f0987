//! The free space new mail must leave on the SQLite store's file system
//! (`queue.min_free`). Below it, new messages are refused, so that the
//! commit marks and outcomes of the mail already accepted still find room:
//! a full disk would otherwise leave a delivered message `unknown`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::time::{Duration, Instant};

/// How long one reading of the free space stands, less what was accepted
/// since: a reading costs a system call, and a burst takes many messages
/// a millisecond.
const FRESH: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub(super) struct Reserve {
    dir: PathBuf,
    min: u64,
    /// The last reading: when, and the bytes free then.
    read: Mutex<Option<(Instant, u64)>>,
    /// Bytes accepted since that reading.
    since: AtomicU64,
    /// Whether the last message found no room, so that each change is
    /// logged once.
    short: AtomicBool,
}

/// The space a new message would leave is under the reserve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Short {
    pub free: u64,
    pub min: u64,
}

impl Reserve {
    /// The reserve of a store in the file `store`, or none when `min` is 0.
    pub(super) fn new(store: &Path, min: u64) -> Option<Reserve> {
        let dir = match store.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        (min > 0).then(|| Reserve {
            dir,
            min,
            read: Mutex::new(None),
            since: AtomicU64::new(0),
            short: AtomicBool::new(false),
        })
    }

    /// Takes `bytes` more if that leaves at least the reserve free.
    pub(super) fn take(&self, bytes: u64) -> Result<(), Short> {
        let free = self.free();
        let short = free.saturating_sub(bytes) < self.min;
        if self.short.swap(short, Ordering::Relaxed) != short {
            let (free_mib, min_mib) = (free >> 20, self.min >> 20);
            if short {
                tracing::warn!(dir = %self.dir.display(), free_mib, min_mib, "the queue's file system is under queue.min_free: new mail is refused");
            } else {
                tracing::warn!(dir = %self.dir.display(), free_mib, min_mib, "the queue's file system has room again: new mail is accepted");
            }
        }
        if short {
            return Err(Short {
                free,
                min: self.min,
            });
        }
        self.since.fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// The bytes free: the last reading, less what was taken since. A
    /// file system that cannot be read is not refused for it (its writes
    /// say whether there is room); it counts as having all it needs.
    pub(super) fn free(&self) -> u64 {
        let mut read = self.read.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if read.is_none_or(|(at, _)| now.duration_since(at) >= FRESH) {
            match available(&self.dir) {
                Ok(free) => {
                    *read = Some((now, free));
                    self.since.store(0, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::debug!(dir = %self.dir.display(), error = %e, "the queue's free space could not be read");
                    return u64::MAX;
                }
            }
        }
        let (_, free) = read.unwrap_or((now, u64::MAX));
        free.saturating_sub(self.since.load(Ordering::Relaxed))
    }

    pub(super) fn min(&self) -> u64 {
        self.min
    }
}

/// The bytes an unprivileged writer may still use on the file system of
/// `dir`.
fn available(dir: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A reserve of 8 MiB whose last reading, `ago`, found 10 MiB free.
    fn seeded(dir: &Path, ago: Duration) -> Reserve {
        let r = Reserve::new(&dir.join("queue.db"), 8 * MIB).unwrap();
        *r.read.lock().unwrap() = Some((Instant::now() - ago, 10 * MIB));
        r
    }

    #[test]
    fn takes_until_the_reserve_and_no_further() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Reserve::new(&dir.path().join("queue.db"), 0).is_none());
        let r = seeded(dir.path(), Duration::ZERO);
        assert_eq!(r.take(MIB), Ok(()));
        let short = r.take(MIB + MIB / 2).unwrap_err();
        assert_eq!(
            short,
            Short {
                free: 9 * MIB,
                min: 8 * MIB
            }
        );
        assert_eq!(r.take(MIB), Ok(()), "down to the reserve exactly");
        assert!(r.take(1).is_err());
    }

    #[test]
    fn a_stale_reading_is_taken_again() {
        let dir = tempfile::tempdir().unwrap();
        let r = seeded(dir.path(), FRESH * 2);
        r.since.store(10 * MIB, Ordering::Relaxed);
        let free = r.free();
        let now = available(dir.path()).unwrap();
        assert!(
            free > 0 && free.abs_diff(now) < 64 * MIB,
            "{free} against {now}"
        );
    }
}
