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
//! ```text
//! vlog := "FVDV" version:u32(1) st_dev:u64 st_ino:u64 session:u64 record*
//! record := (as in the journal) 13 bytes
//! ```

use crate::format::journal::RECORD_LEN;
use crate::format::Record;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

const MAGIC: &[u8; 4] = b"FVDV";
const HEADER_LEN: u64 = 32;
const TMPFS_MAGIC: i64 = 0x0102_1994;

pub struct VolatileLog {
    file: File,
    end: Mutex<u64>,
    /// Appends so far (a checkpoint truncates the log only if none came after
    /// its snapshot).
    pub appends: AtomicU64,
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

impl VolatileLog {
    /// Starts a fresh log for `image` at `log` (replacing an old one).
    pub fn create(log: &Path, image: &Path, session: u64) -> io::Result<VolatileLog> {
        let dir = log.parent().unwrap_or(Path::new("."));
        if !on_tmpfs(dir) {
            return Err(io::Error::other(format!("{} is not on tmpfs", dir.display())));
        }
        let (dev, ino) = identity(image)?;
        let file = OpenOptions::new().create(true).write(true).truncate(true).open(log)?;
        let mut h = Vec::with_capacity(HEADER_LEN as usize);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&1u32.to_le_bytes());
        h.extend_from_slice(&dev.to_le_bytes());
        h.extend_from_slice(&ino.to_le_bytes());
        h.extend_from_slice(&session.to_le_bytes());
        file.write_all_at(&h, 0)?;
        Ok(VolatileLog { file, end: Mutex::new(HEADER_LEN), appends: AtomicU64::new(0) })
    }

    /// Appends records (a memory copy into tmpfs: no I/O to wait for).
    pub fn append(&self, recs: &[Record]) -> io::Result<()> {
        if recs.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(recs.len() * RECORD_LEN);
        for r in recs {
            r.encode_into(&mut buf);
        }
        let mut end = self.end.lock().unwrap_or_else(|p| p.into_inner());
        self.file.write_all_at(&buf, *end)?;
        *end += buf.len() as u64;
        self.appends.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Drops every record if nothing was appended since `seen` appends: a
    /// checkpoint that covered them all has made them durable.
    pub fn truncate_if_unchanged(&self, seen: u64) {
        let mut end = self.end.lock().unwrap_or_else(|p| p.into_inner());
        if self.appends.load(Ordering::Acquire) == seen && self.file.set_len(HEADER_LEN).is_ok() {
            *end = HEADER_LEN;
        }
    }
}
