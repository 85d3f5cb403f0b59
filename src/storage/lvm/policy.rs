//! When to grow an LV and to what size (pure decisions, no I/O).
//!
//! The LV keeps between one and two grow units of free space past the
//! storage the image uses (`used`: the end of its highest allocated chunk):
//! once the free space ahead drops below the low-water mark (one unit), a
//! background growth adds whole units until it is back above it. Sizes stay
//! `initial + n × unit`, so the number of units added is `(size − initial) /
//! unit`. A write that needs space past the end waits for the same growth;
//! when the volume group cannot give a whole unit, the growth falls back to
//! the least size that holds what the write needs.
//!
//! Growth never goes past the most the image can need (`limit`: its metadata and
//! every chunk, set once the image is open), and the default unit is bounded by
//! it: at most an eighth of it, so that the one to two units kept ahead are at
//! most a quarter of the disk (a 2 GiB image grows 256 MiB at a time, not 1 GiB).

/// Growth parameters, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Growth step: a multiple of the extent size.
    pub unit: u64,
    /// Grow when less than this much is free past `used`.
    pub low_water: u64,
    /// The volume group's extent size (LV sizes are multiples of it).
    pub extent: u64,
    /// The most the image can ever need; `u64::MAX` until the image says.
    pub limit: u64,
}

/// Default grow unit (see docs/lvm.md for the reasoning).
pub const DEFAULT_GROW_UNIT: u64 = 1 << 30;
/// Where [`choose_unit`] says the unit came from when nobody chose it.
pub const FROM_DEFAULT: &str = "the default";
/// Smallest and largest grow unit accepted.
pub const MIN_GROW_UNIT: u64 = 1 << 20;
pub const MAX_GROW_UNIT: u64 = 1 << 40;

impl Policy {
    /// A policy for `unit` (rounded up to whole extents), low water = one unit.
    pub fn new(unit: u64, extent: u64) -> Policy {
        let extent = extent.max(512);
        let unit = unit.clamp(MIN_GROW_UNIT, MAX_GROW_UNIT).div_ceil(extent) * extent;
        Policy { unit, low_water: unit, extent, limit: u64::MAX }
    }

    /// This policy for an image that needs at most `limit` bytes: growth stops
    /// there, and when `bound_unit` (the unit is the default, nobody chose it)
    /// the unit is at most an eighth of it, in whole extents.
    pub fn bounded(self, limit: u64, bound_unit: bool) -> Policy {
        let mut p = Policy { limit, ..self };
        if bound_unit {
            let most = (limit / 8 / self.extent * self.extent).max(MIN_GROW_UNIT.div_ceil(self.extent) * self.extent);
            p.unit = p.unit.min(most);
            p.low_water = p.unit;
        }
        p
    }

    /// The largest size growth goes to: `limit` in whole extents.
    pub fn cap(&self) -> u64 {
        if self.limit == u64::MAX {
            u64::MAX
        } else {
            self.minimal(self.limit)
        }
    }

    /// Whether the free space past `used` is below the low-water mark (and the
    /// LV is short of the most the image can need).
    pub fn wants_growth(&self, size: u64, used: u64) -> bool {
        size < self.cap() && size.saturating_sub(used) < self.low_water
    }

    /// The size to grow to: `size + k × unit` with the least `k ≥ 1` that
    /// leaves at least the low-water mark free past `used`, never past the cap
    /// (but always holding `used`).
    pub fn target(&self, size: u64, used: u64) -> u64 {
        let want = used.saturating_add(self.low_water);
        let k = want.saturating_sub(size).div_ceil(self.unit).max(1);
        size.saturating_add(k.saturating_mul(self.unit)).min(self.cap()).max(self.minimal(used))
    }

    /// The least LV size that holds `need` bytes.
    pub fn minimal(&self, need: u64) -> u64 {
        need.div_ceil(self.extent) * self.extent
    }

    /// Growth in steps (the one-shot commands): what `used` needs, but at
    /// least [`STEP`] (or the unit, if smaller) past `size`, so that a long
    /// copy grows the LV a few times, not once per extent, while taking from
    /// the volume group no more than that ahead.
    pub fn step(&self, size: u64, used: u64) -> u64 {
        self.minimal(used.max(size.saturating_add(STEP.min(self.unit)))).min(self.cap()).max(self.minimal(used))
    }

    /// The size one growth goes to, from `size`, for `used` bytes.
    pub fn goal(&self, g: Growth, size: u64, used: u64) -> u64 {
        match g {
            Growth::Ahead => self.target(size, used),
            Growth::Steps => self.step(size, used),
            Growth::Exact => self.minimal(used),
        }
    }
}

/// How far an LV grows past what is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Growth {
    /// One to two grow units ahead, in the background (the serving daemon).
    Ahead,
    /// By [`STEP`] or the need (the one-shot commands: commit, rebase, ...).
    Steps,
    /// Exactly the need (`fvd create`: room for the metadata).
    Exact,
}

/// The least growth in steps (see [`Policy::step`]).
pub const STEP: u64 = 64 << 20;

/// Picks the grow unit: an explicit value (API), else $FVD_GROW_UNIT, else
/// the LV's `fvd-grow-unit=SIZE` tag, else [`DEFAULT_GROW_UNIT`]. Returns the
/// unit and where it came from.
pub fn choose_unit(
    explicit: Option<u64>,
    env: Option<&str>,
    tag: Option<Result<u64, String>>,
) -> Result<(u64, &'static str), String> {
    let checked = |v: u64, from: &'static str| {
        if (MIN_GROW_UNIT..=MAX_GROW_UNIT).contains(&v) {
            Ok((v, from))
        } else {
            Err(format!("grow unit from {from} must be between 1 MiB and 1 TiB, not {v} bytes"))
        }
    };
    if let Some(v) = explicit {
        return checked(v, "the caller");
    }
    if let Some(s) = env.filter(|s| !s.trim().is_empty()) {
        let v = crate::units::parse_size(s).map_err(|e| format!("FVD_GROW_UNIT: {e}"))?;
        return checked(v.0, "FVD_GROW_UNIT");
    }
    match tag {
        Some(Ok(v)) => checked(v, "the LV tag fvd-grow-unit"),
        Some(Err(e)) => Err(format!("LV tag fvd-grow-unit: {e}")),
        None => Ok((DEFAULT_GROW_UNIT, FROM_DEFAULT)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    const M: u64 = 1 << 20;

    #[test]
    fn the_default_unit_keeps_at_most_a_quarter_of_the_image_ahead() {
        // A 2 GiB image (20 MiB of metadata): 256 MiB units, not 1 GiB.
        let limit = 2068 * M;
        let p = Policy::new(DEFAULT_GROW_UNIT, 4 * M).bounded(limit, true);
        assert_eq!(p.unit, 256 * M);
        // After 8 MiB of data past 20 MiB of metadata, from a 20 MiB LV.
        let t = p.target(20 * M, 28 * M);
        assert!(t - 28 * M <= 2 * p.unit && t - 28 * M <= 2048 * M / 4, "{t}");
        // Never past the most the image can need, but always what is used.
        assert_eq!(p.target(2000 * M, 2000 * M), 2068 * M);
        assert!(!p.wants_growth(2068 * M, 2060 * M));
        assert_eq!(p.step(2064 * M, 2064 * M), 2068 * M);
        // A unit someone chose stays (only the cap applies), and a small image
        // still grows at least 1 MiB at a time.
        assert_eq!(Policy::new(DEFAULT_GROW_UNIT, 4 * M).bounded(limit, false).unit, DEFAULT_GROW_UNIT);
        assert_eq!(Policy::new(DEFAULT_GROW_UNIT, 4 * M).bounded(8 * M, true).unit, 4 * M);
        assert_eq!(Policy::new(DEFAULT_GROW_UNIT, 512).bounded(4 * M, true).unit, M);
    }

    #[test]
    fn unit_rounds_to_extents() {
        let p = Policy::new(10 * M, 4 * M);
        assert_eq!(p.unit, 12 * M);
        assert_eq!(p.low_water, 12 * M);
        assert_eq!(Policy::new(1, 4 * M).unit, 4 * M);
    }

    #[test]
    fn growth_keeps_one_to_two_units_ahead() {
        let p = Policy::new(64 * M, 4 * M);
        // 64 MiB LV, 17 MiB of metadata, first chunk allocated: 46 MiB free < 64.
        assert!(p.wants_growth(64 * M, 18 * M));
        assert_eq!(p.target(64 * M, 18 * M), 128 * M);
        assert!(!p.wants_growth(128 * M, 64 * M));
        assert!(p.wants_growth(128 * M, 65 * M));
        // A writer that got ahead of the grower: past the end by 10 MiB.
        assert_eq!(p.target(128 * M, 138 * M), 256 * M);
        // Exactly at the mark.
        assert_eq!(p.target(128 * M, 64 * M), 192 * M);
        // Stepping `used` through a 1 GiB write from a 64 MiB LV: every growth
        // adds one unit, and the count is ceil(used / unit).
        let (mut size, mut growths) = (64 * M, 0);
        for used in (18..=1041).map(|m| m * M) {
            if p.wants_growth(size, used) {
                let t = p.target(size, used);
                assert_eq!(t - size, 64 * M);
                size = t;
                growths += 1;
            }
            assert!(size - used >= 64 * M && size - used < 128 * M);
        }
        assert_eq!(growths, 1041u64.div_ceil(64));
        assert_eq!(size, 64 * M + growths * 64 * M);
        assert_eq!(p.minimal(138 * M + 1), 140 * M);
        // Without growth ahead: the need, or one step past the size, whichever is more.
        assert_eq!(p.step(128 * M, 130 * M), 192 * M);
        assert_eq!(p.step(128 * M, 300 * M + 1), 304 * M);
        let small = Policy::new(8 * M, 4 * M);
        assert_eq!(small.step(128 * M, 129 * M), 136 * M, "a unit under the step bounds it");
        assert_eq!(p.goal(Growth::Exact, 128 * M, 130 * M), 132 * M);
        assert_eq!(p.goal(Growth::Steps, 128 * M, 130 * M), 192 * M);
        assert_eq!(p.goal(Growth::Ahead, 128 * M, 130 * M), p.target(128 * M, 130 * M));
    }

    #[test]
    fn unit_sources_in_order() {
        let tag = || Some(Ok(256 * M));
        assert_eq!(choose_unit(Some(2 * M), Some("8M"), tag()), Ok((2 * M, "the caller")));
        assert_eq!(choose_unit(None, Some("8M"), tag()), Ok((8 * M, "FVD_GROW_UNIT")));
        assert_eq!(choose_unit(None, Some(" "), tag()).unwrap().0, 256 * M);
        assert_eq!(choose_unit(None, None, None), Ok((DEFAULT_GROW_UNIT, "the default")));
        assert!(choose_unit(None, Some("x"), None).is_err());
        assert!(choose_unit(None, Some("4k"), None).is_err());
        assert!(choose_unit(None, None, Some(Err("bad".into()))).is_err());
    }
}
