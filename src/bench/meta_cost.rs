//! Metadata figures: size for 1 TiB over a 1 TiB base, and the time to open
//! and replay a 1 TiB image whose journal is full.

use fvd::format::layout::CreateParams;
use fvd::format::{journal, Geometry, Header, JournalBlock, Record, META_BLOCK};
use fvd::image::{Image, OpenOptions};
use fvd::units::human;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

const TIB: u64 = 1 << 40;

fn tib_geometry(base: u64) -> Result<Geometry, String> {
    Geometry::new(&CreateParams {
        virtual_size: TIB,
        block_size: 64 << 10,
        chunk_size: Some(1 << 20),
        base_size: base,
        journal_len: 16 << 20,
    })
    .map_err(|e| e.to_string())
}

/// Writes a sparse 1 TiB image whose table maps many chunks and whose
/// journal is full of valid records, marked dirty.
fn make_full_journal_image(p: &Path) -> Result<(u64, u64), String> {
    let g = tib_geometry(0)?;
    let _ = std::fs::remove_file(p);
    let f = std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?;
    // Storage big enough for every chunk the records name (sparse).
    f.set_len(g.data_offset + g.chunks() * g.chunk_bytes()).map_err(|e| e.to_string())?;
    let mut h: Header = g.header(fvd::format::BaseFormat::None, "");
    h.flags |= fvd::format::header::FLAG_DIRTY;
    h.generation = 1;
    h.journal_seq = 1000;
    let shape = journal::Shape::of(h.incompat);
    let blocks = shape.capacity(g.journal_len);
    let per = JournalBlock::CAPACITY;
    let mut records = 0u64;
    let mut buf = Vec::with_capacity(g.journal_len as usize);
    for b in 0..blocks {
        let recs: Vec<Record> = (0..per as u64)
            .map(|i| {
                let v = ((b * per as u64 + i) % g.chunks()) as u32;
                Record::TableSet { vchunk: v, entry: v + 1 }
            })
            .collect();
        records += recs.len() as u64;
        buf.extend_from_slice(&shape.pack(&recs, h.journal_seq + b));
    }
    f.write_all_at(&buf, g.journal_offset).map_err(|e| e.to_string())?;
    f.write_all_at(&h.encode(), 4096).map_err(|e| e.to_string())?;
    f.sync_all().map_err(|e| e.to_string())?;
    Ok((blocks, records))
}

pub fn print(dir: &Path) -> Result<(), String> {
    let g = tib_geometry(TIB)?;
    println!(
        "metadata for a 1 TiB image over a 1 TiB base (64 KiB blocks, 1 MiB chunks): {} ({} bytes: header {} + table {} + bitmap {}); journal {} on top",
        human(g.metadata_bytes()),
        g.metadata_bytes(),
        2 * META_BLOCK,
        g.table_len,
        g.bitmap_len,
        human(g.journal_len)
    );
    let p = dir.join("tib-replay.fvd");
    let (blocks, records) = make_full_journal_image(&p)?;
    let t0 = Instant::now();
    let img = Image::open(&p, &OpenOptions { read_only: true, ..Default::default() }).map_err(|e| e.to_string())?;
    let open_ms = t0.elapsed().as_secs_f64() * 1e3;
    // The table scan alone: validation + high-water mark over 1 Mi entries.
    let table: Vec<u32> = (0..img.geometry().chunks() as u32).map(|v| v + 1).collect();
    let t1 = Instant::now();
    let hwm = fvd::meta::validate_table(img.geometry(), &table, u64::MAX).map_err(|e| e.to_string())?;
    let scan_ms = t1.elapsed().as_secs_f64() * 1e3;
    drop(img);
    println!(
        "open + replay of a 1 TiB image with a full journal ({blocks} blocks, {records} records): {open_ms:.1} ms; table scan of {} entries (used-space high-water mark {hwm}): {scan_ms:.1} ms",
        table.len()
    );
    let _ = std::fs::remove_file(&p);
    Ok(())
}
