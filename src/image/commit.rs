//! Making metadata durable: journal commits, checkpoints, header writes, close.
//!
//! Ordering, for every commit: take the merged updates (their data writes have
//! completed) → fdatasync the data → write the journal blocks → fdatasync. A
//! record is therefore never durable before the data it describes (crash rule 1).

use super::{Image, ImageError, JournalPos};
use crate::format::{self, journal, Header, META_BLOCK};
use crate::io::{self, IoEngine};
use crate::meta::Batch;
use std::sync::atomic::Ordering;

impl Image {
    pub(super) fn io_error(&self, what: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
        move |source| ImageError::Io { path: self.name(), what, offset, source }
    }

    /// The commit lock; its holder may run on another queue's thread.
    pub(crate) async fn journal_lock(&self) -> async_lock::MutexGuard<'_, JournalPos> {
        io::wake::CrossThread::new(self.journal.lock()).await
    }

    pub(crate) fn check_not_failed(&self) -> Result<(), ImageError> {
        if self.failed.load(Ordering::Acquire) {
            return Err(ImageError::Failed { path: self.name() });
        }
        Ok(())
    }

    /// Makes every write completed before the call durable, with the metadata
    /// that describes it. Concurrent flushes share one commit.
    pub async fn flush<E: IoEngine>(&self, e: &E) -> Result<(), ImageError> {
        if self.opts.read_only {
            return Ok(());
        }
        self.check_not_failed()?;
        let target = self.completed.load(Ordering::Acquire);
        let mut j = self.journal_lock().await;
        // Nothing new to cover; chunks still waiting to be freed (see
        // `release_freed`) are the one reason to commit anyway.
        if self.durable.load(Ordering::Acquire) >= target && target > 0 && !self.meta.persist.has_freed() {
            return Ok(());
        }
        let covered = self.completed.load(Ordering::Acquire);
        let r = self.commit_locked(e, &mut j).await;
        if r.is_err() {
            self.failed.store(true, Ordering::Release);
        } else {
            self.durable.fetch_max(covered, Ordering::AcqRel);
        }
        r
    }

    pub(crate) fn note_completed(&self) {
        self.completed.fetch_add(1, Ordering::AcqRel);
    }

    async fn sync_data<E: IoEngine>(&self, e: &E) -> Result<(), ImageError> {
        self.stats.data_syncs.fetch_add(1, Ordering::Relaxed);
        io::sync(e, self.storage.as_ref()).await.map_err(self.io_error("fdatasync", 0))
    }

    /// Journals the metadata of every completed request before returning:
    /// what a front end calls before completing a write when no volatile log
    /// covers a daemon crash. Does nothing when nothing is pending and no
    /// commit is under way.
    pub async fn journal_completed<E: IoEngine>(&self, e: &E) -> Result<(), ImageError> {
        if self.meta.persist.pending() > 0 || self.committing.load(Ordering::Acquire) {
            self.flush(e).await
        } else {
            Ok(())
        }
    }

    async fn commit_locked<E: IoEngine>(&self, e: &E, j: &mut JournalPos) -> Result<(), ImageError> {
        // Until this commit is durable, records it took are neither pending
        // nor journaled: `journal_completed` must wait for it.
        self.committing.store(true, Ordering::Release);
        let r = self.commit_inner(e, j).await;
        self.committing.store(false, Ordering::Release);
        r
    }

    async fn commit_inner<E: IoEngine>(&self, e: &E, j: &mut JournalPos) -> Result<(), ImageError> {
        // Through the volatile log: every update this commit makes durable reaches
        // the log first, so a replay of the log after the journal never brings
        // back a record older than one the journal holds.
        let batch = super::volatile::batch(self.volatile.as_ref(), &self.meta.persist)
            .map_err(self.io_error("volatile log append", 0))?;
        // Read before the data sync, which makes the zeroing below it durable.
        let mark = self.storage.initialised_end();
        if batch.records.is_empty() {
            self.sync_data(e).await?;
            self.persist_initialised_end(e, mark).await?;
            self.release_freed(e, batch).await;
            return Ok(());
        }
        let geo = &self.meta.geo;
        let capacity = j.shape.capacity(geo.journal_len);
        let need = journal::blocks_for(batch.records.len());
        if j.next + need > capacity {
            // The journal is full: write the whole persist view (which holds
            // these records' effects) as a checkpoint instead.
            return self.checkpoint_with(e, j, batch).await;
        }
        let seq = self.header_seq() + j.next;
        let bytes = io::AlignedBuf::from_slice(&j.shape.pack(&batch.records, seq));
        self.sync_data(e).await?;
        let off = geo.journal_offset + j.shape.offset(j.next);
        io::write_at(e, self.storage.as_ref(), &bytes, off).await.map_err(self.io_error("journal write", off))?;
        self.sync_data(e).await?;
        j.next += need;
        self.persist_initialised_end(e, mark).await?;
        self.stats.journal_commits.fetch_add(1, Ordering::Relaxed);
        self.stats.journal_records.fetch_add(batch.records.len() as u64, Ordering::Relaxed);
        let bits = batch.records.iter().filter(|r| matches!(r, format::Record::BitmapSet { .. })).count();
        self.stats.bitmap_records.fetch_add(bits as u64, Ordering::Relaxed);
        self.stats.journal_blocks.fetch_add(need, Ordering::Relaxed);
        self.release_freed(e, batch).await;
        Ok(())
    }

    /// A plain block device's initialised end (see [`crate::storage::device`]),
    /// read before a data sync, goes into the header when it grew: a flushed write
    /// past the old mark would otherwise read as zeros after a crash.
    async fn persist_initialised_end<E: IoEngine>(&self, e: &E, mark: Option<u64>) -> Result<(), ImageError> {
        match mark {
            Some(m) if m > self.header.lock().unwrap_or_else(|p| p.into_inner()).initialised_end => {
                self.write_header(e, |h| h.initialised_end = m).await
            }
            _ => Ok(()),
        }
    }

    /// Hands chunks whose free is durable back to the allocator, punched
    /// again first: a write that mapped the chunk before the discard may
    /// have landed after the discard's own punch, and the chunk's next owner
    /// must read zeros where it has not written. Chunks whose old guest chunk
    /// still has a request in flight (or whose punch failed) wait for the
    /// next commit.
    async fn release_freed<E: IoEngine>(&self, e: &E, batch: Batch) {
        if batch.freed.is_empty() {
            return;
        }
        let (idle, mut busy): (Vec<_>, Vec<_>) =
            batch.freed.into_iter().partition(|f| self.meta.inflight.is_idle(f.vchunk));
        let cb = self.meta.geo.chunk_bytes();
        for f in idle {
            let off = self.meta.chunk_offset(f.phys);
            match io::punch(e, self.storage.as_ref(), off, cb).await {
                Ok(()) => self.meta.alloc.release([f.phys]),
                Err(err) => {
                    let at = format!("{off:#x}");
                    tracing::warn!(offset = %at, error = %err, "punching a freed chunk failed; it stays unused");
                    busy.push(f);
                }
            }
        }
        if !busy.is_empty() {
            tracing::debug!(chunks = busy.len(), "freed chunks wait for requests in flight");
            self.meta.persist.carry_freed(busy);
        }
    }

    fn header_seq(&self) -> u64 {
        self.header.lock().unwrap_or_else(|p| p.into_inner()).journal_seq
    }

    /// Writes the whole persist view (table, bitmap) and starts a new journal.
    pub(crate) async fn checkpoint_locked<E: IoEngine>(&self, e: &E, j: &mut JournalPos) -> Result<(), ImageError> {
        self.checkpoint_with(e, j, Batch::default()).await
    }

    /// A checkpoint that also completes `carried`, a batch already taken.
    async fn checkpoint_with<E: IoEngine>(&self, e: &E, j: &mut JournalPos, carried: Batch) -> Result<(), ImageError> {
        let was = self.committing.swap(true, Ordering::AcqRel);
        let r = self.checkpoint_inner(e, j, carried).await;
        self.committing.store(was, Ordering::Release);
        r
    }

    async fn checkpoint_inner<E: IoEngine>(&self, e: &E, j: &mut JournalPos, carried: Batch) -> Result<(), ImageError> {
        // The snapshot, and the volatile log position it covers, in one step
        // (see `VolatileLog`): the log then holds every update the snapshot
        // does, and the truncation below drops only those.
        let (mut batch, snap, vlog_covered) = super::volatile::snapshot(self.volatile.as_ref(), &self.meta.persist)
            .map_err(self.io_error("volatile log append", 0))?;
        batch.freed.extend(carried.freed);
        let geo = &self.meta.geo;
        // Prefetch progress, read before the data sync that makes the copies
        // below it durable.
        let cursor = self.meta.prefetch_cursor.load(Ordering::Acquire);
        let prefetched = geo.base_blocks() > 0 && cursor >= geo.base_blocks();
        let mark = self.storage.initialised_end();
        self.sync_data(e).await?;
        let s = self.storage.as_ref();
        let twin = self.header.lock().unwrap_or_else(|p| p.into_inner()).has_twin();
        // With a twin: the copy that is not current is written and synced, the
        // header switches to it, then the other is brought up to date (see
        // `format::twin`); a current copy is never written.
        let mut twin_update = None;
        if twin {
            let stream = super::meta_copies::stream(geo, &snap.table, &snap.bitmap);
            let cur = self.header.lock().unwrap_or_else(|p| p.into_inner()).meta_copy;
            self.write_copy(e, 1 - cur, &stream).await?;
            twin_update = Some((cur, stream));
        } else {
            // Without a twin, the snapshot may hold updates the journal does not,
            // so a torn checkpoint must be safe on its own: the table goes first
            // and is made durable before any bit that relies on it (a new table
            // entry alone points at a chunk of zeros, which is what an
            // unallocated one reads).
            if geo.table_len > 0 {
                let t = io::AlignedBuf::from_slice(&format::encode_table(&snap.table, geo.table_len as usize));
                io::write_at(e, s, &t, geo.table_offset)
                    .await
                    .map_err(self.io_error("table write", geo.table_offset))?;
                if geo.bitmap_len > 0 {
                    self.sync_data(e).await?;
                }
            }
            if geo.bitmap_len > 0 {
                let b = io::AlignedBuf::from_slice(&format::encode_bitmap(&snap.bitmap, geo.bitmap_len as usize));
                io::write_at(e, s, &b, geo.bitmap_offset)
                    .await
                    .map_err(self.io_error("bitmap write", geo.bitmap_offset))?;
            }
        }
        self.sync_data(e).await?;
        // The new journal's sequence lies past every block the old one may have
        // left in the region, whether this writer wrote it or not (after a crash,
        // blocks a replay never reached, past a torn one): see the format docs.
        let next_seq = self.header_seq() + geo.journal_len / META_BLOCK;
        self.write_header(e, |h| {
            h.journal_seq = next_seq;
            // The new log is kept in two copies (see `INCOMPAT_JOURNAL_DUP`).
            h.incompat |= format::header::INCOMPAT_JOURNAL_DUP;
            h.prefetch_cursor = cursor;
            if let Some(m) = mark {
                h.initialised_end = h.initialised_end.max(m);
            }
            if prefetched {
                h.compat |= format::header::COMPAT_PREFETCHED;
            }
            if let Some((cur, stream)) = &twin_update {
                super::meta_copies::point_header_at(h, 1 - cur, stream);
            }
        })
        .await?;
        // The new log starts here, whatever happens to the twin below.
        j.next = 0;
        j.shape = journal::Shape::DUP;
        if let Some((cur, stream)) = &twin_update {
            self.write_copy(e, *cur, stream).await?;
            self.sync_data(e).await?;
        }
        if let (Some(v), Some(covered)) = (&self.volatile, vlog_covered) {
            v.drop_covered(covered);
        }
        if prefetched && !self.meta.all_present() {
            // Durable now: from here on the bitmap is neither read nor written.
            self.meta.all_present.store(true, Ordering::Release);
            tracing::info!(image = %self.name(), "the whole base is in the image; the base is no longer needed");
        }
        self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
        self.release_freed(e, batch).await;
        Ok(())
    }

    /// Writes `stream` (see `meta_copies::stream`) into copy `copy` of the
    /// table and bitmap; no sync.
    async fn write_copy<E: IoEngine>(&self, e: &E, copy: u32, stream: &[u8]) -> Result<(), ImageError> {
        for (off, r) in super::meta_copies::copy_writes(&self.meta.geo, copy, stream.len()) {
            let b = io::AlignedBuf::from_slice(&stream[r]);
            io::write_at(e, self.storage.as_ref(), &b, off).await.map_err(self.io_error("metadata write", off))?;
        }
        Ok(())
    }

    /// Writes a new header generation into the other slot, durably.
    pub(crate) async fn write_header<E: IoEngine>(
        &self,
        e: &E,
        change: impl FnOnce(&mut Header),
    ) -> Result<(), ImageError> {
        let mut h = self.header();
        change(&mut h);
        // This writer's journal blocks carry their commit positions (see
        // `INCOMPAT_JOURNAL_POS`); the header says so before the first of them.
        h.incompat |= format::header::INCOMPAT_JOURNAL_POS;
        h.generation += 1;
        let off = (h.generation % 2) * META_BLOCK;
        let bytes = io::AlignedBuf::from_slice(&h.encode());
        io::write_at(e, self.storage.as_ref(), &bytes, off).await.map_err(self.io_error("header write", off))?;
        self.sync_data(e).await?;
        *self.header.lock().unwrap_or_else(|p| p.into_inner()) = h;
        Ok(())
    }

    /// After a crash: chunks that no record names may hold data of writes whose
    /// records were lost; punch them so a later allocation starts from zeros.
    pub(crate) async fn wipe_unreferenced<E: IoEngine>(&self, e: &E) -> Result<(), ImageError> {
        if !self.meta.geo.has_table() {
            return Ok(());
        }
        let s = self.storage.as_ref();
        let cb = self.meta.geo.chunk_bytes();
        for p in self.meta.alloc.free_chunks() {
            let off = self.meta.chunk_offset(crate::units::PhysChunk(p));
            io::punch(e, s, off, cb).await.map_err(self.io_error("punch free chunk", off))?;
        }
        let end = self.meta.chunk_offset(crate::units::PhysChunk(self.meta.alloc.hwm()));
        if s.size() > end {
            io::punch(e, s, end, s.size() - end).await.map_err(self.io_error("punch past used chunks", end))?;
        }
        Ok(())
    }

    /// Marks the image dirty on storage before its first change, so that a
    /// crash from here on is recovered by replaying the journal.
    pub(crate) async fn ensure_dirty<E: IoEngine>(&self, e: &E) -> Result<(), ImageError> {
        if self.marked_dirty.load(Ordering::Acquire) {
            return Ok(());
        }
        let _j = self.journal_lock().await;
        if self.marked_dirty.load(Ordering::Acquire) {
            return Ok(());
        }
        self.write_header(e, |h| h.flags |= format::header::FLAG_DIRTY).await?;
        self.marked_dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Commits, checkpoints and marks the image clean.
    pub async fn close_async<E: IoEngine>(&self, e: &E) -> Result<(), ImageError> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        if !self.marked_dirty.load(Ordering::Acquire) {
            return Ok(()); // never changed: nothing to write
        }
        self.check_not_failed()?;
        let mut j = self.journal_lock().await;
        self.checkpoint_locked(e, &mut j).await?;
        self.write_header(e, |h| h.flags &= !format::header::FLAG_DIRTY).await
    }

    /// [`Image::close_async`] on a ring of its own.
    pub fn close(&self) -> Result<(), ImageError> {
        let ring = super::offline_ring(&self.name())?;
        ring.block_on(self.close_async(&ring)).map_err(self.io_error("close", 0))?
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if !self.closed.load(Ordering::Acquire) {
            if let Err(e) = self.close() {
                tracing::warn!(image = %self.name(), error = %e, "closing image failed; it will be recovered at next open");
            }
        }
    }
}
