//! Tensor tables, encoded once and answered a page at a time.
//!
//! A model's table does not change once it is READY, and every lease of a model with the same
//! backend gets the same table. Building and encoding 10,000 rows takes milliseconds of CPU;
//! doing it for every page of every GetModel and every attach kept the daemon's cores busy on
//! a 100k-tensor model and delayed everyone else's calls. So each table is encoded once, on the
//! first page asked for, and a page is then a copy of bytes. The cache holds about 70 bytes a
//! row for a model's table and as many for each lease table (7 MB each at 100k tensors), for as
//! long as the model is registered; `offloadd_table_cache_bytes` shows how much.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, Weak};

use bytes::{BufMut, Bytes, BytesMut};
use prometheus_client::metrics::gauge::Gauge;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use super::convert;
use super::paging;
use crate::core::backend::BackendConfig;
use crate::core::leases::Lease;
use crate::core::models::model::{Model, ModelState};
use crate::proto::{self, Encoded};

/// Field numbers of the repeated fields that carry the rows.
pub(super) const MODEL_TENSORS: u32 = 11;
const LEASE_TENSORS: u32 = 7;
const PAGE_TENSORS: u32 = 1;

/// Lease tables kept per model: one per backend (and with or without static buffers) in use.
/// Backends change rarely; a model switched back and forth keeps only the latest few.
const LEASE_SHAPES_PER_MODEL: usize = 4;

/// Encoded tables by model name, while the model they were built from lives.
#[derive(Debug)]
pub struct Tables {
    entries: Mutex<HashMap<String, Entry>>,
    /// Kept at the heap bytes the tables hold (`offloadd_table_cache_bytes`): they live beside
    /// the pools, outside every budget, and an operator sizing a node needs to see them.
    bytes: Gauge,
}

#[derive(Debug)]
struct Entry {
    /// Which registration the tables belong to: a name registered again is another model.
    /// The `Weak` keeps the allocation, so its address cannot be reused by a later model.
    model: Weak<Model>,
    table: Option<Arc<Rows>>,
    leases: Vec<(LeaseShape, Arc<Rows>)>,
}

/// What a lease table depends on besides the model's table.
#[derive(Debug, Clone, PartialEq)]
struct LeaseShape {
    backend: Option<BackendConfig>,
    statics: bool,
}

impl Tables {
    pub fn new(bytes: Gauge) -> Self {
        Self {
            entries: Mutex::default(),
            bytes,
        }
    }

    /// GetModel with include_tensors: the model with rows `rows` of its table (fitted) and the
    /// token of the next page. Blocking: the first page of a READY model encodes its table.
    pub fn model_page(&self, m: &Arc<Model>, rows: Range<usize>) -> Encoded<proto::Model> {
        // Before READY the checksums are still being filled in: build the page itself.
        if m.progress().state != ModelState::Ready {
            return Encoded::new(&convert::model_page(m, rows));
        }
        let table = self.cached(
            m,
            |e| e.table.clone(),
            |e, t| e.table = Some(t),
            || Rows::encode(m.tensors().iter().map(convert::tensor)),
        );
        table.page(rows, MODEL_TENSORS, |next| proto::Model {
            next_page_token: paging::Scope::model(m).token(next),
            ..convert::model(m)
        })
    }

    /// AttachWorker's answer: the lease with rows `rows` of its table. Blocking.
    pub fn lease(&self, l: &Lease, rows: Range<usize>) -> Encoded<proto::Lease> {
        self.lease_rows(l)
            .page(rows, LEASE_TENSORS, |next| proto::Lease {
                next_page_token: paging::Scope::lease(l).token(next),
                ..convert::lease(l)
            })
    }

    /// GetLeaseTensors: rows `rows` of the lease's table. Blocking.
    pub fn lease_page(&self, l: &Lease, rows: Range<usize>) -> Encoded<proto::LeaseTensorPage> {
        self.lease_rows(l)
            .page(rows, PAGE_TENSORS, |next| proto::LeaseTensorPage {
                tensors: Vec::new(),
                next_page_token: paging::Scope::lease(l).token(next),
            })
    }

    /// Leases are granted on READY models only, so their tables are final too.
    fn lease_rows(&self, l: &Lease) -> Arc<Rows> {
        let shape = LeaseShape {
            backend: l.backend.clone(),
            statics: l.statics.is_some(),
        };
        let find = |e: &Entry| {
            e.leases
                .iter()
                .find(|(s, _)| *s == shape)
                .map(|(_, t)| Arc::clone(t))
        };
        let keep = |e: &mut Entry, t: Arc<Rows>| {
            if e.leases.len() == LEASE_SHAPES_PER_MODEL {
                e.leases.remove(0);
            }
            e.leases.push((shape.clone(), t));
        };
        self.cached(&l.model, find, keep, || {
            Rows::encode(convert::lease_tensors(l))
        })
    }

    /// Drops what is kept for `name`, which was just unregistered, and for any other model gone
    /// since (evicted from a full pool, say), so their tables do not outlive them until the next
    /// table is built.
    pub fn forget(&self, name: &str) {
        let mut entries = self.entries.lock().expect("tables lock");
        entries.remove(name);
        entries.retain(|_, e| e.model.strong_count() > 0);
        self.count(&entries);
    }

    /// Sets the gauge to what `entries` hold; a few entries per model, so a sum is cheap.
    fn count(&self, entries: &HashMap<String, Entry>) {
        let bytes: usize = entries
            .values()
            .flat_map(|e| e.table.iter().chain(e.leases.iter().map(|(_, t)| t)))
            .map(|t| t.heap_bytes())
            .sum();
        self.bytes.set(bytes as i64);
    }

    /// The table `find` picks from `m`'s entry, or one `build` makes (outside the lock: it
    /// takes milliseconds) and `keep` stores. Two first pages at once may both build; the
    /// tables are equal, and the later one is kept.
    fn cached(
        &self,
        m: &Arc<Model>,
        find: impl Fn(&Entry) -> Option<Arc<Rows>>,
        keep: impl FnOnce(&mut Entry, Arc<Rows>),
        build: impl FnOnce() -> Rows,
    ) -> Arc<Rows> {
        {
            let entries = self.entries.lock().expect("tables lock");
            if let Some(t) = entries.get(&m.name).filter(|e| e.is(m)).and_then(&find) {
                return t;
            }
        }
        let table = Arc::new(build());
        let mut entries = self.entries.lock().expect("tables lock");
        // Models unregistered since: their tables go with them.
        entries.retain(|_, e| e.model.strong_count() > 0);
        let entry = entries
            .entry(m.name.clone())
            .and_modify(|e| {
                if !e.is(m) {
                    *e = Entry::new(m);
                }
            })
            .or_insert_with(|| Entry::new(m));
        keep(entry, Arc::clone(&table));
        self.count(&entries);
        table
    }
}

impl Entry {
    fn new(m: &Arc<Model>) -> Self {
        Self {
            model: Arc::downgrade(m),
            table: None,
            leases: Vec::new(),
        }
    }

    fn is(&self, m: &Arc<Model>) -> bool {
        std::ptr::eq(self.model.as_ptr(), Arc::as_ptr(m))
    }
}

/// The rows of a table, each encoded on its own (without the field key and length, which
/// depend on the message that carries it).
#[derive(Debug)]
struct Rows {
    bytes: Bytes,
    /// Row `i` is `bytes[ends[i - 1]..ends[i]]`, the first starting at 0.
    ends: Vec<usize>,
}

impl Rows {
    fn encode<M: Message>(rows: impl ExactSizeIterator<Item = M>) -> Self {
        let mut ends = Vec::with_capacity(rows.len());
        let mut bytes = Vec::new();
        for row in rows {
            row.encode_raw(&mut bytes);
            ends.push(bytes.len());
        }
        // Grown by doubling, a 9 MB table would hold up to 16 MB for as long as its model.
        bytes.shrink_to_fit();
        Self {
            bytes: bytes.into(),
            ends,
        }
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn heap_bytes(&self) -> usize {
        self.bytes.len() + self.ends.capacity() * std::mem::size_of::<usize>()
    }

    fn row(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }

    /// Rows `rows` (fitted to the table and the page limit: [`paging::fit`]) as elements of
    /// the repeated field `field` of the message `header` makes from the next page's first row,
    /// after its other fields. Protobuf decoders merge fields in any order, so the rows may
    /// follow every other field.
    fn page<H: Message>(
        &self,
        rows: Range<usize>,
        field: u32,
        header: impl FnOnce(Option<usize>) -> H,
    ) -> Encoded<H> {
        let size = |i| {
            let len = self.row(i).len();
            key_len(field) + encoded_len_varint(len as u64) + len
        };
        let (rows, next) = paging::fit(rows, self.len(), size);
        let header = header(next);
        let body: usize = rows.clone().map(size).sum();
        let mut out = BytesMut::with_capacity(header.encoded_len() + body);
        header.encode_raw(&mut out);
        for i in rows {
            let row = self.row(i);
            encode_key(field, WireType::LengthDelimited, &mut out);
            encode_varint(row.len() as u64, &mut out);
            out.put_slice(row);
        }
        Encoded::from_bytes(out.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::TensorInfo;

    fn info(i: usize) -> TensorInfo {
        TensorInfo {
            name: format!("model.layers.{i}.w"),
            dtype: "BF16".into(),
            shape: vec![i as u64 + 1, 2],
            strides: vec![2, 1],
            offset: 256 * i as u64,
            length: 4 * (i as u64 + 1),
            layer: Some(i as u32),
            crc32c: 7 * i as u32,
        }
    }

    /// A page assembled from the encoded rows is the message prost would have encoded.
    #[test]
    fn a_page_decodes_as_the_message_with_those_rows() {
        let all: Vec<TensorInfo> = (0..50).map(info).collect();
        let rows = Rows::encode(all.clone().into_iter());
        assert_eq!(rows.len(), 50);
        let header = proto::Model {
            name: "m".into(),
            tensor_count: 50,
            adopted: true,
            next_page_token: "30".into(),
            ..Default::default()
        };
        let page = rows.page(10..30, MODEL_TENSORS, |next| proto::Model {
            next_page_token: next.unwrap().to_string(),
            ..header.clone()
        });
        let got = proto::Model::decode(page.bytes().clone()).unwrap();
        assert_eq!(
            got,
            proto::Model {
                tensors: all[10..30].to_vec(),
                ..header.clone()
            }
        );
        // Lease rows fit both messages that carry them, in different fields.
        let lease_rows: Vec<proto::LeaseTensor> = all
            .iter()
            .map(|t| proto::LeaseTensor {
                name: t.name.clone(),
                static_segment: t.layer.filter(|l| l % 2 == 0),
                offset: t.offset,
                ..Default::default()
            })
            .collect();
        let rows = Rows::encode(lease_rows.clone().into_iter());
        let header = proto::Lease {
            lease_id: "l".into(),
            prefetch_next: vec![3, 1],
            ..Default::default()
        };
        let page = rows.page(0..50, LEASE_TENSORS, |_| header.clone());
        let got = proto::Lease::decode(page.bytes().clone()).unwrap();
        assert_eq!(got.tensors, lease_rows);
        assert_eq!(got.prefetch_next, [3, 1]);
        let page = rows.page(40..49, PAGE_TENSORS, |next| proto::LeaseTensorPage {
            tensors: Vec::new(),
            next_page_token: next.unwrap().to_string(),
        });
        let got = proto::LeaseTensorPage::decode(page.bytes().clone()).unwrap();
        assert_eq!(got.tensors, lease_rows[40..49]);
        assert_eq!(got.next_page_token, "49");
    }
}
