//! The scrubber: re-reads READY models' bytes in the background, at a budgeted rate, and
//! compares each tensor's CRC32C with its table. A model whose bytes changed after they were
//! checksummed (a writer outside the daemon, root included, or failing memory) is taken out of
//! service: no attach, no onload, and leases are told at their next KeepAlive.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::Core;
use super::crc;
use super::models::model::{Model, ModelState};

/// Bytes read and checksummed between two looks at the pacing clock and the model's state.
const PIECE: u64 = 1 << 20;
/// Longest sleep between pieces: the daemon's shutdown (dropping the core) is noticed this soon.
const NAP: Duration = Duration::from_millis(100);

/// What the scrubber has done in this run, for GetInfo and metrics.
#[derive(Debug, Default)]
pub struct ScrubStats {
    pub bytes_per_second: u64,
    bytes_checked: AtomicU64,
    passes: AtomicU64,
    out_of_service: Mutex<Vec<String>>,
}

impl ScrubStats {
    pub fn new(bytes_per_second: u64) -> Self {
        Self {
            bytes_per_second,
            ..Self::default()
        }
    }

    pub fn bytes_checked(&self) -> u64 {
        self.bytes_checked.load(Ordering::Relaxed)
    }

    pub fn passes(&self) -> u64 {
        self.passes.load(Ordering::Relaxed)
    }

    /// Models taken out of service in this run, in the order it happened.
    pub fn out_of_service(&self) -> Vec<String> {
        self.out_of_service.lock().expect("scrub lock").clone()
    }
}

/// Starts the scrubber's thread, unless its rate is 0. It ends when the core is dropped.
pub fn start(core: &Arc<Core>) -> std::io::Result<()> {
    if core.scrub.bytes_per_second == 0 {
        return Ok(());
    }
    let core = Arc::downgrade(core);
    std::thread::Builder::new()
        .name("offloadd-scrub".into())
        .spawn(move || run(&core))
        .map(drop)
}

fn run(core: &Weak<Core>) {
    let mut pace = Pace::new();
    // One copy buffer for the thread's life: the pool's mapping is let go between pieces, the
    // buffer need not be.
    let mut crc = crc::CrcBuffer::default();
    loop {
        // Weak from the start: a strong list held for the whole pass would keep an
        // unregistered model's ranges from returning to its pool until the pass ended.
        let Some(models) = core.upgrade().map(|c| weak(&c.models.list())) else {
            return;
        };
        let mut read = 0;
        for model in models {
            let Some(n) = scrub_model(core, &model, &mut pace, &mut crc) else {
                return;
            };
            read += n;
        }
        if read == 0 {
            // Nothing servable to read (no model, or only ones loading, publishing or out of
            // service): look again in a second, in naps to notice shutdown. Going round at
            // once would spin a core for as long as a load lasts.
            for _ in 0..10 {
                std::thread::sleep(NAP);
                if core.strong_count() == 0 {
                    return;
                }
            }
            continue;
        }
        let Some(c) = core.upgrade() else { return };
        c.scrub.passes.fetch_add(1, Ordering::Relaxed);
    }
}

/// Checks every tensor of one READY model; the bytes it read, or None once the daemon is gone.
fn scrub_model(
    core: &Weak<Core>,
    model: &Weak<Model>,
    pace: &mut Pace,
    buf: &mut crc::CrcBuffer,
) -> Option<u64> {
    let Some(tensors) = model
        .upgrade()
        .and_then(|m| servable(&m).then(|| m.tensors()))
    else {
        return Some(0);
    };
    let mut read = 0;
    for t in tensors.iter() {
        let Some(want) = t.crc32c else { continue };
        let mut crc = 0u32;
        let mut done = 0u64;
        while done < t.len {
            let n = (t.len - done).min(PIECE);
            // The model is not held while its bytes are read, only the pool's mapping: an
            // UnregisterModel meanwhile frees the ranges when it returns, as it promises. Bytes
            // read after that belong to no model of ours; the result is then dropped below.
            let Some(region) = model
                .upgrade()
                .filter(|m| servable(m))
                .map(|m| Arc::clone(m.pool().region()))
            else {
                return Some(read);
            };
            let piece = buf.checksum(&region, t.offset + done, n);
            drop(region);
            crc = crc::combine(crc, piece, n);
            done += n;
            read += n;
            let c = core.upgrade()?;
            c.scrub.bytes_checked.fetch_add(n, Ordering::Relaxed);
            drop(c);
            if !pace.wait(core, n) {
                return None;
            }
        }
        if crc != want {
            // Still registered (the same registration: a Weak never upgrades to a newer one),
            // so the ranges read were this model's throughout.
            let (Some(m), Some(c)) = (model.upgrade().filter(|m| servable(m)), core.upgrade())
            else {
                return core.upgrade().map(|_| read);
            };
            let why = format!(
                "the scrubber found tensor {:?} changed in pool {:?} (crc32c {crc:08x}, table says {want:08x}, {} bytes at offset {}): something outside offloadd wrote the pool file",
                t.name,
                m.pool().name,
                t.len,
                t.offset
            );
            c.models.take_out_of_service(&m, why);
            c.scrub
                .out_of_service
                .lock()
                .expect("scrub lock")
                .push(m.name.clone());
            return Some(read);
        }
    }
    Some(read)
}

fn weak(models: &[Arc<Model>]) -> Vec<Weak<Model>> {
    models.iter().map(Arc::downgrade).collect()
}

fn servable(m: &Model) -> bool {
    m.state() == ModelState::Ready && m.out_of_service().is_none()
}

/// Keeps the bytes read at or under the configured rate. Time spent idle is not banked: after
/// a quiet hour the next model is read at the rate, not in a burst that catches up.
struct Pace {
    started: Instant,
    bytes: u64,
}

impl Pace {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            bytes: 0,
        }
    }

    /// Counts `n` bytes and sleeps until they are due; false once the daemon is gone.
    fn wait(&mut self, core: &Weak<Core>, n: u64) -> bool {
        self.bytes += n;
        loop {
            let Some(rate) = core.upgrade().map(|c| c.scrub.bytes_per_second) else {
                return false;
            };
            let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
            let elapsed = self.started.elapsed();
            match due.checked_sub(elapsed) {
                Some(ahead) if !ahead.is_zero() => std::thread::sleep(ahead.min(NAP)),
                _ => {
                    // Behind schedule: forget the slack, so it cannot be spent as a burst.
                    self.started += elapsed - due;
                    return true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom, Write};
    use std::sync::Arc;
    use std::time::Duration;

    use crate::core::models::model::ModelState;
    use crate::core::models::{NewPublished, PublishedTensor, RegisterRequest};
    use crate::core::pools::NewPool;
    use crate::core::testing::Fixture;
    use crate::metrics::Metrics;
    use crate::service::Service;

    /// A byte changed under a READY model is found by the scrubber's next pass; the model goes
    /// out of service naming the tensor, and a model beside it keeps serving.
    #[tokio::test]
    async fn a_changed_byte_takes_only_its_model_out_of_service() {
        let f = Fixture::new();
        let mut config = f.config();
        config.models.scrub_bytes_per_second = 256 << 20;
        let svc = Service::new(f.build(config).start().unwrap(), Arc::new(Metrics::new()));
        let pool = svc
            .create_pool(NewPool {
                name: "p".into(),
                device: "cpu".into(),
                size_bytes: 4 << 20,
            })
            .await
            .unwrap();
        for name in ["hit", "spared"] {
            let (path, _) = f.checkpoint(name, 2, 4096);
            let req = RegisterRequest {
                name: name.into(),
                pool: "p".into(),
                path,
                backend: None,
            };
            svc.register(req, true, |_| ()).await.unwrap();
        }
        let hit = svc.model("hit").unwrap();
        let target = hit.tensors()[1].clone();
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(pool.pool.path())
            .unwrap();
        let mut byte = [0u8];
        file.seek(SeekFrom::Start(target.offset + 7)).unwrap();
        std::io::Read::read_exact(&mut file, &mut byte).unwrap();
        file.seek(SeekFrom::Start(target.offset + 7)).unwrap();
        file.write_all(&[!byte[0]]).unwrap();
        drop(file);

        let mut progress = hit.watch_progress();
        let failed = tokio::time::timeout(
            Duration::from_secs(60),
            progress.wait_for(|p| p.state == ModelState::Failed),
        )
        .await
        .expect("the scrubber finds the change within a minute")
        .unwrap()
        .clone();
        let why = hit.out_of_service().expect("out of service");
        assert!(why.contains(&target.name), "{why}");
        assert!(failed.error.unwrap().contains(&target.name));
        let spared = svc.model("spared").unwrap();
        assert_eq!(spared.state(), ModelState::Ready);
        assert!(spared.out_of_service().is_none());
    }

    /// While nothing is servable (here an unsealed publication) the scrubber rests: it reads
    /// nothing and counts no pass. It used to go round at once, spinning a core for as long as
    /// a load or a publication lasted, and forever beside a model out of service. The 300 ms
    /// are a window to measure over, not a wait for something to happen: the old loop counted
    /// millions of passes in it.
    #[tokio::test]
    async fn with_nothing_servable_the_scrubber_rests() {
        let f = Fixture::new();
        let mut config = f.config();
        config.models.scrub_bytes_per_second = 256 << 20;
        let svc = Service::new(f.build(config).start().unwrap(), Arc::new(Metrics::new()));
        svc.create_pool(NewPool {
            name: "p".into(),
            device: "cpu".into(),
            size_bytes: 4 << 20,
        })
        .await
        .unwrap();
        let req = NewPublished {
            name: "unsealed".into(),
            pool: "p".into(),
            tensors: vec![PublishedTensor {
                name: "w".into(),
                dtype: "F32".into(),
                shape: vec![1024],
            }],
            backend: None,
        };
        svc.create_published(req, |_, _| ()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let scrub = &svc.core().scrub;
        assert_eq!((scrub.passes(), scrub.bytes_checked()), (0, 0));
    }
}
