//! Online snapshots (`fvd snapshot -n ID NEW`): the daemon freezes the image
//! it serves and goes on with a new empty overlay over it, while the
//! applications see nothing but a pause.
//!
//! In order, each step durable before the next:
//! 1. the run dir records the snapshot as pending (`snapshot-pending`: NEW);
//! 2. the gate closes ([`super::gate`]): new requests are held, those in
//!    flight finish;
//! 3. the image is frozen ([`Image::freeze`]: every completed write durable,
//!    checkpoint, header clean and frozen in one write);
//! 4. NEW is created over it ([`create_overlay`]: under a temporary name,
//!    then renamed into place) and opened with the daemon's options (its
//!    chain holds the old top, read-only);
//! 5. the run dir names NEW as the image, nothing pending;
//! 6. every queue switches to NEW, the gate opens: the held requests run on NEW.
//!
//! A daemon killed part-way leaves `snapshot-pending` behind, and
//! [`resolve_pending`] (run by `fvd recover` and `fvd stop`) decides from the
//! old top's header alone: not frozen → roll back (the temporary overlay is
//! removed, the old top is served and its journal and volatile log replayed
//! as after any crash); frozen → complete (NEW is created if it is missing,
//! NEW is served). Held requests were never answered; the kernel hands them
//! to the new daemon, which carries them out on whichever top it serves.
//!
//! A failure before the switch gives the old top back: NEW is removed, the
//! old top is opened afresh from storage and thawed when the freeze got that
//! far, and the gate opens on it.

use super::gate::{Closed, DrainTimeout, Gate};
use super::state::{DeviceState, RunDir};
use super::DaemonError;
use crate::image::snapshot::{create_overlay, header_at, temp_name};
use crate::image::{Image, OpenOptions};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The longest the requests in flight may take to finish before a snapshot gives up.
pub(super) const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// Environment variable of the crash tests: `hold`, `freeze` or `create`
/// makes the daemon kill itself (SIGKILL) right after that step of an online
/// snapshot (the gate closed, the old top frozen, NEW in place).
pub const TEST_DIE_AFTER: &str = "FVD_TEST_SNAPSHOT_DIE_AFTER";

/// A snapshot taken.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct Taken {
    /// The old top, frozen: the point-in-time copy.
    pub frozen: PathBuf,
    /// The new top, served from now on.
    pub overlay: PathBuf,
    /// How long requests were held, in milliseconds.
    pub held_ms: f64,
    /// Of that, how long the requests in flight took to finish.
    pub drain_ms: f64,
    /// Online snapshots of this device so far.
    pub snapshots: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0}: already exists")]
    Exists(PathBuf),
    #[error("{0}: give an absolute path")]
    Relative(PathBuf),
    #[error("{0}: no such folder")]
    NoFolder(PathBuf),
    #[error("{0} is the image being served")]
    Same(PathBuf),
    #[error("the device is served read-only: there is nothing to snapshot")]
    ReadOnly,
    #[error("the daemon is stopping")]
    Stopping,
    #[error(
        "the device serves no image (an earlier snapshot failed and could not roll back); stop it and start it again"
    )]
    NoImage,
    #[error("{0}; nothing changed")]
    Drain(#[from] DrainTimeout),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error("{why}; rolled back: the device goes on with {image}")]
    RolledBack { why: String, image: PathBuf },
    #[error(
        "{why}; rolling back failed too ({rollback}): the device now fails requests, stop it and start {image} again"
    )]
    Broken { why: String, rollback: String, image: PathBuf },
}

/// Takes online snapshots of the image the gate serves.
pub struct Snapshotter {
    pub(super) gate: Arc<Gate<Image>>,
    pub(super) run_dir: RunDir,
    pub(super) id: u32,
    /// The daemon's options for opening a top (the volatile log is per image).
    open: OpenOptions,
    /// Taken while a snapshot (or an online resize) runs; true once the daemon stops.
    pub(super) stopping: Mutex<bool>,
}

impl Snapshotter {
    pub fn new(gate: Arc<Gate<Image>>, run_dir: RunDir, id: u32, open: OpenOptions) -> Snapshotter {
        Snapshotter { gate, run_dir, id, open, stopping: Mutex::new(false) }
    }

    /// Waits for a snapshot under way and refuses new ones: the daemon stops.
    pub fn stop(&self) {
        *self.stopping.lock().unwrap_or_else(|p| p.into_inner()) = true;
    }

    pub(super) fn options_for(&self, image: &Path) -> OpenOptions {
        OpenOptions { volatile_log: self.run_dir.volatile_log(image), ..self.open.clone() }
    }

    /// `fvd snapshot -n ID NEW`.
    pub fn take(&self, new: &Path) -> Result<Taken, SnapshotError> {
        let stopping = self.stopping.lock().unwrap_or_else(|p| p.into_inner());
        if *stopping {
            return Err(SnapshotError::Stopping);
        }
        let old_path = {
            let old = self.gate.current().ok_or(SnapshotError::NoImage)?;
            if old.read_only() {
                return Err(SnapshotError::ReadOnly);
            }
            old.path().to_path_buf()
        };
        let is_device = check_new(new, &old_path)?;
        self.run_dir.update(self.id, |s| s.snapshot_pending = Some(new.to_path_buf()))?;
        let mut closed = match self.gate.close(DRAIN_LIMIT) {
            Ok(c) => c,
            Err(e) => {
                self.clear_pending();
                return Err(e.into());
            }
        };
        let drained = closed.drained();
        test_hook("hold");
        tracing::info!(image = %old_path.display(), new = %new.display(), drain_ms = ms(drained), "online snapshot: requests held");
        let outcome = match self.switch(&mut closed, &old_path, new) {
            Ok(()) => Ok(()),
            Err(why) => Err((why.to_string(), self.roll_back(&mut closed, &old_path, new, is_device))),
        };
        let held = closed.open();
        match outcome {
            Ok(()) => {
                let mut count = 0;
                let r = self.run_dir.update(self.id, |s| {
                    s.snapshots += 1;
                    s.last_snapshot_held_ms = Some(ms(held));
                    count = s.snapshots;
                });
                if let Err(e) = r {
                    tracing::warn!(error = %e, "could not record the snapshot's pause");
                }
                tracing::info!(
                    frozen = %old_path.display(),
                    top = %new.display(),
                    held_ms = ms(held),
                    drain_ms = ms(drained),
                    snapshots = count,
                    "online snapshot taken; requests released"
                );
                // With requests flowing again: the frozen layer never allocates again.
                crate::image::slack::log_give_back(
                    &old_path,
                    crate::image::slack::give_back_at(&old_path, crate::storage::Slack::Frozen),
                );
                Ok(Taken {
                    frozen: old_path,
                    overlay: new.to_path_buf(),
                    held_ms: ms(held),
                    drain_ms: ms(drained),
                    snapshots: count,
                })
            }
            Err((why, Ok(()))) => {
                tracing::error!(error = %why, held_ms = ms(held), "online snapshot failed; rolled back to the old top");
                Err(SnapshotError::RolledBack { why, image: old_path })
            }
            Err((why, Err(rb))) => {
                tracing::error!(error = %why, rollback = %rb, "online snapshot failed, and so did the roll back");
                Err(SnapshotError::Broken { why, rollback: rb.to_string(), image: old_path })
            }
        }
    }

    /// Steps 3 to 5 (see the module docs), with the gate closed.
    fn switch(&self, closed: &mut Closed<'_, Image>, old_path: &Path, new: &Path) -> Result<(), DaemonError> {
        let ring = ring()?;
        let old = closed.current().ok_or_else(|| DaemonError::Invalid("no image is served".into()))?;
        ring.block_on(old.freeze(&ring)).map_err(sys("freezing the image"))??;
        test_hook("freeze");
        create_overlay(old_path, new, &old.header())?;
        test_hook("create");
        let img = Image::open(new, &self.options_for(new))?;
        let base = img.base().map(|b| b.name());
        self.run_dir.update(self.id, |s| {
            s.image = new.to_path_buf();
            s.base = base;
            s.snapshot_pending = None;
        })?;
        closed.switch(Some(Arc::new(img)));
        // Every request has left the old top and it is frozen: the last
        // reference goes here (its lock with it), and its volatile log, all
        // of it in the checkpoint, is of no more use.
        drop(old);
        if let Some(v) = self.run_dir.volatile_log(old_path) {
            let _ = std::fs::remove_file(v);
        }
        Ok(())
    }

    /// After a failed [`Snapshotter::switch`]: NEW goes, the old top is opened
    /// afresh from storage (thawed if the freeze got that far) and served.
    fn roll_back(
        &self,
        closed: &mut Closed<'_, Image>,
        old_path: &Path,
        new: &Path,
        is_device: bool,
    ) -> Result<(), DaemonError> {
        // Whatever state the failure left the old instance in, it goes: what
        // storage holds is what is known to be right.
        drop(closed.switch(None));
        if let Some(v) = self.run_dir.volatile_log(new) {
            let _ = std::fs::remove_file(v);
        }
        if !is_device {
            let _ = std::fs::remove_file(temp_name(new));
            let _ = std::fs::remove_file(new);
        }
        let img = Image::open(old_path, &OpenOptions { allow_frozen: true, ..self.options_for(old_path) })?;
        if img.header().is_frozen() {
            let ring = ring()?;
            ring.block_on(img.thaw(&ring)).map_err(sys("thawing the image"))??;
        }
        closed.switch(Some(Arc::new(img)));
        self.clear_pending();
        Ok(())
    }

    fn clear_pending(&self) {
        if let Err(e) = self.run_dir.update(self.id, |s| s.snapshot_pending = None) {
            tracing::warn!(error = %e, "could not clear the pending snapshot in the run dir");
        }
    }
}

pub(super) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

pub(super) fn ring() -> Result<crate::io::uring::Uring, DaemonError> {
    crate::io::uring::Uring::new(64).map_err(|source| DaemonError::Sys { what: "io_uring setup", source })
}

pub(super) fn sys(what: &'static str) -> impl FnOnce(std::io::Error) -> DaemonError {
    move |source| DaemonError::Sys { what, source }
}

/// NEW must be an absolute path in an existing folder, not exist yet (or be
/// a block device) and not be the image served. Returns whether it is a
/// block device (formatted in place, never removed).
fn check_new(new: &Path, old: &Path) -> Result<bool, SnapshotError> {
    use std::os::unix::fs::FileTypeExt;
    if !new.is_absolute() {
        return Err(SnapshotError::Relative(new.to_path_buf()));
    }
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    match std::fs::symlink_metadata(new) {
        Ok(m)
            if m.file_type().is_block_device()
                || std::fs::metadata(new).is_ok_and(|m| m.file_type().is_block_device()) =>
        {
            if canon(new) == canon(old) {
                return Err(SnapshotError::Same(new.to_path_buf()));
            }
            Ok(true)
        }
        Ok(_) => Err(SnapshotError::Exists(new.to_path_buf())),
        Err(_) => match new.parent() {
            Some(d) if d.is_dir() => Ok(false),
            _ => Err(SnapshotError::NoFolder(new.parent().unwrap_or(Path::new("/")).to_path_buf())),
        },
    }
}

/// The crash tests' hook (see [`TEST_DIE_AFTER`]).
fn test_hook(step: &str) {
    if std::env::var(TEST_DIE_AFTER).is_ok_and(|v| v == step) {
        tracing::warn!(step, "{TEST_DIE_AFTER}: the daemon kills itself (test hook)");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// What to do about an online snapshot its daemon did not finish (the state
/// names one pending): decided by the old top's header alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Nothing was pending.
    None,
    /// The old top was not frozen: it stays the image.
    RolledBack,
    /// The old top was frozen: NEW (created now if it was missing) is the image.
    Completed,
}

/// Completes or rolls back the online snapshot `st` records as pending (see
/// the module docs) and writes the state back. Run with no daemon serving
/// the device.
pub fn resolve_pending(rd: &RunDir, st: &mut DeviceState) -> Result<Resolution, DaemonError> {
    let Some(new) = st.snapshot_pending.clone() else { return Ok(Resolution::None) };
    let h = header_at(&st.image)?;
    let r = if h.is_frozen() {
        // NEW was checked not to exist before the snapshot was recorded, so
        // a file there is this snapshot's own, renamed into place whole.
        let is_device = std::fs::metadata(&new).map(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_block_device()
        });
        if is_device.is_err() || matches!(is_device, Ok(true)) {
            create_overlay(&st.image, &new, &h)?;
        }
        // Everything of the old top is in its checkpoint.
        if let Some(v) = rd.volatile_log(&st.image) {
            let _ = std::fs::remove_file(v);
        }
        tracing::info!(frozen = %st.image.display(), top = %new.display(), "the interrupted online snapshot is completed");
        st.base = Some(st.image.display().to_string());
        st.image = new;
        st.snapshots += 1;
        Resolution::Completed
    } else {
        let _ = std::fs::remove_file(temp_name(&new));
        tracing::info!(image = %st.image.display(), new = %new.display(), "the interrupted online snapshot is rolled back");
        Resolution::RolledBack
    };
    st.snapshot_pending = None;
    rd.write(st)?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{create, CreateOptions};
    use crate::io::uring::Uring;

    struct Rig {
        _dir: tempfile::TempDir,
        root: PathBuf,
        rd: RunDir,
        gate: Arc<Gate<Image>>,
        snap: Snapshotter,
        ring: Uring,
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let img = root.join("disk.fvd");
        let opts = CreateOptions {
            size: Some(8 << 20),
            block_size: 64 << 10,
            chunk_size: Some(1 << 20),
            journal_size: 1 << 20,
            ..Default::default()
        };
        create(&img, &opts).unwrap();
        let rd = RunDir::new(root.join("run"));
        rd.write(&DeviceState { image: img.clone(), ..super::super::state::tests::sample(0) }).unwrap();
        let gate = Arc::new(Gate::new(2, Arc::new(Image::open(&img, &OpenOptions::default()).unwrap())));
        let snap = Snapshotter::new(gate.clone(), rd.clone(), 0, OpenOptions::default());
        Rig { _dir: dir, root, rd, gate, snap, ring: Uring::new(64).unwrap() }
    }

    impl Rig {
        fn write(&self, off: u64, byte: u8, len: usize) {
            let buf = vec![byte; len];
            self.ring
                .block_on(async {
                    let p = self.gate.enter(0).await;
                    p.get().unwrap().write(&self.ring, off, &buf, false).await
                })
                .unwrap()
                .unwrap();
        }

        fn read(&self, off: u64, len: usize) -> Vec<u8> {
            let mut buf = vec![0; len];
            self.ring
                .block_on(async {
                    let p = self.gate.enter(1).await;
                    p.get().unwrap().read(&self.ring, off, &mut buf).await
                })
                .unwrap()
                .unwrap();
            buf
        }

        fn state(&self) -> DeviceState {
            self.rd.read(0).unwrap().unwrap()
        }
    }

    fn read_file(path: &Path, off: u64, len: usize) -> Vec<u8> {
        let img = Image::open(path, &OpenOptions { read_only: true, ..Default::default() }).unwrap();
        let ring = Uring::new(8).unwrap();
        let mut buf = vec![0; len];
        ring.block_on(img.read(&ring, off, &mut buf)).unwrap().unwrap();
        buf
    }

    /// The old top is frozen with what was written before; writes after go
    /// to NEW, which reads the old data through its chain; the run dir names
    /// NEW and counts the snapshot.
    #[test]
    fn snapshot_freezes_the_point_in_time_and_switches() {
        let r = rig();
        let old = r.root.join("disk.fvd");
        let new = r.root.join("s1.fvd");
        r.write(0, 0xaa, 128 << 10);
        let t = r.snap.take(&new).unwrap();
        assert_eq!((t.frozen.as_path(), t.overlay.as_path(), t.snapshots), (old.as_path(), new.as_path(), 1));
        assert!(t.held_ms >= t.drain_ms);
        let st = r.state();
        assert_eq!(st.image, new);
        assert_eq!(st.snapshot_pending, None);
        assert_eq!((st.snapshots, st.last_snapshot_held_ms), (1, Some(t.held_ms)));
        assert!(header_at(&old).unwrap().is_frozen());
        assert_eq!(r.gate.current().unwrap().path(), new);

        r.write(0, 0xbb, 4096);
        let back = r.read(0, 128 << 10);
        assert!(back[..4096].iter().all(|&b| b == 0xbb));
        assert!(back[4096..].iter().all(|&b| b == 0xaa));
        assert!(read_file(&old, 0, 128 << 10).iter().all(|&b| b == 0xaa));

        // A second one over the first.
        let t2 = r.snap.take(&r.root.join("s2.fvd")).unwrap();
        assert_eq!(t2.snapshots, 2);
        r.write(8192, 0xcc, 4096);
        let back = r.read(0, 3 * 4096);
        assert_eq!((back[0], back[4096], back[8192]), (0xbb, 0xaa, 0xcc));
        assert_eq!(read_file(&new, 0, 3 * 4096)[8192], 0xaa);
        r.gate.current().unwrap().close().unwrap();
    }

    /// Refusals change nothing: the device keeps serving the old top, writable.
    #[test]
    fn refused_snapshots_leave_the_top_writable() {
        let r = rig();
        let old = r.root.join("disk.fvd");
        std::fs::write(r.root.join("there"), b"x").unwrap();
        assert!(matches!(r.snap.take(&r.root.join("there")), Err(SnapshotError::Exists(_))));
        assert!(matches!(r.snap.take(Path::new("rel.fvd")), Err(SnapshotError::Relative(_))));
        assert!(matches!(r.snap.take(&r.root.join("no/such/x.fvd")), Err(SnapshotError::NoFolder(_))));
        r.write(0, 0x11, 4096);
        assert_eq!(r.read(0, 4096)[0], 0x11);
        assert_eq!(r.state().image, old);
        assert_eq!(r.state().snapshot_pending, None);
        assert!(!header_at(&old).unwrap().is_frozen());
        r.snap.stop();
        assert!(matches!(r.snap.take(&r.root.join("s.fvd")), Err(SnapshotError::Stopping)));
        r.gate.current().unwrap().close().unwrap();
    }

    /// A failure after the freeze: the old top is opened afresh, thawed, and
    /// served writable; NEW is gone.
    #[test]
    fn roll_back_after_the_freeze_thaws_the_old_top() {
        let r = rig();
        let old = r.root.join("disk.fvd");
        let new = r.root.join("s1.fvd");
        r.write(0, 0x22, 4096);
        {
            let mut closed = r.gate.close(DRAIN_LIMIT).unwrap();
            let img = closed.current().unwrap();
            r.ring.block_on(img.freeze(&r.ring)).unwrap().unwrap();
            create_overlay(&old, &new, &img.header()).unwrap();
            drop(img);
            r.snap.roll_back(&mut closed, &old, &new, false).unwrap();
        }
        assert!(!new.exists());
        assert!(!header_at(&old).unwrap().is_frozen());
        r.write(4096, 0x33, 4096);
        let back = r.read(0, 8192);
        assert_eq!((back[0], back[4096]), (0x22, 0x33));
        r.gate.current().unwrap().close().unwrap();
    }

    /// After a daemon died mid-snapshot: old top not frozen → roll back (the
    /// temporary overlay goes); frozen → complete (NEW made if missing).
    #[test]
    fn pending_snapshots_are_rolled_back_or_completed() {
        let r = rig();
        let old = r.root.join("disk.fvd");
        let new = r.root.join("s1.fvd");
        r.write(0, 0x44, 4096);
        let mut st = DeviceState { snapshot_pending: Some(new.clone()), ..r.state() };
        std::fs::write(temp_name(&new), b"half").unwrap();
        assert_eq!(resolve_pending(&r.rd, &mut st).unwrap(), Resolution::RolledBack);
        assert!(!temp_name(&new).exists() && !new.exists());
        assert_eq!((st.image.as_path(), st.snapshot_pending.as_ref()), (old.as_path(), None));
        assert_eq!(r.state(), st);
        assert_eq!(resolve_pending(&r.rd, &mut st).unwrap(), Resolution::None);

        // Frozen, no overlay yet.
        let img = r.gate.current().unwrap();
        r.ring.block_on(img.freeze(&r.ring)).unwrap().unwrap();
        drop(img);
        let mut st = DeviceState { snapshot_pending: Some(new.clone()), ..r.state() };
        assert_eq!(resolve_pending(&r.rd, &mut st).unwrap(), Resolution::Completed);
        assert_eq!((st.image.as_path(), st.snapshot_pending.as_ref(), st.snapshots), (new.as_path(), None, 1));
        assert_eq!(r.state(), st);
        assert_eq!(read_file(&new, 0, 4096)[0], 0x44);
        let top = Image::open(&new, &OpenOptions::default()).unwrap();
        top.close().unwrap();
    }
}
