//! `fvd convert`: raw ↔ fvd, sparse-aware.

use super::{fail, CliError};
use clap::Args;
use fvd::image::{self, CreateOptions, Image, MapKind, OpenOptions};
use fvd::io::uring::Uring;
use fvd::storage::{FileStorage, OpenMode, Storage};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ConvertArgs {
    pub src: PathBuf,
    pub dst: PathBuf,
    /// Output format.
    #[arg(short = 'O', value_parser = ["fvd", "raw"], default_value = "fvd")]
    pub format: String,
    /// For fvd output: no table (raw layout).
    #[arg(long)]
    pub no_table: bool,
}

const STEP: usize = 1 << 20;

enum Src {
    Raw(FileStorage),
    Fvd(Box<Image>),
}

fn open_src(p: &std::path::Path) -> Result<Src, CliError> {
    if std::fs::metadata(p).map(|m| m.is_dir()).unwrap_or(false) {
        return Err(fail(format!("{}: is a folder, not an image or a raw disk", p.display())));
    }
    let s = FileStorage::open(p, OpenMode::ReadOnly)?;
    if s.size() == 0 {
        return Err(fail(format!("{}: is empty (0 bytes): nothing to convert", p.display())));
    }
    // Either header slot's magic makes it an fvd image (one damaged slot
    // still opens from the other; both damaged, the open says why).
    let magic_at = |off: u64| {
        let mut m = [0u8; 8];
        s.size() >= off + 8 && s.read_at(&mut m, off).is_ok() && m == fvd::format::header::MAGIC
    };
    if magic_at(0) || magic_at(fvd::format::META_BLOCK) {
        drop(s);
        Ok(Src::Fvd(Box::new(Image::open(p, &OpenOptions { read_only: true, ..Default::default() })?)))
    } else {
        tracing::warn!(source = %p.display(), "no fvd header in either slot: converted as a raw disk image");
        Ok(Src::Raw(s))
    }
}

/// Where the output is written until it is whole.
enum Out {
    /// A new fvd file, staged under a temporary name.
    Fvd(Image, image::Staged),
    /// An fvd image on a block device, marked invalid until it is whole.
    FvdDevice(Image),
    /// A new raw file, written under a temporary name.
    Raw(std::fs::File, PathBuf),
}

/// Converts SRC into DST, all or nothing: a file DST appears only once it
/// is whole (made under a temporary name that a rerun removes); an fvd DST
/// on a block device is marked invalid until the end, so an interrupted
/// convert leaves nothing that opens as a good image, and a rerun formats
/// it again.
pub fn run(a: ConvertArgs) -> Result<i32, CliError> {
    super::warn_if_written(&a.src);
    let src = open_src(&a.src)?;
    let size = match &src {
        Src::Raw(s) => s.size(),
        Src::Fvd(i) => i.size(),
    };
    // Ranges that may hold data; everything else is zeros and is skipped.
    let ranges: Vec<(u64, u64)> = match &src {
        Src::Raw(_) => vec![(0, size)],
        Src::Fvd(i) => i.map().iter().filter(|r| r.kind != MapKind::Zero).map(|r| (r.start, r.length)).collect(),
    };
    let ring = Uring::new(64)?;
    let padded = size.div_ceil(512) * 512;
    let derr = |e: std::io::Error| fail(format!("{}: {e}", a.dst.display()));
    let out = if a.format == "fvd" {
        let opts =
            CreateOptions { size: Some(padded), chunk_size: (!a.no_table).then_some(1 << 20), ..Default::default() };
        if image::is_block_device(&a.dst) {
            image::create(&a.dst, &opts)?;
            let so = fvd::storage::StorageOptions::new(OpenMode::ReadWrite);
            let st = fvd::storage::open_image_storage(&a.dst, &so)?;
            image::layer_header::edit_header(st.as_ref(), |h| h.flags |= fvd::format::header::FLAG_INVALID)?;
            drop(st);
            Out::FvdDevice(Image::open(&a.dst, &OpenOptions { allow_invalid: true, ..Default::default() })?)
        } else {
            let staged = image::stage(&a.dst, &opts)?;
            let img = Image::open(staged.temp_path(), &OpenOptions::default())?;
            Out::Fvd(img, staged)
        }
    } else {
        if std::fs::symlink_metadata(&a.dst).is_ok() {
            return Err(fail(format!("{}: already exists", a.dst.display())));
        }
        let tmp = image::temp_name(&a.dst);
        let _ = std::fs::remove_file(&tmp);
        let f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(derr)?;
        f.set_len(size).map_err(derr)?;
        Out::Raw(f, tmp)
    };
    let r = copy(&src, &out, &ranges, size, &ring, &a);
    if r.is_err() {
        if let Out::Raw(_, tmp) = &out {
            let _ = std::fs::remove_file(tmp);
        }
    }
    let written = r?;
    match out {
        Out::Fvd(img, staged) => {
            img.close()?;
            drop(img);
            staged.publish()?;
        }
        Out::FvdDevice(img) => {
            img.close()?;
            drop(img);
            let so = fvd::storage::StorageOptions::new(OpenMode::ReadWrite);
            let st = fvd::storage::open_image_storage(&a.dst, &so)?;
            image::layer_header::edit_header(st.as_ref(), |h| h.flags &= !fvd::format::header::FLAG_INVALID)?;
        }
        Out::Raw(f, tmp) => {
            f.sync_all().map_err(derr)?;
            drop(f);
            let r = image::put_in_place(&tmp, &a.dst).map_err(derr);
            let _ = std::fs::remove_file(&tmp);
            r?;
        }
    }
    tracing::info!(bytes = written, "convert wrote non-zero data");
    Ok(0)
}

/// Copies every range of SRC that may hold data into `out`; returns the bytes written.
fn copy(
    src: &Src,
    out: &Out,
    ranges: &[(u64, u64)],
    size: u64,
    ring: &Uring,
    a: &ConvertArgs,
) -> Result<u64, CliError> {
    let pb = super::progress_bar(size);
    let mut buf = vec![0u8; STEP];
    let mut written = 0u64;
    for &(start, len) in ranges {
        let mut pos = start;
        while pos < start + len {
            let n = ((start + len - pos) as usize).min(STEP);
            let chunk = &mut buf[..n.div_ceil(512) * 512];
            match src {
                Src::Raw(s) => {
                    if !s.has_data(pos, n as u64) {
                        pos += n as u64;
                        pb.inc(n as u64);
                        continue;
                    }
                    s.read_at(chunk, pos)?;
                }
                Src::Fvd(i) => ring.block_on(i.read(ring, pos, chunk))??,
            }
            if chunk.iter().any(|&b| b != 0) {
                match out {
                    Out::Fvd(img, _) | Out::FvdDevice(img) => ring.block_on(img.write(ring, pos, chunk, false))??,
                    Out::Raw(f, _) => {
                        use std::os::unix::fs::FileExt;
                        f.write_all_at(&chunk[..n], pos).map_err(|e| fail(format!("{}: {e}", a.dst.display())))?;
                    }
                }
                written += n as u64;
            }
            pos += n as u64;
            pb.inc(n as u64);
        }
    }
    pb.finish_and_clear();
    Ok(written)
}
