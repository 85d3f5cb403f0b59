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
    let s = FileStorage::open(p, OpenMode::ReadOnly)?;
    let mut magic = [0u8; 8];
    if s.size() >= 8 {
        s.read_at(&mut magic, 0)?;
    }
    if magic == fvd::format::header::MAGIC {
        drop(s);
        Ok(Src::Fvd(Box::new(Image::open(p, &OpenOptions { read_only: true, ..Default::default() })?)))
    } else {
        Ok(Src::Raw(s))
    }
}

pub fn run(a: ConvertArgs) -> Result<i32, CliError> {
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
    let dst_img;
    let dst_raw;
    if a.format == "fvd" {
        if padded == 0 {
            return Err(fail(format!("{}: source is empty", a.src.display())));
        }
        let opts =
            CreateOptions { size: Some(padded), chunk_size: (!a.no_table).then_some(1 << 20), ..Default::default() };
        image::create(&a.dst, &opts)?;
        dst_img = Some(Image::open(&a.dst, &OpenOptions::default())?);
        dst_raw = None;
    } else {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&a.dst)
            .map_err(|e| fail(format!("{}: {e}", a.dst.display())))?;
        f.set_len(size).map_err(|e| fail(format!("{}: {e}", a.dst.display())))?;
        dst_raw = Some(f);
        dst_img = None;
    }
    let pb = super::progress_bar(size);
    let mut buf = vec![0u8; STEP];
    let mut written = 0u64;
    for (start, len) in ranges {
        let mut pos = start;
        while pos < start + len {
            let n = ((start + len - pos) as usize).min(STEP);
            let chunk = &mut buf[..n.div_ceil(512) * 512];
            match &src {
                Src::Raw(s) => {
                    if !s.has_data(pos, n as u64) {
                        pos += n as u64;
                        pb.inc(n as u64);
                        continue;
                    }
                    s.read_at(chunk, pos)?;
                }
                Src::Fvd(i) => ring.block_on(i.read(&ring, pos, chunk))??,
            }
            if chunk.iter().any(|&b| b != 0) {
                if let Some(img) = &dst_img {
                    ring.block_on(img.write(&ring, pos, chunk, false))??;
                }
                if let Some(f) = &dst_raw {
                    use std::os::unix::fs::FileExt;
                    f.write_all_at(&chunk[..n], pos).map_err(|e| fail(format!("{}: {e}", a.dst.display())))?;
                }
                written += n as u64;
            }
            pos += n as u64;
            pb.inc(n as u64);
        }
    }
    pb.finish_and_clear();
    if let Some(img) = dst_img {
        img.close()?;
    }
    if let Some(f) = dst_raw {
        f.sync_all()?;
    }
    tracing::info!(bytes = written, "convert wrote non-zero data");
    Ok(0)
}
