//! Tensor tables through the real daemon: pages within gRPC's default message limits, and
//! tables that the daemon encodes once and keeps (see src/grpc/tables.rs) still follow the
//! model they describe: a name registered again, a backend switched.

mod common;

use std::collections::BTreeSet;

use common::ckpt;
use common::workers::*;
use common::{DaemonBuilder, Scratch};
use offloadd::proto::offload_client::OffloadClient;
use offloadd::proto::{
    DetachWorkerRequest, GetModelRequest, Placement, SetBackendRequest, UnregisterModelRequest,
};
use tonic::Code;
use tonic::transport::Channel;

#[tokio::test]
async fn get_model_pages_a_large_table_within_default_message_limits() {
    let s = Scratch::new();
    let root = s.models();
    let path = root.join("moe.safetensors");
    let tensors = ckpt::experts(25_000);
    ckpt::write_file(&path, &tensors);
    let d = DaemonBuilder::new(&s)
        .roots(&[&root])
        .start()
        .await
        .unwrap();
    // A plain tonic client, with gRPC's default 4 MiB limit on answers, as grpcurl has.
    let mut c = OffloadClient::new(d.channel().await);
    common::cpu_pool(&mut c, "p", 16 << 20).await;
    c.register_model(common::registration("moe", "p", &path, true))
        .await
        .unwrap();
    let page = |token: &str, size: u32| GetModelRequest {
        name: "moe".into(),
        include_tensors: true,
        page_size: size,
        page_token: token.into(),
    };
    let mut names = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let m = c.get_model(page(&token, 0)).await.unwrap().into_inner();
        assert!(prost::Message::encoded_len(&m) < 4 << 20);
        assert_eq!(m.tensor_count, 25_000);
        names.extend(m.tensors.into_iter().map(|t| t.name));
        pages += 1;
        if m.next_page_token.is_empty() {
            break;
        }
        token = m.next_page_token;
    }
    assert_eq!(pages, 3, "10,000 tensors a page by default");
    // Every tensor exactly once (the table is in file order, which sorts the names).
    let mut want: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    want.sort_unstable();
    let mut got: Vec<&str> = names.iter().map(String::as_str).collect();
    got.sort_unstable();
    assert!(
        got == want,
        "{} names, {} distinct expected",
        got.len(),
        want.len()
    );
    let token = c
        .get_model(page("", 24_998))
        .await
        .unwrap()
        .into_inner()
        .next_page_token;
    let small = c.get_model(page(&token, 7)).await.unwrap().into_inner();
    assert_eq!(small.tensors.len(), 2);
    assert!(small.next_page_token.is_empty());
    // Tokens are opaque and bound to their table: neither a row number, nor something else,
    // nor a lease's token passes for one of this model's.
    let lease = c
        .attach_worker(offloadd::proto::AttachWorkerRequest {
            model: "moe".into(),
            worker_name: "pager".into(),
            page_size: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!lease.next_page_token.is_empty());
    for forged in ["24998", "ten", lease.next_page_token.as_str()] {
        let e = c.get_model(page(forged, 0)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{forged:?}");
        assert!(e.message().contains("next_page_token"), "{}", e.message());
    }
    assert!(d.terminate().await.success());
}

/// Every name in the model's table, read page by page with small pages.
async fn model_names(c: &mut OffloadClient<Channel>, model: &str) -> BTreeSet<String> {
    let first = c
        .get_model(GetModelRequest {
            name: model.into(),
            include_tensors: true,
            page_size: 7,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let rows = common::pages::model_rows(c, first, 7).await;
    rows.into_iter().map(|t| t.name).collect()
}

/// A lease's whole table (AttachWorker's first page, then GetLeaseTensors), detached after.
async fn lease_table(
    c: &mut OffloadClient<Channel>,
    model: &str,
) -> Vec<offloadd::proto::LeaseTensor> {
    let lease = c
        .attach_worker(offloadd::proto::AttachWorkerRequest {
            model: model.into(),
            worker_name: "tables".into(),
            page_size: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let rows = common::pages::lease_rows(c, &lease, 6).await;
    c.detach_worker(DetachWorkerRequest {
        lease_id: lease.lease_id,
    })
    .await
    .unwrap();
    rows
}

#[tokio::test]
async fn kept_tables_follow_a_new_registration_and_a_new_backend() {
    let mut f = fixture(|b| b).await;
    let want = |t: &[ckpt::Tensor]| t.iter().map(|t| t.name.clone()).collect::<BTreeSet<_>>();
    register(&mut f.c, "m", &f.ckpt, uva(1)).await;
    let llama = ckpt::llama(LAYERS, 128, 256);
    assert_eq!(model_names(&mut f.c, "m").await, want(&llama));
    // Twice: the second answer comes from the kept table and must be the same.
    assert_eq!(model_names(&mut f.c, "m").await, want(&llama));
    let uva_rows = lease_table(&mut f.c, "m").await;
    assert_eq!(uva_rows.len(), llama.len());
    assert!(
        uva_rows
            .iter()
            .all(|t| t.placement() != Placement::Prefetch)
    );
    assert_eq!(lease_table(&mut f.c, "m").await, uva_rows);

    f.c.set_backend(SetBackendRequest {
        model: "m".into(),
        backend: prefetched(1, 1, 2),
    })
    .await
    .unwrap();
    let prefetch_rows = lease_table(&mut f.c, "m").await;
    let staged: Vec<_> = prefetch_rows
        .iter()
        .filter(|t| t.placement() == Placement::Prefetch)
        .collect();
    assert!(
        !staged.is_empty(),
        "the new backend's table, not the kept uva one"
    );
    assert!(staged.iter().all(|t| t.static_segment == Some(1)));

    // The same name, another checkpoint: its table, not the one kept for the old model.
    f.c.unregister_model(UnregisterModelRequest { name: "m".into() })
        .await
        .unwrap();
    let experts = ckpt::experts(40);
    let other = f.s.models().join("experts.safetensors");
    ckpt::write_file(&other, &experts);
    register(&mut f.c, "m", &other, prefetched(1, 1, 2)).await;
    assert_eq!(model_names(&mut f.c, "m").await, want(&experts));
    let rows = lease_table(&mut f.c, "m").await;
    assert_eq!(
        rows.iter().map(|t| t.name.clone()).collect::<BTreeSet<_>>(),
        want(&experts)
    );
    assert!(f.d.terminate().await.success());
}

/// A model evicted from a full pool goes without an UnregisterModel; the same name registered
/// again must still answer its own table.
#[tokio::test]
async fn a_name_evicted_and_registered_again_answers_its_new_table() {
    let s = Scratch::new();
    let root = s.models();
    let llama = ckpt::llama(2, 256, 256);
    let experts = ckpt::experts(40);
    ckpt::write_file(&root.join("llama.safetensors"), &llama);
    ckpt::write_file(&root.join("experts.safetensors"), &experts);
    let size: u64 = llama
        .iter()
        .map(|t| (t.data.len() as u64).div_ceil(256) * 256)
        .sum();
    let d = DaemonBuilder::new(&s)
        .roots(&[&root])
        .set("pools.evict_idle=true")
        .start()
        .await
        .unwrap();
    let mut c = d.client().await;
    // Room for one copy of the llama checkpoint.
    common::cpu_pool(&mut c, "p", size + 1024).await;
    let names = |t: &[ckpt::Tensor]| t.iter().map(|t| t.name.clone()).collect::<BTreeSet<_>>();
    let llama_path = root.join("llama.safetensors");
    c.register_model(common::registration("m", "p", &llama_path, true))
        .await
        .unwrap();
    assert_eq!(model_names(&mut c, "m").await, names(&llama));
    // "x" takes the pool: "m" is evicted, its table kept until it is found stale.
    c.register_model(common::registration("x", "p", &llama_path, true))
        .await
        .unwrap();
    let e = c
        .get_model(GetModelRequest {
            name: "m".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "m was evicted");
    let experts_path = root.join("experts.safetensors");
    c.register_model(common::registration("m", "p", &experts_path, true))
        .await
        .unwrap();
    assert_eq!(model_names(&mut c, "m").await, names(&experts));
    assert!(d.terminate().await.success());
}
