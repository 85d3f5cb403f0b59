//! `fvd io`: qemu-io style commands against an image.

use super::{fail, CliError};
use clap::Args;
use fvd::image::{Image, ImageError, OpenOptions};
use fvd::io::uring::Uring;
use fvd::units::parse_size;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct IoArgs {
    pub image: PathBuf,
    /// A command: write [-P BYTE] OFF LEN | write -s FILE OFF [LEN] | read [-P BYTE] OFF LEN |
    /// read -o FILE OFF LEN | discard OFF LEN | zero OFF LEN | flush. Repeatable.
    #[arg(short = 'c', long = "cmd", required = true)]
    pub cmds: Vec<String>,
    /// Open read-only.
    #[arg(short = 'r', long)]
    pub read_only: bool,
    /// Writethrough mode.
    #[arg(long)]
    pub writethrough: bool,
    /// Copy-on-read (default: the image's setting).
    #[arg(long)]
    pub copy_on_read: bool,
}

#[derive(Debug, PartialEq)]
enum Cmd {
    Write {
        pattern: u8,
        off: u64,
        len: u64,
    },
    /// LEN: bytes of FILE to write (None: its size; a source without a size needs it).
    WriteFile {
        file: PathBuf,
        off: u64,
        len: Option<u64>,
    },
    Read {
        pattern: Option<u8>,
        off: u64,
        len: u64,
    },
    ReadFile {
        file: PathBuf,
        off: u64,
        len: u64,
    },
    Discard {
        off: u64,
        len: u64,
    },
    Zero {
        off: u64,
        len: u64,
    },
    Flush,
}

fn num(s: Option<&&str>, what: &str) -> Result<u64, String> {
    let s = s.ok_or_else(|| format!("missing {what}"))?;
    if let Some(h) = s.strip_prefix("0x") {
        return u64::from_str_radix(h, 16).map_err(|_| format!("bad {what} '{s}'"));
    }
    parse_size(s).map(|b| b.0)
}

fn byte(s: Option<&&str>) -> Result<u8, String> {
    let v = num(s, "pattern byte")?;
    u8::try_from(v).map_err(|_| format!("pattern {v} does not fit in a byte"))
}

fn parse(line: &str) -> Result<Cmd, String> {
    let w: Vec<&str> = line.split_whitespace().collect();
    let (name, args) = w.split_first().ok_or("empty command")?;
    let flag = |f: &str| args.first() == Some(&f);
    match *name {
        "write" if flag("-s") => Ok(Cmd::WriteFile {
            file: PathBuf::from(args.get(1).ok_or("write -s needs FILE OFF [LEN]")?),
            off: num(args.get(2), "offset")?,
            len: args.get(3).map(|_| num(args.get(3), "length")).transpose()?,
        }),
        "write" if flag("-P") => Ok(Cmd::Write {
            pattern: byte(args.get(1))?,
            off: num(args.get(2), "offset")?,
            len: num(args.get(3), "length")?,
        }),
        "write" => {
            Ok(Cmd::Write { pattern: 0xcd, off: num(args.first(), "offset")?, len: num(args.get(1), "length")? })
        }
        "read" if flag("-o") => Ok(Cmd::ReadFile {
            file: PathBuf::from(args.get(1).ok_or("read -o needs FILE OFF LEN")?),
            off: num(args.get(2), "offset")?,
            len: num(args.get(3), "length")?,
        }),
        "read" if flag("-P") => Ok(Cmd::Read {
            pattern: Some(byte(args.get(1))?),
            off: num(args.get(2), "offset")?,
            len: num(args.get(3), "length")?,
        }),
        "read" => Ok(Cmd::Read { pattern: None, off: num(args.first(), "offset")?, len: num(args.get(1), "length")? }),
        "discard" => Ok(Cmd::Discard { off: num(args.first(), "offset")?, len: num(args.get(1), "length")? }),
        "zero" => Ok(Cmd::Zero { off: num(args.first(), "offset")?, len: num(args.get(1), "length")? }),
        "flush" => Ok(Cmd::Flush),
        other => Err(format!("unknown command '{other}'")),
    }
}

const PIECE: u64 = 4 << 20;

/// Runs `f` over `[off, off+len)` in pieces of at most 4 MiB.
async fn pieces<F, Fut>(off: u64, len: u64, mut f: F) -> Result<(), ImageError>
where
    F: FnMut(u64, usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), ImageError>>,
{
    let mut pos = off;
    while pos < off + len {
        let n = (off + len - pos).min(PIECE);
        f(pos, n as usize).await?;
        pos += n;
    }
    Ok(())
}

/// The whole request's range, checked before anything is read or written:
/// an offset that wraps, or a range past the disk's end, is refused.
fn check_range(img: &Image, off: u64, len: u64) -> Result<(), CliError> {
    match off.checked_add(len) {
        Some(end) if end <= img.size() => Ok(()),
        _ => Err(fail(format!(
            "{}: offset {off:#x} + length {len:#x} is outside the disk ({:#x} bytes); nothing was done",
            img.path().display(),
            img.size()
        ))),
    }
}

/// Bytes `FILE` holds: a regular file's size or a block device's; None for a
/// source that has no size (a pipe, /dev/zero).
fn source_size(f: &std::fs::File) -> std::io::Result<Option<u64>> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileTypeExt;
    let m = f.metadata()?;
    if m.is_file() {
        return Ok(Some(m.len()));
    }
    if m.file_type().is_block_device() {
        let mut f = f;
        return f.seek(SeekFrom::End(0)).map(Some);
    }
    Ok(None)
}

/// `write -s FILE OFF [LEN]`: LEN bytes (default: the file's size) of FILE
/// at OFF, streamed in pieces. The range is checked first; a length that is
/// not a multiple of 512 keeps the disk's own bytes after it in the last
/// sector (read, merged, written).
async fn write_file(
    img: &Image,
    ring: &Uring,
    file: &std::path::Path,
    off: u64,
    len: Option<u64>,
) -> Result<String, CliError> {
    use std::io::Read;
    let ferr = |e: std::io::Error| fail(format!("{}: {e}", file.display()));
    let mut f = std::fs::File::open(file).map_err(ferr)?;
    let size = source_size(&f).map_err(ferr)?;
    let len = match (len, size) {
        (Some(l), _) => l,
        (None, Some(s)) => s,
        (None, None) => {
            return Err(fail(format!("{}: has no size (a pipe or character device): give LEN", file.display())))
        }
    };
    if off % 512 != 0 {
        return Err(fail(format!("offset {off:#x} is not a multiple of 512")));
    }
    check_range(img, off, len.div_ceil(512) * 512)?;
    if let Some(s) = size {
        if s < len {
            return Err(fail(format!("{}: holds {s} bytes, fewer than the {len} asked for", file.display())));
        }
    }
    let mut buf = vec![0u8; PIECE as usize];
    let mut pos = 0u64;
    while pos < len {
        let n = (len - pos).min(PIECE) as usize;
        f.read_exact(&mut buf[..n]).map_err(ferr)?;
        let padded = n.div_ceil(512) * 512;
        if padded > n {
            // The last, partial sector: the disk's bytes after the file's end stay.
            let mut tail = [0u8; 512];
            let at = off + pos + (padded - 512) as u64;
            img.read(ring, at, &mut tail).await?;
            let keep = padded - n;
            buf[n..padded].copy_from_slice(&tail[512 - keep..]);
        }
        img.write(ring, off + pos, &buf[..padded], false).await?;
        pos += n as u64;
    }
    Ok(format!("wrote {len}/{len} bytes at offset {off}"))
}

async fn exec(img: &Image, ring: &Uring, cmd: &Cmd) -> Result<String, CliError> {
    match cmd {
        Cmd::Write { pattern, off, len } => {
            check_range(img, *off, *len)?;
            let buf = vec![*pattern; (*len).min(PIECE) as usize];
            pieces(*off, *len, |o, n| img.write(ring, o, &buf[..n], false)).await?;
            Ok(format!("wrote {len}/{len} bytes at offset {off}"))
        }
        Cmd::WriteFile { file, off, len } => write_file(img, ring, file, *off, *len).await,
        Cmd::Read { pattern, off, len } => {
            check_range(img, *off, *len)?;
            let mut buf = vec![0u8; (*len).min(PIECE) as usize];
            let mut pos = *off;
            while pos < off + len {
                let n = (off + len - pos).min(PIECE) as usize;
                img.read(ring, pos, &mut buf[..n]).await?;
                if let Some(p) = pattern {
                    if let Some(i) = buf[..n].iter().position(|b| b != p) {
                        return Err(CliError {
                            msg: format!("Pattern verification failed at offset {}, {} bytes", pos + i as u64, len),
                            code: 1,
                        });
                    }
                }
                pos += n as u64;
            }
            Ok(format!("read {len}/{len} bytes at offset {off}"))
        }
        Cmd::ReadFile { file, off, len } => {
            use std::io::Write;
            check_range(img, *off, *len)?;
            let mut out = std::fs::File::create(file).map_err(|e| fail(format!("{}: {e}", file.display())))?;
            let mut buf = vec![0u8; (*len).min(PIECE) as usize];
            let mut pos = *off;
            while pos < off + len {
                let n = (off + len - pos).min(PIECE) as usize;
                img.read(ring, pos, &mut buf[..n]).await?;
                out.write_all(&buf[..n]).map_err(|e| fail(format!("{}: {e}", file.display())))?;
                pos += n as u64;
            }
            Ok(format!("read {len}/{len} bytes at offset {off}"))
        }
        Cmd::Discard { off, len } => {
            check_range(img, *off, *len)?;
            img.discard(ring, *off, *len).await?;
            Ok(format!("discard {len}/{len} bytes at offset {off}"))
        }
        Cmd::Zero { off, len } => {
            check_range(img, *off, *len)?;
            img.write_zeroes(ring, *off, *len).await?;
            Ok(format!("wrote {len}/{len} bytes at offset {off}"))
        }
        Cmd::Flush => {
            img.flush(ring).await?;
            Ok(String::new())
        }
    }
}

pub fn run(a: IoArgs) -> Result<i32, CliError> {
    let cmds =
        a.cmds.iter().map(|c| parse(c).map_err(|e| fail(format!("-c '{c}': {e}")))).collect::<Result<Vec<_>, _>>()?;
    let opts = OpenOptions {
        read_only: a.read_only,
        writethrough: a.writethrough,
        copy_on_read: a.copy_on_read.then_some(true),
        ..Default::default()
    };
    let img = Image::open(&a.image, &opts)?;
    let ring = Uring::new(256)?;
    for c in &cmds {
        let line = ring.block_on(exec(&img, &ring, c))??;
        if img.background_pending() {
            ring.block_on(img.run_background_copies(&ring))?;
        }
        if !line.is_empty() {
            println!("{line}");
        }
    }
    img.close()?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse() {
        assert_eq!(parse("write -P 0xab 0 4k").unwrap(), Cmd::Write { pattern: 0xab, off: 0, len: 4096 });
        assert_eq!(parse("read 512 1M").unwrap(), Cmd::Read { pattern: None, off: 512, len: 1 << 20 });
        assert_eq!(parse("flush").unwrap(), Cmd::Flush);
        assert!(parse("write -P 300 0 4k").is_err());
        assert!(parse("frobnicate").is_err());
        assert!(parse("read").is_err());
    }
}
