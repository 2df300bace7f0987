//! A count of work in progress that can be awaited down to zero: the
//! dispatcher's sends in flight and the queue's delivery rounds, both of
//! which shutdown waits for.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub(crate) struct Tally {
    count: AtomicUsize,
    idle: Notify,
}

/// Counts one piece of work for as long as it lives.
pub(crate) struct Counted<'a>(&'a Tally);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Tally {
    pub(crate) fn enter(&self) -> Counted<'_> {
        self.count.fetch_add(1, Ordering::AcqRel);
        Counted(self)
    }

    pub(crate) fn get(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Resolves once the count is zero.
    pub(crate) async fn idle(&self) {
        loop {
            let idle = self.idle.notified();
            if self.get() == 0 {
                return;
            }
            idle.await;
        }
    }
}
