//! The reference worker: what an inference worker in another process does with a lease.
//! Connect, attach, map the segments, read tensors in place, onload prefetch layers into static
//! slots, keep the lease alive, detach. It follows the lease's pin decision: it locks its own
//! mapping of the pool only when the decision is to pin.

mod cuda;
mod mapping;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use tonic::transport::Channel;

pub use cuda::CudaAccess;
pub use mapping::SegmentMap;

use crate::fast_client::FastClient;
use crate::proto::offload_client::OffloadClient;
use crate::proto::{
    AttachWorkerRequest, DetachWorkerRequest, GetLeaseTensorsRequest, KeepAliveRequest, Lease,
    LeaseTensor, OnloadToStaticRequest, OnloadToStaticResponse, Placement, SegmentKind,
};
use offloadd_proto::fast::FastError;

#[derive(Debug, Error)]
pub enum WorkerError {
    #[error("rpc: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("mapping segment {path}: {source}")]
    Map {
        path: String,
        source: std::io::Error,
    },
    #[error("segment {0} has no file to map (CUDA static buffers need a CUDA worker)")]
    NotMappable(usize),
    #[error("tensor {0:?} is not in the lease")]
    NoSuchTensor(String),
    #[error("tensor {name:?}: bytes out of the segment's bounds")]
    OutOfBounds { name: String },
    #[error("cuda: {0}")]
    Cuda(String),
    #[error(transparent)]
    Fast(#[from] FastError),
    #[error("the fast path is not connected; call connect_fast first")]
    NoFastPath,
    #[error("tensor {name:?} ({where_}): crc32c {got:#010x}, expected {want:#010x}")]
    Checksum {
        name: String,
        where_: &'static str,
        want: u32,
        got: u32,
    },
}

/// An attached worker.
pub struct Worker {
    client: OffloadClient<Channel>,
    /// What attached it, to attach again after a daemon restart.
    request: AttachWorkerRequest,
    pub lease: Lease,
    maps: Vec<Option<SegmentMap>>,
    by_name: HashMap<String, usize>,
    locked_bytes: u64,
    /// The onload fast path, once connected, and the socket it was opened on.
    fast: Option<FastClient>,
    fast_socket: Option<PathBuf>,
    /// CUDA static buffers: the device pointer of each segment opened by IPC handle.
    device_segments: HashMap<usize, u64>,
    cuda: Option<CudaAccess>,
}

/// Attaches and reads the whole tensor table, following its pages (AttachWorker answers the
/// first 10,000 rows). If a page cannot be read, the lease is detached rather than left for
/// its ttl.
pub async fn attach_lease(
    client: &mut OffloadClient<Channel>,
    request: &AttachWorkerRequest,
) -> Result<Lease, tonic::Status> {
    let mut lease = client.attach_worker(request.clone()).await?.into_inner();
    while !lease.next_page_token.is_empty() {
        let page = GetLeaseTensorsRequest {
            lease_id: lease.lease_id.clone(),
            page_size: 0,
            page_token: std::mem::take(&mut lease.next_page_token),
        };
        match client.get_lease_tensors(page).await {
            Ok(p) => {
                let p = p.into_inner();
                lease.tensors.extend(p.tensors);
                lease.next_page_token = p.next_page_token;
            }
            Err(e) => {
                let _ = client
                    .detach_worker(DetachWorkerRequest {
                        lease_id: lease.lease_id,
                    })
                    .await;
                return Err(e);
            }
        }
    }
    Ok(lease)
}

/// What [`Worker::reattach`] did.
#[derive(Debug, Clone)]
pub struct Reattached {
    /// From the first attempt to the new lease being mapped.
    pub pause: Duration,
    pub attempts: u32,
    /// The pool file was the same one, so its mapping was kept.
    pub kept_pool_mapping: bool,
}

/// Codes under which attaching again is worth a retry: the daemon is down or restarting, or
/// has not brought the model back (READY) yet.
fn retry_attach(code: tonic::Code) -> bool {
    use tonic::Code as C;
    matches!(
        code,
        C::Unavailable | C::NotFound | C::FailedPrecondition | C::Unknown | C::Cancelled
    )
}

/// Whether an error means the daemon or the lease is gone, so [`Worker::reattach`] applies.
pub fn lease_lost(e: &WorkerError) -> bool {
    match e {
        WorkerError::Rpc(s) => retry_attach(s.code()),
        WorkerError::Fast(FastError::Io(_)) => true,
        _ => false,
    }
}

/// The lease's segments, mapped.
struct Mapped {
    maps: Vec<Option<SegmentMap>>,
    locked_bytes: u64,
    device_segments: HashMap<usize, u64>,
    cuda: Option<CudaAccess>,
}

/// Maps every segment of `lease`, reusing a mapping from `old` for a pool file that is still
/// the same file (same path, inode and size). Returns whether one was reused.
fn map_lease(
    lease: &Lease,
    old: Vec<Option<SegmentMap>>,
    mut cuda: Option<CudaAccess>,
) -> Result<(Mapped, bool), WorkerError> {
    let mut old: Vec<SegmentMap> = old.into_iter().flatten().collect();
    let mut kept = false;
    let mut maps = Vec::with_capacity(lease.segments.len());
    let mut locked_bytes = 0;
    let mut device_segments = HashMap::new();
    for seg in &lease.segments {
        if seg.path.is_empty() {
            if !seg.ipc_handle.is_empty() {
                if cuda.is_none() {
                    cuda = Some(CudaAccess::new(&seg.device).map_err(WorkerError::Cuda)?);
                }
                let access = cuda.as_ref().expect("set above");
                let dptr = access
                    .open_ipc(&seg.ipc_handle)
                    .map_err(WorkerError::Cuda)?;
                device_segments.insert(maps.len(), dptr);
            }
            maps.push(None);
            continue;
        }
        let path = Path::new(&seg.path);
        let map_err = |source| WorkerError::Map {
            path: seg.path.clone(),
            source,
        };
        let reused = (seg.kind() == SegmentKind::Pool)
            .then(|| old.iter().position(|m| m.is_same_file(path)))
            .flatten()
            .map(|i| old.swap_remove(i));
        kept |= reused.is_some();
        let mut m = match reused {
            Some(m) => m,
            None => SegmentMap::open(path).map_err(map_err)?,
        };
        // The shared decision travels with the lease: pin our view of the pool only when the
        // daemon's policy said so, and only what this process reads in place (the UVA
        // tensors); prefetch and device tensors are copied by the daemon or once.
        if lease.pinned && seg.kind() == SegmentKind::Pool {
            if let Some((start, end)) = uva_span(lease) {
                locked_bytes += m.lock(start, end - start).map_err(map_err)?;
            }
        }
        maps.push(Some(m));
    }
    let mapped = Mapped {
        maps,
        locked_bytes,
        device_segments,
        cuda,
    };
    Ok((mapped, kept))
}

/// The byte span of the pool that holds UVA tensors.
fn uva_span(lease: &Lease) -> Option<(u64, u64)> {
    let uva = lease
        .tensors
        .iter()
        .filter(|t| t.placement() == Placement::Uva && t.length > 0);
    uva.fold(None, |acc, t| {
        let (s, e) = (t.offset, t.offset + t.length);
        Some(acc.map_or((s, e), |(a, b): (u64, u64)| (a.min(s), b.max(e))))
    })
}

impl Worker {
    /// Attaches to `model` and maps every segment the lease names.
    pub async fn attach(
        channel: Channel,
        model: &str,
        worker_name: &str,
        ttl_ms: u64,
    ) -> Result<Self, WorkerError> {
        let mut client = crate::client::offload(channel);
        let request = AttachWorkerRequest {
            model: model.to_string(),
            worker_name: worker_name.to_string(),
            ttl_ms,
            ..Default::default()
        };
        let lease = attach_lease(&mut client, &request).await?;
        let (mapped, _) = map_lease(&lease, Vec::new(), None)?;
        Ok(Self::with(client, request, lease, mapped))
    }

    fn with(
        client: OffloadClient<Channel>,
        request: AttachWorkerRequest,
        lease: Lease,
        m: Mapped,
    ) -> Self {
        let by_name = lease
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Self {
            client,
            request,
            lease,
            maps: m.maps,
            by_name,
            locked_bytes: m.locked_bytes,
            fast: None,
            fast_socket: None,
            device_segments: m.device_segments,
            cuda: m.cuda,
        }
    }

    /// After the lease was lost (the daemon restarted, or the ttl passed): attaches to the same
    /// model again, retrying with backoff for up to `timeout` while the daemon is down or the
    /// model is not READY yet (an adopted model is verified first). A pool file that is the same
    /// file as before (same inode, as when the daemon adopted it) keeps its mapping; anything
    /// else is mapped again, and static slots always are. The fast path is reconnected if it
    /// was open. Old mappings are released only after the new lease is in place, and nothing
    /// of the old lease is read afterwards.
    pub async fn reattach(&mut self, timeout: Duration) -> Result<Reattached, WorkerError> {
        let started = std::time::Instant::now();
        let mut delay = Duration::from_millis(20);
        let mut attempts = 0;
        self.fast = None;
        let lease = loop {
            attempts += 1;
            match attach_lease(&mut self.client, &self.request).await {
                Ok(lease) => break lease,
                Err(s) if retry_attach(s.code()) && started.elapsed() + delay < timeout => {
                    // Backoff between attempts while the daemon restarts.
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(s) => return Err(s.into()),
            }
        };
        let old = std::mem::take(&mut self.maps);
        let (mapped, kept_pool_mapping) = map_lease(&lease, old, self.cuda.take())?;
        let client = self.client.clone();
        let fast_socket = self.fast_socket.take();
        *self = Self::with(client, self.request.clone(), lease, mapped);
        if let Some(socket) = fast_socket {
            self.connect_fast(&socket)?;
        }
        Ok(Reattached {
            pause: started.elapsed(),
            attempts,
            kept_pool_mapping,
        })
    }

    pub fn tensors(&self) -> &[LeaseTensor] {
        &self.lease.tensors
    }

    pub fn tensor(&self, name: &str) -> Result<&LeaseTensor, WorkerError> {
        self.by_name
            .get(name)
            .map(|&i| &self.lease.tensors[i])
            .ok_or_else(|| WorkerError::NoSuchTensor(name.to_string()))
    }

    /// Whether this worker locked its mapping of the pool: only when the lease says pinned and
    /// it has UVA tensors to read in place.
    pub fn locked_pool(&self) -> bool {
        self.maps.iter().flatten().any(SegmentMap::is_locked)
    }

    /// Bytes of the pool this worker locked (whole pages around its UVA tensors).
    pub fn locked_bytes(&self) -> u64 {
        self.locked_bytes
    }

    fn segment(&self, i: usize) -> Result<&SegmentMap, WorkerError> {
        self.maps
            .get(i)
            .and_then(Option::as_ref)
            .ok_or(WorkerError::NotMappable(i))
    }

    /// The tensor's host copy, read in place from the pool mapping (no copy).
    pub fn host_bytes(&self, t: &LeaseTensor) -> Result<&[u8], WorkerError> {
        self.segment(t.segment as usize)?
            .bytes(t.offset, t.length)
            .ok_or_else(|| WorkerError::OutOfBounds {
                name: t.name.clone(),
            })
    }

    /// The tensor's static slot (PREFETCH tensors): read in place on cpu, copied back from the
    /// GPU on cuda.
    pub fn static_bytes(&self, t: &LeaseTensor) -> Result<std::borrow::Cow<'_, [u8]>, WorkerError> {
        let seg = t
            .static_segment
            .ok_or_else(|| WorkerError::NoSuchTensor(t.name.clone()))? as usize;
        if let Some(&dptr) = self.device_segments.get(&seg) {
            let cuda = self
                .cuda
                .as_ref()
                .expect("device segments come with a context");
            let bytes = cuda
                .read(dptr + t.static_offset, t.length as usize)
                .map_err(WorkerError::Cuda)?;
            return Ok(std::borrow::Cow::Owned(bytes));
        }
        self.segment(seg)?
            .bytes(t.static_offset, t.length)
            .map(std::borrow::Cow::Borrowed)
            .ok_or_else(|| WorkerError::OutOfBounds {
                name: t.name.clone(),
            })
    }

    /// Checks bytes against the checksum the daemon computed from the checkpoint.
    pub fn verify(t: &LeaseTensor, bytes: &[u8], where_: &'static str) -> Result<(), WorkerError> {
        let got = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, bytes) as u32;
        if got != t.crc32c {
            return Err(WorkerError::Checksum {
                name: t.name.clone(),
                where_,
                want: t.crc32c,
                got,
            });
        }
        Ok(())
    }

    /// Tensors of a model layer with the given placement.
    pub fn layer_tensors(
        &self,
        layer: u32,
        placement: Placement,
    ) -> impl Iterator<Item = &LeaseTensor> {
        self.lease
            .tensors
            .iter()
            .filter(move |t| t.layer == Some(layer) && t.placement() == placement)
    }

    pub async fn onload(&mut self, layer: u32) -> Result<OnloadToStaticResponse, WorkerError> {
        Ok(self
            .client
            .onload_to_static(OnloadToStaticRequest {
                lease_id: self.lease.lease_id.clone(),
                layer,
                async_copy: false,
                slot_free_event: Vec::new(),
            })
            .await?
            .into_inner())
    }

    /// Opens the onload fast path for this lease on the daemon's Unix socket (the one the
    /// channel connected to). Later `onload_fast` calls use it.
    pub fn connect_fast(&mut self, socket: &Path) -> Result<(), WorkerError> {
        match FastClient::connect(socket, &self.lease.lease_id)? {
            Ok(c) => {
                self.fast = Some(c);
                self.fast_socket = Some(socket.to_path_buf());
                Ok(())
            }
            Err(refused) => Err(refused.to_status().into()),
        }
    }

    /// OnloadToStatic over the fast path: no HTTP/2, same copy and same errors (the status and
    /// message the RPC would give). Blocks the calling thread until the copy is complete, like
    /// the RPC. Returns the bytes copied.
    pub fn onload_fast(&mut self, layer: u32) -> Result<u64, WorkerError> {
        let fast = self.fast.as_mut().ok_or(WorkerError::NoFastPath)?;
        let reply = fast.onload(layer)?;
        if reply.code != 0 {
            return Err(reply.to_status().into());
        }
        Ok(reply.bytes)
    }

    pub async fn keep_alive(&mut self) -> Result<u64, WorkerError> {
        Ok(self
            .client
            .keep_alive(KeepAliveRequest {
                lease_id: self.lease.lease_id.clone(),
            })
            .await?
            .into_inner()
            .expires_in_ms)
    }

    /// Renews the lease every `every` in the background until the task is dropped/aborted.
    /// Renews the lease every `every` until it is lost, and returns why: the daemon no longer
    /// knows it, or could not be reached for a whole ttl (it died). A worker then lets go of its
    /// mappings instead of holding a dead daemon's deleted shared memory.
    pub fn spawn_keep_alive(&self, every: Duration) -> tokio::task::JoinHandle<String> {
        let mut client = self.client.clone();
        let lease_id = self.lease.lease_id.clone();
        let ttl = Duration::from_millis(self.lease.ttl_ms);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            let mut renewed = tokio::time::Instant::now();
            loop {
                tick.tick().await;
                let request = KeepAliveRequest {
                    lease_id: lease_id.clone(),
                };
                match client.keep_alive(request).await {
                    Ok(_) => renewed = tokio::time::Instant::now(),
                    Err(s) if s.code() == tonic::Code::NotFound => {
                        return format!("lease {lease_id} is gone: {}", s.message());
                    }
                    Err(s) if renewed.elapsed() >= ttl => {
                        return format!(
                            "lease {lease_id} was not renewed within its ttl of {ttl:?}: {}",
                            s.message()
                        );
                    }
                    Err(_) => {} // a daemon restarting within the ttl: try again
                }
            }
        })
    }

    pub async fn detach(mut self) -> Result<(), WorkerError> {
        self.client
            .detach_worker(DetachWorkerRequest {
                lease_id: self.lease.lease_id.clone(),
            })
            .await?;
        Ok(())
    }
}
