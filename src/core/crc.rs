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

/// CRC32C of a range of pool memory that another process may still be writing (a sealed
/// publication a root-owned writer reaches, a READY model the scrubber re-reads): the bytes are
/// copied out a piece at a time, never borrowed, so a racing writer changes only the result.
pub fn checksum(region: &HostRegion, offset: u64, len: u64) -> u32 {
    // Small enough that the copy is still in L2 when the CRC reads it, and below malloc's mmap
    // threshold, so a call does not map, fault in and unmap a fresh buffer (at 1 MiB pieces
    // the scrubber spent more on that than on the CRC).
    const PIECE: usize = 64 << 10;
    let mut buf = vec![0u8; PIECE.min(len as usize)];
    let mut digest = crc_fast::Digest::new(Crc32Iscsi);
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(PIECE as u64) as usize;
        region.read_at((offset + done) as usize, &mut buf[..n]);
        digest.update(&buf[..n]);
        done += n as u64;
    }
    digest.finalize() as u32
}
