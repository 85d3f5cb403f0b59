//! The hybrid queue's path against a model: random batches of concurrent
//! reads, writes (some FUA), discards and write-zeroes on a real file through
//! io_uring, each request carried out as a hybrid queue carries it out
//! (`ublk::hybrid::execute_host`: the fast path when it takes the request,
//! else the async path), mixed with flushes, clean reopens and daemon kills
//! (the process's memory is gone, the file keeps every completed write, as
//! after `kill -9`), several in a row, with and without a volatile log.
//!
//! After every batch each read must return the model's bytes; after a kill
//! every completed request must still be there (a completed write's metadata
//! is journaled, or in the volatile log, before it completes); at the end the
//! content equals the model and `fvd check` is clean.

use futures::future::join_all;
mod common;

use common::data;
use fvd::image::{create, CreateOptions, Image, OpenOptions};
use fvd::io::uring::Uring;
use fvd::ublk::hybrid::execute_host;
use fvd::ublk::request::{execute, Op as ReqOp, Policy, Request};
use proptest::prelude::*;
use std::path::PathBuf;

const SIZE: u64 = 8 << 20;
const BASE: u64 = 3 << 20;

#[derive(Debug, Clone)]
enum Op {
    /// Requests issued together (overlapping ones are dropped), and maybe
    /// a kill after that many of them completed.
    Batch(Vec<(u8, u64, u64)>, Option<usize>),
    Flush,
    Reopen,
    Kill,
}

#[derive(Debug, Clone, Copy)]
struct Geo {
    block: u32,
    chunk: Option<u32>,
    base: bool,
    vlog: bool,
}

fn geos() -> impl Strategy<Value = Geo> {
    (
        prop_oneof![Just(4096u32), Just(65536)],
        prop_oneof![Just(None), Just(Some(65536u32)), Just(Some(1 << 20))],
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(block, chunk, base, vlog)| Geo { block, chunk, base, vlog })
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let req = (0u8..10, 0u64..SIZE / 4096, 1u64..33).prop_map(|(k, b, n)| {
        let off = b * 4096;
        (k, off, (n * 4096).min(SIZE - off))
    });
    let op = prop_oneof![
        8 => (proptest::collection::vec(req, 1..8), prop_oneof![3 => Just(None), 1 => (1usize..8).prop_map(Some)])
            .prop_map(|(r, k)| Op::Batch(r, k)),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        1 => Just(Op::Kill),
    ];
    proptest::collection::vec(op, 1..30)
}

struct World {
    dir: tempfile::TempDir,
    geo: Geo,
    /// The image file and volatile log now in use (a kill moves to copies).
    img: PathBuf,
    vlog: PathBuf,
    gen: u32,
}

impl World {
    fn new(geo: Geo) -> (World, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let mut model = vec![0u8; SIZE as usize];
        let base = geo.base.then(|| {
            let p = dir.path().join("base.raw");
            let b = data(7, BASE as usize);
            std::fs::write(&p, &b).unwrap();
            model[..BASE as usize].copy_from_slice(&b);
            p
        });
        let img = dir.path().join("img0.fvd");
        let opts = CreateOptions {
            size: Some(SIZE),
            base,
            block_size: geo.block,
            chunk_size: geo.chunk,
            journal_size: 256 << 10,
            ..Default::default()
        };
        create(&img, &opts).unwrap();
        let vlog = dir.path().join("v0.vlog");
        (World { dir, geo, img, vlog, gen: 0 }, model)
    }

    fn open(&self) -> Image {
        let o = OpenOptions { volatile_log: self.geo.vlog.then(|| self.vlog.clone()), ..Default::default() };
        Image::open(&self.img, &o).unwrap_or_else(|e| panic!("open {}: {e}", self.img.display()))
    }

    fn next(&self) -> (PathBuf, PathBuf) {
        let g = self.gen + 1;
        (self.dir.path().join(format!("img{g}.fvd")), self.dir.path().join(format!("v{g}.vlog")))
    }

    /// The daemon dies now: what the file and the volatile log hold is what
    /// a new daemon finds (copied aside; the old image may run on a while,
    /// as a dead process's requests in the kernel do).
    fn copy_now(&self) {
        let (ni, nv) = self.next();
        copy_keeping_holes(&self.img, &ni);
        if self.vlog.exists() {
            copy_keeping_holes(&self.vlog, &nv);
        }
    }

    /// After `copy_now`: the dead daemon's memory (and its lock) are gone;
    /// the copies carry on.
    fn kill(&mut self, img: Image) {
        std::mem::forget(img);
        (self.img, self.vlog) = self.next();
        self.gen += 1;
    }
}

/// Copies `from` to `to` with the same bytes and the same holes, as a dead
/// daemon leaves its file (`std::fs::copy` fills holes, and `fvd check` then
/// rightly reports a chunk a discard punched as leaked storage).
fn copy_keeping_holes(from: &std::path::Path, to: &std::path::Path) {
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let src = std::fs::File::open(from).unwrap();
    let len = src.metadata().unwrap().len();
    let dst = std::fs::File::create(to).unwrap();
    dst.set_len(len).unwrap();
    let mut off = 0;
    // SEEK_DATA fails (ENXIO) past the last data.
    while let Ok(data) = lseek(src.as_raw_fd(), off, Whence::SeekData) {
        let hole = lseek(src.as_raw_fd(), data, Whence::SeekHole).unwrap();
        let mut buf = vec![0u8; (hole - data) as usize];
        src.read_exact_at(&mut buf, data as u64).unwrap();
        dst.write_all_at(&buf, data as u64).unwrap();
        off = hole;
    }
}

fn read_all(ring: &Uring, img: &Image) -> Vec<u8> {
    let mut b = vec![0u8; SIZE as usize];
    ring.block_on(img.read(ring, 0, &mut b)).unwrap().unwrap();
    b
}

/// What the disk may hold after a kill: the content when it died (every
/// completed request in it), and per sector the other values a request still
/// in flight may have left there.
struct AtKill {
    content: Vec<u8>,
    pending: Vec<(Request, Vec<u8>)>,
}

impl AtKill {
    fn check(&self, got: &[u8], i: usize) -> Result<(), TestCaseError> {
        for (k, (g, c)) in got.chunks(512).zip(self.content.chunks(512)).enumerate() {
            if g == c {
                continue;
            }
            let at = (k * 512) as u64;
            let alt = self.pending.iter().any(|(r, d)| {
                at >= r.off && at < r.off + r.len && {
                    let o = (at - r.off) as usize;
                    match r.op {
                        ReqOp::Write { .. } => g == &d[o..o + 512],
                        _ => g.iter().all(|&b| b == 0),
                    }
                }
            });
            if !alt {
                return Err(TestCaseError::fail(format!(
                    "op {i}: after the kill, sector {at:#x} holds what no completed or pending request put there"
                )));
            }
        }
        Ok(())
    }
}

fn run_sequence(geo: Geo, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let (mut w, model) = World::new(geo);
    let model = std::cell::RefCell::new(model);
    let ring = Uring::new(128).unwrap();
    let mut img = w.open();
    for (i, op) in ops.into_iter().enumerate() {
        match op {
            Op::Batch(reqs, kill_after) => {
                let mut taken: Vec<(u64, u64)> = Vec::new();
                let mut batch = Vec::new();
                for (k, off, len) in reqs {
                    if taken.iter().any(|&(o, l)| off < o + l && o < off + len) {
                        continue;
                    }
                    taken.push((off, len));
                    let op = match k {
                        0..=3 => ReqOp::Read,
                        4..=7 => ReqOp::Write { fua: false },
                        8 => ReqOp::Write { fua: true },
                        _ if k % 2 == 0 => ReqOp::Discard,
                        _ => ReqOp::WriteZeroes,
                    };
                    let data = data((i as u64) << 8 | batch.len() as u64, len as usize);
                    batch.push((Request { op, off, len }, data));
                }
                // Kill after this many completions (none: after the batch).
                let kill_at = kill_after.map(|k| k % batch.len().max(1)).filter(|&k| k > 0);
                let done: std::cell::RefCell<Vec<bool>> = std::cell::RefCell::new(vec![false; batch.len()]);
                let at_kill: std::cell::RefCell<Option<AtKill>> = std::cell::RefCell::new(None);
                let failure: std::cell::RefCell<Option<String>> = std::cell::RefCell::new(None);
                let sent: Vec<(Request, Vec<u8>)> = batch.iter().map(|(r, d)| (*r, d.clone())).collect();
                let pol = Policy::default().for_image(&img);
                let (img_ref, ring_ref, w_ref) = (&img, &ring, &w);
                let futs = batch.iter_mut().enumerate().map(|(n, (req, buf))| {
                    let (done, at_kill, failure, model, sent) = (&done, &at_kill, &failure, &model, &sent);
                    async move {
                        // Most go the hybrid way; some take the async path only, as
                        // requests the fast path turns down do, side by side.
                        let res = if n % 4 == 3 {
                            execute(img_ref, ring_ref, *req, buf, pol).await
                        } else {
                            execute_host(img_ref, ring_ref, *req, buf, pol).await
                        };
                        let (o, l) = (req.off as usize, req.len as usize);
                        let want = if matches!(req.op, ReqOp::Read | ReqOp::Write { .. }) { l as i32 } else { 0 };
                        let mut m = model.borrow_mut();
                        if res != want {
                            *failure.borrow_mut() = Some(format!("op {i} {req:?}: answered {res}"));
                        }
                        match req.op {
                            ReqOp::Read if buf[..] != m[o..o + l] => {
                                let at = buf.iter().zip(&m[o..o + l]).position(|(a, b)| a != b).unwrap_or(0);
                                *failure.borrow_mut() = Some(format!("op {i} {req:?}: read differs at +{at:#x}"));
                            }
                            ReqOp::Read => {}
                            ReqOp::Write { .. } => m[o..o + l].copy_from_slice(buf),
                            _ => m[o..o + l].fill(0),
                        }
                        let mut d = done.borrow_mut();
                        d[n] = true;
                        if Some(d.iter().filter(|&&x| x).count()) == kill_at && at_kill.borrow().is_none() {
                            // The daemon dies here, the others still in flight.
                            w_ref.copy_now();
                            let pending = sent
                                .iter()
                                .zip(d.iter())
                                .filter(|((r, _), &fin)| !fin && r.op != ReqOp::Read)
                                .map(|(x, _)| x.clone())
                                .collect();
                            *at_kill.borrow_mut() = Some(AtKill { content: m.clone(), pending });
                        }
                    }
                });
                ring.block_on(join_all(futs)).unwrap();
                if let Some(f) = failure.take() {
                    return Err(TestCaseError::fail(f));
                }
                if let Some(k) = at_kill.take() {
                    w.kill(img);
                    img = w.open();
                    let got = read_all(&ring, &img);
                    k.check(&got, i)?;
                    *model.borrow_mut() = got;
                }
            }
            Op::Flush => {
                ring.block_on(img.flush(&ring)).unwrap().map_err(|e| TestCaseError::fail(e.to_string()))?;
            }
            Op::Reopen => {
                img.close().map_err(|e| TestCaseError::fail(e.to_string()))?;
                drop(img);
                img = w.open();
            }
            Op::Kill => {
                w.copy_now();
                w.kill(img);
                img = w.open();
                let got = read_all(&ring, &img);
                let m = model.borrow();
                if got != *m {
                    let at = got.iter().zip(m.iter()).position(|(a, b)| a != b).unwrap_or(0);
                    return Err(TestCaseError::fail(format!(
                        "op {i}: after the kill, offset {at:#x} lost a completed request"
                    )));
                }
            }
        }
    }
    prop_assert!(read_all(&ring, &img) == *model.borrow(), "final content differs from the model");
    img.close().map_err(|e| TestCaseError::fail(e.to_string()))?;
    drop(img);
    let s = fvd::storage::FileStorage::open(&w.img, fvd::storage::OpenMode::ReadOnly).unwrap();
    let report = fvd::image::check(&s);
    prop_assert_eq!(report.exit_code(), 0, "check: {:?}", report);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn hybrid_requests_match_the_model_across_kills(geo in geos(), ops in ops()) {
        run_sequence(geo, ops)?;
    }
}

/// The fast path is really taken: overwrites and reads of allocated space.
#[test]
fn overwrites_and_reads_take_the_fast_path() {
    let (w, _) = World::new(Geo { block: 65536, chunk: Some(1 << 20), base: false, vlog: false });
    let img = w.open();
    let ring = Uring::new(8).unwrap();
    let pol = Policy::default();
    let mut buf = vec![1u8; 4096];
    let req = |op, off| Request { op, off, len: 4096 };
    // First write: allocates (async path); then the same chunk is fast.
    assert_eq!(
        ring.block_on(execute_host(&img, &ring, req(ReqOp::Write { fua: false }, 0), &mut buf, pol)).unwrap(),
        4096
    );
    assert!(img
        .fast_begin(true, 8192, 4096)
        .is_some_and(|io| img.fast_end(io, 4096, false) == fvd::image::fast::FastEnd::Done(4096)));
    assert!(img
        .fast_begin(false, 0, 4096)
        .is_some_and(|io| img.fast_end(io, 4096, false) == fvd::image::fast::FastEnd::Done(4096)));
    img.close().unwrap();
}

/// A fast write into a chunk whose allocation another request made and has
/// not journaled yet completes only once that allocation is journaled: a
/// daemon killed right after it completed keeps it.
#[test]
fn a_fast_write_into_a_chunk_not_yet_journaled_survives_a_kill() {
    let (mut w, _) = World::new(Geo { block: 65536, chunk: Some(1 << 20), base: false, vlog: false });
    let img = w.open();
    let ring = Uring::new(8).unwrap();
    // Another request allocated chunk 2 and wrote its data; its journal
    // commit has not run (Image::write leaves it to the front end).
    ring.block_on(img.write(&ring, 2 << 20, &[0x11u8; 4096], false)).unwrap().unwrap();
    assert!(img.meta().persist.pending() > 0);
    let mut data = vec![0x22u8; 4096];
    let req = Request { op: ReqOp::Write { fua: false }, off: (2 << 20) + 8192, len: 4096 };
    let pol = Policy::default().for_image(&img);
    assert_eq!(ring.block_on(execute_host(&img, &ring, req, &mut data, pol)).unwrap(), 4096);
    w.copy_now();
    w.kill(img);
    let img = w.open();
    let mut back = vec![0u8; 4096];
    ring.block_on(img.read(&ring, (2 << 20) + 8192, &mut back)).unwrap().unwrap();
    assert_eq!(back, data, "the completed fast write was lost with the daemon");
    img.close().unwrap();
}
