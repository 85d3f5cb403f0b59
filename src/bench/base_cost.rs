//! Metadata updates per guest write in the cases FVD's base optimizations
//! target: writes beyond the base, writes over zero blocks of the base, and
//! writes after prefetch finished (with copy-on-write before prefetch as the
//! contrast).

use fvd::image::{self, CreateOptions, Image, OpenOptions, PrefetchOptions};
use fvd::io::uring::Uring;
use fvd::io::AlignedBuf;
use std::os::unix::fs::FileExt;
use std::path::Path;

const WRITES: u64 = 2000;

struct Case {
    name: &'static str,
    records: f64,
    bits: f64,
}

/// `WRITES` 4 KiB writes at random block-aligned offsets in `[lo, hi)`, then
/// a flush; returns journal records and bitmap bits per write.
fn measure(ring: &Uring, img: &Image, lo: u64, hi: u64) -> Result<(f64, f64), String> {
    let r0 = img.stats.snapshot().journal_records;
    let b0 = img.meta().persist.bits_recorded();
    let buf = AlignedBuf::from_slice(&[0x5Au8; 4096]);
    let mut rng = super::XorShift::new(0x2545F4914F6CDD1D);
    let bs = img.block_size() as u64;
    let slots = (hi - lo) / bs;
    for _ in 0..WRITES {
        let off = lo + (rng.next() % slots) * bs;
        ring.block_on(img.write(ring, off, &buf, false)).map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
    }
    ring.block_on(img.flush(ring)).map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
    let recs = img.stats.snapshot().journal_records - r0;
    let bits = img.meta().persist.bits_recorded() - b0;
    Ok((recs as f64 / WRITES as f64, bits as f64 / WRITES as f64))
}

pub fn print(dir: &Path, size: u64) -> Result<(), String> {
    // Base: first half of the disk; its first half random data, its second half zeros (holes).
    let half = size / 2;
    let base = dir.join("opt-base.raw");
    let f = std::fs::File::create(&base).map_err(|e| e.to_string())?;
    f.set_len(half).map_err(|e| e.to_string())?;
    let mut chunk = vec![0u8; 1 << 20];
    super::XorShift::new(7).fill(&mut chunk);
    let mut off = 0;
    while off < half / 2 {
        f.write_all_at(&chunk, off).map_err(|e| e.to_string())?;
        off += chunk.len() as u64;
    }
    drop(f);
    let p = dir.join("opt.fvd");
    let _ = std::fs::remove_file(&p);
    let opts = CreateOptions { size: Some(size), base: Some("opt-base.raw".into()), ..Default::default() };
    image::create(&p, &opts).map_err(|e| e.to_string())?;
    let ring = Uring::new(64).map_err(|e| e.to_string())?;
    let img = Image::open(&p, &OpenOptions::default()).map_err(|e| e.to_string())?;
    let mut cases = Vec::new();
    let (r, b) = measure(&ring, &img, half, size)?;
    cases.push(Case { name: "first writes beyond the base", records: r, bits: b });
    let (r, b) = measure(&ring, &img, half / 2, half)?;
    cases.push(Case { name: "writes over zero blocks of the base", records: r, bits: b });
    let (r, b) = measure(&ring, &img, 0, half / 2)?;
    cases.push(Case { name: "writes over base data (copy-on-write)", records: r, bits: b });
    ring.block_on(img.prefetch(&ring, &PrefetchOptions { floor: 0, ..Default::default() }))
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let (r, b) = measure(&ring, &img, 0, half / 2)?;
    cases.push(Case { name: "writes over base data after prefetch", records: r, bits: b });
    img.close().map_err(|e| e.to_string())?;
    drop(img);
    println!();
    println!(
        "metadata updates per guest write (64 KiB blocks, 1 MiB chunks, {WRITES} random 4 KiB writes, then a flush)"
    );
    println!("{:<42} {:>16} {:>16}", "case", "journal rec/w", "bitmap bits/w");
    for c in &cases {
        println!("{:<42} {:>16.4} {:>16.4}", c.name, c.records, c.bits);
    }
    let _ = std::fs::remove_file(&p);
    let _ = std::fs::remove_file(&base);
    Ok(())
}
