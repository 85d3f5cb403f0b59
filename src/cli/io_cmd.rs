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
    /// A command: write [-P BYTE] OFF LEN | write -s FILE OFF | read [-P BYTE] OFF LEN |
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
    Write { pattern: u8, off: u64, len: u64 },
    WriteFile { file: PathBuf, off: u64 },
    Read { pattern: Option<u8>, off: u64, len: u64 },
    ReadFile { file: PathBuf, off: u64, len: u64 },
    Discard { off: u64, len: u64 },
    Zero { off: u64, len: u64 },
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
            file: PathBuf::from(args.get(1).ok_or("write -s needs FILE OFF")?),
            off: num(args.get(2), "offset")?,
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

async fn exec(img: &Image, ring: &Uring, cmd: &Cmd) -> Result<String, CliError> {
    match cmd {
        Cmd::Write { pattern, off, len } => {
            let buf = vec![*pattern; (*len).min(PIECE) as usize];
            pieces(*off, *len, |o, n| img.write(ring, o, &buf[..n], false)).await?;
            Ok(format!("wrote {len}/{len} bytes at offset {off}"))
        }
        Cmd::WriteFile { file, off } => {
            let data = std::fs::read(file).map_err(|e| fail(format!("{}: {e}", file.display())))?;
            let mut padded = data.clone();
            padded.resize(data.len().div_ceil(512) * 512, 0);
            let len = padded.len() as u64;
            pieces(*off, len, |o, n| {
                let s = (o - off) as usize;
                img.write(ring, o, &padded[s..s + n], false)
            })
            .await?;
            Ok(format!("wrote {}/{} bytes at offset {off}", data.len(), data.len()))
        }
        Cmd::Read { pattern, off, len } => {
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
            img.discard(ring, *off, *len).await?;
            Ok(format!("discard {len}/{len} bytes at offset {off}"))
        }
        Cmd::Zero { off, len } => {
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
