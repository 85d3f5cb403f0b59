//! Snapshots as separate overlay files: the image is frozen as the point-in-time
//! copy, and a new empty overlay over it becomes the live disk.
//!
//! Order, so that a crash at any point leaves a state the same command completes:
//! 1. the image is closed cleanly and its header marked frozen (one header
//!    write: before it the image is the live disk, after it a snapshot layer);
//! 2. the overlay is created under a temporary name beside its final one, made
//!    durable, and renamed into place (a block device is formatted in place).
//!
//! A crash between 1 and 2 leaves a frozen image and no overlay: running the
//! snapshot again skips step 1 (a frozen image may have any number of overlays).

use super::{create, CreateOptions, Image, ImageError, OpenOptions};
use crate::format::Header;
use crate::io::IoEngine;
use std::path::{Path, PathBuf};

impl Image {
    /// Makes every completed write durable, checkpoints, and writes the header
    /// clean and frozen. The image takes no more writes.
    pub async fn freeze<E: IoEngine>(&self, e: &E) -> Result<(), ImageError> {
        if self.read_only() {
            return Err(ImageError::ReadOnly { path: self.name() });
        }
        self.check_not_failed()?;
        self.close_async(e).await?;
        self.write_header(e, |h| {
            h.flags &= !crate::format::header::FLAG_DIRTY;
            h.flags |= crate::format::header::FLAG_FROZEN;
        })
        .await
    }
}

/// The base path to store in `new` for `image`: the file name when both are in
/// one folder (the pair can move together), else the absolute path.
pub fn base_reference(image: &Path, new: &Path) -> PathBuf {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let img = canon(image);
    let new_dir =
        new.parent().filter(|d| !d.as_os_str().is_empty()).map(canon).unwrap_or_else(|| canon(Path::new(".")));
    match (img.parent(), img.file_name()) {
        (Some(d), Some(name)) if d == new_dir => PathBuf::from(name),
        _ => img,
    }
}

/// Creates an empty overlay at `new` over the frozen image `image` (whose
/// header is `like`): the same size, block, chunk and journal sizes, and
/// copy-on-read and prefetch defaults.
pub fn create_overlay(image: &Path, new: &Path, like: &Header) -> Result<(), ImageError> {
    let opts = CreateOptions {
        size: Some(like.virtual_size),
        base: Some(base_reference(image, new)),
        block_size: like.block_size,
        chunk_size: (like.chunk_size != 0).then_some(like.chunk_size),
        journal_size: like.journal_len,
        zero_detect: false,
        copy_on_read: like.compat & crate::format::header::COMPAT_COPY_ON_READ != 0,
        prefetch: like.compat & crate::format::header::COMPAT_PREFETCH != 0,
    };
    let is_device = std::fs::metadata(new).map(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_block_device()
    });
    if matches!(is_device, Ok(true)) {
        return create(new, &opts).map(|_| ());
    }
    if new.exists() {
        return Err(ImageError::Invalid { path: new.display().to_string(), why: "already exists".into() });
    }
    let tmp = temp_name(new);
    let _ = std::fs::remove_file(&tmp); // a crashed earlier attempt's
    let io = |what: &'static str| {
        let path = new.display().to_string();
        move |source| ImageError::Io { path, what, offset: 0, source }
    };
    create(&tmp, &opts)?;
    std::fs::rename(&tmp, new).map_err(io("rename into place"))?;
    let dir = new.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io("folder sync"))?;
    Ok(())
}

/// Where an overlay is created before it is renamed into place.
pub fn temp_name(new: &Path) -> PathBuf {
    let mut n = new.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    n.push(".fvd-snapshot-tmp");
    new.with_file_name(n)
}

/// The current header of the image at `path`, opened read-only.
pub fn header_at(path: &Path) -> Result<Header, ImageError> {
    let so = crate::storage::StorageOptions::new(crate::storage::OpenMode::ReadOnly);
    let s = crate::storage::open_image_storage(path, &so)?;
    super::header_of(s.as_ref())
}

/// `fvd snapshot IMAGE NEW` on an image no daemon serves.
pub fn snapshot(image: &Path, new: &Path) -> Result<Header, ImageError> {
    let h = header_at(image)?;
    if !h.is_frozen() {
        let img = Image::open(image, &OpenOptions::default())?;
        let ring = crate::io::uring::Uring::new(16).map_err(|source| ImageError::Io {
            path: image.display().to_string(),
            what: "io_uring setup",
            offset: 0,
            source,
        })?;
        ring.block_on(img.freeze(&ring)).map_err(|source| ImageError::Io {
            path: image.display().to_string(),
            what: "freeze",
            offset: 0,
            source,
        })??;
    }
    let h = header_at(image)?;
    create_overlay(image, new, &h)?;
    Ok(h)
}
