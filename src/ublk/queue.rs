//! One queue: a thread with its own io_uring and executor, one task per tag.

use super::background::{self, Background};
use super::engine::{keep_bell_armed, QueueEngine};
use super::gate::Gate;
use super::request::{decode, execute_on, Policy, Zc};
use super::zc::ZcQueue;
use crate::image::Image;
use crate::io::wake::{Bell, CrossThread};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::{sys, BufDesc, UblkError};
use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;

/// Seconds without I/O before libublk lets an idle queue release its buffers.
const IDLE_SECS: u64 = 20;

/// Serves queue `qid` until the device stops, on the image `gate` holds for
/// it. Runs on the queue's thread.
pub fn serve_queue(qid: u16, dev: &UblkDev, gate: Arc<Gate<Image>>, pol: Policy, bg: Background) {
    if super::ring::tuned() && super::ring::init_tuned(dev) && qid == 0 {
        tracing::info!("queue rings: SINGLE_ISSUER, DEFER_TASKRUN, COOP_TASKRUN, TASKRUN_FLAG");
    }
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
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
    // Every task is wrapped, so that no wake from another queue's thread,
    // whatever it waited for, can leave this one asleep.
    let _registered = bell.register();
    // Zero copy when the device was added with it (a recovered device keeps
    // the flags it was added with).
    let zc = if q.support_auto_buf_zc() {
        match ZcQueue::new(q.dev.dev_info.max_io_buf_bytes) {
            Ok(z) => Some(Rc::new(z)),
            Err(e) => {
                tracing::error!(queue = qid, error = %e, "zero-copy set-up failed");
                return;
            }
        }
    } else {
        None
    };
    let exe = Rc::new(smol::LocalExecutor::new());
    let mut tasks = Vec::new();
    let tags_live = Rc::new(Cell::new(0usize));
    for tag in q.tags() {
        let (q, gate, live, zc) = (q.clone(), gate.clone(), tags_live.clone(), zc.clone());
        live.set(live.get() + 1);
        tasks.push(exe.spawn(CrossThread::new(async move {
            let r = match zc {
                Some(z) => tag_task_zc(&q, qid, tag, &gate, pol, &z).await,
                None => tag_task(&q, qid, tag, &gate, pol).await,
            };
            match r {
                Err(UblkError::QueueIsDown) | Ok(()) => {}
                Err(e) => tracing::error!(queue = qid, tag, error = %super::error::ublk_why(&e), "tag task failed"),
            }
            live.set(live.get() - 1);
        })));
    }
    // Copy-on-read and prefetch run beside the requests and end after them.
    tasks.extend(background::spawn_all(&exe, &gate, qid, &tags_live, bg));
    let bell_task = exe.spawn(keep_bell_armed(bell));
    let ticker = exe.clone();
    smol::block_on(exe.run(async {
        let run_ops = || while ticker.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&q, Some(IDLE_SECS), run_ops, done).await {
            tracing::error!(queue = qid, error = %super::error::ublk_why(&e), "queue loop failed");
        }
    }));
    // The bell's poll points at no memory: dropping it in flight is harmless.
    drop(bell_task);
    tracing::debug!(queue = qid, "queue done");
}

/// One tag: fetch a request, pass the gate, carry it out on the image the
/// gate gives, commit the result, repeat.
async fn tag_task(q: &UblkQueue<'_>, qid: u16, tag: u16, gate: &Gate<Image>, pol: Policy) -> Result<(), UblkError> {
    // libublk's own buffer type, which its prep command requires (see
    // crate::io::aligned for why it is not the io layer's AlignedBuf).
    let mut buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf)).await?;
    loop {
        let iod = *q.get_iod(tag);
        let res = match decode(&iod) {
            Ok(req) => {
                let pass = gate.enter(usize::from(qid)).await;
                match pass.get() {
                    Some(img) => execute_on(img, &QueueEngine, req, buf.as_mut_slice(), pol.for_image(img), None).await,
                    None => -libc::EIO,
                }
            }
            Err(errno) => errno,
        };
        tracing::trace!(tag, op_flags = iod.op_flags, sector = iod.start_sector, nr = iod.nr_sectors, res, "request");
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res).await?;
    }
}

/// One tag in zero-copy mode: the kernel registers each request's pages as
/// fixed buffer `tag` on this queue's ring before handing the request over,
/// and unregisters them when it is committed. `buf` serves only the requests
/// that take the copy path.
async fn tag_task_zc(
    q: &UblkQueue<'_>,
    qid: u16,
    tag: u16,
    gate: &Gate<Image>,
    pol: Policy,
    zq: &ZcQueue,
) -> Result<(), UblkError> {
    let desc = BufDesc::AutoReg(auto_reg(tag));
    let mut buf = crate::io::AlignedBuf::zeroed(q.dev.dev_info.max_io_buf_bytes as usize);
    q.submit_io_prep_cmd(tag, desc.clone(), 0, None).await?;
    loop {
        let res = zc_request(q, qid, tag, gate, pol, zq, &mut buf).await;
        q.submit_io_commit_cmd(tag, desc.clone(), res).await?;
    }
}

/// The auto registration of `tag`'s request buffer: fixed buffer `tag`.
/// When auto registration fails (the index is taken), the kernel hands the
/// request over anyway with UBLK_IO_F_NEED_REG_BUF, and the server registers it.
pub(super) fn auto_reg(tag: u16) -> sys::ublk_auto_buf_reg {
    sys::ublk_auto_buf_reg { index: tag, flags: sys::UBLK_AUTO_BUF_REG_FALLBACK as u8, ..Default::default() }
}

/// Carries out the zero-copy request in `tag`'s I/O descriptor (registering
/// its buffer by hand when the kernel could not), with `buf` for the copy
/// path. Returns what the request is answered with.
pub(super) async fn zc_request(
    q: &UblkQueue<'_>,
    qid: u16,
    tag: u16,
    gate: &Gate<Image>,
    pol: Policy,
    zq: &ZcQueue,
    buf: &mut [u8],
) -> i32 {
    let iod = *q.get_iod(tag);
    let by_hand = iod.op_flags & sys::UBLK_IO_F_NEED_REG_BUF != 0 && has_data(&iod);
    let registered = !by_hand || {
        let r = q.submit_register_io_buf(tag, tag).await;
        if r < 0 {
            tracing::warn!(queue = qid, tag, errno = -r, "registering a request buffer by hand failed");
        }
        r >= 0
    };
    let res = match decode(&iod) {
        Ok(_) if !registered => -libc::EIO,
        Ok(req) => {
            let pass = gate.enter(usize::from(qid)).await;
            match pass.get() {
                Some(img) => {
                    let z = Some(Zc { q: zq, tag });
                    execute_on(img, &QueueEngine, req, buf, pol.for_image(img), z).await
                }
                None => -libc::EIO,
            }
        }
        Err(errno) => errno,
    };
    if by_hand && registered {
        let _ = q.submit_unregister_io_buf(tag, tag).await;
    }
    tracing::trace!(tag, op_flags = iod.op_flags, sector = iod.start_sector, nr = iod.nr_sectors, res, "request");
    res
}

/// Reads and writes carry data; other requests have no buffer.
fn has_data(iod: &sys::ublksrv_io_desc) -> bool {
    matches!(iod.op_flags & 0xff, sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE)
}
