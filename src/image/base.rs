//! The read-only base image under a copy-on-write image.

use super::{Image, ImageError, OpenOptions};
use crate::format::BaseFormat;
use crate::io::{self, IoEngine};
use crate::storage::{FileStorage, OpenMode, Storage};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

/// A base: a raw file (or device), or another FVD image opened read-only.
pub enum Base {
    Raw(Box<dyn Storage>),
    Fvd(Box<Image>),
}

impl Base {
    pub fn size(&self) -> u64 {
        match self {
            Base::Raw(s) => s.size(),
            Base::Fvd(i) => i.size(),
        }
    }

    pub fn name(&self) -> String {
        match self {
            Base::Raw(s) => s.name().to_string(),
            Base::Fvd(i) => i.path().display().to_string(),
        }
    }

    pub fn format(&self) -> BaseFormat {
        match self {
            Base::Raw(_) => BaseFormat::Raw,
            Base::Fvd(_) => BaseFormat::Fvd,
        }
    }

    /// Reads from the base. Boxed, because an FVD base reads from its own base.
    pub fn read<'a, E: IoEngine>(
        &'a self,
        e: &'a E,
        buf: &'a mut [u8],
        off: u64,
    ) -> Pin<Box<dyn Future<Output = Result<(), ImageError>> + 'a>> {
        Box::pin(async move {
            match self {
                Base::Raw(s) => io::read_at(e, s.as_ref(), buf, off).await.map_err(|source| ImageError::Io {
                    path: s.name().to_string(),
                    what: "base read",
                    offset: off,
                    source,
                }),
                Base::Fvd(img) => img.read(e, off, buf).await,
            }
        })
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

/// Opens a base read-only and checks it still has the size recorded at create time.
pub fn open_base(
    image: &Path,
    stored: &str,
    format: BaseFormat,
    recorded_size: u64,
) -> Result<Option<Base>, ImageError> {
    let path = resolve(image, stored);
    let err =
        |why: String| ImageError::Base { path: image.display().to_string(), base: path.display().to_string(), why };
    let base = match format {
        BaseFormat::None => return Ok(None),
        BaseFormat::Raw => {
            let s = FileStorage::open(&path, OpenMode::ReadOnly).map_err(|e| err(source_text(&e)))?;
            Base::Raw(Box::new(s))
        }
        BaseFormat::Fvd => {
            let opts = OpenOptions { read_only: true, ..OpenOptions::default() };
            let img = Image::open(&path, &opts).map_err(|e| err(e.to_string()))?;
            Base::Fvd(Box::new(img))
        }
    };
    if base.size() != recorded_size {
        return Err(err(format!(
            "size changed from {recorded_size:#x} to {:#x} bytes since the image was created; refusing to use it",
            base.size()
        )));
    }
    Ok(Some(base))
}

fn source_text(e: &crate::storage::StorageError) -> String {
    match e {
        crate::storage::StorageError::Open { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}
