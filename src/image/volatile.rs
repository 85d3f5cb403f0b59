//! The volatile log: every metadata update, appended as it happens to a file
//! in a RAM file system (tmpfs, normally under /run), never synced.
//!
//! It serves one case: the daemon dies (kill -9, a crash) while the machine
//! keeps running. The guest's kernel still believes every completed write,
//! and with ublk user recovery it keeps using the device. Those writes' data
//! is in the host's page cache or on disk, but metadata updates not yet
//! journaled died with the process. The new daemon replays the durable
//! journal and then this log, and nothing completed is lost — without the
//! daemon ever syncing metadata the guest did not ask for.
//!
//! After a power loss the RAM file system is empty, so the log cannot make a
//! record durable before its data (crash rule 1 is untouched). The log is
//! used only when its file system is tmpfs.
//!
//! The log names the writer session stamped in the image's header before the
//! session's first change. Anyone else who changes or recovers the image
//! stamps another session, so a log left behind by a dead daemon can never be
//! replayed over changes made after it.
//!
//! A checkpoint drops the records its snapshot holds once it is durable, and
//! keeps the ones made after it. [`VolatileLog`] gives the rules that keep the
//! file in the order the updates were made, whatever the threads do.
//!
//! ```text
//! vlog := "FVDV" version:u32(1) st_dev:u64 st_ino:u64 session:u64 record*
//! record := (as in the journal) 13 bytes
//! ```

use crate::format::journal::RECORD_LEN;
use crate::format::Record;
use crate::meta::{Batch, Persist, Snapshot};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

const MAGIC: &[u8; 4] = b"FVDV";
const HEADER_LEN: u64 = 32;
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// The log of one writer session.
///
/// Two rules keep a replay right, whatever the threads do:
///
/// - **The file holds the updates in the order they were made.** The persist
///   view queues every update under its own lock, in the order it makes them
///   (the order of the live table, see [`Persist::install`]). Records leave
///   that queue only while this log's lock is held, and are written before
///   it is let go: whoever takes records first writes them first, and the
///   queue is taken from its front. A free and a reallocation of the same
///   chunk reach the file in the order they were made. And when a request's
///   [`VolatileLog::sync`] returns, every update made before the call is in
///   the file, whichever request took it.
/// - **The log never lacks an update a checkpoint holds, and a checkpoint
///   drops only what it holds.** Records are numbered as they are written.
///   [`snapshot`] takes the checkpoint's snapshot and the updates not yet
///   written in one step of the persist view, and writes them before letting
///   go of the log: every record numbered below the number it returns was
///   made before the snapshot, every later one after it.
///   [`VolatileLog::drop_covered`] drops exactly those below, once the
///   checkpoint is durable.
///
/// The lock order is this log, then the persist view (which never calls out).
pub struct VolatileLog {
    path: PathBuf,
    /// The header the file starts with (also a compacted one).
    header: Vec<u8>,
    state: Mutex<State>,
    /// The persist view's update count (`Persist::updates`) that the file
    /// holds every update up to: read under this log's lock before taking
    /// the records, stored once they are written.
    covered: std::sync::atomic::AtomicU64,
}

struct State {
    file: File,
    /// Records written since the log was created: the next one's number.
    written: u64,
    /// The number of the first record the file holds (a checkpoint dropped
    /// the ones before it).
    first: u64,
}

impl State {
    /// Where the next record goes.
    fn end(&self) -> u64 {
        HEADER_LEN + (self.written - self.first) * RECORD_LEN as u64
    }

    /// Appends records (a memory copy into tmpfs: no I/O to wait for).
    fn append(&mut self, recs: &[Record]) -> io::Result<()> {
        if recs.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(recs.len() * RECORD_LEN);
        for r in recs {
            r.encode_into(&mut buf);
        }
        self.file.write_all_at(&buf, self.end())?;
        self.written += recs.len() as u64;
        Ok(())
    }

    /// Appends records taken from `persist`, or gives them back to the front
    /// of its queue when the write fails: the next call writes them, still in
    /// order (no one took records in between: this log's lock is held).
    fn append_or_give_back(&mut self, persist: &Persist, recs: Vec<Record>) -> io::Result<()> {
        let r = self.append(&recs);
        if r.is_err() {
            persist.give_back_volatile(recs);
        }
        r
    }
}

fn identity(image: &Path) -> io::Result<(u64, u64)> {
    let m = std::fs::metadata(image)?;
    Ok((m.dev(), m.ino()))
}

/// Whether `dir` is on tmpfs.
// f_type is i64 on x86_64 but narrower elsewhere: the cast is for those.
#[allow(clippy::unnecessary_cast)]
pub fn on_tmpfs(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir).map(|s| s.filesystem_type().0 as i64 == TMPFS_MAGIC).unwrap_or(false)
}

/// Reads the records a previous daemon left for `image` in session
/// `session`, if the log is there and belongs to both. Stops at a torn tail.
pub fn read(log: &Path, image: &Path, session: u64) -> Vec<Record> {
    if session == 0 {
        return Vec::new();
    }
    let Ok(bytes) = std::fs::read(log) else { return Vec::new() };
    let Ok((dev, ino)) = identity(image) else { return Vec::new() };
    if bytes.len() < HEADER_LEN as usize || &bytes[0..4] != MAGIC {
        return Vec::new();
    }
    let le = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap_or([0; 8]));
    if le(8) != dev || le(16) != ino {
        tracing::warn!(log = %log.display(), "volatile log belongs to another image: ignored");
        return Vec::new();
    }
    if le(24) != session {
        tracing::info!(log = %log.display(), "volatile log of an older session: ignored");
        return Vec::new();
    }
    bytes[HEADER_LEN as usize..]
        .chunks_exact(RECORD_LEN)
        .enumerate()
        .map_while(|(i, r)| Record::decode(r, i * RECORD_LEN).ok())
        .collect()
}

/// A file at `path` holding `header` alone.
fn new_file(path: &Path, header: &[u8]) -> io::Result<File> {
    let file = OpenOptions::new().create(true).read(true).write(true).truncate(true).open(path)?;
    file.write_all_at(header, 0)?;
    Ok(file)
}

/// Takes the persist view's batch and snapshot for a checkpoint and, with a
/// log, every update made before the snapshot into the log, in one step (see
/// [`VolatileLog`]). Returns the log position the snapshot covers: hand it to
/// [`VolatileLog::drop_covered`] once the checkpoint is durable. An error (the
/// log could not be written) must fail the checkpoint: a durable snapshot
/// holding updates the log lacks would be undone by the log's older ones.
pub fn snapshot(log: Option<&VolatileLog>, persist: &Persist) -> io::Result<(Batch, Snapshot, Option<u64>)> {
    let Some(log) = log else {
        let (batch, snap) = persist.take_snapshot();
        return Ok((batch, snap, None));
    };
    let mut st = log.lock();
    let (batch, snap, recs) = persist.take_snapshot_and_volatile();
    st.append_or_give_back(persist, recs)?;
    Ok((batch, snap, Some(st.written)))
}

/// Takes the persist view's batch for a journal commit and, with a log,
/// every update it covers into the log first, in one step: a commit never
/// makes an update durable that the log lacks (a log replayed after the
/// journal must not hold an older update of a chunk without the newer one).
pub fn batch(log: Option<&VolatileLog>, persist: &Persist) -> io::Result<Batch> {
    let Some(log) = log else { return Ok(persist.take_batch()) };
    let mut st = log.lock();
    let (batch, recs) = persist.take_batch_and_volatile();
    st.append_or_give_back(persist, recs)?;
    Ok(batch)
}

impl VolatileLog {
    /// Starts a fresh log for `image` at `log` (replacing an old one).
    pub fn create(log: &Path, image: &Path, session: u64) -> io::Result<VolatileLog> {
        let dir = log.parent().unwrap_or(Path::new("."));
        if !on_tmpfs(dir) {
            return Err(io::Error::other(format!("{} is not on tmpfs", dir.display())));
        }
        let (dev, ino) = identity(image)?;
        let mut header = Vec::with_capacity(HEADER_LEN as usize);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&1u32.to_le_bytes());
        header.extend_from_slice(&dev.to_le_bytes());
        header.extend_from_slice(&ino.to_le_bytes());
        header.extend_from_slice(&session.to_le_bytes());
        let file = new_file(log, &header)?;
        let v = VolatileLog {
            path: log.to_path_buf(),
            header,
            state: Mutex::new(State { file, written: 0, first: 0 }),
            covered: std::sync::atomic::AtomicU64::new(0),
        };
        let _ = std::fs::remove_file(v.compact_path()); // left by a daemon that died compacting
        Ok(v)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn compact_path(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(".new");
        p.into()
    }

    /// Writes every update the persist view made so far into the log: when
    /// this returns, the updates of the caller's request are in the file,
    /// after every update made before them.
    pub fn sync(&self, persist: &Persist) -> io::Result<()> {
        let mut st = self.lock();
        // Every update counted by now has taken the persist view's lock, so
        // the take below (which waits for that lock) finds its record, or a
        // take before it did, which wrote it under this log's lock.
        let n = persist.updates();
        let recs = persist.take_volatile();
        st.append_or_give_back(persist, recs)?;
        self.covered.fetch_max(n, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Whether the file holds every update the persist view made so far (no
    /// lock: what a request that made no update of its own checks before
    /// it completes). An update a request saw the effect of is counted in
    /// what this reads (`Persist::count_update`), so true means its record
    /// is written; false sends the caller to [`VolatileLog::sync`].
    pub fn covers(&self, persist: &Persist) -> bool {
        persist.updates() <= self.covered.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Drops the records numbered below `covered` (as [`snapshot`] returned
    /// it), which a durable checkpoint holds. Records after them stay: they
    /// go into a new file renamed over the log, so a crash leaves either the
    /// old log or the new one, and both replay right over the checkpoint.
    /// A failure leaves the log as it was (only longer than needed).
    pub fn drop_covered(&self, covered: u64) {
        let mut st = self.lock();
        if covered <= st.first {
            return;
        }
        let r = if covered >= st.written {
            st.file.set_len(HEADER_LEN).map(|()| st.first = st.written)
        } else {
            self.keep_from(&mut st, covered)
        };
        if let Err(e) = r {
            tracing::warn!(log = %self.path.display(), error = %e, "dropping checkpointed records from the volatile log failed; it keeps them");
        }
    }

    /// Rewrites the log with the records from number `from` on.
    fn keep_from(&self, st: &mut State, from: u64) -> io::Result<()> {
        let off = HEADER_LEN + (from - st.first) * RECORD_LEN as u64;
        let mut keep = vec![0; (st.end() - off) as usize];
        st.file.read_exact_at(&mut keep, off)?;
        let tmp = self.compact_path();
        let file = new_file(&tmp, &self.header)?;
        file.write_all_at(&keep, HEADER_LEN)?;
        std::fs::rename(&tmp, &self.path)?;
        st.file = file;
        st.first = from;
        Ok(())
    }

    /// Records written since the log was created.
    pub fn written(&self) -> u64 {
        self.lock().written
    }
}
