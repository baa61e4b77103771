//! Reading a tensor table to its end, page by page, as a client with gRPC's default 4 MiB
//! message limit (grpcurl's) must.

use offloadd::proto::offload_client::OffloadClient;
use offloadd::proto::{
    GetLeaseTensorsRequest, GetModelRequest, Lease, LeaseTensor, Model, TensorInfo,
};
use tonic::transport::Channel;

const DEFAULT_LIMIT: usize = 4 << 20;

/// `first`'s rows and every later page's, asked for `page_size` at a time (0: the default).
pub async fn model_rows(
    c: &mut OffloadClient<Channel>,
    first: Model,
    page_size: u32,
) -> Vec<TensorInfo> {
    let mut rows = first.tensors;
    let mut token = first.next_page_token;
    while !token.is_empty() {
        let m = c
            .get_model(GetModelRequest {
                name: first.name.clone(),
                include_tensors: true,
                page_size,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(prost::Message::encoded_len(&m) < DEFAULT_LIMIT);
        rows.extend(m.tensors);
        token = m.next_page_token;
    }
    rows
}

/// The lease's first page (from AttachWorker) and every later page (GetLeaseTensors), asked for
/// `page_size` at a time (0: the default).
pub async fn lease_rows(
    c: &mut OffloadClient<Channel>,
    lease: &Lease,
    page_size: u32,
) -> Vec<LeaseTensor> {
    let mut rows = lease.tensors.clone();
    let mut token = lease.next_page_token.clone();
    while !token.is_empty() {
        let p = c
            .get_lease_tensors(GetLeaseTensorsRequest {
                lease_id: lease.lease_id.clone(),
                page_size,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(prost::Message::encoded_len(&p) < DEFAULT_LIMIT);
        rows.extend(p.tensors);
        token = p.next_page_token;
    }
    rows
}
