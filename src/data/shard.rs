//! The slice-shard file format (`*.ctshard`): a versioned header, per-slice volume ids, i16 HU
//! images, u8 labels and a CRC-32 of everything before it. Documented in the README.
//!
//! ```text
//! offset        size            field
//! 0             8               magic  "CTSHARD\0"
//! 8             4               version (u32, = 1)
//! 12            4               header bytes (u32, = 32)
//! 16            4               height (u32)
//! 20            4               width (u32)
//! 24            4               count: slices in the shard (u32)
//! 28            4               flags (u32, = 0)
//! 32            8·count         per slice: volume id (u32), slice index in its volume (u32)
//! …             2·count·h·w     images, i16 HU, row-major, slice after slice
//! …             count·h·w       labels, u8 (0 background, 1 liver, 2 tumour)
//! end − 4       4               CRC-32 (IEEE) of all preceding bytes
//! ```
//! All integers little-endian.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

use crate::error::{Error, Result};

/// File magic.
pub const MAGIC: &[u8; 8] = b"CTSHARD\0";
/// Current version.
pub const VERSION: u32 = 1;
const HEADER: usize = 32;

/// Slices held in memory, as read from or written to one shard.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShardData {
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
    /// Volume id of each slice.
    pub volume_ids: Vec<u32>,
    /// Index of each slice within its volume.
    pub slice_indices: Vec<u32>,
    /// `count · h · w` HU values.
    pub images: Vec<i16>,
    /// `count · h · w` labels.
    pub labels: Vec<u8>,
}

impl ShardData {
    /// An empty shard of the given size.
    pub fn new(height: usize, width: usize) -> Self {
        Self {
            height,
            width,
            ..Default::default()
        }
    }

    /// Number of slices.
    pub fn len(&self) -> usize {
        self.volume_ids.len()
    }

    /// True when it holds no slice.
    pub fn is_empty(&self) -> bool {
        self.volume_ids.is_empty()
    }

    /// Appends one slice.
    pub fn push(&mut self, volume: u32, slice: u32, image: &[i16], label: &[u8]) {
        debug_assert_eq!(image.len(), self.height * self.width);
        debug_assert_eq!(label.len(), self.height * self.width);
        self.volume_ids.push(volume);
        self.slice_indices.push(slice);
        self.images.extend_from_slice(image);
        self.labels.extend_from_slice(label);
    }

    /// Serialises to bytes (including the trailing CRC).
    pub fn to_bytes(&self) -> Vec<u8> {
        let n = self.len();
        let px = self.height * self.width;
        let mut b = Vec::with_capacity(HEADER + 8 * n + 3 * n * px + 4);
        b.extend_from_slice(MAGIC);
        for v in [
            VERSION,
            HEADER as u32,
            self.height as u32,
            self.width as u32,
            n as u32,
            0,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for i in 0..n {
            b.extend_from_slice(&self.volume_ids[i].to_le_bytes());
            b.extend_from_slice(&self.slice_indices[i].to_le_bytes());
        }
        for v in &self.images {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.labels);
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses bytes read from `path` (named in errors). The header's sizes are checked against
    /// the length of `bytes` before anything is allocated.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let err = |m: String| Error::dataset(path, m);
        if bytes.len() < HEADER + 4 {
            return Err(err(format!(
                "truncated: {} bytes, a shard has at least {}",
                bytes.len(),
                HEADER + 4
            )));
        }
        if &bytes[..8] != MAGIC {
            return Err(err(
                "not a ctseg shard (bad magic; expected \"CTSHARD\\0\")".into(),
            ));
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let version = u32_at(8);
        if version != VERSION {
            return Err(err(format!(
                "unsupported shard version {version}, expected {VERSION}"
            )));
        }
        let header = u32_at(12) as usize;
        if header != HEADER {
            return Err(err(format!("header size {header}, expected {HEADER}")));
        }
        let (h, w, n) = (
            u32_at(16) as usize,
            u32_at(20) as usize,
            u32_at(24) as usize,
        );
        // Untrusted sizes: every product checked, and the total held against the file's length
        // before anything is sliced or allocated (u32 × u32 × 3 overflows even 64-bit usize).
        let px = h.checked_mul(w);
        let slice_bytes = px
            .and_then(|p| p.checked_mul(3))
            .and_then(|b| b.checked_add(8));
        let expected = slice_bytes
            .and_then(|b| b.checked_mul(n))
            .and_then(|v| v.checked_add(HEADER + 4));
        let (Some(px), Some(expected)) = (px, expected) else {
            return Err(err(format!(
                "header says {n} slices of {h}x{w} pixels, more bytes than any file holds; the file is corrupt"
            )));
        };
        if bytes.len() != expected {
            return Err(err(format!(
                "size {} bytes does not match its header ({n} slices of {h}x{w} need {expected}); the file is truncated or corrupt",
                bytes.len()
            )));
        }
        let body = &bytes[..bytes.len() - 4];
        let stored = u32_at(bytes.len() - 4);
        let actual = crc32fast::hash(body);
        if stored != actual {
            return Err(err(format!(
                "checksum mismatch: stored CRC-32 {stored:08x}, computed {actual:08x}; the file is corrupt"
            )));
        }
        let mut o = HEADER;
        let mut volume_ids = Vec::with_capacity(n);
        let mut slice_indices = Vec::with_capacity(n);
        for _ in 0..n {
            volume_ids.push(u32_at(o));
            slice_indices.push(u32_at(o + 4));
            o += 8;
        }
        let images: Vec<i16> = bytes[o..o + 2 * n * px]
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]))
            .collect();
        o += 2 * n * px;
        let labels = bytes[o..o + n * px].to_vec();
        Ok(Self {
            height: h,
            width: w,
            volume_ids,
            slice_indices,
            images,
            labels,
        })
    }

    /// Reads and verifies a shard file.
    pub fn read(path: &Path) -> Result<Self> {
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes, path)
    }

    /// Writes the shard (the caller makes the whole dataset atomic by writing into a temporary
    /// directory that is renamed at the end).
    pub fn write(&self, path: &Path) -> Result<()> {
        let f = File::create(path).map_err(|e| Error::io(path, e))?;
        let mut w = BufWriter::new(f);
        w.write_all(&self.to_bytes())
            .and_then(|_| w.flush())
            .map_err(|e| Error::io(path, e))?;
        w.get_ref().sync_all().map_err(|e| Error::io(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ShardData {
        let mut s = ShardData::new(2, 3);
        s.push(7, 0, &[-1000, 0, 50, 100, 200, 3000], &[0, 1, 1, 2, 0, 0]);
        s.push(8, 4, &[1, 2, 3, 4, 5, 6], &[0, 0, 0, 0, 0, 1]);
        s
    }

    #[test]
    fn round_trip() {
        let s = sample();
        let bytes = s.to_bytes();
        assert_eq!(bytes.len(), 32 + 16 + 24 + 12 + 4);
        assert_eq!(ShardData::from_bytes(&bytes, Path::new("x")).ok(), Some(s));
    }

    #[test]
    fn crc_is_the_ieee_crc32() {
        // Independent reference: Python's zlib.crc32(b"123456789") == 0xCBF43926.
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn corruption_is_reported_with_the_file() {
        let mut bytes = sample().to_bytes();
        bytes[40] ^= 1;
        let e = ShardData::from_bytes(&bytes, Path::new("d/shard-0.ctshard"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("d/shard-0.ctshard") && e.contains("checksum"),
            "{e}"
        );
        let short = &sample().to_bytes()[..50];
        let e = ShardData::from_bytes(short, Path::new("s"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("truncated or corrupt"), "{e}");
        let e = ShardData::from_bytes(b"NOTSHARD0000000000000000000000000000000", Path::new("s"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("bad magic"), "{e}");
    }

    /// A forged shard whose header sizes wrap around in unchecked arithmetic.
    fn forged(h: u32, w: u32, count: u32, body: usize) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        for v in [VERSION, HEADER as u32, h, w, count, 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.resize(b.len() + body, 0);
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn sizes_that_overflow_are_refused_with_the_file() {
        // 3 · 3633886365 · 3384208571 = 13 (mod 2⁶⁴) (found by searching h·w ≡ 13 · 3⁻¹
        // (mod 2⁶⁴) for factors below 2³²): wrapping arithmetic gave 8 + 13 = 21 bytes per slice,
        // so a 57-byte file with a valid CRC passed the size check and its slicing panicked.
        let e = ShardData::from_bytes(
            &forged(3_633_886_365, 3_384_208_571, 1, 21),
            Path::new("w.ctshard"),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.contains("w.ctshard") && e.contains("corrupt"), "{e}");
        // The largest header: (2³² − 1)² pixels per slice.
        let e = ShardData::from_bytes(
            &forged(u32::MAX, u32::MAX, u32::MAX, 0),
            Path::new("m.ctshard"),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.contains("m.ctshard") && e.contains("corrupt"), "{e}");
    }
}
