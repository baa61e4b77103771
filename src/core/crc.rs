//! CRC32C (Castagnoli), the checksum of every tensor in a tensor table: over bytes, combined
//! from pieces, and over pool memory that another process may be writing. Below models,
//! journal and scrubber alike, which all checksum.

use crc_fast::CrcAlgorithm::Crc32Iscsi;

use crate::device::host::HostRegion;

/// CRC32C of `a ++ b` from the CRCs of `a` and `b`.
pub fn combine(a: u32, b: u32, b_len: u64) -> u32 {
    crc_fast::checksum_combine(Crc32Iscsi, a.into(), b.into(), b_len) as u32
}

/// CRC32C (Castagnoli), the checksum of every tensor in a tensor table.
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc_fast::checksum(Crc32Iscsi, bytes) as u32
}

/// CRC32C of ranges of pool memory that another process may still be writing (a sealed
/// publication a root-owned writer reaches, a READY model the scrubber re-reads): the bytes are
/// copied out a piece at a time, never borrowed, so a racing writer changes only the result.
/// One copy buffer serves every range: at 100k tensors of 4 KiB, a zeroed buffer per tensor
/// cost a restart's verification as much as the copy did. It holds no region, so a caller that
/// must not keep a pool mapped between ranges (the scrubber) keeps the buffer all the same.
#[derive(Debug, Default)]
pub struct CrcBuffer {
    buf: Vec<u8>,
}

impl CrcBuffer {
    /// Small enough that the copy is still in L2 when the CRC reads it, and below malloc's mmap
    /// threshold, so a call does not map, fault in and unmap a fresh buffer (at 1 MiB pieces
    /// the scrubber spent more on that than on the CRC).
    const PIECE: usize = 64 << 10;

    /// CRC32C of `len` bytes at `offset` of `region`.
    pub fn checksum(&mut self, region: &HostRegion, offset: u64, len: u64) -> u32 {
        let want = Self::PIECE.min(len as usize);
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        if len as usize <= Self::PIECE {
            // One piece: one call, without a digest to set up and finalize.
            let buf = &mut self.buf[..len as usize];
            region.read_at(offset as usize, buf);
            return crc32c(buf);
        }
        let mut digest = crc_fast::Digest::new(Crc32Iscsi);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(Self::PIECE as u64) as usize;
            region.read_at((offset + done) as usize, &mut self.buf[..n]);
            digest.update(&self.buf[..n]);
            done += n as u64;
        }
        digest.finalize() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_buffer_matches_the_bytes_across_pieces_and_reuse() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let len = 3 * CrcBuffer::PIECE + 100;
        let region = HostRegion::create(&dir.path().join("r"), len as u64).unwrap();
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
        // SAFETY: the region is this test's own and nothing else maps it.
        unsafe { region.write_at(0, &bytes) };
        let mut crc = CrcBuffer::default();
        // Small, whole, then small again through the buffer the whole one grew; zero bytes.
        for (offset, n) in [(5, 4096), (0, len), (CrcBuffer::PIECE - 3, 10), (17, 0)] {
            let want = crc32c(&bytes[offset..offset + n]);
            assert_eq!(
                crc.checksum(&region, offset as u64, n as u64),
                want,
                "{offset}+{n}"
            );
            let fresh = CrcBuffer::default().checksum(&region, offset as u64, n as u64);
            assert_eq!(fresh, want);
        }
    }
}
