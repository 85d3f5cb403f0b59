//! Device parameters that tell the block layer the truth about the image.

use super::DaemonError;
use libublk::sys;

/// What the parameters are derived from.
#[derive(Debug, Clone, Copy)]
pub struct ParamsInput {
    pub size: u64,
    /// The image's copy-on-write block size.
    pub block_size: u32,
    /// 512 or 4096.
    pub logical_block: u32,
    pub read_only: bool,
    /// Writes are durable when they complete: no volatile cache to flush.
    pub writethrough: bool,
    /// Largest request in bytes (the per-tag buffer).
    pub max_io_bytes: u32,
}

/// The largest discard or write-zeroes request, in sectors (1 GiB).
const MAX_DISCARD_SECTORS: u32 = 1 << 21;

fn shift(v: u32) -> u8 {
    v.trailing_zeros() as u8
}

pub fn device_params(i: &ParamsInput) -> Result<sys::ublk_params, DaemonError> {
    if i.logical_block != 512 && i.logical_block != 4096 {
        return Err(DaemonError::Invalid(format!(
            "logical block size {} is not supported: use 512 or 4096",
            i.logical_block
        )));
    }
    if i.size == 0 || i.size % u64::from(i.logical_block) != 0 {
        return Err(DaemonError::Invalid(format!(
            "image size {} is not a multiple of the logical block size {}",
            i.size, i.logical_block
        )));
    }
    if !i.block_size.is_power_of_two() || i.block_size < 512 {
        return Err(DaemonError::Invalid(format!("image block size {} is not a power of two", i.block_size)));
    }
    // A write smaller than the block may cost a read-modify-write (copy-on-write
    // from the base): say so as the physical block, up to what the block layer
    // accepts there (a page), and as the optimal I/O size.
    let physical = i.block_size.clamp(i.logical_block, 4096);
    let mut attrs = 0;
    if i.read_only {
        attrs |= sys::UBLK_ATTR_READ_ONLY;
    } else if !i.writethrough {
        // Writes sit in the page cache and in uncommitted metadata until a
        // FLUSH: ask for flushes, and for FUA on writes that need to be durable.
        attrs |= sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
    }
    let mut p = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC,
        basic: sys::ublk_param_basic {
            attrs,
            logical_bs_shift: shift(i.logical_block),
            physical_bs_shift: shift(physical),
            io_min_shift: shift(physical),
            io_opt_shift: shift(i.block_size),
            max_sectors: i.max_io_bytes >> 9,
            dev_sectors: i.size >> 9,
            ..Default::default()
        },
        ..Default::default()
    };
    if !i.read_only {
        // Discarding less than a block frees nothing; the driver takes only
        // single-range discards.
        p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        p.discard = sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: i.block_size,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_discard_segments: 1,
            reserved0: 0,
        };
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> ParamsInput {
        ParamsInput {
            size: 8 << 30,
            block_size: 64 << 10,
            logical_block: 512,
            read_only: false,
            writethrough: false,
            max_io_bytes: 512 << 10,
        }
    }

    #[test]
    fn default_device() {
        let p = device_params(&input()).unwrap();
        assert_eq!(p.types, sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD);
        assert_eq!(p.basic.attrs, sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA);
        assert_eq!(p.basic.logical_bs_shift, 9);
        assert_eq!(p.basic.physical_bs_shift, 12);
        assert_eq!(p.basic.io_opt_shift, 16);
        assert_eq!(p.basic.dev_sectors, (8u64 << 30) >> 9);
        assert_eq!(p.basic.max_sectors, 1024);
        assert_eq!(p.discard.discard_granularity, 64 << 10);
        assert_eq!(p.discard.max_discard_segments, 1);
    }

    #[test]
    fn read_only_and_writethrough() {
        let p = device_params(&ParamsInput { read_only: true, ..input() }).unwrap();
        assert_eq!(p.basic.attrs, sys::UBLK_ATTR_READ_ONLY);
        assert_eq!(p.types, sys::UBLK_PARAM_TYPE_BASIC);
        let p = device_params(&ParamsInput { writethrough: true, ..input() }).unwrap();
        assert_eq!(p.basic.attrs, 0);
    }

    #[test]
    fn block_sizes() {
        let p = device_params(&ParamsInput { logical_block: 4096, block_size: 4096, ..input() }).unwrap();
        assert_eq!((p.basic.logical_bs_shift, p.basic.physical_bs_shift), (12, 12));
        let p = device_params(&ParamsInput { block_size: 1 << 20, ..input() }).unwrap();
        assert_eq!((p.basic.physical_bs_shift, p.basic.io_opt_shift), (12, 20));
        assert!(device_params(&ParamsInput { logical_block: 1024, ..input() }).is_err());
        assert!(device_params(&ParamsInput { logical_block: 4096, size: (1 << 20) + 512, ..input() }).is_err());
    }
}
