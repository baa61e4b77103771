//! A thread per CUDA device that makes every driver call for it. Driver calls block (sometimes
//! for long), so they never run on the async runtime; one thread also keeps the context current
//! without per-call bookkeeping.

use std::sync::Mutex;
use std::sync::mpsc;

use cudarc::driver::{result, sys};

use crate::device::DeviceError;

type Job = Box<dyn FnOnce(&mut DriverState) + Send>;

/// State owned by the driver thread.
pub struct DriverState {
    pub ordinal: i32,
    /// The device's primary context, retained the first time a call needs one, so devices no
    /// pool uses never get a context.
    ctx: Option<sys::CUcontext>,
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

/// Handle to the thread. Dropping it lets the thread finish its queue and exit.
#[derive(Debug)]
pub struct DriverThread {
    id: String,
    tx: Mutex<mpsc::Sender<Job>>,
}

impl DriverThread {
    pub fn spawn(ordinal: i32) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let id = format!("cuda:{ordinal}");
        std::thread::Builder::new()
            .name(format!("cuda-{ordinal}"))
            .spawn(move || {
                let mut state = DriverState { ordinal, ctx: None };
                while let Ok(job) = rx.recv() {
                    job(&mut state);
                }
            })?;
        Ok(Self {
            id,
            tx: Mutex::new(tx),
        })
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
