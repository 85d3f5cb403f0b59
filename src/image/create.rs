//! Creating a new image.

use super::base::resolve;
use super::identity::BaseId;
use super::ImageError;
use crate::format::layout::CreateParams;
use crate::format::{BaseFormat, Geometry, Header, HEADER_AREA};
use crate::storage::{open_image_storage, FileStorage, OpenMode, Storage, StorageOptions};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size; defaults to the base's size.
    pub size: Option<u64>,
    pub base: Option<PathBuf>,
    pub block_size: u32,
    /// `None`: no table (raw layout).
    pub chunk_size: Option<u32>,
    pub journal_size: u64,
    /// Preset the bits of base blocks that are holes or all zeros, so they
    /// never need a copy or a bitmap update.
    pub zero_detect: bool,
    /// Serve with copy-on-read by default.
    pub copy_on_read: bool,
    /// Prefetch the base in the background by default.
    pub prefetch: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: None,
            base: None,
            block_size: 64 << 10,
            chunk_size: Some(1 << 20),
            journal_size: 16 << 20,
            zero_detect: true,
            copy_on_read: false,
            prefetch: false,
        }
    }
}

/// Detects whether a base is an FVD image or raw.
pub(crate) fn probe_base(path: &Path) -> Result<BaseFormat, ImageError> {
    let s = FileStorage::open(path, OpenMode::ReadOnly)?;
    let mut magic = [0u8; 8];
    if s.size() >= 8 {
        s.read_at(&mut magic, 0).map_err(|source| ImageError::Io {
            path: path.display().to_string(),
            what: "base probe",
            offset: 0,
            source,
        })?;
    }
    Ok(if magic == crate::format::header::MAGIC { BaseFormat::Fvd } else { BaseFormat::Raw })
}

/// Whether `path` is an existing block device (formatted in place, never
/// staged under another name).
pub fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).map(|m| m.file_type().is_block_device()).unwrap_or(false)
}

/// Where a new image file is made before it is put in place (see [`Staged`]).
pub fn temp_name(path: &Path) -> PathBuf {
    let mut n = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    n.push(".fvd-tmp");
    path.with_file_name(n)
}

/// A new image file made, durable, under its temporary name beside `path`
/// (a relative base resolves the same from both). [`Staged::publish`] puts
/// it in place; dropped unpublished, it is removed. A create killed part-way
/// leaves at most the temporary file, which the next create of the same name
/// removes: an image at `path` is always a whole one.
pub struct Staged {
    tmp: PathBuf,
    path: PathBuf,
    geo: Geometry,
    published: bool,
}

impl Staged {
    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }

    /// The temporary file, to open and fill before [`Staged::publish`].
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    /// Links the image into place (failing, with nothing changed, when
    /// something is there by now) and makes the folder entry durable.
    pub fn publish(mut self) -> Result<Geometry, ImageError> {
        let io = |what: &'static str, path: &Path| {
            let path = path.display().to_string();
            move |source| ImageError::Io { path, what, offset: 0, source }
        };
        // A link, not a rename: it never replaces what appeared at `path`
        // since the stage began.
        put_in_place(&self.tmp, &self.path).map_err(io("put in place", &self.path))?;
        self.published = true;
        Ok(self.geo.clone())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Puts the finished file `tmp` in place at `path`, never replacing what is
/// there (a link, then the temporary name goes; a rename, checked just
/// before, on a file system without links), and makes the folder entry
/// durable.
pub fn put_in_place(tmp: &Path, path: &Path) -> std::io::Result<()> {
    match std::fs::hard_link(tmp, path) {
        Ok(()) => {
            let _ = std::fs::remove_file(tmp);
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(e),
        Err(_) if std::fs::symlink_metadata(path).is_err() => std::fs::rename(tmp, path)?,
        Err(e) => return Err(e),
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all())
}

/// Makes the image file `path` under its temporary name (see [`Staged`]).
/// Fails, with nothing made, when `path` exists or its folder does not.
pub fn stage(path: &Path, opts: &CreateOptions) -> Result<Staged, ImageError> {
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(ImageError::Invalid { path: path.display().to_string(), why: "already exists".into() });
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(ImageError::Invalid {
            path: path.display().to_string(),
            why: format!("its folder {} does not exist", dir.display()),
        });
    }
    let tmp = temp_name(path);
    let _ = std::fs::remove_file(&tmp); // an interrupted earlier create's
    let geo = create_in_place(&tmp, path, opts)?;
    Ok(Staged { tmp, path: path.to_path_buf(), geo, published: false })
}

/// Creates an image file at `path` (made whole under a temporary name, then
/// put in place), or formats the block device at `path`.
///
/// An fvd base is frozen first (if it is not already): an overlay reads
/// through its base, so the base must never change again (a write to it
/// would change what the overlay reads without a word). A base that another
/// process holds open for writing is refused.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<Geometry, ImageError> {
    if is_block_device(path) {
        freeze_fvd_base(path, opts)?;
        return create_in_place(path, path, opts);
    }
    let staged = stage(path, opts)?;
    freeze_fvd_base(path, opts)?;
    staged.publish()
}

/// Freezes the fvd base named in `opts` (resolved against `image`), unless
/// it is frozen already; raw bases are left alone (their fingerprint is
/// checked at every open).
fn freeze_fvd_base(image: &Path, opts: &CreateOptions) -> Result<(), ImageError> {
    let Some(b) = &opts.base else { return Ok(()) };
    let p = resolve(image, &b.to_string_lossy());
    if probe_base(&p)? != BaseFormat::Fvd || super::snapshot::header_at(&p)?.is_frozen() {
        return Ok(());
    }
    super::snapshot::freeze_offline(&p)?;
    tracing::info!(base = %p.display(), "the fvd base is frozen: an overlay reads through it from now on");
    Ok(())
}

/// Creates an image at `path` (an existing block device, or a new file),
/// resolving a relative base against `image`'s folder.
fn create_in_place(path: &Path, image: &Path, opts: &CreateOptions) -> Result<Geometry, ImageError> {
    let (base_str, base_format, base_size, base_id) = match &opts.base {
        None => (String::new(), BaseFormat::None, 0, BaseId::default()),
        Some(b) => {
            let stored = b.to_string_lossy().to_string();
            let p = resolve(image, &stored);
            let fmt = probe_base(&p)?;
            let (size, id) = match fmt {
                BaseFormat::Fvd => {
                    let o = super::OpenOptions { read_only: true, ..Default::default() };
                    let img = super::Image::open(&p, &o)?;
                    (img.size(), BaseId { uuid: img.header().uuid, fingerprint: 0 })
                }
                _ => {
                    let s = FileStorage::open(&p, OpenMode::ReadOnly)?;
                    let fingerprint = super::identity::raw_fingerprint(&s).map_err(|source| ImageError::Io {
                        path: p.display().to_string(),
                        what: "base fingerprint",
                        offset: 0,
                        source,
                    })?;
                    (s.size(), BaseId { uuid: [0; 16], fingerprint })
                }
            };
            if size == 0 {
                return Err(ImageError::Invalid {
                    path: p.display().to_string(),
                    why: "is empty and cannot be a base".into(),
                });
            }
            (stored, fmt, size, id)
        }
    };
    let mode = if is_block_device(path) { OpenMode::ReadWrite } else { OpenMode::Create };
    let virtual_size = opts.size.unwrap_or(base_size.div_ceil(512) * 512);
    let params = CreateParams {
        virtual_size,
        block_size: opts.block_size,
        chunk_size: opts.chunk_size,
        base_size,
        journal_len: opts.journal_size,
    };
    let name = path.display().to_string();
    let geo = Geometry::new(&params).map_err(|source| ImageError::Layout { path: name.clone(), source })?;
    let storage = open_image_storage(path, &StorageOptions { format: true, ..StorageOptions::new(mode) })?;
    let compat = if opts.copy_on_read { crate::format::header::COMPAT_COPY_ON_READ } else { 0 }
        | if opts.prefetch { crate::format::header::COMPAT_PREFETCH } else { 0 };
    let preset = if opts.zero_detect && base_format != BaseFormat::None {
        let (words, zero) = super::zero_scan::zero_blocks(&resolve(image, &base_str), base_format, &geo)?;
        tracing::info!(zero_blocks = zero, of = geo.base_blocks(), "zero blocks of the base preset");
        Some(words)
    } else {
        None
    };
    let r = create_on_with(storage.as_ref(), &geo, &base_str, base_format, base_id, compat, preset.as_ref());
    if r.is_err() && mode == OpenMode::Create {
        let _ = std::fs::remove_file(path);
    }
    r.map(|_| geo)
}

/// Writes a fresh image with geometry `geo` onto `s`.
pub fn create_on(s: &dyn Storage, geo: &Geometry, base: &str, fmt: BaseFormat) -> Result<(), ImageError> {
    create_on_with(s, geo, base, fmt, BaseId::default(), 0, None)
}

/// [`create_on`] with compatible feature bits and a preset bitmap.
pub fn create_on_with(
    s: &dyn Storage,
    geo: &Geometry,
    base: &str,
    fmt: BaseFormat,
    base_id: BaseId,
    compat: u64,
    preset: Option<&crate::format::BitmapBits>,
) -> Result<(), ImageError> {
    let name = s.name().to_string();
    let io = |what: &'static str, offset: u64| {
        let name = name.clone();
        move |source| ImageError::Io { path: name, what, offset, source }
    };
    if base.len() > crate::format::header::MAX_BASE_PATH {
        return Err(ImageError::Invalid { path: name, why: "base path longer than 1024 bytes".into() });
    }
    let fresh = s.size() == 0;
    s.set_size_limit(geo.max_storage_size());
    s.ensure_size(geo.data_offset)?;
    // Zero the metadata regions of reused storage (a block device holds old
    // bytes); a new file is sparse zeros already and stays sparse.
    let zeros = vec![0u8; 1 << 20];
    if !fresh {
        // An old image's header goes first, durably: a create interrupted
        // part-way must not leave old headers over new, zeroed metadata.
        s.write_at(&zeros[..HEADER_AREA as usize], 0).map_err(io("header zeroing", 0))?;
        s.sync().map_err(io("fdatasync", 0))?;
    }
    let mut off = if fresh { geo.data_offset } else { HEADER_AREA };
    while off < geo.data_offset {
        let n = (geo.data_offset - off).min(zeros.len() as u64) as usize;
        s.write_at(&zeros[..n], off).map_err(io("metadata zeroing", off))?;
        off += n as u64;
    }
    let mut h: Header = geo.header(fmt, base);
    if let Some(bits) = preset {
        let b = crate::format::encode_bitmap(bits, geo.bitmap_len as usize);
        // Into both copies, and the checksums to match (see `format::twin`).
        for copy in if h.has_twin() { 0..2 } else { 0..1 } {
            let at = geo.copy_offsets(copy).1;
            s.write_at(&b, at).map_err(io("bitmap write", at))?;
        }
        let table = vec![0u32; geo.chunks() as usize];
        super::meta_copies::point_header_at(&mut h, 0, &super::meta_copies::stream(geo, &table, bits));
    }
    h.compat = compat;
    base_id.record(&mut h);
    // A random first sequence number: a stale journal left on reused storage
    // by an earlier image can never look like part of this one's log.
    h.journal_seq = rand::random::<u32>() as u64 + 1;
    h.generation = 1;
    // A plain block device: zeroed up to here by `ensure_size` above, no further.
    h.initialised_end = s.initialised_end().unwrap_or(0);
    let mut other = h.clone();
    other.generation = 0;
    s.write_at(&h.encode(), 4096).map_err(io("header write", 4096))?;
    s.write_at(&other.encode(), 0).map_err(io("header write", 0))?;
    s.sync().map_err(io("fdatasync", 0))?;
    Ok(())
}
