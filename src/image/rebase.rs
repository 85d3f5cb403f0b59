//! `fvd rebase`: moving an image onto another base, or making it stand alone.
//!
//! Safe mode keeps what the image reads: every block the image does not hold
//! and where the old chain and the new base differ is copied into the image
//! from the old chain first; then one header write switches the base. A crash
//! before that write leaves the old chain with more blocks held in the image,
//! reading the same; running the rebase again completes it. With no new base
//! (`-b ""`) every block the image does not hold is copied, and the image
//! stands alone: its header says the whole base is in it (as after a prefetch).
//!
//! Unsafe mode (`-u`) only rewrites the reference and the identity recorded for
//! the base: the deliberate override of the identity check.

use super::base::open_base;
use super::identity::{raw_fingerprint, BaseId};
use super::snapshot::base_reference;
use super::{Base, Image, ImageError, OpenOptions};
use crate::format::header::{COMPAT_PREFETCHED, FLAG_COMMITTING};
use crate::format::{BaseFormat, Header};
use crate::io::{self, IoEngine};
use crate::storage::{FileStorage, OpenMode, Storage};
use crate::units::{BlockIdx, Bytes};
use std::path::Path;

/// What a rebase did.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RebaseOutcome {
    /// The new base ("" when the image now stands alone).
    pub base: String,
    /// Bytes copied into the image because the old and the new base differ.
    pub copied_bytes: u64,
    /// Bytes compared.
    pub compared_bytes: u64,
    pub unsafe_mode: bool,
}

/// The new base opened for reading, with what the image records about it.
pub struct NewBase {
    pub chain: Base,
    pub reference: String,
    pub id: BaseId,
}

fn io_error(path: &str, what: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.to_string();
    move |source| ImageError::Io { path, what, offset, source }
}

/// Opens `path` as the new base of `image` (whose header is `image_header`),
/// with the whole chain under it: safe mode compares what the image reads
/// with what the new chain reads, not with the new base's own blocks alone.
/// The chain is walked as an open walks it, so a new base whose chain passes
/// through the image itself (a loop), a layer marked invalid or a layer that
/// no longer matches what its overlay recorded is refused here.
pub fn open_new_base(image: &Path, path: &Path, image_header: &Header) -> Result<NewBase, ImageError> {
    let reference = base_reference(path, image).display().to_string();
    let name = path.display().to_string();
    let format = super::create::probe_base(path)?;
    let (size, id) = match format {
        BaseFormat::Fvd => {
            let h = super::snapshot::header_at(path)?;
            if h.is_invalid() {
                return Err(ImageError::Invalid { path: name, why: "is marked invalid and cannot be a base".into() });
            }
            (h.virtual_size, BaseId { uuid: h.uuid, fingerprint: 0 })
        }
        _ => {
            let s = FileStorage::open(path, OpenMode::ReadOnly)?;
            let fingerprint = raw_fingerprint(&s).map_err(io_error(&name, "fingerprint", 0))?;
            (s.size(), BaseId { uuid: [0; 16], fingerprint })
        }
    };
    // The image's header as it will read after the switch, for the walk.
    let mut above = image_header.clone();
    above.base_path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()).display().to_string();
    above.base_format = format;
    above.base_size = size;
    above.compat &= !COMPAT_PREFETCHED;
    above.flags &= !FLAG_COMMITTING;
    id.record(&mut above);
    let chain = open_base(image, &above)?
        .ok_or_else(|| ImageError::Invalid { path: name, why: "opened as no base at all".into() })?;
    Ok(NewBase { chain, reference, id })
}

/// Safe mode's copy: every block the image does not hold whose content differs
/// between the old chain and `new` (None: zeros, what a flattened image reads
/// where it has no data) is written into the image. Returns (copied, compared).
pub async fn copy_differences<E: IoEngine>(
    e: &E,
    top: &Image,
    new: Option<&Base>,
    progress: &dyn Fn(u64),
) -> Result<(u64, u64), ImageError> {
    let geo = top.geometry();
    let bs = geo.block_size as u64;
    let end = geo.base_blocks() * bs;
    let mut old = io::AlignedBuf::zeroed(bs as usize);
    let mut now = io::AlignedBuf::zeroed(bs as usize);
    let (mut copied, mut compared) = (0u64, 0u64);
    let mut b = 0u64;
    while b * bs < end {
        let off = b * bs;
        let n = (bs.min(top.size() - off)) as usize;
        b += 1;
        if top.meta().block_in_image(BlockIdx(off / bs)) {
            continue;
        }
        top.read(e, off, &mut old[..n]).await?;
        match new {
            Some(base) => {
                let m = (base.size().saturating_sub(off) as usize).min(n);
                now[m..n].fill(0);
                if m > 0 {
                    base.read(e, &mut now[..m], off).await?;
                }
            }
            // Flattened, a block the image does not hold reads what its chunk
            // holds: zeros when unallocated, else assume nothing.
            None if top.meta().storage_offset(Bytes(off)).is_none() => now[..n].fill(0),
            None => now[..n].iter_mut().zip(old[..n].iter()).for_each(|(a, b)| *a = !*b),
        }
        compared += n as u64;
        if old[..n] != now[..n] {
            if old[..n].iter().all(|&x| x == 0) {
                top.write_zeroes(e, off, n as u64).await?;
            } else {
                top.write(e, off, &old[..n], false).await?;
            }
            copied += n as u64;
        }
        progress(off + n as u64);
    }
    top.flush(e).await?;
    Ok((copied, compared))
}

/// Freezes the new base unless it is raw or frozen already.
fn freeze_new_base(n: &NewBase) -> Result<(), ImageError> {
    match n.chain.layers().first() {
        Some(super::Layer::Fvd(img)) if !img.header().is_frozen() => super::snapshot::freeze_offline(img.path()),
        _ => Ok(()),
    }
}

/// Switches the open image's header to `new` (None: stands alone).
pub async fn switch_base<E: IoEngine>(e: &E, top: &Image, new: Option<&NewBase>) -> Result<(), ImageError> {
    top.write_header(e, |h| match new {
        Some(n) => {
            h.base_path = n.reference.clone();
            h.base_format = n.chain.format();
            n.id.record(h);
        }
        None => {
            h.base_path.clear();
            h.base_format = BaseFormat::None;
            BaseId::default().record(h);
            h.compat |= COMPAT_PREFETCHED;
            h.prefetch_cursor = h.prefetch_cursor.max(top.geometry().base_blocks());
        }
    })
    .await
}

/// `fvd rebase -b NEWBASE [-u] IMAGE` (NEWBASE None: `-b ""`).
pub fn rebase(
    image: &Path,
    new_base: Option<&Path>,
    unsafe_mode: bool,
    progress: &dyn Fn(u64, u64),
) -> Result<RebaseOutcome, ImageError> {
    let name = image.display().to_string();
    let invalid = |why: String| ImageError::Invalid { path: name.clone(), why };
    let h = super::snapshot::header_at(image)?;
    if h.is_frozen() && unsafe_mode {
        return Err(invalid(
            "is a frozen layer: an unsafe rebase would change what its overlays read (use safe mode)".into(),
        ));
    }
    if h.is_committing() {
        return Err(invalid("a commit from it is not finished: run 'fvd commit' on it again first".into()));
    }
    let new = new_base.map(|p| open_new_base(image, p, &h)).transpose()?;
    if let Some(n) = &new {
        if n.chain.size() != h.base_size && h.base_size != 0 {
            return Err(invalid(format!(
                "the new base is {:#x} bytes and the current one {:#x}: a rebase keeps the base's size",
                n.chain.size(),
                h.base_size
            )));
        }
        if h.base_size == 0 {
            return Err(invalid("has no base; give it one at create time".into()));
        }
    }
    let opts = OpenOptions { allow_frozen: true, ..OpenOptions::default() };
    // Unsafe mode does not read the old chain: it may be gone or changed (the
    // reason to use it), so the image is opened without it.
    let top = if unsafe_mode {
        let so = crate::storage::StorageOptions::new(OpenMode::ReadWrite);
        let storage = crate::storage::open_image_storage(image, &so)?;
        Image::open_on(image, storage, None, &OpenOptions { chain_member: true, ..opts })?
    } else {
        Image::open(image, &opts)?
    };
    let ring = super::offline_ring(&name)?;
    let size = top.size();
    let prog = |done: u64| progress(done, size);
    let (copied_bytes, compared_bytes) = ring
        .block_on(async {
            let r = if unsafe_mode {
                (0, 0)
            } else {
                copy_differences(&ring, &top, new.as_ref().map(|n| &n.chain), &prog).await?
            };
            // The new base must never change under the image from now on:
            // an fvd one is frozen (as `fvd create --base` does), last, so a
            // failure before leaves it as it was.
            if let Some(n) = &new {
                freeze_new_base(n)?;
            }
            switch_base(&ring, &top, new.as_ref()).await?;
            top.close_async(&ring).await?;
            Ok::<_, ImageError>(r)
        })
        .map_err(io_error(&name, "rebase", 0))??;
    Ok(RebaseOutcome {
        base: new.as_ref().map(|n| n.reference.clone()).unwrap_or_default(),
        copied_bytes,
        compared_bytes,
        unsafe_mode,
    })
}
