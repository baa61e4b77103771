//! The `cuda` devices, through cudarc with libcuda loaded at run time so one binary serves
//! machines with and without NVIDIA drivers.

mod device;
mod driver;
mod pacer;
mod probe;
mod statics;

pub use device::{Copies, CudaDevice};
pub use driver::is_sticky;
pub use probe::probe;

/// The driver's name for an error code, e.g. `CUDA_ERROR_OUT_OF_MEMORY`. Only called once the
/// driver is known to be loaded.
pub(crate) fn error_name(e: cudarc::driver::DriverError) -> String {
    e.error_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("CUresult {}", e.0 as i32))
}
