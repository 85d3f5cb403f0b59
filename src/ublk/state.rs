//! The run dir: one JSON file per device (`<dir>/<id>.json`) that `fvd list`,
//! `fvd stop`, `fvd recover` and the udev helper read, and the daemons' logs.
//!
//! The files are written whole and renamed into place, so a reader never sees
//! half a file. The dir is /run/fvd, or $FVD_RUN_DIR.

use super::DaemonError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct DeviceState {
    pub id: u32,
    /// The block device, /dev/ublkbN.
    pub device: String,
    /// The image, as an absolute path.
    pub image: PathBuf,
    pub base: Option<String>,
    pub virtual_size: u64,
    pub block_size: u32,
    pub logical_block_size: u32,
    pub queues: u16,
    pub depth: u16,
    pub read_only: bool,
    pub writethrough: bool,
    pub lazy_metadata: bool,
    /// The serving daemon.
    pub pid: i32,
    /// starting, live, stopping.
    pub state: String,
    /// How many times a new daemon took the device over.
    pub recoveries: u32,
    pub log: Option<PathBuf>,
    /// Periodic commit interval in milliseconds (0: only on flush).
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// Prefetch asked for at start, and its rate bound: `fvd recover` keeps them.
    #[serde(default)]
    pub prefetch: bool,
    #[serde(default)]
    pub prefetch_rate: Option<u64>,
    /// `--grow-unit`, kept for `fvd recover`.
    #[serde(default)]
    pub grow_unit: Option<u64>,
    /// Added by a user without CAP_SYS_ADMIN (no user recovery).
    #[serde(default)]
    pub unprivileged: bool,
    /// An online snapshot under way to this new top (see [`super::snapshot`]):
    /// `fvd recover` completes or rolls it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_pending: Option<PathBuf>,
    /// Online snapshots taken on this device.
    #[serde(default)]
    pub snapshots: u32,
    /// Served with zero copy (UBLK_F_AUTO_BUF_REG).
    #[serde(default)]
    pub zero_copy: bool,
    /// How long the last one held requests, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_snapshot_held_ms: Option<f64>,
}

fn default_commit_interval_ms() -> u64 {
    crate::image::DEFAULT_COMMIT_INTERVAL.as_millis() as u64
}

#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    pub fn new(root: impl Into<PathBuf>) -> RunDir {
        RunDir { root: root.into() }
    }

    /// /run/fvd, or $FVD_RUN_DIR (see [`crate::rundir`]).
    pub fn system() -> RunDir {
        RunDir::new(crate::rundir::path())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn state_path(&self, id: u32) -> PathBuf {
        self.root.join(format!("{id}.json"))
    }

    /// What the serving daemon publishes about itself (see [`crate::image::LiveStatus`]).
    pub fn live_path(&self, id: u32) -> PathBuf {
        self.root.join(format!("{id}.live.json"))
    }

    /// The daemon's control socket (see [`super::channel`]).
    pub fn socket_path(&self, id: u32) -> PathBuf {
        self.root.join(format!("{id}.sock"))
    }

    pub fn log_path(&self, id: u32) -> PathBuf {
        self.root.join(format!("{id}.log"))
    }

    /// The image's volatile log (see [`crate::image::volatile`]): named after
    /// the image file's identity, so that any later daemon for the same image
    /// (`fvd recover`, a new `fvd start`, `fvd stop` of a crashed device)
    /// finds what a dead one left there.
    pub fn volatile_log(&self, image: &Path) -> Option<PathBuf> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(image).ok()?;
        // In the run dir itself, not a folder of its own: an unprivileged
        // daemon can write where its state file goes.
        std::fs::create_dir_all(&self.root).ok()?;
        Some(self.root.join(format!("{:x}-{:x}.vlog", m.dev(), m.ino())))
    }

    fn err(&self, path: &Path) -> impl FnOnce(std::io::Error) -> DaemonError {
        let path = path.to_path_buf();
        move |source| DaemonError::State { path, source }
    }

    /// Fails with a hint unless this process can write the run dir (made
    /// if missing).
    pub fn check_writable(&self) -> Result<(), DaemonError> {
        let _ = std::fs::create_dir_all(&self.root);
        let w = nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK;
        nix::unistd::access(&self.root, w).map_err(|_| DaemonError::RunDirNotWritable(self.root.clone()))
    }

    pub fn create(&self) -> Result<(), DaemonError> {
        std::fs::create_dir_all(&self.root).map_err(self.err(&self.root))
    }

    pub fn write(&self, st: &DeviceState) -> Result<(), DaemonError> {
        // One key per line: the udev helper reads it with sed.
        self.replace(&self.state_path(st.id), st)
    }

    /// Writes `value` as pretty JSON to a temporary file and renames it over `path`.
    fn replace<T: Serialize>(&self, path: &Path, value: &T) -> Result<(), DaemonError> {
        self.create()?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = self.root.join(format!(".{name}.{}", std::process::id()));
        let text = serde_json::to_string_pretty(value).map_err(|e| DaemonError::Invalid(e.to_string()))?;
        std::fs::write(&tmp, text + "\n").map_err(self.err(&tmp))?;
        std::fs::rename(&tmp, path).map_err(self.err(path))
    }

    pub fn write_live(&self, id: u32, live: &crate::image::LiveStatus) -> Result<(), DaemonError> {
        self.replace(&self.live_path(id), live)
    }

    /// The daemon's last published status; None when there is none or it
    /// does not parse (an older daemon's, say).
    pub fn read_live(&self, id: u32) -> Option<crate::image::LiveStatus> {
        let text = std::fs::read_to_string(self.live_path(id)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Changes a device's file in place (read, change, write).
    pub fn update(&self, id: u32, change: impl FnOnce(&mut DeviceState)) -> Result<(), DaemonError> {
        if let Some(mut st) = self.read(id)? {
            change(&mut st);
            self.write(&st)?;
        }
        Ok(())
    }

    pub fn read(&self, id: u32) -> Result<Option<DeviceState>, DaemonError> {
        let path = self.state_path(id);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| DaemonError::Invalid(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err(&path)(e)),
        }
    }

    pub fn remove(&self, id: u32) -> Result<(), DaemonError> {
        let _ = std::fs::remove_file(self.live_path(id));
        let _ = std::fs::remove_file(self.socket_path(id));
        let path = self.state_path(id);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(self.err(&path)(e)),
            _ => Ok(()),
        }
    }

    /// Every device with a state file, by ID. Files that don't parse are
    /// skipped with a warning: one bad file must not hide the others.
    pub fn list(&self) -> Result<Vec<DeviceState>, DaemonError> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.err(&self.root)(e)),
        };
        let mut out = Vec::new();
        for ent in entries.flatten() {
            let name = ent.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")).and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            match self.read(id) {
                Ok(Some(st)) => out.push(st),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "skipping a device state file"),
            }
        }
        out.sort_by_key(|s| s.id);
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample(id: u32) -> DeviceState {
        DeviceState {
            id,
            device: format!("/dev/ublkb{id}"),
            image: PathBuf::from("/srv/disk.fvd"),
            base: Some("/srv/base.raw".into()),
            virtual_size: 1 << 30,
            block_size: 65536,
            logical_block_size: 512,
            queues: 2,
            depth: 128,
            read_only: false,
            writethrough: false,
            lazy_metadata: false,
            pid: 1234,
            state: "live".into(),
            recoveries: 0,
            log: None,
            commit_interval_ms: 5000,
            prefetch: false,
            prefetch_rate: None,
            grow_unit: None,
            unprivileged: false,
            snapshot_pending: None,
            snapshots: 0,
            zero_copy: false,
            last_snapshot_held_ms: None,
        }
    }

    /// A state file from before the commit interval and prefetch fields.
    #[test]
    fn older_state_files_still_parse() {
        let mut v = serde_json::to_value(sample(2)).unwrap();
        for k in ["commit-interval-ms", "prefetch", "prefetch-rate", "grow-unit", "unprivileged"] {
            v.as_object_mut().unwrap().remove(k);
        }
        let st: DeviceState = serde_json::from_value(v).unwrap();
        assert_eq!(st.commit_interval_ms, 5000);
        assert!(!st.prefetch);
    }

    #[test]
    fn write_read_list_remove() {
        let d = tempfile::tempdir().unwrap();
        let rd = RunDir::new(d.path().join("run"));
        assert!(rd.list().unwrap().is_empty());
        assert_eq!(rd.read(3).unwrap(), None);
        rd.write(&sample(3)).unwrap();
        rd.write(&sample(1)).unwrap();
        std::fs::write(rd.root().join("junk.json"), "x").unwrap();
        std::fs::write(rd.root().join("7.json"), "{").unwrap();
        let ids: Vec<u32> = rd.list().unwrap().iter().map(|s| s.id).collect();
        assert_eq!(ids, vec![1, 3]);
        rd.update(3, |s| s.state = "stopping".into()).unwrap();
        assert_eq!(rd.read(3).unwrap().unwrap().state, "stopping");
        let live = crate::image::LiveStatus {
            stats: Default::default(),
            pending_records: 2,
            records_per_write: 0.5,
            bitmap_records_per_write: 0.0,
            prefetch: None,
        };
        rd.write_live(3, &live).unwrap();
        assert_eq!(rd.read_live(3), Some(live));
        assert_eq!(rd.read_live(1), None);
        rd.remove(3).unwrap();
        assert_eq!(rd.read_live(3), None);
        rd.remove(3).unwrap();
        assert_eq!(rd.read(3).unwrap(), None);
    }

    /// The udev helper greps the image line out of the file.
    #[test]
    fn image_is_on_a_line_of_its_own() {
        let d = tempfile::tempdir().unwrap();
        let rd = RunDir::new(d.path());
        rd.write(&sample(0)).unwrap();
        let text = std::fs::read_to_string(rd.state_path(0)).unwrap();
        assert!(text.lines().any(|l| l == "  \"image\": \"/srv/disk.fvd\","), "{text}");
    }
}
