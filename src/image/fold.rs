//! `fvd commit`: folding an image's data down into a layer of its chain.
//!
//! The chain reads the same at every step, so a crash anywhere leaves a chain
//! that still reads what the image read, and running the commit again completes
//! it (every step is idempotent):
//! 1. the image's header is marked committing, with the target's depth;
//! 2. an fvd target takes a new identity (other overlays over it would read
//!    changed data: they are refused at their next open instead); then every
//!    block the layers above the target hold (the image's own, and those
//!    of the layers in between) is read through the image and written into the
//!    target, which is then made durable. Readers through the image never read
//!    those blocks from the target, so its changing under them is invisible;
//! 3. the layers in between are marked invalid: they no longer read what they
//!    did (the target changed under them);
//! 4. the image is rebased onto the target (one header write, which also
//!    records the target's identity and ends the committing state);
//! 5. unless asked to keep it, the image is emptied (see
//!    [`super::layer_header::empty`]): the target holds all it read.
//!
//! Until step 4 the chain is opened with relaxed identity checks (the header's
//! committing flag): a raw target's fingerprint changes in step 2, and layers in
//! between are invalid after step 3.

use super::identity::BaseId;
use super::layer_header::{edit_header, empty};
use super::snapshot::{base_reference, header_at};
use super::{Image, ImageError, OpenOptions};
use crate::format::header::{FLAG_COMMITTING, FLAG_INVALID};
use crate::format::BaseFormat;
use crate::io::{self, IoEngine};
use crate::storage::{open_image_storage, FileStorage, OpenMode, Storage, StorageOptions};
use crate::units::BlockIdx;
use std::path::{Path, PathBuf};

/// The layer a commit writes into.
pub enum Target<'a> {
    Fvd(&'a Image),
    Raw(&'a dyn Storage),
}

/// What a commit did.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CommitOutcome {
    /// The target's depth below the image (1: its base).
    pub depth: usize,
    pub target: String,
    /// Bytes of data written into the target, and bytes written as zeros.
    pub copied_bytes: u64,
    pub zeroed_bytes: u64,
    /// Layers between the image and the target, now marked invalid.
    pub invalidated: Vec<String>,
    pub emptied: bool,
}

/// The finest block size of any layer: blocks are examined at this step.
const STEP: u64 = 4096;
/// Bytes read and written at a time.
const RUN: u64 = 1 << 20;

fn io_error(path: &str, what: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.to_string();
    move |source| ImageError::Io { path, what, offset, source }
}

/// Whether the block at `off` is held by the image or a layer above depth `depth`.
fn held_above(top: &Image, depth: usize, off: u64) -> bool {
    top.meta().block_in_image(BlockIdx(off / top.block_size() as u64))
        || top.base().and_then(|b| b.layer_at(off)).is_some_and(|l| l + 1 < depth)
}

/// Step 2: copies into the target what the layers above it hold. Returns
/// (data bytes, zero bytes).
pub async fn copy_down<E: IoEngine>(
    e: &E,
    top: &Image,
    depth: usize,
    target: &Target<'_>,
    progress: &dyn Fn(u64),
) -> Result<(u64, u64), ImageError> {
    let size = top.size();
    let (mut copied, mut zeroed) = (0u64, 0u64);
    let mut buf = io::AlignedBuf::zeroed(RUN as usize);
    let mut scratch = io::AlignedBuf::zeroed(RUN as usize);
    let mut pos = 0u64;
    while pos < size {
        if !held_above(top, depth, pos) {
            pos += STEP;
            continue;
        }
        let start = pos;
        while pos < size && pos - start < RUN && held_above(top, depth, pos) {
            pos += STEP;
        }
        let end = pos.min(size);
        let n = (end - start) as usize;
        let chunk = &mut buf[..n];
        top.read(e, start, chunk).await?;
        let zero = chunk.iter().all(|&b| b == 0);
        // Zeros where the target reads zeros already (the zero blocks of a golden
        // image that create preset) are not written: a sparse base stays sparse.
        if zero && target_reads_zeros(e, target, start, &mut scratch[..n]).await? {
            progress(end);
            continue;
        }
        match target {
            Target::Fvd(t) if zero => t.write_zeroes(e, start, n as u64).await?,
            Target::Fvd(t) => t.write(e, start, chunk, false).await?,
            Target::Raw(s) => io::write_at(e, *s, chunk, start).await.map_err(io_error(s.name(), "write", start))?,
        }
        if zero {
            zeroed += n as u64;
        } else {
            copied += n as u64;
        }
        progress(end);
    }
    match target {
        Target::Fvd(t) => t.flush(e).await?,
        Target::Raw(s) => io::sync(e, *s).await.map_err(io_error(s.name(), "fdatasync", 0))?,
    }
    Ok((copied, zeroed))
}

async fn target_reads_zeros<E: IoEngine>(
    e: &E,
    target: &Target<'_>,
    off: u64,
    buf: &mut [u8],
) -> Result<bool, ImageError> {
    match target {
        Target::Fvd(t) => t.read(e, off, buf).await?,
        Target::Raw(s) => {
            let n = (s.size().saturating_sub(off) as usize).min(buf.len());
            buf[n..].fill(0);
            if n > 0 {
                io::read_at(e, *s, &mut buf[..n], off).await.map_err(io_error(s.name(), "read", off))?;
            }
        }
    }
    Ok(buf.iter().all(|&b| b == 0))
}

/// Steps 1 to 5 on open layers. `between` are the layers above the target
/// (depth 1 to depth-1); `rebase_to` the reference the image stores for the
/// target when there are any.
#[allow(clippy::too_many_arguments)]
pub async fn run<E: IoEngine>(
    e: &E,
    top: &Image,
    depth: usize,
    target: Target<'_>,
    between: &[&dyn Storage],
    rebase_to: Option<(String, BaseFormat, u64)>,
    keep: bool,
    progress: &dyn Fn(u64),
) -> Result<CommitOutcome, ImageError> {
    top.write_header(e, |h| {
        h.flags |= FLAG_COMMITTING;
        h.commit_depth = depth as u32;
    })
    .await?;
    // The target changes from here on: an fvd target takes a new identity,
    // durable before any of its data changes, so that any other overlay over
    // it (which would read changed data) is refused at its next open rather
    // than reading it silently. This image's checks are relaxed (committing)
    // until step 4 records the new identity; a resumed commit renews it again.
    if let Target::Fvd(t) = &target {
        t.write_header(e, |h| h.uuid = crate::format::header::new_uuid()).await?;
    }
    let (copied_bytes, zeroed_bytes) = copy_down(e, top, depth, &target, progress).await?;
    for s in between {
        edit_header(*s, |h| h.flags |= FLAG_INVALID)?;
    }
    let id = match &target {
        Target::Fvd(t) => BaseId { uuid: t.header().uuid, fingerprint: 0 },
        Target::Raw(s) => BaseId {
            uuid: [0; 16],
            fingerprint: super::identity::raw_fingerprint(*s).map_err(io_error(s.name(), "fingerprint", 0))?,
        },
    };
    top.write_header(e, |h| {
        if let Some((path, fmt, size)) = &rebase_to {
            h.base_path = path.clone();
            h.base_format = *fmt;
            h.base_size = *size;
        }
        id.record(h);
        h.flags &= !FLAG_COMMITTING;
        h.commit_depth = 0;
    })
    .await?;
    top.close_async(e).await?;
    if !keep {
        empty(top.storage())?;
    }
    Ok(CommitOutcome {
        depth,
        target: match &target {
            Target::Fvd(t) => t.path().display().to_string(),
            Target::Raw(s) => s.name().to_string(),
        },
        copied_bytes,
        zeroed_bytes,
        invalidated: between.iter().map(|s| s.name().to_string()).collect(),
        emptied: !keep,
    })
}

/// `fvd commit [-b BASE] [-d] IMAGE` on images no daemon serves.
pub fn commit(
    image: &Path,
    base: Option<&Path>,
    keep: bool,
    progress: &dyn Fn(u64, u64),
) -> Result<CommitOutcome, ImageError> {
    let name = image.display().to_string();
    let invalid = |why: String| ImageError::Invalid { path: name.clone(), why };
    let h = header_at(image)?;
    if h.is_prefetched() {
        return Err(invalid(
            "holds its whole base (prefetched) and no longer reads through it, so there is no base to commit into; \
             it is a whole disk by itself"
                .into(),
        ));
    }
    let top = Image::open(image, &OpenOptions { allow_frozen: true, ..OpenOptions::default() })?;
    let chain = top.base().ok_or_else(|| invalid("has no base to commit into".into()))?;
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let paths: Vec<PathBuf> = chain.layers().iter().map(|l| PathBuf::from(l.name())).collect();
    let depth = match base {
        Some(b) => {
            let want = canon(b);
            let i = paths
                .iter()
                .position(|p| canon(p) == want)
                .ok_or_else(|| invalid(format!("{} is not a layer of its chain", b.display())))?;
            i + 1
        }
        None if h.is_committing() && h.commit_depth > 0 => h.commit_depth as usize,
        None => 1,
    };
    if depth > paths.len() {
        return Err(invalid(format!("an interrupted commit names layer {depth}, but the chain has {}", paths.len())));
    }
    let layer = &chain.layers()[depth - 1];
    if layer.size() < top.size() {
        return Err(invalid(format!(
            "{} is smaller ({:#x} bytes) than the image ({:#x} bytes): a commit does not grow the layer it \
             writes into, and a layer under an overlay keeps its size: make the image stand alone with \
             'fvd rebase -b \"\" IMAGE' instead (or commit before growing the image)",
            layer.name(),
            layer.size(),
            top.size()
        )));
    }
    let fmt = layer.format();
    let target_path = paths[depth - 1].clone();
    let rebase_to = (depth > 1).then(|| (base_reference(&target_path, image).display().to_string(), fmt, layer.size()));
    let rw = StorageOptions::new(OpenMode::ReadWrite);
    let between: Vec<Box<dyn Storage>> =
        paths[..depth - 1].iter().map(|p| open_image_storage(p, &rw)).collect::<Result<_, _>>()?;
    let between_refs: Vec<&dyn Storage> = between.iter().map(|b| b.as_ref()).collect();
    let ring = super::offline_ring(&name)?;
    let size = top.size();
    let prog = |done: u64| progress(done, size);
    let r = match fmt {
        BaseFormat::Fvd => {
            let t = Image::open(&target_path, &OpenOptions { allow_frozen: true, ..OpenOptions::default() })?;
            let r = ring.block_on(run(&ring, &top, depth, Target::Fvd(&t), &between_refs, rebase_to, keep, &prog));
            let r = r.map_err(io_error(&name, "commit", 0))?;
            t.close()?;
            r
        }
        _ => {
            let s = FileStorage::open(&target_path, OpenMode::ReadWrite)?;
            let r = ring.block_on(run(&ring, &top, depth, Target::Raw(&s), &between_refs, rebase_to, keep, &prog));
            r.map_err(io_error(&name, "commit", 0))?
        }
    };
    r
}
