//! A thread per CUDA device that makes every driver call for it. Driver calls block (sometimes
//! for long), so they never run on the async runtime; one thread also keeps the context current
//! without per-call bookkeeping.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys};

use crate::device::DeviceError;

type Job = Box<dyn FnOnce(&mut DriverState) + Send>;

/// State owned by the driver thread.
pub struct DriverState {
    pub ordinal: i32,
    /// The device's primary context, retained the first time a call needs one, so devices no
    /// pool uses never get a context.
    ctx: Option<sys::CUcontext>,
    /// Pinned staging ring for copies from unpinned pools, made on first use.
    staging: Option<Staging>,
    /// Bytes of each of the ring's two buffers (half of `pin.staging_bytes`).
    stage_bytes: usize,
    /// Set once the ring exists, for readers that must not queue behind copies (GetInfo and the
    /// host budget).
    staged: Arc<AtomicBool>,
    /// The copy pacer, started with the first asynchronous copy from a pinned pool; `Some(None)`
    /// where it could not start (copies then go unpaced).
    pacer: Option<Option<super::pacer::Pacer>>,
    window_bytes: u64,
}

/// Two pinned host buffers and the events that say when each is free again.
pub struct Staging {
    pub buffers: [*mut std::ffi::c_void; 2],
    /// Bytes of each buffer.
    pub stage_bytes: usize,
    pub events: [sys::CUevent; 2],
    pub in_flight: [bool; 2],
    /// Threads that fill the staging buffers.
    pub copiers: rayon::ThreadPool,
}

impl DriverState {
    /// Makes the device's primary context current, creating it on first use.
    pub fn context(&mut self) -> Result<sys::CUcontext, DeviceError> {
        if let Some(ctx) = self.ctx {
            return Ok(ctx);
        }
        let id = format!("cuda:{}", self.ordinal);
        let err = |call| {
            let device = id.clone();
            move |e| DeviceError::Cuda {
                device,
                call,
                name: super::error_name(e),
            }
        };
        let dev = result::device::get(self.ordinal).map_err(err("cuDeviceGet"))?;
        // SAFETY: `dev` came from cuDeviceGet; the retained context is released in Drop.
        let ctx =
            unsafe { result::primary_ctx::retain(dev) }.map_err(err("cuDevicePrimaryCtxRetain"))?;
        // SAFETY: the context was just retained and stays alive while this thread runs.
        unsafe { result::ctx::set_current(ctx) }.map_err(err("cuCtxSetCurrent"))?;
        tracing::info!(device = %id, "created CUDA context");
        self.ctx = Some(ctx);
        Ok(ctx)
    }
}

impl DriverState {
    fn check(&self, call: &'static str, rc: sys::CUresult) -> Result<(), DeviceError> {
        super::statics::check(&format!("cuda:{}", self.ordinal), call, rc)
    }

    /// The device's copy pacer, started on first use.
    pub fn pacer(&mut self, id: &str) -> Option<&super::pacer::Pacer> {
        if self.pacer.is_none() {
            let started = self
                .context()
                .and_then(|ctx| super::pacer::Pacer::start(ctx, id, self.window_bytes));
            self.pacer = Some(started.map_err(|e| {
                tracing::warn!(device = id, error = %e, "copy pacer unavailable; asynchronous copies go unpaced");
            }).ok());
        }
        self.pacer.as_ref().and_then(Option::as_ref)
    }

    /// A lease's stream is drained and about to go: its pacer gate is free again.
    pub fn forget_paced(&mut self, stream: usize) {
        if let Some(Some(p)) = &self.pacer {
            p.forget(stream);
        }
    }

    /// The staging ring, allocated on the first copy from an unpinned pool.
    pub fn staging(&mut self) -> Result<&mut Staging, DeviceError> {
        if self.staging.is_none() {
            self.context()?;
            let mut buffers = [std::ptr::null_mut(); 2];
            let mut events = [std::ptr::null_mut(); 2];
            for i in 0..2 {
                // SAFETY: out-pointers to locals; context current. Leaked on failure is bounded
                // (at most one buffer) and only at setup.
                self.check("cuMemAllocHost", unsafe {
                    sys::cuMemAllocHost_v2(&mut buffers[i], self.stage_bytes)
                })?;
                // SAFETY: as above; DISABLE_TIMING (2) makes the events cheap.
                self.check("cuEventCreate", unsafe {
                    sys::cuEventCreate(&mut events[i], 2)
                })?;
            }
            tracing::info!(
                device = self.ordinal,
                bytes = 2 * self.stage_bytes,
                "allocated pinned staging ring for unpinned pools"
            );
            let threads = std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(16);
            let copiers = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(move |i| format!("stage-copy-{i}"))
                .build()
                .map_err(|e| DeviceError::Unsupported(format!("staging copy threads: {e}")))?;
            self.staged.store(true, Ordering::Release);
            self.staging = Some(Staging {
                buffers,
                stage_bytes: self.stage_bytes,
                events,
                in_flight: [false; 2],
                copiers,
            });
        }
        Ok(self.staging.as_mut().expect("just set"))
    }
}

impl Drop for DriverState {
    fn drop(&mut self) {
        if self.ctx.take().is_some() {
            if let Ok(dev) = result::device::get(self.ordinal) {
                // SAFETY: balances the retain in `context`.
                let _ = unsafe { result::primary_ctx::release(dev) };
            }
        }
    }
}

/// Errors after which a CUDA context is unusable ("sticky"): the device is marked faulted and
/// answers UNAVAILABLE until the daemon restarts, while other devices keep serving.
const STICKY: &[&str] = &[
    "CUDA_ERROR_ILLEGAL_ADDRESS",
    "CUDA_ERROR_LAUNCH_FAILED",
    "CUDA_ERROR_HARDWARE_STACK_ERROR",
    "CUDA_ERROR_ILLEGAL_INSTRUCTION",
    "CUDA_ERROR_MISALIGNED_ADDRESS",
    "CUDA_ERROR_INVALID_ADDRESS_SPACE",
    "CUDA_ERROR_INVALID_PC",
    "CUDA_ERROR_ECC_UNCORRECTABLE",
    "CUDA_ERROR_NVLINK_UNCORRECTABLE",
    "CUDA_ERROR_CONTEXT_IS_DESTROYED",
];

pub fn is_sticky(error_name: &str) -> bool {
    STICKY.contains(&error_name)
}

/// Handle to the thread. Dropping it lets the thread finish its queue and exit.
#[derive(Debug)]
pub struct DriverThread {
    id: String,
    tx: Mutex<mpsc::Sender<Job>>,
    /// The sticky error that faulted the device, once one has.
    fault: Mutex<Option<String>>,
    staged: Arc<AtomicBool>,
}

impl DriverThread {
    /// `stage_bytes`: each staging buffer's size (the ring is two of them); `window_bytes`:
    /// the copy pacer's window, 0 for none.
    pub fn spawn(ordinal: i32, stage_bytes: usize, window_bytes: u64) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let id = format!("cuda:{ordinal}");
        let staged = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&staged);
        std::thread::Builder::new()
            .name(format!("cuda-{ordinal}"))
            .spawn(move || {
                let mut state = DriverState {
                    ordinal,
                    ctx: None,
                    staging: None,
                    stage_bytes,
                    staged: flag,
                    // Never started when pacing is off.
                    pacer: (window_bytes == 0).then_some(None),
                    window_bytes,
                };
                while let Ok(job) = rx.recv() {
                    job(&mut state);
                }
            })?;
        Ok(Self {
            id,
            tx: Mutex::new(tx),
            fault: Mutex::new(None),
            staged,
        })
    }

    /// Whether the staging ring has been allocated (without waiting for the driver thread).
    pub fn has_staging(&self) -> bool {
        self.staged.load(Ordering::Acquire)
    }

    /// The error that faulted the device, if one has.
    pub fn fault(&self) -> Option<String> {
        self.fault.lock().expect("fault lock").clone()
    }

    /// Runs a driver job unless the device has faulted; a sticky CUDA error from the job faults
    /// the device for every later call.
    pub fn run_checked<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut DriverState) -> Result<R, DeviceError> + Send + 'static,
    ) -> Result<R, DeviceError> {
        if let Some(cause) = self.fault() {
            return Err(DeviceError::Faulted {
                device: self.id.clone(),
                cause,
            });
        }
        let result = self.run(f)?;
        self.observe(result)
    }

    /// Faults the device if `result` is a sticky CUDA error, for driver calls made on other
    /// threads (waits on events and streams, which must not hold up this thread's queue).
    pub fn observe<R>(&self, result: Result<R, DeviceError>) -> Result<R, DeviceError> {
        if let Err(DeviceError::Cuda { name, call, .. }) = &result {
            if is_sticky(name) {
                tracing::error!(device = %self.id, call, error = %name, "device faulted; it answers UNAVAILABLE until offloadd restarts");
                *self.fault.lock().expect("fault lock") = Some(name.clone());
            }
        }
        result
    }

    /// Runs `f` on the driver thread and waits for its result (call from blocking contexts).
    pub fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut DriverState) -> R + Send + 'static,
    ) -> Result<R, DeviceError> {
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |state| {
            let _ = done_tx.send(f(state));
        });
        self.tx
            .lock()
            .expect("driver queue lock")
            .send(job)
            .map_err(|_| DeviceError::Gone(self.id.clone()))?;
        done_rx
            .recv()
            .map_err(|_| DeviceError::Gone(self.id.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No driver is needed: the jobs below never call CUDA.
    #[test]
    fn a_sticky_error_faults_the_device_and_later_calls_are_refused() {
        let t = DriverThread::spawn(7, 1 << 20, 0).unwrap();
        assert_eq!(t.run_checked(|st| Ok(st.ordinal)).unwrap(), 7);
        let transient = t.run_checked::<()>(|_| {
            Err(DeviceError::Cuda {
                device: "cuda:7".into(),
                call: "cuMemAlloc",
                name: "CUDA_ERROR_OUT_OF_MEMORY".into(),
            })
        });
        assert!(transient.is_err());
        assert_eq!(t.fault(), None, "out of memory is not sticky");
        let _ = t.run_checked::<()>(|_| {
            Err(DeviceError::Cuda {
                device: "cuda:7".into(),
                call: "cuMemcpyHtoDAsync",
                name: "CUDA_ERROR_ILLEGAL_ADDRESS".into(),
            })
        });
        assert_eq!(t.fault().as_deref(), Some("CUDA_ERROR_ILLEGAL_ADDRESS"));
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r = {
            let ran = ran.clone();
            t.run_checked(move |_| {
                ran.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            })
        };
        assert!(matches!(r, Err(DeviceError::Faulted { .. })), "{r:?}");
        assert!(
            !ran.load(std::sync::atomic::Ordering::SeqCst),
            "nothing runs on a faulted device"
        );
    }
}
