//! A remote load: parallel ranged GETs whose bodies are written into pool ranges as they
//! arrive, checksummed on the way. No local file and no whole-part buffer: what a load holds is
//! the network stack's buffers of `concurrency` responses.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crc_fast::{CrcAlgorithm::Crc32Iscsi, Digest};
use futures_util::StreamExt;

use super::{Object, ObjectStamp, RemoteError};
use crate::core::crc::combine;
use crate::device::host::HostRegion;

/// Bytes of one object and the pool range they go to: a whole tensor.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    pub object: usize,
    pub offset: u64,
    pub pool_offset: u64,
    pub len: u64,
}

/// A load from a store.
pub struct FetchJob<'a> {
    pub objects: &'a [(Object, ObjectStamp)],
    pub region: &'a HostRegion,
    /// `tensors[i]` is tensor i, in each object's byte order.
    pub tensors: &'a [Span],
    pub part_bytes: u64,
    pub concurrency: usize,
    pub cancel: &'a AtomicBool,
    /// Called with each piece's length as it lands.
    pub on_progress: &'a (dyn Fn(u64) + Sync),
    /// Rate cap for the whole load; 0 means unlimited.
    pub max_bytes_per_sec: u64,
}

/// A piece of one tensor inside a part, with the slot its CRC goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    slot: usize,
    pool_offset: u64,
    len: u64,
}

/// One ranged GET: contiguous bytes of one object, covering whole segments.
#[derive(Debug, PartialEq, Eq)]
struct Part {
    object: usize,
    offset: u64,
    len: u64,
    segments: Vec<Segment>,
}

/// Tensor `t`'s segments have the slots `first[t]..first[t + 1]`, in byte order.
struct Plan {
    parts: Vec<Part>,
    first: Vec<usize>,
}

/// Cuts the tensors into parts of at most `part_bytes`: neighbours in an object share a part
/// (a mixture of experts has 100k small tensors, and a request costs more than their bytes),
/// and a large tensor spans several.
fn plan(tensors: &[Span], part_bytes: u64) -> Plan {
    let mut parts: Vec<Part> = Vec::new();
    let mut first = Vec::with_capacity(tensors.len() + 1);
    let mut slots = 0;
    for t in tensors {
        first.push(slots);
        let mut done = 0;
        while done < t.len {
            let at = t.offset + done;
            let fits = parts.last().is_some_and(|p| {
                p.object == t.object && p.offset + p.len == at && p.len < part_bytes
            });
            if !fits {
                parts.push(Part {
                    object: t.object,
                    offset: at,
                    len: 0,
                    segments: Vec::new(),
                });
            }
            let part = parts.last_mut().expect("pushed above");
            let n = (part_bytes - part.len).min(t.len - done);
            part.segments.push(Segment {
                slot: slots,
                pool_offset: t.pool_offset + done,
                len: n,
            });
            part.len += n;
            slots += 1;
            done += n;
        }
    }
    first.push(slots);
    Plan { parts, first }
}

/// Runs the load; returns each tensor's CRC32C.
pub async fn fetch(job: &FetchJob<'_>) -> Result<Vec<u32>, RemoteError> {
    let Plan { parts, first } = plan(job.tensors, job.part_bytes);
    let crcs: Vec<AtomicU32> = (0..*first.last().expect("one more than the tensors"))
        .map(|_| AtomicU32::new(0))
        .collect();
    let failed = AtomicBool::new(false);
    let pace = Pace {
        max_bytes_per_sec: job.max_bytes_per_sec,
        started: Instant::now(),
        total: AtomicU64::new(0),
    };
    let mut results = futures_util::stream::iter(&parts)
        .map(|p| fetch_part(job, p, &crcs, &failed, &pace))
        .buffer_unordered(job.concurrency.max(1));
    let mut outcome = Ok(());
    while let Some(r) = results.next().await {
        match r {
            Ok(()) => {}
            // The first real failure; a cancellation only when there is none.
            Err(e) => {
                failed.store(true, Ordering::Relaxed);
                let cancelled = matches!(e, RemoteError::Cancelled);
                if outcome.is_ok() || (!cancelled && matches!(outcome, Err(RemoteError::Cancelled)))
                {
                    outcome = Err(e);
                }
            }
        }
    }
    outcome?;
    let mut lens = vec![0; crcs.len()];
    for s in parts.iter().flat_map(|p| &p.segments) {
        lens[s.slot] = s.len;
    }
    Ok(first
        .windows(2)
        .map(|slots| {
            let mut pieces =
                (slots[0]..slots[1]).map(|s| (lens[s], crcs[s].load(Ordering::Relaxed)));
            let head = pieces.next().map_or(0, |(_, crc)| crc);
            pieces.fold(head, |acc, (len, crc)| combine(acc, crc, len))
        })
        .collect())
}

/// A shared read-rate cap.
struct Pace {
    max_bytes_per_sec: u64,
    started: Instant,
    total: AtomicU64,
}

impl Pace {
    async fn add(&self, n: u64) {
        let total = self.total.fetch_add(n, Ordering::Relaxed) + n;
        if self.max_bytes_per_sec == 0 {
            return;
        }
        let due = Duration::from_secs_f64(total as f64 / self.max_bytes_per_sec as f64);
        if let Some(ahead) = due.checked_sub(self.started.elapsed()) {
            tokio::time::sleep(ahead).await;
        }
    }
}

/// Attempts at one part beyond object_store's own retries, which already resume a body that
/// broke off: these cover a body that ended early without an error.
const RESUMES: u32 = 3;

/// Streams one part into its segments, resuming where it stopped if the body ends early.
async fn fetch_part(
    job: &FetchJob<'_>,
    part: &Part,
    crcs: &[AtomicU32],
    failed: &AtomicBool,
    pace: &Pace,
) -> Result<(), RemoteError> {
    let (object, stamp) = &job.objects[part.object];
    let mut done = 0u64;
    let (mut seg, mut seg_done) = (0usize, 0u64);
    let mut digest = Digest::new(Crc32Iscsi);
    let mut resumes = 0;
    while done < part.len {
        if failed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let range = part.offset + done..part.offset + part.len;
        let mut body = object.get(stamp, range).await?.into_stream();
        let mut broke = None;
        while let Some(chunk) = body.next().await {
            if job.cancel.load(Ordering::Relaxed) {
                return Err(RemoteError::Cancelled);
            }
            let bytes = match chunk {
                Ok(b) => b,
                Err(e) => {
                    broke = Some(object.error(e));
                    break;
                }
            };
            if bytes.len() as u64 > part.len - done {
                return Err(RemoteError::Short {
                    url: object.url.clone(),
                    why: format!("the store sent more than the {} bytes asked for", part.len),
                });
            }
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let s = part.segments[seg];
                let n = rest.len().min((s.len - seg_done) as usize);
                // SAFETY: the segment lies in a range this load allocated; nothing else
                // touches it until the model is READY, and each part has exactly one fetcher.
                unsafe {
                    job.region
                        .write_at((s.pool_offset + seg_done) as usize, &rest[..n])
                };
                digest.update(&rest[..n]);
                seg_done += n as u64;
                rest = &rest[n..];
                if seg_done == s.len {
                    let d = std::mem::replace(&mut digest, Digest::new(Crc32Iscsi));
                    crcs[s.slot].store(d.finalize() as u32, Ordering::Relaxed);
                    (seg, seg_done) = (seg + 1, 0);
                }
            }
            let n = bytes.len() as u64;
            done += n;
            (job.on_progress)(n);
            pace.add(n).await;
        }
        if done < part.len {
            resumes += 1;
            if resumes > RESUMES {
                return Err(broke.unwrap_or_else(|| RemoteError::Short {
                    url: object.url.clone(),
                    why: format!(
                        "the body of bytes {}..{} ended after {done} bytes, {RESUMES} times",
                        part.offset,
                        part.offset + part.len
                    ),
                }));
            }
            if let Some(e) = &broke {
                tracing::warn!(url = %object.url, error = %e, done, "remote read broke off; resuming");
            }
            tokio::time::sleep(Duration::from_millis(100 << resumes)).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(object: usize, offset: u64, pool_offset: u64, len: u64) -> Span {
        Span {
            object,
            offset,
            pool_offset,
            len,
        }
    }

    #[test]
    fn neighbours_share_parts_and_large_tensors_span_several() {
        let tensors = [
            span(0, 100, 0, 3),
            span(0, 103, 256, 0), // empty: no slot, no bytes
            span(0, 103, 512, 10),
            span(1, 8, 1024, 4),
        ];
        let Plan { parts, first } = plan(&tensors, 8);
        assert_eq!(first, [0, 1, 1, 3, 4]);
        let shape: Vec<_> = parts
            .iter()
            .map(|p| {
                let segs: Vec<_> = p
                    .segments
                    .iter()
                    .map(|s| (s.slot, s.pool_offset, s.len))
                    .collect();
                (p.object, p.offset, p.len, segs)
            })
            .collect();
        assert_eq!(
            shape,
            [
                (0, 100, 8, vec![(0, 0, 3), (1, 512, 5)]),
                (0, 108, 5, vec![(2, 517, 5)]),
                (1, 8, 4, vec![(3, 1024, 4)]),
            ]
        );
        for p in &parts {
            assert_eq!(p.len, p.segments.iter().map(|s| s.len).sum::<u64>());
        }
    }
}
