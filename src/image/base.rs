//! The read-only chain under a copy-on-write image: its base, that base's base,
//! and so on down to a raw image or an fvd image without a base.
//!
//! Every layer is opened once, read-only, without a base of its own: the chain
//! reads a block from the one layer that holds it, found in one
//! [`DepthIndex`] built at open (see [`crate::meta::depth`]), never by asking
//! each layer in turn. Each layer is checked against what the layer above it
//! recorded (see [`super::identity`]); a layer marked invalid (a commit wrote
//! below it) is refused.

use super::{identity, Image, ImageError, OpenOptions};
use crate::format::{BaseFormat, Header};
use crate::io::{self, IoEngine};
use crate::meta::depth::{DepthIndex, MAX_LAYERS};
use crate::meta::Source;
use crate::storage::{FileStorage, OpenMode, Storage};
use crate::units::{BlockIdx, Bytes};
use futures::future::join_all;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

/// One read-only layer of a chain.
pub enum Layer {
    Raw(Box<dyn Storage>),
    Fvd(Box<Image>),
}

impl Layer {
    pub fn size(&self) -> u64 {
        match self {
            Layer::Raw(s) => s.size(),
            Layer::Fvd(i) => i.size(),
        }
    }

    pub fn name(&self) -> String {
        match self {
            Layer::Raw(s) => s.name().to_string(),
            Layer::Fvd(i) => i.path().display().to_string(),
        }
    }

    pub fn format(&self) -> BaseFormat {
        match self {
            Layer::Raw(_) => BaseFormat::Raw,
            Layer::Fvd(_) => BaseFormat::Fvd,
        }
    }

    /// Whether this layer holds the block at `off` (below it, the next layer would).
    fn holds(&self, off: u64) -> bool {
        match self {
            Layer::Raw(_) => true,
            Layer::Fvd(i) => i.meta().block_in_image(BlockIdx(off / i.block_size() as u64)),
        }
    }

    /// Which of the index blocks `64w..64w+64` (of `1 << shift` bytes, no
    /// larger than this layer's blocks) this layer holds, one bit each: its
    /// bitmap word itself when the sizes match.
    fn held_mask(&self, shift: u32, w: u64) -> u64 {
        let Layer::Fvd(i) = self else { return u64::MAX };
        let m = i.meta();
        if m.all_present() {
            return u64::MAX;
        }
        let bb = m.geo.base_blocks();
        let r = i.block_size().trailing_zeros().saturating_sub(shift);
        if r == 0 {
            // Blocks past the base are the image's own.
            let past = match bb.saturating_sub(w * 64) {
                n if n >= 64 => 0,
                n => u64::MAX << n,
            };
            return m.bitmap.word(w) | past;
        }
        (0..64u64).fold(0, |acc, j| {
            let b = (w * 64 + j) >> r;
            if b >= bb || m.bitmap.test(BlockIdx(b)) {
                acc | 1 << j
            } else {
                acc
            }
        })
    }

    /// Reads the layer's own bytes; bytes past its end read as zeros.
    async fn read<E: IoEngine>(&self, e: &E, buf: &mut [u8], off: u64) -> Result<(), ImageError> {
        let n = (self.size().saturating_sub(off) as usize).min(buf.len());
        buf[n..].fill(0);
        if n == 0 {
            return Ok(());
        }
        match self {
            Layer::Raw(s) => io::read_at(e, s.as_ref(), &mut buf[..n], off).await.map_err(|source| ImageError::Io {
                path: s.name().to_string(),
                what: "base read",
                offset: off,
                source,
            }),
            // A layer's size is a multiple of 512, so `n` is too.
            Layer::Fvd(img) => img.read_held(e, off, &mut buf[..n]).await,
        }
    }
}

/// The chain under an image, top (its base) first.
pub struct Base {
    layers: Vec<Layer>,
    /// None for a chain of one layer.
    index: Option<DepthIndex>,
}

impl Base {
    /// A chain of one layer.
    pub fn single(layer: Layer) -> Base {
        Base::new(vec![layer])
    }

    /// A chain of given layers, the image's base first (tests and tools; `open_base`
    /// is the checked way).
    pub fn from_layers(layers: Vec<Layer>) -> Base {
        Base::new(layers)
    }

    fn new(layers: Vec<Layer>) -> Base {
        let index = (layers.len() > 1).then(|| {
            let gran = layers
                .iter()
                .filter_map(|l| match l {
                    Layer::Fvd(i) => Some(i.block_size()),
                    Layer::Raw(_) => None,
                })
                .min()
                .unwrap_or(4096);
            let shift = gran.trailing_zeros();
            let index =
                DepthIndex::build_masked(layers[0].size(), gran, layers.len(), |k, w| layers[k].held_mask(shift, w));
            debug_assert!(
                index.blocks() >= (1 << 16)
                    || (0..index.blocks()).all(|b| {
                        let off = b << shift;
                        index.layer_at(off) == (0..layers.len()).find(|&k| layers[k].holds(off))
                    }),
                "the index from bitmap words agrees with asking each layer"
            );
            index
        });
        Base { layers, index }
    }

    pub fn size(&self) -> u64 {
        self.layers[0].size()
    }

    pub fn name(&self) -> String {
        self.layers[0].name()
    }

    pub fn format(&self) -> BaseFormat {
        self.layers[0].format()
    }

    /// The layers, the image's base first.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Bytes of memory of the chain's index (0 for one layer).
    pub fn index_bytes(&self) -> usize {
        self.index.as_ref().map_or(0, |i| i.bytes())
    }

    /// Which layer holds guest byte `off` (0: the image's base), or None: zeros.
    pub fn layer_at(&self, off: u64) -> Option<usize> {
        match &self.index {
            None => Some(0),
            Some(i) => i.layer_at(off),
        }
    }

    /// Reads from the chain: each run from the one layer holding it. Boxed,
    /// because a layer is an image whose read may come back here.
    pub fn read<'a, E: IoEngine>(
        &'a self,
        e: &'a E,
        buf: &'a mut [u8],
        off: u64,
    ) -> Pin<Box<dyn Future<Output = Result<(), ImageError>> + 'a>> {
        Box::pin(async move {
            let Some(index) = &self.index else {
                return self.layers[0].read(e, buf, off).await;
            };
            let mut runs = index.runs(off, buf.len() as u64);
            let Some(first) = runs.next() else { return Ok(()) };
            if first.1 == buf.len() as u64 {
                // One layer holds it all (the common case): no fan-out.
                return self.read_run(e, buf, off, first.2).await;
            }
            let mut futs = Vec::new();
            let mut rest = &mut *buf;
            for (roff, len, layer) in std::iter::once(first).chain(runs) {
                let (piece, tail) = rest.split_at_mut(len as usize);
                rest = tail;
                futs.push(self.read_run(e, piece, roff, layer));
            }
            join_all(futs).await.into_iter().collect()
        })
    }

    async fn read_run<E: IoEngine>(
        &self,
        e: &E,
        buf: &mut [u8],
        off: u64,
        layer: Option<usize>,
    ) -> Result<(), ImageError> {
        match layer {
            Some(k) => self.layers[k].read(e, buf, off).await,
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }
}

/// The base path as stored, resolved against the image's folder when relative.
pub fn resolve(image: &Path, stored: &str) -> PathBuf {
    let p = Path::new(stored);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// Opens the chain under the image whose header is `header`, checking each
/// layer against what the one above it recorded. None when it has no base.
pub fn open_base(image: &Path, header: &Header) -> Result<Option<Base>, ImageError> {
    let mut layers = Vec::new();
    let mut seen = vec![std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf())];
    let mut above_path = image.to_path_buf();
    let mut above = header.clone();
    // A commit under way from the top relaxes the identity checks below it: the
    // layers it writes into change on purpose (see `FLAG_COMMITTING`).
    let relaxed = header.is_committing();
    while above.base_format != BaseFormat::None && !above.is_prefetched() {
        let path = resolve(&above_path, &above.base_path);
        let err = |why: String| ImageError::Base {
            path: above_path.display().to_string(),
            base: path.display().to_string(),
            why,
        };
        if layers.len() >= MAX_LAYERS {
            return Err(err(format!("the chain is deeper than {MAX_LAYERS} layers")));
        }
        let canon = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if seen.contains(&canon) {
            return Err(err("the chain loops: this layer is already above it".into()));
        }
        seen.push(canon);
        let (layer, next) = match above.base_format {
            BaseFormat::None => break,
            BaseFormat::Raw => {
                let s = FileStorage::open(&path, OpenMode::ReadOnly).map_err(|e| err(source_text(&e)))?;
                check_size(s.size(), &above).map_err(err)?;
                if !relaxed {
                    if let Some(why) =
                        identity::raw_mismatch(&above, &s).map_err(|e| err(format!("fingerprint read: {e}")))?
                    {
                        return Err(err(why));
                    }
                }
                (Layer::Raw(Box::new(s)), None)
            }
            BaseFormat::Fvd => {
                let img = Image::open_layer(&path).map_err(|e| err(e.to_string()))?;
                let h = img.header();
                check_size(img.size(), &above).map_err(err)?;
                // An interrupted commit from the top marks the layers it writes
                // through invalid before the top stops reading through them.
                if h.is_invalid() && !relaxed {
                    return Err(err(
                        "is marked invalid: a commit wrote into a layer below it, so it no longer reads what it did"
                            .into(),
                    ));
                }
                if !relaxed {
                    if let Some(why) = identity::fvd_mismatch(&above, &h) {
                        return Err(err(why));
                    }
                }
                (Layer::Fvd(Box::new(img)), Some(h))
            }
        };
        layers.push(layer);
        match next {
            Some(h) => {
                above_path = path;
                above = h;
            }
            None => break,
        }
    }
    Ok((!layers.is_empty()).then(|| Base::new(layers)))
}

fn check_size(size: u64, above: &Header) -> Result<(), String> {
    if size != above.base_size {
        return Err(format!(
            "size changed from {:#x} to {:#x} bytes since the image was created over it; refusing to use it",
            above.base_size, size
        ));
    }
    Ok(())
}

fn source_text(e: &crate::storage::StorageError) -> String {
    match e {
        crate::storage::StorageError::Open { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

impl Image {
    /// Reads a range that this image, a layer of a chain, holds in full (the
    /// chain's index says so): within one chunk, straight from its storage,
    /// without a request's plan; a range across chunks goes the usual way.
    async fn read_held<E: IoEngine>(&self, e: &E, off: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        let geo = &self.meta.geo;
        let len = buf.len() as u64;
        let one_chunk = match geo.chunk_size {
            None => true,
            Some(c) => off / c as u64 == (off + len.max(1) - 1) / c as u64,
        };
        if !one_chunk || off % 512 != 0 || len % 512 != 0 || self.meta.check_range(Bytes(off), len).is_err() {
            return self.read(e, off, buf).await;
        }
        debug_assert!(self.meta.block_in_image(BlockIdx(off / geo.block_size as u64)));
        match self.meta.storage_offset(Bytes(off)) {
            Some(so) => self.read_piece(e, Source::Image(so), buf).await,
            // Unallocated: never written, or a zero block of its base.
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Opens an image as a layer of a chain: read-only, without its own base
    /// (the chain reads below it).
    pub(crate) fn open_layer(path: &Path) -> Result<Image, ImageError> {
        let opts = OpenOptions { read_only: true, chain_member: true, ..OpenOptions::default() };
        let storage =
            crate::storage::open_image_storage(path, &crate::storage::StorageOptions::new(OpenMode::ReadOnly))?;
        Image::open_on(path, storage, None, &opts)
    }
}
