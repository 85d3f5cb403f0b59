//! A queue whose common request takes no executor ("hybrid", the default;
//! `FVD_QUEUE_PATH=async` gives the all-async queue of [`super::queue`]).
//!
//! The queue loop takes every ublk command's completion itself. A read or
//! write the image can carry out with one I/O ([`crate::image::fast`]) goes
//! from there straight to its SQE on the queue's ring, and from that SQE's
//! completion straight to the commit: plain calls, no task, no wake-up, no
//! allocation. Every other request goes to its tag's task, which carries it
//! out on the async path (the same code the async queue runs) and commits it
//! the same way. So does a fast request whose I/O failed or was short (done
//! again whole), or whose write left metadata to journal first.
//!
//! A tag is owned by one party at a time, and only the loop hands it over:
//! the kernel (its command in flight), the fast path (its SQE in flight) or
//! its task (a [`Mail`] in hand). The tag's buffer belongs to the owner.
//!
//! The gate: fast requests hold one pass for the queue while any of them is
//! in flight, taken without waiting, and only while no hold is being taken;
//! otherwise requests take the async path, which waits at the gate. The pass
//! is dropped when the last fast request in flight ends, so a closing gate
//! never waits on a queue that is idle.
//!
//! user_data: a ublk command has libublk's target bit clear (tag in the low
//! 16 bits); a fast I/O has the target and non-async bits and the tag;
//! everything else is one of libublk's async futures (the tasks' I/O).

use super::background::{self, Background};
use super::engine::{keep_bell_armed, QueueEngine};
use super::gate::{Gate, Pass};
use super::queue::{auto_reg, zc_request};
use super::request::{decode, execute, execute_on, Op, Policy, Request};
use super::zc::ZcQueue;
use crate::image::fast::{FastBuf, FastEnd, FastIo};
use crate::image::Image;
use crate::io::wake::{Bell, CrossThread};
use libublk::helpers::IoBuf;
use libublk::io::{with_task_io_ring_mut, BufDescList, UblkDev, UblkQueue};
use libublk::uring_async::ublk_wake_task;
use libublk::{sys, BufDesc, UblkError, UblkIORes, UblkUringData};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

/// user_data bits of a fast I/O (with the tag in the low 16).
const FAST: u64 = UblkUringData::Target as u64 | UblkUringData::NonAsync as u64;

/// What the loop hands a tag's task.
#[derive(Debug, Default, PartialEq, Eq)]
enum Mail {
    #[default]
    Empty,
    /// Carry out the request now in the tag's I/O descriptor.
    Request,
    /// The fast path wrote the request's data: journal what it left pending,
    /// then answer with this.
    Settle(i32),
    /// The queue is down: end.
    Stop,
}

#[derive(Default)]
struct Tag {
    mail: Cell<Mail>,
    waker: Cell<Option<Waker>>,
    fast: Cell<Option<FastIo>>,
    stopped: Cell<bool>,
}

/// Resolves to the tag's next mail.
struct Recv<'a>(&'a Tag);

impl Future for Recv<'_> {
    type Output = Mail;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Mail> {
        match self.0.mail.take() {
            Mail::Empty => {
                self.0.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
            m => Poll::Ready(m),
        }
    }
}

/// Per-tag buffers: libublk's (copy mode), or the kernel's registered ones.
enum Bufs<'a> {
    Copy(&'a [IoBuf<u8>]),
    Zc(&'a ZcQueue),
}

struct Hybrid<'a, 'd> {
    q: &'a UblkQueue<'d>,
    qid: u16,
    gate: &'a Gate<Image>,
    pol: Policy,
    bufs: Bufs<'a>,
    tags: Box<[Tag]>,
    /// The queue's pass while fast requests are in flight, and how many.
    pass: RefCell<Option<Pass<'a, Image>>>,
    fast_inflight: Cell<u32>,
    max_len: u64,
    /// Requests the fast path carried out, and those the tasks did.
    fast_done: Cell<u64>,
    async_done: Cell<u64>,
}

impl<'a, 'd> Hybrid<'a, 'd> {
    /// Takes one CQE of the queue's ring.
    fn dispatch(&self, cqe: &io_uring::cqueue::Entry) {
        let ud = cqe.user_data();
        let tag = (ud & 0xffff) as u16;
        if ud & UblkUringData::Target as u64 == 0 {
            if cqe.result() == sys::UBLK_IO_RES_ABORT {
                self.stop(tag);
            } else {
                self.request(tag);
            }
        } else if ud & FAST == FAST {
            self.fast_done(tag, cqe.result());
        } else {
            ublk_wake_task(ud, cqe);
        }
    }

    fn tag(&self, tag: u16) -> Option<&Tag> {
        self.tags.get(usize::from(tag))
    }

    fn mail(&self, tag: u16, m: Mail) {
        if let Some(t) = self.tag(tag) {
            t.mail.set(m);
            if let Some(w) = t.waker.take() {
                w.wake();
            }
        }
    }

    fn stop(&self, tag: u16) {
        if let Some(t) = self.tag(tag) {
            if !t.stopped.replace(true) {
                self.mail(tag, Mail::Stop);
            }
        }
    }

    /// A request arrived on `tag`.
    fn request(&self, tag: u16) {
        if !self.try_fast(tag) {
            self.async_done.set(self.async_done.get() + 1);
            self.mail(tag, Mail::Request);
        }
    }

    fn try_fast(&self, tag: u16) -> bool {
        let Some(t) = self.tag(tag) else { return false };
        let iod = *self.q.get_iod(tag);
        let write = match iod.op_flags & 0xff {
            sys::UBLK_IO_OP_READ => false,
            sys::UBLK_IO_OP_WRITE if iod.op_flags & sys::UBLK_IO_F_FUA == 0 => true,
            _ => return false,
        };
        let buf = match self.bufs {
            Bufs::Zc(_) if iod.op_flags & sys::UBLK_IO_F_NEED_REG_BUF != 0 => return false,
            Bufs::Zc(_) => FastBuf::Fixed(ZcQueue::buf(tag)),
            Bufs::Copy(b) => match b.get(usize::from(tag)) {
                Some(b) => FastBuf::Mem(b.as_mut_ptr()),
                None => return false,
            },
        };
        let Some(off) = iod.start_sector.checked_mul(512) else { return false };
        let len = u64::from(iod.nr_sectors) << 9;
        if len > self.max_len {
            return false;
        }
        let mut pass = self.pass.borrow_mut();
        if pass.is_none() {
            *pass = self.gate.try_enter(usize::from(self.qid));
        }
        let io = pass.as_ref().and_then(|p| p.get()).and_then(|img| img.fast_begin(write, off, len));
        let Some(io) = io else {
            if self.fast_inflight.get() == 0 {
                *pass = None;
            }
            return false;
        };
        drop(pass);
        let sqe = io.sqe(buf).user_data(FAST | u64::from(tag));
        t.fast.set(Some(io));
        self.fast_inflight.set(self.fast_inflight.get() + 1);
        // SAFETY: the SQE's buffer is the tag's: libublk's buffer for the tag
        // (alive until the queue is dropped, after this loop) or the kernel's
        // registered buffer `tag`, which stays registered until the commit.
        // The tag belongs to the fast path until `fast_done` takes this SQE's
        // completion, and only then is the request committed.
        with_task_io_ring_mut(|r| unsafe {
            while r.submission().push(&sqe).is_err() {
                let _ = r.submit();
            }
        });
        true
    }

    /// The fast I/O of `tag` completed with `res`.
    fn fast_done(&self, tag: u16, res: i32) {
        let Some(io) = self.tag(tag).and_then(|t| t.fast.take()) else {
            tracing::error!(queue = self.qid, tag, "completion of a fast request that is not in flight");
            return;
        };
        let left = self.fast_inflight.get() - 1;
        self.fast_inflight.set(left);
        let end = {
            let mut pass = self.pass.borrow_mut();
            let end = match pass.as_ref().and_then(|p| p.get()) {
                Some(img) => img.fast_end(io, res, self.pol.for_image(img).lazy_metadata),
                // Unreachable: the pass that began it is held until now.
                None => FastEnd::Retry,
            };
            if left == 0 {
                *pass = None;
            }
            end
        };
        tracing::trace!(tag, res, ?end, "fast request");
        self.fast_done.set(self.fast_done.get() + 1);
        match end {
            FastEnd::Done(r) | FastEnd::Failed(r) => self.commit(tag, r),
            FastEnd::Settle(r) => self.mail(tag, Mail::Settle(r)),
            FastEnd::Retry => self.mail(tag, Mail::Request),
        }
    }

    /// Answers `tag`'s request with `res` and fetches its next one.
    fn commit(&self, tag: u16, res: i32) {
        let desc = match self.bufs {
            Bufs::Copy(b) => BufDesc::Slice(b.get(usize::from(tag)).map_or(&[][..], |b| b.as_slice())),
            Bufs::Zc(_) => BufDesc::AutoReg(auto_reg(tag)),
        };
        if let Err(e) = self.q.complete_io_cmd_unified(tag, desc, Ok(UblkIORes::Result(res))) {
            tracing::error!(queue = self.qid, tag, error = %super::error::ublk_why(&e), "commit failed");
            self.stop(tag);
        } else if self.q.is_stopping() {
            // A stopping queue queues no command: no completion will come.
            self.stop(tag);
        }
    }

    /// The tag's task: carries out what the fast path can't.
    async fn tag_task(&self, tag: u16) {
        let Some(t) = self.tag(tag) else { return };
        // The copy path's buffer in zero-copy mode (see `super::zc`).
        let mut bounce = match self.bufs {
            Bufs::Zc(_) => crate::io::AlignedBuf::zeroed(self.max_len as usize),
            Bufs::Copy(_) => crate::io::AlignedBuf::zeroed(0),
        };
        loop {
            let res = match Recv(t).await {
                Mail::Stop => break,
                Mail::Empty => continue,
                Mail::Request => self.carry_out(tag, &mut bounce).await,
                Mail::Settle(res) => self.settle(res).await,
            };
            self.commit(tag, res);
        }
    }

    async fn carry_out(&self, tag: u16, bounce: &mut [u8]) -> i32 {
        let b = match self.bufs {
            Bufs::Zc(zq) => return zc_request(self.q, self.qid, tag, self.gate, self.pol, zq, bounce).await,
            Bufs::Copy(b) => b,
        };
        let iod = *self.q.get_iod(tag);
        let res = match (decode(&iod), b.get(usize::from(tag))) {
            (Err(errno), _) => errno,
            (Ok(_), None) => -libc::EINVAL,
            (Ok(req), Some(b)) => {
                // SAFETY: the tag's buffer belongs to this task while it
                // carries out the tag's request (the module's ownership rule:
                // the loop handed it over with Mail::Request, and takes it
                // back only through the commit below in `tag_task`).
                let buf = unsafe { std::slice::from_raw_parts_mut(b.as_mut_ptr(), b.len()) };
                let pass = self.gate.enter(usize::from(self.qid)).await;
                match pass.get() {
                    Some(img) => execute_on(img, &QueueEngine, req, buf, self.pol.for_image(img), None).await,
                    None => -libc::EIO,
                }
            }
        };
        tracing::trace!(tag, op_flags = iod.op_flags, sector = iod.start_sector, nr = iod.nr_sectors, res, "request");
        res
    }

    /// Journals what a fast write left pending, as `execute_on` does after
    /// its write. The gate may have switched images in between: a snapshot
    /// freezes the old one with all of its metadata, so journaling the new
    /// one's is then all that is left.
    async fn settle(&self, res: i32) -> i32 {
        let pass = self.gate.enter(usize::from(self.qid)).await;
        let Some(img) = pass.get() else { return -libc::EIO };
        match img.journal_completed(&QueueEngine).await {
            Ok(()) => res,
            Err(e) => {
                tracing::warn!(error = %e, "journaling a fast write's metadata failed");
                -e.errno()
            }
        }
    }
}

/// One request as a hybrid queue carries it out, on a host ring: the fast
/// path when it takes the request (its SQE run at once, no task), else (and
/// for what the fast path hands back) the async path. For the host's tests
/// and the request-cost harness: the same image calls in the same order as
/// the queue's, with `Uring` where the queue has its ublk ring.
pub async fn execute_host(
    img: &Image,
    ring: &crate::io::uring::Uring,
    req: Request,
    buf: &mut [u8],
    pol: Policy,
) -> i32 {
    let write = match req.op {
        Op::Read => false,
        Op::Write { fua: false } => true,
        _ => return execute(img, ring, req, buf, pol).await,
    };
    if req.len > buf.len() as u64 {
        return execute(img, ring, req, buf, pol).await;
    }
    let Some(io) = img.fast_begin(write, req.off, req.len) else {
        return execute(img, ring, req, buf, pol).await;
    };
    let sqe = io.sqe(FastBuf::Mem(buf.as_mut_ptr()));
    // SAFETY: `buf` (at least the request's length, checked above) is
    // borrowed mutably for this whole call and not touched until run_one
    // returns with the completion.
    let res = match unsafe { ring.run_one(sqe) } {
        Ok(res) => res,
        Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
    };
    match img.fast_end(io, res, pol.for_image(img).lazy_metadata) {
        FastEnd::Done(r) | FastEnd::Failed(r) => r,
        FastEnd::Settle(r) => match img.journal_completed(ring).await {
            Ok(()) => r,
            Err(e) => -e.errno(),
        },
        FastEnd::Retry => execute(img, ring, req, buf, pol).await,
    }
}

/// Whether the daemon's queues are hybrid (the default) rather than all
/// async (`FVD_QUEUE_PATH=async` in the daemon's environment).
pub fn chosen() -> bool {
    std::env::var("FVD_QUEUE_PATH").map_or(true, |v| v != "async")
}

/// Serves queue `qid` until the device stops, on the image `gate` holds for
/// it. Runs on the queue's thread.
pub fn serve_queue(qid: u16, dev: &UblkDev, gate: Arc<Gate<Image>>, pol: Policy, bg: Background) {
    if super::ring::tuned() && super::ring::init_tuned(dev) && qid == 0 {
        tracing::info!("queue rings: SINGLE_ISSUER, DEFER_TASKRUN, COOP_TASKRUN, TASKRUN_FLAG");
    }
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => q,
        Err(e) => {
            tracing::error!(queue = qid, error = %super::error::ublk_why(&e), "queue setup failed");
            return;
        }
    };
    let bell = match Bell::new() {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(queue = qid, error = %e, "eventfd for the queue failed");
            return;
        }
    };
    let _registered = bell.register();
    let max_len = u64::from(q.dev.dev_info.max_io_buf_bytes);
    // Zero copy when the device was added with it (a recovered device keeps
    // the flags it was added with).
    let zc = q.support_auto_buf_zc();
    let zq = if zc {
        match ZcQueue::new(q.dev.dev_info.max_io_buf_bytes) {
            Ok(z) => Some(z),
            Err(e) => {
                tracing::error!(queue = qid, error = %e, "zero-copy set-up failed");
                return;
            }
        }
    } else {
        None
    };
    let copy_bufs: Vec<IoBuf<u8>> = if zc { Vec::new() } else { dev.alloc_queue_io_bufs() };
    let regs: Vec<sys::ublk_auto_buf_reg> = if zc { q.tags().map(auto_reg).collect() } else { Vec::new() };
    let list = if zc { BufDescList::AutoRegs(&regs) } else { BufDescList::Slices(Some(&copy_bufs)) };
    let q = match q.submit_fetch_commands_unified(list) {
        Ok(q) => q,
        Err(e) => {
            tracing::error!(queue = qid, error = %super::error::ublk_why(&e), "fetching requests failed");
            return;
        }
    };
    let bufs = match &zq {
        Some(z) => Bufs::Zc(z),
        None => Bufs::Copy(&copy_bufs),
    };
    let nr = q.tags().map(|t| usize::from(t) + 1).max().unwrap_or(0);
    let h = Hybrid {
        q: &q,
        qid,
        gate: &gate,
        pol,
        bufs,
        tags: (0..nr).map(|_| Tag::default()).collect(),
        pass: RefCell::new(None),
        fast_inflight: Cell::new(0),
        max_len,
        fast_done: Cell::new(0),
        async_done: Cell::new(0),
    };
    let tags_live = std::rc::Rc::new(Cell::new(0usize));
    let exe = smol::LocalExecutor::new();
    let mut tasks = Vec::new();
    for tag in q.tags() {
        let (h, live) = (&h, tags_live.clone());
        live.set(live.get() + 1);
        tasks.push(exe.spawn(CrossThread::new(async move {
            h.tag_task(tag).await;
            live.set(live.get() - 1);
        })));
    }
    // Copy-on-read and prefetch run beside the requests and end after them.
    tasks.extend(background::spawn_all(&exe, &gate, qid, &tags_live, bg));
    let bell_task = exe.spawn(keep_bell_armed(bell));
    let run = || while exe.try_tick() {};
    loop {
        run();
        match q.flush_and_wake_io_tasks(|_, cqe, _| h.dispatch(cqe), 1) {
            Ok(_) => {}
            Err(UblkError::IOError(e)) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(UblkError::QueueIsDown) => break,
            // As libublk's own loop: an error of one wait is not the end.
            Err(e) => {
                tracing::warn!(queue = qid, error = %super::error::ublk_why(&e), "waiting for completions failed")
            }
        }
    }
    // Down: the tags end as their requests finish, the background work after
    // them; every operation in flight is reaped before the buffers go.
    let mut cqes = Vec::new();
    while !(tasks.iter().all(|t| t.is_finished()) && h.fast_inflight.get() == 0) {
        run();
        let ts = io_uring::types::Timespec::new().nsec(100_000_000);
        let args = io_uring::types::SubmitArgs::new().timespec(&ts);
        with_task_io_ring_mut(|r| {
            let _ = r.submitter().submit_with_args(1, &args);
            cqes.extend(r.completion());
        });
        for cqe in cqes.drain(..) {
            h.dispatch(&cqe);
        }
    }
    drop(bell_task);
    drop(tasks);
    tracing::info!(queue = qid, fast = h.fast_done.get(), r#async = h.async_done.get(), "queue done");
}
