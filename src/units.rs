//! Unit newtypes for the quantities that cross module boundaries.
//!
//! A guest byte offset, a block index, a virtual chunk index and a physical chunk
//! index are all integers; mixing them up is the classic image-format bug. Each
//! gets its own type, and conversions between them go through [`Geometry`].

use std::fmt;

macro_rules! unit {
    ($(#[$m:meta])* $name:ident, $inner:ty) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub $inner);

        impl $name {
            /// The raw integer, for encoders and arithmetic at the edges.
            pub const fn get(self) -> $inner {
                self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:#x})", stringify!($name), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

unit!(
    /// A length or offset in bytes.
    Bytes, u64);
unit!(
    /// A length or offset in 512-byte sectors.
    Sectors, u64);
unit!(
    /// Index of a copy-on-write block in the guest address space.
    BlockIdx, u64);
unit!(
    /// Index of a chunk in the guest address space (a slot of the table).
    ChunkIdx, u64);
unit!(
    /// Index of a chunk of storage in the image's data region.
    PhysChunk, u32);

pub const SECTOR: u64 = 512;

impl Bytes {
    pub const ZERO: Bytes = Bytes(0);

    pub fn to_sectors(self) -> Sectors {
        Sectors(self.0 / SECTOR)
    }

    pub fn is_sector_aligned(self) -> bool {
        self.0 % SECTOR == 0
    }

    pub fn checked_add(self, other: Bytes) -> Option<Bytes> {
        self.0.checked_add(other.0).map(Bytes)
    }
}

impl Sectors {
    pub fn to_bytes(self) -> Bytes {
        Bytes(self.0 * SECTOR)
    }
}

impl std::ops::Add for Bytes {
    type Output = Bytes;
    fn add(self, o: Bytes) -> Bytes {
        Bytes(self.0 + o.0)
    }
}

impl std::ops::Sub for Bytes {
    type Output = Bytes;
    fn sub(self, o: Bytes) -> Bytes {
        Bytes(self.0 - o.0)
    }
}

/// Parses a size such as `512`, `64k`, `1M`, `8G`, `1T` (binary multiples).
/// A rate in bytes per second (k/M/G suffixes), at least 1: a rate of 0
/// would never finish (no limit is the option left out).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    match parse_size(s)?.0 {
        0 => Err("a rate of 0 would never finish: give at least 1 byte per second, or leave the rate out for no limit"
            .into()),
        r => Ok(r),
    }
}

pub fn parse_size(s: &str) -> Result<Bytes, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_lowercase() {
                'b' => 1u64,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                'p' => 1 << 50,
                _ => return Err(format!("bad size suffix in '{s}' (use k, M, G, T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size (examples: 4096, 64k, 1M, 8G)"))?;
    n.checked_mul(mult).map(Bytes).ok_or_else(|| format!("size '{s}' is too large"))
}

/// Formats a byte count for people: `1.5 GiB`.
pub fn human(b: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("512").unwrap(), Bytes(512));
        assert_eq!(parse_size("64k").unwrap(), Bytes(65536));
        assert_eq!(parse_size("1M").unwrap(), Bytes(1 << 20));
        assert_eq!(parse_size("8G").unwrap(), Bytes(8 << 30));
        assert_eq!(parse_size("1T").unwrap(), Bytes(1 << 40));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("abc").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(100), "100 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(1 << 40), "1.0 TiB");
    }
}
