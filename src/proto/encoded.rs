//! A message encoded ahead of time. tonic encodes answers on the runtime thread, after the
//! handler returns; a 10,000-row tensor table takes milliseconds there, and every other call on
//! that thread waits. An `Encoded` answer was encoded where it was built (a blocking thread), so
//! the runtime thread only copies its bytes.

use std::fmt;
use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes};
use prost::encoding::{self, DecodeContext, WireType, encode_key};
use prost::{DecodeError, Message};

/// The wire bytes of one `M`: the same bytes `M::encode` writes, so a client decodes an `M`.
pub struct Encoded<M> {
    bytes: Bytes,
    kind: PhantomData<fn() -> M>,
}

impl<M: Message> Encoded<M> {
    /// Encodes `message` now, on the calling thread.
    pub fn new(message: &M) -> Self {
        Self::from_bytes(message.encode_to_vec().into())
    }
}

impl<M> Encoded<M> {
    /// Bytes already known to be an encoded `M`, such as fields encoded one by one.
    pub fn from_bytes(bytes: Bytes) -> Self {
        Self {
            bytes,
            kind: PhantomData,
        }
    }

    /// The wire bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }
}

impl<M: Message> From<M> for Encoded<M> {
    fn from(message: M) -> Self {
        Self::new(&message)
    }
}

impl<M> Clone for Encoded<M> {
    fn clone(&self) -> Self {
        Self::from_bytes(self.bytes.clone())
    }
}

impl<M> Default for Encoded<M> {
    fn default() -> Self {
        Self::from_bytes(Bytes::new())
    }
}

impl<M> fmt::Debug for Encoded<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Encoded<{}>({} bytes)",
            std::any::type_name::<M>(),
            self.bytes.len()
        )
    }
}

impl<M> Message for Encoded<M>
where
    M: Send + Sync,
{
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.bytes);
    }

    /// Keeps each field's bytes as they came, so decoding an `Encoded<M>` and encoding it again
    /// gives the same `M`.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let mut out = Vec::with_capacity(self.bytes.len() + 16);
        out.extend_from_slice(&self.bytes);
        encode_key(tag, wire_type, &mut out);
        match wire_type {
            WireType::Varint => {
                let mut v = 0u64;
                encoding::uint64::merge(wire_type, &mut v, buf, ctx)?;
                encoding::encode_varint(v, &mut out);
            }
            WireType::SixtyFourBit => {
                let mut v = 0u64;
                encoding::fixed64::merge(wire_type, &mut v, buf, ctx)?;
                out.put_u64_le(v);
            }
            WireType::ThirtyTwoBit => {
                let mut v = 0u32;
                encoding::fixed32::merge(wire_type, &mut v, buf, ctx)?;
                out.put_u32_le(v);
            }
            WireType::LengthDelimited => {
                let mut v = Vec::new();
                encoding::bytes::merge(wire_type, &mut v, buf, ctx)?;
                encoding::encode_varint(v.len() as u64, &mut out);
                out.extend_from_slice(&v);
            }
            // Groups are not in offloadd.v1: refused as the wrong wire type.
            WireType::StartGroup | WireType::EndGroup => {
                encoding::check_wire_type(WireType::LengthDelimited, wire_type)?;
            }
        }
        self.bytes = out.into();
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        self.bytes.len()
    }

    fn clear(&mut self) {
        self.bytes = Bytes::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Model, TensorInfo};

    fn model() -> Model {
        Model {
            name: "m".into(),
            bytes: 1 << 40,
            tensor_count: 2,
            tensors: vec![
                TensorInfo {
                    name: "a".into(),
                    dtype: "F16".into(),
                    shape: vec![2, 3],
                    strides: vec![3, 1],
                    offset: 256,
                    length: 12,
                    layer: Some(0),
                    crc32c: 0xdead_beef,
                },
                TensorInfo::default(),
            ],
            next_page_token: "2".into(),
            ..Default::default()
        }
    }

    #[test]
    fn encodes_the_same_bytes_as_the_message() {
        let m = model();
        let e = Encoded::new(&m);
        assert_eq!(e.encode_to_vec(), m.encode_to_vec());
        assert_eq!(e.encoded_len(), m.encoded_len());
        assert_eq!(Model::decode(e.encode_to_vec().as_slice()).unwrap(), m);
    }

    #[test]
    fn decoding_keeps_every_field() {
        let m = model();
        let e = Encoded::<Model>::decode(m.encode_to_vec().as_slice()).unwrap();
        assert_eq!(Model::decode(e.bytes().clone()).unwrap(), m);
    }

    #[test]
    fn a_short_buffer_is_an_error() {
        let bytes = model().encode_to_vec();
        assert!(Encoded::<Model>::decode(&bytes[..bytes.len() - 1]).is_err());
    }
}
