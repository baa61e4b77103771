//! The `cuda` devices, through cudarc with libcuda loaded at run time so one binary serves
//! machines with and without NVIDIA drivers.

mod probe;

pub use probe::{CudaProbe, probe};
