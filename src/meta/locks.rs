//! Per-block locks that order requests to the same block while its data moves
//! from the base into the image. Requests to other blocks, even in the same
//! chunk, never wait here. The holder may run on another thread than a
//! waiter: the image wraps its waits so that the release wakes the waiter's
//! ring (see `crate::io::wake`).

use crate::units::BlockIdx;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

const SHARDS: usize = 64;

pub struct BlockLocks {
    shards: Vec<Mutex<HashMap<u64, Vec<Waker>>>>,
}

impl Default for BlockLocks {
    fn default() -> Self {
        BlockLocks { shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect() }
    }
}

/// Held while a block is being copied; releases (and wakes waiters) on drop.
pub struct BlockGuard<'a> {
    locks: &'a BlockLocks,
    block: u64,
}

impl BlockLocks {
    fn shard(&self, b: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Vec<Waker>>> {
        self.shards[(b as usize) % SHARDS].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until no one else holds block `b`, then holds it.
    pub fn lock(&self, b: BlockIdx) -> impl Future<Output = BlockGuard<'_>> {
        LockFuture { locks: self, block: b.0 }
    }

    /// Number of blocks held (for tests).
    pub fn held(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map(|m| m.len()).unwrap_or(0)).sum()
    }
}

struct LockFuture<'a> {
    locks: &'a BlockLocks,
    block: u64,
}

impl<'a> Future for LockFuture<'a> {
    type Output = BlockGuard<'a>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<BlockGuard<'a>> {
        let mut m = self.locks.shard(self.block);
        match m.get_mut(&self.block) {
            Some(waiters) => {
                waiters.push(cx.waker().clone());
                Poll::Pending
            }
            None => {
                m.insert(self.block, Vec::new());
                Poll::Ready(BlockGuard { locks: self.locks, block: self.block })
            }
        }
    }
}

impl Drop for BlockGuard<'_> {
    fn drop(&mut self) {
        let waiters = self.locks.shard(self.block).remove(&self.block).unwrap_or_default();
        for w in waiters {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn second_locker_waits_for_the_first() {
        let locks = BlockLocks::default();
        let g = locks.lock(BlockIdx(7)).now_or_never().unwrap();
        assert!(locks.lock(BlockIdx(7)).now_or_never().is_none());
        assert!(locks.lock(BlockIdx(8)).now_or_never().is_some());
        drop(g);
        assert!(locks.lock(BlockIdx(7)).now_or_never().is_some());
        assert_eq!(locks.held(), 0);
    }
}
