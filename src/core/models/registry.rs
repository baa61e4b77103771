//! The model registry: registration (validate → allocate → load), removal, backends and
//! attachment. Placement and eviction are `placement`'s, publication by engines `published`'s.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rayon::prelude::*;
use tokio::sync::watch;

use super::header::ShardTensor;
use super::loader::{self, Chunk, LoadError, LoadJob};
use super::model::{Model, ModelSource, ModelState, Progress, TensorEntry};
use super::remote_source::{self, RemoteCheckpoint};
use super::{ModelError, source};
use crate::config::validate::is_valid_name;
use crate::core::backend::BackendConfig;
use crate::core::journal::Journal;
use crate::core::layers;
use crate::core::pool::Allocation;
use crate::core::pools::Pools;
use crate::core::remote::{FetchJob, Object, ObjectStamp, RemoteError, Remotes, Span, fetch};

/// Rows a core takes at a time when the layers of a table are found: enough that a handful of
/// tasks cover 100k tensors; a table of fewer than two such tasks stays on its own thread.
const LAYERS_PER_TASK: usize = 8192;

/// Settings from `[models]` and `[pools]`.
#[derive(Debug, Clone)]
pub struct ModelsParams {
    pub roots: Vec<PathBuf>,
    pub layer_patterns: Vec<String>,
    pub load_threads: usize,
    pub chunk_bytes: u64,
    pub max_load_bytes_per_sec: u64,
    pub evict_idle: bool,
    /// Where READY models are recorded for the next start.
    pub journal: Journal,
    /// The object stores checkpoints may be streamed from.
    pub remotes: Arc<Remotes>,
}

#[derive(Debug, Clone)]
pub struct RegisterRequest {
    pub name: String,
    pub pool: String,
    pub path: PathBuf,
    pub backend: Option<BackendConfig>,
}

#[derive(Debug)]
pub struct Models {
    pub(in crate::core) params: ModelsParams,
    inner: Mutex<BTreeMap<String, Arc<Model>>>,
}

/// Work handed to a blocking thread after registration was accepted.
pub struct PendingLoad {
    model: Arc<Model>,
    input: Input,
    done: watch::Sender<bool>,
}

/// Where a load reads its bytes.
enum Input {
    Files {
        files: Vec<std::fs::File>,
        /// The shard path of each file, to name the one that fails.
        paths: Vec<std::path::PathBuf>,
        chunks: Vec<Chunk>,
    },
    Remote {
        objects: Vec<(Object, ObjectStamp)>,
        spans: Vec<Span>,
    },
}

/// A checkpoint whose headers were read: shards on disk or objects in a store.
enum Opened {
    Files(source::Checkpoint),
    Remote(RemoteCheckpoint),
}

impl Opened {
    /// Each shard's tensors, taken out (the table takes their names and shapes).
    fn take_tensors(&mut self) -> Vec<Vec<ShardTensor>> {
        match self {
            Opened::Files(c) => c
                .shards
                .iter_mut()
                .map(|s| std::mem::take(&mut s.tensors))
                .collect(),
            Opened::Remote(c) => c
                .shards
                .iter_mut()
                .map(|s| std::mem::take(&mut s.tensors))
                .collect(),
        }
    }
}

impl PendingLoad {
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }
}

impl Models {
    pub fn new(params: ModelsParams) -> Self {
        Self {
            params,
            inner: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn get(&self, name: &str) -> Result<Arc<Model>, ModelError> {
        self.lock()
            .get(name)
            .cloned()
            .ok_or_else(|| ModelError::NotFound(name.to_string()))
    }

    pub fn list(&self) -> Vec<Arc<Model>> {
        self.lock().values().cloned().collect()
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Model>>> {
        self.inner.lock().expect("models lock")
    }

    /// Validates the checkpoint and allocates its ranges; the model is visible as LOADING once
    /// this returns. Reads headers only. Blocking.
    pub fn prepare(&self, pools: &Pools, req: &RegisterRequest) -> Result<PendingLoad, ModelError> {
        check_name(&req.name)?;
        let warning = req
            .backend
            .as_ref()
            .map(BackendConfig::validate)
            .transpose()?
            .flatten();
        if let Some(w) = warning {
            tracing::warn!(model = %req.name, "{w}");
        }
        self.check_free(&req.name)?;
        let pool = pools
            .get(&req.pool)
            .map_err(|_| ModelError::PoolNotFound(req.pool.clone()))?;
        let mut opened = match req.path.to_str().filter(|p| Remotes::is_remote(p)) {
            Some(url) => Opened::Remote(remote_source::open(&self.params.remotes, url)?),
            None => Opened::Files(source::open(&req.path, &self.params.roots)?),
        };
        let shards = opened.take_tensors();
        // Which file each row comes from: the shards' rows follow each other in the table.
        let lens: Vec<usize> = shards.iter().map(Vec::len).collect();
        let total: usize = lens.iter().sum();
        let files = (0..)
            .zip(lens)
            .flat_map(|(fi, n)| std::iter::repeat_n(fi, n));
        // The shards' rows become the table where they lie: one shard's list is taken as it is,
        // and the others are appended to the first one's.
        let mut shards = shards.into_iter();
        let mut tensors = shards.next().unwrap_or_default();
        tensors.reserve(total - tensors.len());
        for mut shard in shards {
            tensors.append(&mut shard);
        }
        // A large table on every core, as its header was parsed: one core took 2 ms at 100k
        // tensors, while the others waited. A small one here, without the hop to the pool.
        let patterns = &self.params.layer_patterns;
        let layer = |t: &mut ShardTensor| t.layer = layers::layer_of(&t.name, patterns);
        if tensors.len() < 2 * LAYERS_PER_TASK {
            tensors.iter_mut().for_each(layer);
        } else {
            tensors
                .par_iter_mut()
                .with_min_len(LAYERS_PER_TASK)
                .for_each(layer);
        }
        let alloc = self.allocate(&pool, &req.name, &tensors)?;
        let mut placed = Vec::with_capacity(tensors.len());
        for ((t, range), file) in tensors.iter_mut().zip(alloc.ranges()).zip(files) {
            // The row's offset is in its file until placement puts the pool's there.
            placed.push(Chunk {
                file,
                file_offset: t.offset,
                pool_offset: range.offset(),
                len: t.len,
            });
            t.offset = range.offset();
        }
        let bytes = tensors.iter().map(|t| t.len).sum();
        let (source, input, shown) = match opened {
            Opened::Files(ckpt) => (
                ModelSource::Checkpoint {
                    path: ckpt.path.clone(),
                    files: ckpt.shards.iter().map(|s| s.stamp.clone()).collect(),
                },
                Input::Files {
                    paths: ckpt.shards.iter().map(|s| s.path.clone()).collect(),
                    files: ckpt.shards.into_iter().map(|s| s.file).collect(),
                    chunks: placed,
                },
                ckpt.path.display().to_string(),
            ),
            Opened::Remote(ckpt) => (
                ModelSource::Remote {
                    url: ckpt.url.clone(),
                    objects: ckpt.shards.iter().map(|s| s.stamp.clone()).collect(),
                },
                Input::Remote {
                    spans: placed
                        .iter()
                        .map(|c| Span {
                            object: c.file,
                            offset: c.file_offset,
                            pool_offset: c.pool_offset,
                            len: c.len,
                        })
                        .collect(),
                    objects: ckpt
                        .shards
                        .into_iter()
                        .map(|s| (s.object, s.stamp))
                        .collect(),
                },
                ckpt.url,
            ),
        };
        let shard_count = match &input {
            Input::Files { files, .. } => files.len(),
            Input::Remote { objects, .. } => objects.len(),
        };
        let (done, load_done) = watch::channel(false);
        let model = Arc::new(new_model(NewModel {
            name: req.name.clone(),
            source,
            alloc,
            tensors,
            bytes,
            state: ModelState::Loading,
            backend: req.backend.clone(),
            load_done,
            adopted: false,
            publication: None,
        }));
        self.insert(&model)?;
        tracing::info!(model = %req.name, pool = %req.pool, path = %shown, bytes, shards = shard_count, "registering model");
        Ok(PendingLoad { model, input, done })
    }

    /// Loads the bytes. Blocking; runs on its own thread. On failure the model is removed, so
    /// nothing stays half-registered. Returns the signal that the load has ended, for the
    /// caller to send once it holds nothing of the daemon: whoever waits on it may then
    /// expect the model's ranges and the core to be free of this load.
    #[must_use = "send the load-ended signal, or waiters wait forever"]
    pub fn load(&self, job: PendingLoad) -> LoadEnded {
        let PendingLoad { model, input, done } = job;
        let start = Instant::now();
        // A log line at every tenth of the way, besides WatchModel's stream.
        let logged_tenths = AtomicUsize::new(0);
        let progress = |n: u64| {
            let mut tenths = 0;
            model.progress.send_modify(|p| {
                p.loaded_bytes += n;
                tenths = (p.loaded_bytes * 10 / p.total_bytes.max(1)) as usize;
            });
            if logged_tenths.fetch_max(tenths, Ordering::Relaxed) < tenths && tenths < 10 {
                tracing::info!(model = %model.name, percent = tenths * 10, secs = start.elapsed().as_secs_f64(), "loading");
            }
        };
        let result = match input {
            Input::Files {
                files,
                paths,
                chunks,
            } => self
                .read_files(&model, &files, chunks, &progress)
                .map_err(|e| (describe_load_error(&e, &paths), None)),
            Input::Remote { objects, spans } => self
                .params
                .remotes
                .block_on(fetch(&FetchJob {
                    objects: &objects,
                    region: model.pool().region(),
                    tensors: &spans,
                    part_bytes: self.params.remotes.params.part_bytes,
                    concurrency: self.params.remotes.params.concurrency,
                    cancel: &model.cancel,
                    on_progress: &progress,
                    max_bytes_per_sec: self.params.max_load_bytes_per_sec,
                }))
                .map_err(|e| match e {
                    RemoteError::Cancelled => (CANCELLED.to_string(), None),
                    e => (e.to_string(), Some(e.kind())),
                }),
        };
        match result {
            Ok(crcs) => {
                let mut tensors = model.tensors.lock().expect("tensors lock");
                // Nobody holds the table while it loads: no lease, since it is not READY.
                for (t, crc) in Arc::make_mut(&mut tensors).iter_mut().zip(crcs) {
                    t.crc32c = Some(crc);
                }
                drop(tensors);
                let loaded = start.elapsed();
                let secs = loaded.as_secs_f64();
                tracing::info!(model = %model.name, bytes = model.bytes, secs, gbps = model.bytes as f64 / secs / 1e9, "model ready");
                // Recorded before anyone is told READY: a model a client saw READY survives a
                // crash, or is refused under journal.required.
                match self.journal_write(&model) {
                    Err(refused) => {
                        tracing::warn!(model = %model.name, error = %refused.why, "journal.required: model refused");
                        self.remove_if_same(&model);
                        model.progress.send_modify(|p| {
                            p.state = ModelState::Failed;
                            p.error = Some(refused.why);
                            p.journal_refused = Some(refused.no_space);
                        });
                    }
                    Ok(()) => model.progress.send_modify(|p| {
                        p.state = ModelState::Ready;
                        p.load_time = Some(loaded);
                    }),
                }
            }
            Err((why, remote)) => {
                tracing::warn!(model = %model.name, error = %why, "model load failed; removing it");
                self.remove_if_same(&model);
                model.progress.send_modify(|p| {
                    p.state = ModelState::Failed;
                    p.error = Some(why);
                    p.remote_failure = remote;
                });
            }
        }
        drop(model);
        LoadEnded(done)
    }

    /// Reads a checkpoint's files into the model's ranges with the parallel `pread` loader.
    fn read_files(
        &self,
        model: &Model,
        files: &[std::fs::File],
        chunks: Vec<Chunk>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Vec<u32>, LoadError> {
        let threads = match self.params.load_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        loader::run(&LoadJob {
            files,
            region: model.pool().region(),
            tensors: chunks,
            chunk_bytes: self.params.chunk_bytes,
            threads,
            cancel: &model.cancel,
            on_progress: progress,
            max_bytes_per_sec: self.params.max_load_bytes_per_sec,
        })
    }

    /// Removes a model and forgets its journal record (a file removal: blocking). Refused while
    /// workers are attached. A load in progress is cancelled; the caller waits for it with
    /// [`wait_loaded`], after which the pool's bytes are back.
    pub fn unregister(&self, name: &str) -> Result<Arc<Model>, ModelError> {
        let model = {
            let mut map = self.lock();
            let model = map
                .get(name)
                .ok_or_else(|| ModelError::NotFound(name.to_string()))?;
            ensure_idle(model)?;
            map.remove(name).expect("checked above")
        };
        model.cancel.store(true, Ordering::Relaxed);
        self.journal_forget(&model);
        tracing::info!(model = name, "model unregistered");
        Ok(model)
    }

    /// Replaces a model's backend; refused while workers are attached. Nothing is re-read:
    /// plans are derived from the tensor table when workers attach.
    pub fn set_backend(
        &self,
        name: &str,
        backend: BackendConfig,
    ) -> Result<Arc<Model>, ModelError> {
        if let Some(w) = backend.validate()? {
            tracing::warn!(model = name, "{w}");
        }
        // Under the registry lock, so an attach cannot slip in between the check and the change.
        let map = self.lock();
        let model = map
            .get(name)
            .cloned()
            .ok_or_else(|| ModelError::NotFound(name.to_string()))?;
        ensure_idle(&model)?;
        tracing::info!(model = name, backend = backend.kind(), "backend changed");
        *model.backend.lock().expect("backend lock") = Some(backend);
        drop(map);
        if model.state() == ModelState::Ready {
            // Under journal.required the model stays as it is: the new backend is served and
            // reported not durable, as the refusal of a change already made cannot undo it.
            let _ = self.journal_write(&model);
        }
        Ok(model)
    }

    /// Counts a new worker on a model, unless `refuse` objects. Under the registry lock, so it
    /// cannot race UnregisterModel or SetBackend.
    pub fn attach<E: From<ModelError>>(
        &self,
        name: &str,
        refuse: impl FnOnce(&Model) -> Option<E>,
    ) -> Result<Arc<Model>, E> {
        let map = self.lock();
        let model = map
            .get(name)
            .cloned()
            .ok_or_else(|| ModelError::NotFound(name.to_string()))?;
        if let Some(e) = refuse(&model) {
            return Err(e);
        }
        model.attached.fetch_add(1, Ordering::AcqRel);
        model.touch();
        Ok(model)
    }

    /// Asks every load in progress to stop (daemon shutdown).
    pub fn cancel_all(&self) {
        for m in self.lock().values() {
            m.cancel.store(true, Ordering::Relaxed);
        }
    }

    pub(in crate::core) fn check_free(&self, name: &str) -> Result<(), ModelError> {
        if self.lock().contains_key(name) {
            return Err(ModelError::AlreadyExists(name.to_string()));
        }
        Ok(())
    }

    pub(in crate::core) fn insert(&self, model: &Arc<Model>) -> Result<(), ModelError> {
        let mut map = self.lock();
        if map.contains_key(&model.name) {
            // Lost a race with a concurrent registration of the same name; our allocation is
            // released when `model` drops.
            return Err(ModelError::AlreadyExists(model.name.clone()));
        }
        map.insert(model.name.clone(), Arc::clone(model));
        Ok(())
    }

    pub(in crate::core) fn remove_if_same(&self, model: &Arc<Model>) {
        let mut map = self.lock();
        if map.get(&model.name).is_some_and(|m| Arc::ptr_eq(m, model)) {
            map.remove(&model.name);
        }
    }
}

const CANCELLED: &str = "cancelled: the model was unregistered";

/// Why a load from files failed, naming the shard.
fn describe_load_error(e: &LoadError, paths: &[std::path::PathBuf]) -> String {
    match e {
        LoadError::Cancelled => CANCELLED.to_string(),
        LoadError::Io { file, source, .. } => {
            let path = paths
                .get(*file)
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let hint = if source.kind() == std::io::ErrorKind::UnexpectedEof {
                "; the checkpoint changed while it was loaded: register it again once it is complete"
            } else {
                ""
            };
            format!("{path}: {e}{hint}")
        }
    }
}

/// Unregistering and re-planning need a model no worker holds.
fn ensure_idle(model: &Model) -> Result<(), ModelError> {
    match model.attached_workers() {
        0 => Ok(()),
        workers => Err(ModelError::InUse {
            name: model.name.clone(),
            workers,
        }),
    }
}

/// The end of a load or a verification, to be signalled once the thread that ran it holds
/// nothing of the daemon.
pub struct LoadEnded(pub(in crate::core) watch::Sender<bool>);

impl LoadEnded {
    pub fn signal(self) {
        let _ = self.0.send(true);
    }
}

/// Waits until no loader thread holds the model any more.
pub async fn wait_loaded(model: &Model) {
    let mut rx = model.load_done.clone();
    let _ = rx.wait_for(|done| *done).await;
}

pub(in crate::core) fn check_name(name: &str) -> Result<(), ModelError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(ModelError::InvalidName(name.to_string()))
    }
}

pub fn state_name(s: ModelState) -> &'static str {
    match s {
        ModelState::Loading => "LOADING",
        ModelState::Ready => "READY",
        ModelState::Failed => "FAILED",
        ModelState::AwaitingSeal => "AWAITING_SEAL",
    }
}

pub(in crate::core) struct NewModel {
    pub name: String,
    pub source: ModelSource,
    pub alloc: Allocation,
    pub tensors: Vec<TensorEntry>,
    pub bytes: u64,
    pub state: ModelState,
    pub backend: Option<BackendConfig>,
    pub load_done: watch::Receiver<bool>,
    pub adopted: bool,
    pub publication: Option<super::Publication>,
}

pub(in crate::core) fn new_model(m: NewModel) -> Model {
    let (progress, _) = watch::channel(Progress {
        state: m.state,
        loaded_bytes: 0,
        total_bytes: m.bytes,
        error: None,
        load_time: None,
        journal_refused: None,
        remote_failure: None,
    });
    Model {
        name: m.name,
        source: m.source,
        alloc: m.alloc,
        tensors: Mutex::new(Arc::new(m.tensors)),
        bytes: m.bytes,
        progress,
        cancel: Arc::new(AtomicBool::new(false)),
        backend: Mutex::new(m.backend),
        attached: AtomicUsize::new(0),
        last_used: Mutex::new(Instant::now()),
        load_done: m.load_done,
        adopted: m.adopted,
        publication: m.publication,
        out_of_service: Default::default(),
        journal_gate: Mutex::new(false),
    }
}
