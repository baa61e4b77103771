//! A tensor table's rows: what models hold, plans read and journals record. Below all three,
//! so that none of them depends on another for it.

use safetensors::Dtype;

/// One tensor of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    /// Row-major and contiguous, as safetensors stores it: the strides follow from it.
    pub shape: Vec<usize>,
    /// Offset of the bytes inside the pool file (256-byte aligned).
    pub offset: u64,
    pub len: u64,
    /// Layer index parsed from the name; None outside the layer stack.
    pub layer: Option<u32>,
    /// CRC32C of the bytes, once loaded or sealed.
    pub crc32c: Option<u32>,
}

pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}
