//! Loads tensor bytes straight into pool memory with parallel, chunked `pread`. There is no
//! intermediate buffer: each chunk is read from the page cache directly into its pool range,
//! and its CRC32C is computed while the bytes are still in cache.

use crc_fast::{CrcAlgorithm::Crc32Iscsi, Digest};

use crate::core::crc::{combine, crc32c};

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use super::cache::{Lookahead, Range};
use crate::device::host::HostRegion;

/// Bytes of one file and the pool range they go to: a whole tensor, or a piece of one.
#[derive(Debug, Clone, Copy)]
pub struct Chunk {
    pub file: usize,
    pub file_offset: u64,
    pub pool_offset: u64,
    pub len: u64,
}

/// A load: files, and where each tensor's bytes are and go.
pub struct LoadJob<'a> {
    /// The shards; what a load reads of them that was not cached leaves the page cache behind
    /// it (see `cache`).
    pub files: &'a [File],
    pub region: &'a HostRegion,
    /// `tensors[i]` is tensor i, whole.
    pub tensors: Vec<Chunk>,
    /// Tensors are read in pieces of at most this many bytes.
    pub chunk_bytes: u64,
    pub threads: usize,
    pub cancel: &'a AtomicBool,
    /// Called after each chunk with its length.
    pub on_progress: &'a (dyn Fn(u64) + Sync),
    /// Read-rate cap for the whole load; 0 means unlimited.
    pub max_bytes_per_sec: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cancelled")]
    Cancelled,
    #[error("reading {what}: {source}")]
    Io {
        /// Index into `LoadJob::files` of the file that failed.
        file: usize,
        what: String,
        source: std::io::Error,
    },
}

/// Splits a tensor into pieces of at most `chunk` bytes (none for an empty tensor).
fn pieces(t: Chunk, chunk: u64) -> impl Iterator<Item = Chunk> {
    (0..t.len.div_ceil(chunk)).map(move |i| {
        let off = i * chunk;
        Chunk {
            file: t.file,
            file_offset: t.file_offset + off,
            pool_offset: t.pool_offset + off,
            len: chunk.min(t.len - off),
        }
    })
}

/// Tensors at most this large are read in batches: a mixture-of-experts checkpoint has 100k of
/// them, and a `pread`, a checksum set-up and a progress report each cost more than the bytes.
const SMALL_TENSOR: u64 = 1 << 20;
/// Bytes of neighbouring small tensors read together: straight into the pool when they lie there
/// as in the file, else with one `pread` into a bounce buffer (their pool ranges are 256-byte
/// aligned, so tensors of other sizes are not contiguous there).
const BATCH_BYTES: u64 = 4 << 20;

/// One unit of a loader thread's work.
enum Work {
    /// A piece of a large tensor, read straight into the pool: (its CRC's slot, the piece).
    Piece(usize, Chunk),
    /// Neighbouring small tensors of one file, contiguous in it.
    Batch(Batch),
}

struct Batch {
    file: usize,
    file_offset: u64,
    len: u64,
    /// Its tensors, `LoadJob::tensors[members]`: each is one piece, whose CRC's slot is
    /// `Plan::first[t]`. A range, not a list: at 100k tensors the lists were 4 MB to allocate
    /// and fault in, 2 ms of a load (10 ms when the heap was cold).
    members: std::ops::Range<usize>,
}

/// What a load does, and where each piece's CRC goes: tensor `t`'s pieces have the slots
/// `first[t]..first[t + 1]`, in byte order. One flat list, because a mixture of experts has
/// 100k tensors and a list per tensor cost 100k allocations.
struct Plan {
    work: Vec<Work>,
    first: Vec<usize>,
}

/// Groups the small tensors that follow each other in a file into batches, in file order, and
/// splits the others into pieces of at most `chunk` bytes.
fn plan(tensors: &[Chunk], chunk: u64) -> Plan {
    let mut work = Vec::new();
    let mut first = Vec::with_capacity(tensors.len() + 1);
    let mut slots = 0;
    let mut batch: Option<Batch> = None;
    for (t, &c) in tensors.iter().enumerate() {
        first.push(slots);
        let slot = slots;
        slots += c.len.div_ceil(chunk) as usize;
        if c.len == 0 || c.len > chunk || c.len > SMALL_TENSOR {
            work.extend(batch.take().map(Work::Batch));
            work.extend(
                (slot..)
                    .zip(pieces(c, chunk))
                    .map(|(s, p)| Work::Piece(s, p)),
            );
            continue;
        }
        if let Some(b) = &mut batch {
            if b.file == c.file
                && b.file_offset + b.len == c.file_offset
                && b.len + c.len <= BATCH_BYTES
            {
                b.len += c.len;
                b.members.end = t + 1;
                continue;
            }
        }
        work.extend(batch.take().map(Work::Batch));
        batch = Some(Batch {
            file: c.file,
            file_offset: c.file_offset,
            len: c.len,
            members: t..t + 1,
        });
    }
    first.push(slots);
    work.extend(batch.map(Work::Batch));
    Plan { work, first }
}

/// Runs the load; returns each tensor's CRC32C.
pub fn run(job: &LoadJob<'_>) -> Result<Vec<u32>, LoadError> {
    let Plan { work, first } = plan(&job.tensors, job.chunk_bytes);
    let ranges: Vec<Range> = work
        .iter()
        .map(|w| match w {
            Work::Piece(_, c) => (c.file, c.file_offset, c.len),
            Work::Batch(b) => (b.file, b.file_offset, b.len),
        })
        .collect();
    let ahead = Lookahead::new(job.files, &ranges);
    let crcs: Vec<AtomicU32> = (0..*first.last().expect("one more than the tensors"))
        .map(|_| AtomicU32::new(0))
        .collect();
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let started = std::time::Instant::now();
    let read = std::sync::atomic::AtomicU64::new(0);
    let threads = job.threads.clamp(1, work.len().max(1));
    let result: Result<(), LoadError> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                // Named, so `top -H` and a profile tell the load's threads from the runtime's.
                let thread = std::thread::Builder::new().name("offloadd-load".into());
                thread.spawn_scoped(s, || -> Result<(), LoadError> {
                    let mut bounce = Vec::new();
                    loop {
                        if job.cancel.load(Ordering::Relaxed) {
                            return Err(LoadError::Cancelled);
                        }
                        if failed.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(w) = work.get(i) else {
                            return Ok(());
                        };
                        let (file, file_offset, len) = ranges[i];
                        ahead.before_reading(i);
                        let done = match w {
                            Work::Piece(slot, c) => read_chunk(job, *c)
                                .map(|crc| crcs[*slot].store(crc, Ordering::Relaxed)),
                            Work::Batch(b) => read_batch(job, b, &first, &mut bounce, &crcs),
                        };
                        ahead.after_reading(i);
                        if let Err(source) = done {
                            failed.store(true, Ordering::Relaxed);
                            return Err(LoadError::Io {
                                file,
                                what: format!("{len} bytes at offset {file_offset}"),
                                source,
                            });
                        }
                        (job.on_progress)(len);
                        let total = read.fetch_add(len, Ordering::Relaxed) + len;
                        throttle(job.max_bytes_per_sec, total, started, job.cancel);
                    }
                })
            })
            .collect::<std::io::Result<_>>()
            // As `Scope::spawn` would: the process is out of threads.
            .expect("start a loader thread");
        // Report an I/O error in preference to a cancellation, and the first one found.
        let mut outcome = Ok(());
        for w in workers {
            match w.join().expect("loader thread panicked") {
                Err(e @ LoadError::Io { .. }) if !matches!(outcome, Err(LoadError::Io { .. })) => {
                    outcome = Err(e)
                }
                Err(LoadError::Cancelled) if outcome.is_ok() => outcome = Err(LoadError::Cancelled),
                _ => {}
            }
        }
        outcome
    });
    ahead.finish();
    result?;
    // Every tensor in one piece (all of a mixture of experts' small ones): the slots are the
    // tensors' CRCs already, and the list becomes the answer where it lies.
    if first.iter().enumerate().all(|(t, &slot)| slot == t) {
        return Ok(crcs.into_iter().map(AtomicU32::into_inner).collect());
    }
    Ok(job
        .tensors
        .iter()
        .zip(first.windows(2))
        .map(|(&t, slots)| {
            // The first piece's CRC is the running CRC already: combining it onto the empty
            // prefix cost a combine per tensor, most of the CPU of a load of small tensors.
            let mut parts = pieces(t, job.chunk_bytes)
                .zip(&crcs[slots[0]..slots[1]])
                .map(|(p, crc)| (p.len, crc.load(Ordering::Relaxed)));
            let first = parts.next().map_or(0, |(_, crc)| crc);
            parts.fold(first, |acc, (len, crc)| combine(acc, crc, len))
        })
        .collect())
}

/// Reads a batch of small tensors with one `pread` and places each in its pool range,
/// checksumming it from the bounce buffer while it is in cache. `first` gives each tensor's CRC
/// slot.
fn read_batch(
    job: &LoadJob<'_>,
    b: &Batch,
    first: &[usize],
    bounce: &mut Vec<u8>,
    crcs: &[AtomicU32],
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let file = &job.files[b.file];
    let members = &job.tensors[b.members.clone()];
    let slots = &first[b.members.clone()];
    // Tensors whose sizes are multiples of the pool's alignment (most of a mixture of experts)
    // lie in the pool as in the file: read them straight in, without the bounce buffer's copy.
    let head = members[0];
    let in_place = members
        .iter()
        .all(|c| c.pool_offset - head.pool_offset == c.file_offset - head.file_offset);
    if in_place {
        // In runs of about CRC_PIECE, checksummed while the run is still in cache.
        let (mut rest, mut rest_slots) = (members, slots);
        while let Some(&start) = rest.first() {
            let mut len = 0;
            let run = rest
                .iter()
                .take_while(|c| {
                    let fits = len == 0 || len + c.len <= CRC_PIECE;
                    len += if fits { c.len } else { 0 };
                    fits
                })
                .count();
            // SAFETY: the run's bytes land exactly on its members' ranges, which this load
            // allocated; nothing else touches them until the model is ready, and each batch
            // goes to exactly one loader thread.
            unsafe {
                job.region.pread_from(
                    file,
                    start.file_offset,
                    start.pool_offset as usize,
                    len as usize,
                )?
            };
            for (c, &slot) in rest[..run].iter().zip(&rest_slots[..run]) {
                // SAFETY: as above; this thread has just written the range.
                let bytes = unsafe { job.region.slice(c.pool_offset as usize, c.len as usize) };
                crcs[slot].store(crc32c(bytes), Ordering::Relaxed);
            }
            (rest, rest_slots) = (&rest[run..], &rest_slots[run..]);
        }
        return Ok(());
    }
    bounce.resize(b.len as usize, 0);
    file.read_exact_at(bounce, b.file_offset)?;
    for (c, &slot) in members.iter().zip(slots) {
        let at = (c.file_offset - b.file_offset) as usize;
        let bytes = &bounce[at..at + c.len as usize];
        // SAFETY: the tensor's range was allocated for this load; nothing else touches it
        // until the model is ready, and each batch goes to exactly one loader thread.
        unsafe { job.region.write_at(c.pool_offset as usize, bytes) };
        crcs[slot].store(crc32c(bytes), Ordering::Relaxed);
    }
    Ok(())
}

/// Checksummed in pieces small enough to still be in cache when the CRC reads them back, so the
/// checksum costs no extra trip to memory. 256 KiB measured best on the benchmark machine
/// (0.84-0.92 of the pread bound, against 0.66 for whole 16 MiB chunks).
const CRC_PIECE: u64 = 1 << 18;

/// Reads one chunk into the pool and returns its CRC32C.
fn read_chunk(job: &LoadJob<'_>, c: Chunk) -> std::io::Result<u32> {
    let file = &job.files[c.file];
    let mut digest = Digest::new(Crc32Iscsi);
    let mut done = 0;
    while done < c.len {
        let n = CRC_PIECE.min(c.len - done);
        let dst = (c.pool_offset + done) as usize;
        // SAFETY: the chunk lies in ranges this load allocated; nothing else touches them until
        // the model is ready, and each chunk goes to exactly one loader thread.
        unsafe {
            job.region
                .pread_from(file, c.file_offset + done, dst, n as usize)?;
            digest.update(job.region.slice(dst, n as usize));
        }
        done += n;
    }
    Ok(digest.finalize() as u32)
}

/// Sleeps while the load is ahead of its allowed rate, in short naps so a cancellation is seen
/// promptly.
fn throttle(max_bytes_per_sec: u64, total: u64, started: std::time::Instant, cancel: &AtomicBool) {
    if max_bytes_per_sec == 0 {
        return;
    }
    let due = std::time::Duration::from_secs_f64(total as f64 / max_bytes_per_sec as f64);
    while let Some(ahead) = due.checked_sub(started.elapsed()) {
        if cancel.load(Ordering::Relaxed) {
            return;
        }
        std::thread::sleep(ahead.min(std::time::Duration::from_millis(20)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(file: usize, file_offset: u64, pool_offset: u64, len: u64) -> Chunk {
        Chunk {
            file,
            file_offset,
            pool_offset,
            len,
        }
    }

    #[test]
    fn pieces_cover_the_tensor_exactly() {
        let cs: Vec<Chunk> = pieces(tensor(0, 100, 4096, 10), 4).collect();
        assert_eq!(cs.iter().map(|c| c.len).collect::<Vec<_>>(), vec![4, 4, 2]);
        assert_eq!(cs[2].file_offset, 108);
        assert_eq!(cs[2].pool_offset, 4104);
        assert_eq!(pieces(tensor(0, 0, 0, 0), 4).count(), 0);
    }

    #[test]
    fn small_neighbours_are_batched_and_large_tensors_are_not() {
        let small = |file, off, len| tensor(file, off, off * 2, len);
        let tensors = vec![
            small(0, 0, 100),
            small(0, 100, 28),
            tensor(0, 128, 4096, 3 << 20),
            small(0, (3 << 20) + 128, 8),
            small(0, (3 << 20) + 136, 0), // empty: nothing to read, and no slot
            small(1, 0, 8),
            small(1, 16, 8), // a gap in the file: a new batch
        ];
        let Plan { work, first } = plan(&tensors, 1 << 20);
        assert_eq!(
            first,
            [0, 1, 2, 5, 6, 6, 7, 8],
            "a slot per piece, in tensor order"
        );
        let shape: Vec<String> = work
            .iter()
            .map(|w| match w {
                Work::Piece(slot, c) => format!("p{slot}@{}", c.file_offset),
                Work::Batch(b) => format!(
                    "b{}:{}+{}",
                    b.members
                        .clone()
                        .map(|t| first[t].to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                    b.file_offset,
                    b.len
                ),
            })
            .collect();
        assert_eq!(
            shape,
            [
                "b0,1:0+128",
                "p2@128",
                "p3@1048704",
                "p4@2097280",
                "b5:3145856+8",
                "b6:0+8",
                "b7:16+8"
            ]
        );
    }

    /// Loads `tensors` (file offset, length) of one file, packed from pool offset 0 in order,
    /// and checks every byte placed and every CRC against the bytes' own.
    fn load_and_check(tensors: &[(u64, u64)], chunk_bytes: u64) {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..tensors.iter().map(|&(o, l)| o + l).max().unwrap_or(0))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let mut file = tempfile::tempfile_in(dir.path()).unwrap();
        file.write_all(&data).unwrap();
        let mut at = 0;
        let chunks: Vec<Chunk> = tensors
            .iter()
            .map(|&(file_offset, len)| {
                let c = tensor(0, file_offset, at, len);
                at += len;
                c
            })
            .collect();
        let region = HostRegion::create(&dir.path().join("pool"), at.max(1)).unwrap();
        let crcs = run(&LoadJob {
            files: std::slice::from_ref(&file),
            region: &region,
            tensors: chunks.clone(),
            chunk_bytes,
            threads: 2,
            cancel: &AtomicBool::new(false),
            on_progress: &|_| {},
            max_bytes_per_sec: 0,
        })
        .unwrap();
        assert_eq!(crcs.len(), tensors.len());
        for (c, crc) in chunks.iter().zip(crcs) {
            let want = &data[c.file_offset as usize..(c.file_offset + c.len) as usize];
            let mut got = vec![0u8; c.len as usize];
            region.read_at(c.pool_offset as usize, &mut got);
            assert_eq!(got, want, "tensor at {}", c.file_offset);
            assert_eq!(crc, ::crc32c::crc32c(want), "tensor at {}", c.file_offset);
        }
    }

    #[test]
    fn each_tensor_gets_its_own_crc_whether_in_one_piece_or_several() {
        // All in one piece each: the slots are the answer as they are.
        let small: Vec<(u64, u64)> = (0..300).map(|i| (i * 100, 100)).collect();
        load_and_check(&small, 1 << 20);
        // As many slots as tensors, but not one each: an empty tensor has none, and the one
        // after it two. Its CRC is combined from both pieces, and the empty one's is 0's.
        load_and_check(&[(0, 10), (10, 0), (10, 6000)], 4096);
        // Pieces of several sizes, and a tensor read again from where another lies.
        load_and_check(&[(0, 9000), (9000, 1), (0, 4096), (4096, 8193)], 4096);
    }

    #[test]
    fn combined_chunk_crcs_equal_the_whole() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        // An independent implementation (the crc32c crate) is the reference for ours.
        let whole = ::crc32c::crc32c(&data);
        assert_eq!(crc32c(&data), whole);
        let combined = data
            .chunks(4096)
            .fold(0u32, |acc, c| combine(acc, crc32c(c), c.len() as u64));
        assert_eq!(whole, combined);
        assert_eq!(
            combine(0, whole, data.len() as u64),
            whole,
            "the empty prefix is neutral"
        );
    }
}
