//! Page-aligned buffers: O_DIRECT needs buffer addresses aligned to the
//! logical block size, and a page covers every device.
//!
//! The ublk queues' per-tag buffers are libublk's `IoBuf`, also page-aligned,
//! and the two cannot be one type:
//! - the queues need `IoBuf`: libublk's `submit_io_prep_cmd` takes the tag's
//!   buffer as `Option<&IoBuf<u8>>` and, for a copying device (ours), refuses
//!   a non-empty slice without the `IoBuf` it came from (EINVAL); it records
//!   that buffer for the tag (idle page release, optional mlock);
//! - this layer cannot use `IoBuf`: it would make `io` depend on the ublk
//!   library, and `IoBuf` does not give what the image relies on here: its
//!   memory is not zeroed (reads short of the buffer's end, at the base's
//!   end, rely on the zeros of [`AlignedBuf::zeroed`]), a zero length
//!   panics (an empty [`AlignedBuf`] is valid), and it is `Send + Sync`
//!   whatever its element type.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

pub const ALIGN: usize = 4096;

pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8], like a Vec<u8>.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> AlignedBuf {
        let cap = len.max(1).div_ceil(ALIGN) * ALIGN;
        let layout =
            Layout::from_size_align(cap, ALIGN).unwrap_or_else(|_| alloc::handle_alloc_error(Layout::new::<u8>()));
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len, cap }
    }

    /// An aligned copy of `data`.
    pub fn from_slice(data: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(data.len());
        b.copy_from_slice(data);
        b
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points at `cap >= len` initialised (zeroed) bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with exactly this size and alignment.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Layout::from_size_align_unchecked(self.cap, ALIGN)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_zeroed() {
        for len in [0, 1, 512, 4096, 10000] {
            let b = AlignedBuf::zeroed(len);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
        }
        assert_eq!(&AlignedBuf::from_slice(b"abc")[..], b"abc");
    }
}
