//! The 4096-byte image header: see the table in the [module docs](super).

use super::{le_u16, le_u32, le_u64, META_BLOCK};
use thiserror::Error;

pub const MAGIC: [u8; 8] = *b"FVD\0img\x01";
pub const VERSION: u32 = 1;
/// Incompatible feature: the image has a one-level table.
pub const INCOMPAT_TABLE: u64 = 1;
/// Incompatible feature: a resize that moves the metadata is under way (or was
/// interrupted): table entries may name physical chunks below `resize_chunks`,
/// past the number of chunks the virtual size has. Set only between the first
/// and the last header write of such a resize.
pub const INCOMPAT_RESIZING: u64 = 1 << 1;
/// Incompatible feature: every journal block of the current log carries its
/// position within its commit (see [`super::journal`]), so a damaged block
/// followed by a later, completed commit is told from a torn last commit.
/// Set by every header write of a writer of this version; an older reader,
/// which would take such a block's length field as too large and the log as
/// ending there, refuses the image instead.
pub const INCOMPAT_JOURNAL_POS: u64 = 1 << 2;
/// Incompatible feature: every journal block is written twice, side by side
/// (see [`super::journal`]), so a damaged sector in the last commit, which no
/// later commit vouches for, loses nothing. Set at create and by the header
/// write of a checkpoint (where a new log starts) of a writer of this version;
/// never changed while a log is under way. An older reader would take the
/// second copies for blocks of their own and refuses the image instead.
pub const INCOMPAT_JOURNAL_DUP: u64 = 1 << 3;
/// Incompatible feature: the table and the bitmap are kept in two copies, the
/// second (the twin) right after the journal, and the header holds which copy is
/// current and a CRC-32 of each stripe of it (see [`super::twin`]). A checkpoint
/// writes the copy that is not current, switches to it with one header write,
/// then brings the other up to date; a damaged block is repaired from its twin.
/// Set at create; an older reader would ignore the checksums and the twin and
/// refuses the image instead.
pub const INCOMPAT_META_TWIN: u64 = 1 << 4;
const KNOWN_INCOMPAT: u64 =
    INCOMPAT_TABLE | INCOMPAT_RESIZING | INCOMPAT_JOURNAL_POS | INCOMPAT_JOURNAL_DUP | INCOMPAT_META_TWIN;
/// Flag: the image was not closed cleanly; replay the journal.
pub const FLAG_DIRTY: u64 = 1;
/// Flag: a snapshot layer. Its content is a point in time that overlays read
/// through; a write-open is refused (a commit into it is the one exception).
pub const FLAG_FROZEN: u64 = 1 << 1;
/// Flag: a commit wrote into a layer below this one, so this layer no longer
/// reads what it read when it was frozen. It is never opened again.
pub const FLAG_INVALID: u64 = 1 << 2;
/// Flag: a commit from this image into a layer of its chain is under way (or was
/// interrupted): the layers below may change, so their identity checks are
/// relaxed for this image's chain until the commit completes.
pub const FLAG_COMMITTING: u64 = 1 << 3;
/// Compatible feature: the whole base has been copied into the image; the base
/// is never opened and the bitmap never consulted again.
pub const COMPAT_PREFETCHED: u64 = 1;
/// Compatible feature: serve reads from the base with copy-on-read by default.
pub const COMPAT_COPY_ON_READ: u64 = 1 << 1;
/// Compatible feature: prefetch the base in the background by default.
pub const COMPAT_PREFETCH: u64 = 1 << 2;
const CURSOR_OFF: usize = PATH_OFF + MAX_BASE_PATH;
const SESSION_OFF: usize = CURSOR_OFF + 8;
const INIT_END_OFF: usize = SESSION_OFF + 8;
const UUID_OFF: usize = INIT_END_OFF + 8;
const BASE_UUID_OFF: usize = UUID_OFF + 16;
const BASE_PRINT_OFF: usize = BASE_UUID_OFF + 16;
const COMMIT_DEPTH_OFF: usize = BASE_PRINT_OFF + 8;
const RESIZE_CHUNKS_OFF: usize = COMMIT_DEPTH_OFF + 4;
const META_COPY_OFF: usize = RESIZE_CHUNKS_OFF + 4;
const META_STRIPES_OFF: usize = META_COPY_OFF + 4;
const META_SUMS_OFF: usize = META_STRIPES_OFF + 4;
/// The most stripe checksums a header holds (see [`super::twin`]).
pub const MAX_META_STRIPES: usize = 704;
pub const MAX_BASE_PATH: usize = 1024;
const CRC_OFF: usize = 4092;
const PATH_OFF: usize = 152;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("not an FVD image (bad magic)")]
    BadMagic,
    #[error("header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadChecksum { stored: u32, computed: u32 },
    #[error("unsupported FVD version {0}")]
    UnsupportedVersion(u32),
    #[error("unsupported incompatible features {0:#x}")]
    UnsupportedFeatures(u64),
    #[error("header is truncated ({0} bytes, need 4096)")]
    Truncated(usize),
    #[error("bad header field {field}: {why}")]
    BadField { field: &'static str, why: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseFormat {
    None,
    Raw,
    Fvd,
}

impl BaseFormat {
    fn code(self) -> u32 {
        match self {
            BaseFormat::None => 0,
            BaseFormat::Raw => 1,
            BaseFormat::Fvd => 2,
        }
    }

    fn from_code(c: u32) -> Option<Self> {
        Some(match c {
            0 => BaseFormat::None,
            1 => BaseFormat::Raw,
            2 => BaseFormat::Fvd,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            BaseFormat::None => "none",
            BaseFormat::Raw => "raw",
            BaseFormat::Fvd => "fvd",
        }
    }
}

/// A decoded header. Field meanings are in the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub incompat: u64,
    pub compat: u64,
    pub flags: u64,
    pub virtual_size: u64,
    pub block_size: u32,
    pub chunk_size: u32,
    pub table_offset: u64,
    pub table_len: u64,
    pub bitmap_offset: u64,
    pub bitmap_len: u64,
    pub journal_offset: u64,
    pub journal_len: u64,
    pub data_offset: u64,
    pub journal_seq: u64,
    pub base_size: u64,
    pub base_format: BaseFormat,
    pub base_path: String,
    /// Incremented on every header write; the slot with the highest valid
    /// generation is current.
    pub generation: u64,
    /// Prefetch progress: every base block below this index is in the image
    /// (copied, or needing no copy), whatever the bitmap says.
    pub prefetch_cursor: u64,
    /// The writer session whose volatile log may extend this image's journal
    /// (0: none). A volatile log is replayed only when it carries this value.
    pub session: u64,
    /// Plain block devices: the storage offset below which every byte the image
    /// has not written reads as zeros (0: not kept; the storage's unused space
    /// reads as zeros by itself).
    pub initialised_end: u64,
    /// This image's identity, random at create (all zeros: an image from
    /// before identities; overlays of it check its size only).
    pub uuid: [u8; 16],
    /// The identity of the base this image was created over (or rebased onto):
    /// an fvd base's `uuid`; all zeros for a raw base or none recorded.
    pub base_uuid: [u8; 16],
    /// A raw base's fingerprint (see `image::identity`); 0 when not recorded.
    pub base_fingerprint: u64,
    /// With `FLAG_COMMITTING`: the layer the commit writes into (1: the base,
    /// 2: the base's base, ...), so that running it again needs no arguments.
    pub commit_depth: u32,
    /// With `INCOMPAT_RESIZING`: the number of physical chunks table entries may
    /// name while the resize is under way; 0 otherwise.
    pub resize_chunks: u32,
    /// With `INCOMPAT_META_TWIN`: which copy of the table and bitmap is
    /// current (0: the regions at `table_offset` and `bitmap_offset`; 1: the
    /// twin after the journal); 0 otherwise.
    pub meta_copy: u32,
    /// With `INCOMPAT_META_TWIN`: CRC-32 of each stripe of the current copy
    /// (see [`super::twin`]); empty otherwise.
    pub meta_sums: Vec<u32>,
}

impl Header {
    pub fn has_table(&self) -> bool {
        self.incompat & INCOMPAT_TABLE != 0
    }

    pub fn is_prefetched(&self) -> bool {
        self.compat & COMPAT_PREFETCHED != 0
    }

    pub fn is_dirty(&self) -> bool {
        self.flags & FLAG_DIRTY != 0
    }

    pub fn is_frozen(&self) -> bool {
        self.flags & FLAG_FROZEN != 0
    }

    pub fn is_invalid(&self) -> bool {
        self.flags & FLAG_INVALID != 0
    }

    pub fn is_committing(&self) -> bool {
        self.flags & FLAG_COMMITTING != 0
    }

    pub fn is_resizing(&self) -> bool {
        self.incompat & INCOMPAT_RESIZING != 0
    }

    pub fn has_twin(&self) -> bool {
        self.incompat & INCOMPAT_META_TWIN != 0
    }

    // header := magic version len incompat compat flags vsize bsize csize
    //           (off len){table,bitmap,journal} data_off seq base_size base_fmt
    //           path_len rsvd rsvd(0, was used_chunks) rsvd generation path[1024] prefetch_cursor session
    //           initialised_end uuid[16] base_uuid[16] base_fingerprint commit_depth resize_chunks
    //           meta_copy meta_stripes:u16 rsvd:u16 meta_sums[meta_stripes] pad crc32
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; META_BLOCK as usize];
        b[0..8].copy_from_slice(&MAGIC);
        put32(&mut b, 8, VERSION);
        put32(&mut b, 12, META_BLOCK as u32);
        put64(&mut b, 16, self.incompat);
        put64(&mut b, 24, self.compat);
        put64(&mut b, 32, self.flags);
        put64(&mut b, 40, self.virtual_size);
        put32(&mut b, 48, self.block_size);
        put32(&mut b, 52, self.chunk_size);
        put64(&mut b, 56, self.table_offset);
        put64(&mut b, 64, self.table_len);
        put64(&mut b, 72, self.bitmap_offset);
        put64(&mut b, 80, self.bitmap_len);
        put64(&mut b, 88, self.journal_offset);
        put64(&mut b, 96, self.journal_len);
        put64(&mut b, 104, self.data_offset);
        put64(&mut b, 112, self.journal_seq);
        put64(&mut b, 120, self.base_size);
        put32(&mut b, 128, self.base_format.code());
        let path = self.base_path.as_bytes();
        let n = path.len().min(MAX_BASE_PATH);
        b[132..134].copy_from_slice(&(n as u16).to_le_bytes());
        put64(&mut b, 144, self.generation);
        put64(&mut b, CURSOR_OFF, self.prefetch_cursor);
        put64(&mut b, SESSION_OFF, self.session);
        put64(&mut b, INIT_END_OFF, self.initialised_end);
        b[UUID_OFF..UUID_OFF + 16].copy_from_slice(&self.uuid);
        b[BASE_UUID_OFF..BASE_UUID_OFF + 16].copy_from_slice(&self.base_uuid);
        put64(&mut b, BASE_PRINT_OFF, self.base_fingerprint);
        put32(&mut b, COMMIT_DEPTH_OFF, self.commit_depth);
        put32(&mut b, RESIZE_CHUNKS_OFF, self.resize_chunks);
        put32(&mut b, META_COPY_OFF, self.meta_copy);
        let sums = &self.meta_sums[..self.meta_sums.len().min(MAX_META_STRIPES)];
        b[META_STRIPES_OFF..META_STRIPES_OFF + 2].copy_from_slice(&(sums.len() as u16).to_le_bytes());
        for (i, s) in sums.iter().enumerate() {
            put32(&mut b, META_SUMS_OFF + 4 * i, *s);
        }
        b[PATH_OFF..PATH_OFF + n].copy_from_slice(&path[..n]);
        let crc = crc32fast::hash(&b[..CRC_OFF]);
        put32(&mut b, CRC_OFF, crc);
        b
    }

    /// Decodes and validates the magic, checksum, version and features.
    /// Region geometry is validated by [`super::Geometry::from_header`].
    pub fn decode(b: &[u8]) -> Result<Header, HeaderError> {
        if b.len() < 8 || b[0..8] != MAGIC {
            if b.len() < 8 {
                return Err(HeaderError::Truncated(b.len()));
            }
            return Err(HeaderError::BadMagic);
        }
        if b.len() < META_BLOCK as usize {
            return Err(HeaderError::Truncated(b.len()));
        }
        let stored = le_u32(b, CRC_OFF);
        let computed = crc32fast::hash(&b[..CRC_OFF]);
        if stored != computed {
            return Err(HeaderError::BadChecksum { stored, computed });
        }
        let version = le_u32(b, 8);
        if version != VERSION {
            return Err(HeaderError::UnsupportedVersion(version));
        }
        if le_u32(b, 12) != META_BLOCK as u32 {
            return Err(bad("header_len", format!("{} (need 4096)", le_u32(b, 12))));
        }
        let incompat = le_u64(b, 16);
        if incompat & !KNOWN_INCOMPAT != 0 {
            return Err(HeaderError::UnsupportedFeatures(incompat & !KNOWN_INCOMPAT));
        }
        let fmt = le_u32(b, 128);
        let base_format =
            BaseFormat::from_code(fmt).ok_or_else(|| bad("base_format", format!("unknown code {fmt}")))?;
        let plen = le_u16(b, 132) as usize;
        if plen > MAX_BASE_PATH {
            return Err(bad("base_path_len", format!("{plen} > {MAX_BASE_PATH}")));
        }
        let base_path = std::str::from_utf8(&b[PATH_OFF..PATH_OFF + plen])
            .map_err(|_| bad("base_path", "not UTF-8".into()))?
            .to_string();
        let meta_copy = le_u32(b, META_COPY_OFF);
        let stripes = le_u16(b, META_STRIPES_OFF) as usize;
        if stripes > MAX_META_STRIPES {
            return Err(bad("meta_stripes", format!("{stripes} > {MAX_META_STRIPES}")));
        }
        if incompat & INCOMPAT_META_TWIN != 0 && meta_copy > 1 {
            return Err(bad("meta_copy", format!("{meta_copy} (0 or 1)")));
        }
        let meta_sums = (0..stripes).map(|i| le_u32(b, META_SUMS_OFF + 4 * i)).collect();
        Ok(Header {
            incompat,
            compat: le_u64(b, 24),
            flags: le_u64(b, 32),
            virtual_size: le_u64(b, 40),
            block_size: le_u32(b, 48),
            chunk_size: le_u32(b, 52),
            table_offset: le_u64(b, 56),
            table_len: le_u64(b, 64),
            bitmap_offset: le_u64(b, 72),
            bitmap_len: le_u64(b, 80),
            journal_offset: le_u64(b, 88),
            journal_len: le_u64(b, 96),
            data_offset: le_u64(b, 104),
            journal_seq: le_u64(b, 112),
            base_size: le_u64(b, 120),
            base_format,
            base_path,
            generation: le_u64(b, 144),
            prefetch_cursor: le_u64(b, CURSOR_OFF),
            session: le_u64(b, SESSION_OFF),
            initialised_end: le_u64(b, INIT_END_OFF),
            uuid: uuid_at(b, UUID_OFF),
            base_uuid: uuid_at(b, BASE_UUID_OFF),
            base_fingerprint: le_u64(b, BASE_PRINT_OFF),
            commit_depth: le_u32(b, COMMIT_DEPTH_OFF),
            resize_chunks: le_u32(b, RESIZE_CHUNKS_OFF),
            meta_copy,
            meta_sums,
        })
    }
}

fn uuid_at(b: &[u8], off: usize) -> [u8; 16] {
    let mut u = [0u8; 16];
    u.copy_from_slice(&b[off..off + 16]);
    u
}

/// A fresh random image identity (never all zeros).
pub fn new_uuid() -> [u8; 16] {
    let mut u: [u8; 16] = rand::random();
    // RFC 4122 version 4, variant 1: what `uuidgen -r` prints.
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// The usual 8-4-4-4-12 text of a UUID.
pub fn uuid_text(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

fn bad(field: &'static str, why: String) -> HeaderError {
    HeaderError::BadField { field, why }
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
pub(crate) fn sample() -> Header {
    Header {
        incompat: INCOMPAT_TABLE,
        compat: 0,
        flags: 0,
        virtual_size: 1 << 30,
        block_size: 65536,
        chunk_size: 1 << 20,
        table_offset: 8192,
        table_len: 4096,
        bitmap_offset: 12288,
        bitmap_len: 4096,
        journal_offset: 16384,
        journal_len: 1 << 20,
        data_offset: 2 << 20,
        journal_seq: 7,
        base_size: 1 << 29,
        base_format: BaseFormat::Raw,
        base_path: "base.img".into(),
        generation: 9,
        prefetch_cursor: 5,
        session: 0xfeed,
        initialised_end: 0x30_0000,
        uuid: [0x11; 16],
        base_uuid: [0x22; 16],
        base_fingerprint: 0xdead_beef_0bad_cafe,
        commit_depth: 3,
        resize_chunks: 0,
        meta_copy: 0,
        meta_sums: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = sample();
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn header_rejects_corruption() {
        let mut b = sample().encode();
        b[40] ^= 1;
        assert!(matches!(Header::decode(&b), Err(HeaderError::BadChecksum { .. })));
        let mut b = sample().encode();
        b[0] = b'X';
        assert_eq!(Header::decode(&b), Err(HeaderError::BadMagic));
        let b = sample().encode();
        assert_eq!(Header::decode(&b[..100]), Err(HeaderError::Truncated(100)));
    }

    #[test]
    fn reserved_bytes_are_written_zero_and_ignored() {
        let b = sample().encode();
        assert_eq!(b[134..144], [0u8; 10]);
        // Writers before the rule stored the chunk high-water mark at 136.
        let mut old = b.clone();
        put32(&mut old, 136, 0x1234);
        let crc = crc32fast::hash(&old[..CRC_OFF]);
        put32(&mut old, CRC_OFF, crc);
        assert_eq!(Header::decode(&old).unwrap(), sample());
    }

    #[test]
    fn resizing_round_trips() {
        let mut h = sample();
        h.incompat |= INCOMPAT_RESIZING;
        h.resize_chunks = 0x1234;
        let d = Header::decode(&h.encode()).unwrap();
        assert!(d.is_resizing());
        assert_eq!(d, h);
        assert_eq!(le_u32(&h.encode(), 1244), 0x1234);
    }

    #[test]
    fn header_rejects_unknown_incompat_features() {
        let mut h = sample();
        h.incompat |= 1 << 9;
        assert_eq!(Header::decode(&h.encode()), Err(HeaderError::UnsupportedFeatures(1 << 9)));
    }
}
