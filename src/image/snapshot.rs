//! Snapshots as separate overlay files: the image is frozen as the point-in-time
//! copy, and a new empty overlay over it becomes the live disk.
//!
//! Offline order ([`snapshot`]), so that a crash or a failure at any point
//! leaves a state the same command completes, and a failure that is reported
//! leaves the image as it was:
//! 1. a file overlay is made, durable, under a temporary name beside its
//!    final one (it fails here, with nothing changed, when NEW exists or its
//!    folder does not); a block device NEW is checked (not the image, not in
//!    use);
//! 2. the image is closed cleanly and its header marked frozen (one header
//!    write: before it the image is the live disk, after it a snapshot layer);
//! 3. the overlay is linked into place (a block device is formatted now; a
//!    failure here thaws the image again).
//!
//! A crash between 2 and 3 leaves a frozen image and no overlay: running the
//! snapshot again skips the freeze (a frozen image may have any number of
//! overlays). The online snapshot (`crate::ublk::snapshot`) freezes first
//! and then uses [`create_overlay`].

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

    /// Takes the frozen flag off again (an image opened with
    /// [`OpenOptions::allow_frozen`]): an online snapshot that failed after
    /// the freeze, before any overlay over it was in place, gives the image
    /// back its writes.
    pub async fn thaw<E: IoEngine>(&self, e: &E) -> Result<(), ImageError> {
        if self.read_only() {
            return Err(ImageError::ReadOnly { path: self.name() });
        }
        self.write_header(e, |h| h.flags &= !crate::format::header::FLAG_FROZEN).await
    }
}

/// The base path to store in `new` for `image`: the file name when both are
/// files in one folder (the pair can move together), else the absolute path; a
/// device-mapper device (an LV) by its stable `/dev/mapper` name.
pub fn base_reference(image: &Path, new: &Path) -> PathBuf {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    // A device-mapper device by its dm name, never by its /dev/dm-N node: after a
    // reboot N names another device (once the thin pool's, whose first bytes were
    // the layer's own header: the chain read the pool's blocks as the layer's).
    let img = crate::storage::blockdev::stable_path(&canon(image));
    let new_dir =
        new.parent().filter(|d| !d.as_os_str().is_empty()).map(canon).unwrap_or_else(|| canon(Path::new(".")));
    let is_file = std::fs::metadata(&img).is_ok_and(|m| m.is_file());
    match (img.parent(), img.file_name()) {
        (Some(d), Some(name)) if d == new_dir && is_file => PathBuf::from(name),
        _ => img,
    }
}

/// What an overlay over `image` (whose header is `like`) is created with: the
/// same size, block, chunk and journal sizes, and copy-on-read and prefetch
/// defaults.
fn overlay_options(image: &Path, new: &Path, like: &Header) -> CreateOptions {
    CreateOptions {
        size: Some(like.virtual_size),
        base: Some(base_reference(image, new)),
        block_size: like.block_size,
        chunk_size: (like.chunk_size != 0).then_some(like.chunk_size),
        journal_size: like.journal_len,
        zero_detect: false,
        copy_on_read: like.compat & crate::format::header::COMPAT_COPY_ON_READ != 0,
        prefetch: like.compat & crate::format::header::COMPAT_PREFETCH != 0,
    }
}

/// Creates an empty overlay at `new` over the frozen image `image` (whose
/// header is `like`); see [`overlay_options`]. A file is made under a
/// temporary name and put in place; a block device is formatted in place.
pub fn create_overlay(image: &Path, new: &Path, like: &Header) -> Result<(), ImageError> {
    let opts = overlay_options(image, new, like);
    if create::is_block_device(new) {
        return create_on_device(image, new, &opts);
    }
    create::stage(new, &opts)?.publish().map(|_| ())
}

/// Refuses a NEW that is the image's own storage.
fn refuse_self(image: &Path, new: &Path) -> Result<(), ImageError> {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    if canon(image) == canon(new) {
        return Err(ImageError::Invalid {
            path: new.display().to_string(),
            why: "is the image itself: an overlay needs storage of its own".into(),
        });
    }
    Ok(())
}

fn create_on_device(image: &Path, new: &Path, opts: &CreateOptions) -> Result<(), ImageError> {
    refuse_self(image, new)?;
    // Formats in place; the base is the frozen image, so nothing is frozen here.
    super::create::create(new, opts).map(|_| ())
}

/// Where an overlay is created before it is put in place.
pub fn temp_name(new: &Path) -> PathBuf {
    create::temp_name(new)
}

/// The current header of the image at `path`, opened read-only.
pub fn header_at(path: &Path) -> Result<Header, ImageError> {
    let so = crate::storage::StorageOptions::new(crate::storage::OpenMode::ReadOnly);
    let s = crate::storage::open_image_storage(path, &so)?;
    super::header_of(s.as_ref())
}

/// `fvd snapshot IMAGE NEW` on an image no daemon serves. All or nothing: a
/// NEW that cannot be made (it exists, its folder does not, the image is
/// in use) leaves IMAGE as it was.
///
/// A file NEW is made first under its temporary name, then IMAGE is frozen,
/// then NEW is put in place: a crash before the freeze leaves IMAGE live (and
/// a temporary file the next attempt removes); after it, a frozen IMAGE that
/// the same command completes. A block device NEW is checked, IMAGE frozen,
/// then NEW formatted; a failure there thaws IMAGE again.
pub fn snapshot(image: &Path, new: &Path) -> Result<Header, ImageError> {
    let h = header_at(image)?;
    if h.is_invalid() {
        return Err(ImageError::Invalid {
            path: image.display().to_string(),
            why: "is marked invalid (a commit wrote into a layer below it) and cannot be snapshotted".into(),
        });
    }
    let opts = overlay_options(image, new, &h);
    let device = create::is_block_device(new);
    if device {
        refuse_self(image, new)?;
        // Refused now, before the freeze, if another process holds it.
        drop(crate::storage::FileStorage::open(new, crate::storage::OpenMode::ReadWrite)?);
    }
    let staged = if device { None } else { Some(create::stage(new, &opts)?) };
    let froze = !h.is_frozen();
    if froze {
        freeze_offline(image)?;
    }
    let done = match staged {
        Some(st) => st.publish().map(|_| ()),
        None => create_on_device(image, new, &opts),
    };
    if let Err(e) = done {
        // Give IMAGE back its writes, unless an overlay over it is in place
        // after all (then it stays frozen: the overlay reads through it).
        let in_place = header_at(new).map(|n| n.base_uuid == h.uuid).unwrap_or(false);
        if froze && !in_place {
            if let Err(t) = thaw_offline(image) {
                tracing::error!(image = %image.display(), error = %t, "the snapshot failed and the image could not be thawed");
            }
        }
        return Err(e);
    }
    header_at(image)
}

fn uring_for(image: &Path) -> Result<crate::io::uring::Uring, ImageError> {
    crate::io::uring::Uring::new(16).map_err(|source| ImageError::Io {
        path: image.display().to_string(),
        what: "io_uring setup",
        offset: 0,
        source,
    })
}

/// Freezes the image at `path`, which no one else holds open for writing
/// (a holder makes the open fail: it is never frozen under a writer).
/// A frozen layer on a linear LV then gives back its slack (a failure there is
/// only logged: the layer is frozen and whole, `fvd reduce` can try again).
pub(crate) fn freeze_offline(image: &Path) -> Result<(), ImageError> {
    let img = Image::open(image, &OpenOptions::default())?;
    let ring = uring_for(image)?;
    ring.block_on(img.freeze(&ring)).map_err(|source| ImageError::Io {
        path: image.display().to_string(),
        what: "freeze",
        offset: 0,
        source,
    })??;
    super::slack::log_give_back(image, img.give_back_slack(crate::storage::Slack::Frozen));
    Ok(())
}

fn thaw_offline(image: &Path) -> Result<(), ImageError> {
    let so = crate::storage::StorageOptions::new(crate::storage::OpenMode::ReadWrite);
    let storage = crate::storage::open_image_storage(image, &so)?;
    // Only the header changes: the chain below is not needed for that.
    let opts = OpenOptions { allow_frozen: true, chain_member: true, ..OpenOptions::default() };
    let img = Image::open_on(image, storage, None, &opts)?;
    let ring = uring_for(image)?;
    ring.block_on(async {
        img.thaw(&ring).await?;
        img.close_async(&ring).await
    })
    .map_err(|source| ImageError::Io { path: image.display().to_string(), what: "thaw", offset: 0, source })?
}

/// The image and every layer of its chain as their headers name them (no data
/// is read; a layer that does not open ends the list), canonical where possible.
pub fn chain_paths(image: &Path) -> Vec<PathBuf> {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let mut out = vec![canon(image)];
    let mut path = image.to_path_buf();
    while out.len() <= crate::meta::depth::MAX_LAYERS {
        let Ok(h) = header_at(&path) else { break };
        if h.base_format == crate::format::BaseFormat::None || h.is_prefetched() {
            break;
        }
        path = super::base::resolve(&path, &h.base_path);
        out.push(canon(&path));
        if h.base_format != crate::format::BaseFormat::Fvd {
            break;
        }
    }
    out
}
