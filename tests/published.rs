//! Models an engine publishes itself: CreateModel (or CreateModelStream for spec lists over one
//! message), WriteModel, SealModel. Through the real daemon, with a plain tonic client and
//! gRPC's default 4 MiB message limit, as grpcurl has.

mod common;

use common::ckpt;
use common::{DaemonBuilder, Scratch};
use offloadd::proto::offload_client::OffloadClient;
use offloadd::proto::{
    CreateModelRequest, GetModelRequest, GetPoolRequest, ModelState, SealModelRequest, TensorSpec,
    WriteModelRequest,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

const MIB: u64 = 1 << 20;

async fn used(c: &mut OffloadClient<Channel>, name: &str) -> u64 {
    c.get_pool(GetPoolRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
        .used_bytes
}

/// One WriteModel call putting each `(pool offset, bytes)` of `writes` into model `name`.
async fn write(
    c: &mut OffloadClient<Channel>,
    name: &str,
    token: &str,
    writes: Vec<(u64, Vec<u8>)>,
) -> Result<u64, tonic::Status> {
    let msgs: Vec<WriteModelRequest> = writes
        .into_iter()
        .enumerate()
        .map(|(i, (offset, data))| WriteModelRequest {
            name: if i == 0 { name.into() } else { String::new() },
            publish_token: if i == 0 { token.into() } else { String::new() },
            offset,
            data,
        })
        .collect();
    c.write_model(tokio_stream::iter(msgs))
        .await
        .map(|r| r.into_inner().bytes_written)
}

fn seal(name: &str, token: &str) -> SealModelRequest {
    SealModelRequest {
        name: name.into(),
        publish_token: token.into(),
    }
}

/// `n` specs of 4-byte experts, as a mixture-of-experts engine would publish them.
fn specs(n: usize) -> Vec<TensorSpec> {
    (0..n)
        .map(|i| TensorSpec {
            name: format!("model.layers.{}.mlp.experts.{}.w", i / 1000, i % 1000),
            dtype: "U8".into(),
            shape: vec![4],
        })
        .collect()
}

/// The messages of one CreateModelStream: the first names the model, each carries a page.
fn pages(name: &str, specs: Vec<TensorSpec>, per: usize) -> Vec<CreateModelRequest> {
    specs
        .chunks(per)
        .enumerate()
        .map(|(i, chunk)| CreateModelRequest {
            name: if i == 0 { name.into() } else { String::new() },
            pool: if i == 0 { "p".into() } else { String::new() },
            tensors: chunk.to_vec(),
            backend: None,
        })
        .collect()
}

#[tokio::test]
async fn a_200k_tensor_model_is_published_through_a_stream_of_pages() {
    const N: usize = 200_000;
    let s = Scratch::new();
    let d = DaemonBuilder::new(&s).start().await.unwrap();
    let mut c = OffloadClient::new(d.channel().await);
    common::cpu_pool(&mut c, "p", 64 * MIB).await;
    let all = specs(N);

    // One message with every spec is over the limit a server may take; nothing is created.
    let whole = CreateModelRequest {
        name: "moe".into(),
        pool: "p".into(),
        tensors: all.clone(),
        backend: None,
    };
    assert!(prost::Message::encoded_len(&whole) > 4 << 20);

    let created = c
        .create_model_stream(tokio_stream::iter(pages("moe", all.clone(), 10_000)))
        .await
        .unwrap()
        .into_inner();
    assert!(
        prost::Message::encoded_len(&created) < 4 << 20,
        "the answer is a page"
    );
    assert_eq!(created.state(), ModelState::AwaitingSeal);
    assert_eq!(created.tensor_count, N as u64);
    let created_token = created.publish_token.clone();
    let rows = common::pages::model_rows(&mut c, created, 0).await;
    assert_eq!(rows.len(), N);
    // In the order sent, each 4 bytes, none overlapping.
    for (r, s) in rows.iter().zip(&all) {
        assert_eq!((r.name.as_str(), r.length), (s.name.as_str(), 4));
    }
    let mut ranges: Vec<(u64, u64)> = rows.iter().map(|r| (r.offset, r.length)).collect();
    ranges.sort_unstable();
    assert!(ranges.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0));
    assert!(used(&mut c, "p").await >= 4 * N as u64);

    // The engine sends its bytes; sealing checksums what the daemon wrote.
    let writes = rows
        .iter()
        .enumerate()
        .step_by(997)
        .map(|(i, r)| (r.offset, (i as u32).to_le_bytes().to_vec()))
        .collect();
    write(&mut c, "moe", &created_token, writes).await.unwrap();
    let sealed = c
        .seal_model(seal("moe", &created_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sealed.state(), ModelState::Ready);
    assert_eq!(
        sealed.load_seconds, 0.0,
        "a published model is not loaded by the daemon"
    );
    assert!(d.terminate().await.success());
}

/// Rows are paged by bytes as well as by count: 6,000 tensors with names of 1,000 bytes make
/// a 6 MB table, which 10,000 rows a page would answer in one message over the 4 MiB a plain
/// client takes. Every table (a model awaiting its seal, a READY one, a lease) still reaches
/// that client whole, a page under the limit at a time, even when it asks for every row at once.
#[tokio::test]
async fn tables_of_long_names_are_paged_under_the_default_limit() {
    const N: usize = 6_000;
    let s = Scratch::new();
    let d = DaemonBuilder::new(&s).start().await.unwrap();
    let mut c = OffloadClient::new(d.channel().await);
    common::cpu_pool(&mut c, "p", 8 * MIB).await;
    let long: Vec<TensorSpec> = specs(N)
        .into_iter()
        .map(|s| TensorSpec {
            name: format!("{}.{}", s.name, "x".repeat(1000 - s.name.len() - 1)),
            ..s
        })
        .collect();
    let names = |rows: Vec<String>| {
        assert_eq!(rows.len(), N);
        assert!(rows.iter().zip(&long).all(|(r, s)| *r == s.name));
    };
    let under_limit = |len: usize| assert!(len < 4 << 20, "a page of {len} bytes");

    let created = c
        .create_model_stream(tokio_stream::iter(pages("long", long.clone(), 1_000)))
        .await
        .unwrap()
        .into_inner();
    under_limit(prost::Message::encoded_len(&created));
    assert!(!created.tensors.is_empty() && created.tensors.len() < N);
    let token = created.publish_token.clone();
    let rows = common::pages::model_rows(&mut c, created, N as u32).await;
    names(rows.into_iter().map(|r| r.name).collect());

    c.seal_model(seal("long", &token)).await.unwrap();
    let first = c
        .get_model(GetModelRequest {
            name: "long".into(),
            include_tensors: true,
            page_size: N as u32,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    under_limit(prost::Message::encoded_len(&first));
    let rows = common::pages::model_rows(&mut c, first, N as u32).await;
    names(rows.into_iter().map(|r| r.name).collect());

    let lease = c
        .attach_worker(offloadd::proto::AttachWorkerRequest {
            model: "long".into(),
            worker_name: "plain".into(),
            page_size: N as u32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    under_limit(prost::Message::encoded_len(&lease));
    let rows = common::pages::lease_rows(&mut c, &lease, 0).await;
    names(rows.into_iter().map(|r| r.name).collect());
    assert!(d.terminate().await.success());
}

#[tokio::test]
async fn a_stream_that_breaks_off_or_renames_creates_nothing() {
    let s = Scratch::new();
    let d = DaemonBuilder::new(&s).start().await.unwrap();
    let mut c = OffloadClient::new(d.channel().await);
    common::cpu_pool(&mut c, "p", 4 * MIB).await;

    // A later page that names another model is refused, naming both.
    let mut msgs = pages("a", specs(30), 10);
    msgs[2].name = "b".into();
    let e = c
        .create_model_stream(tokio_stream::iter(msgs))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("\"a\"") && e.message().contains("\"b\""),
        "{}",
        e.message()
    );

    // A client that goes away mid-stream.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut c2 = c.clone();
    let call = tokio::spawn(async move { c2.create_model_stream(ReceiverStream::new(rx)).await });
    for m in pages("a", specs(20), 10) {
        tx.send(m).await.unwrap();
    }
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    drop(tx);

    // A stream with no message at all.
    let e = c
        .create_model_stream(tokio_stream::iter(Vec::<CreateModelRequest>::new()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // None of them left a model, a name or a range behind.
    assert_eq!(used(&mut c, "p").await, 0);
    let e = c
        .get_model(GetModelRequest {
            name: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let m = c
        .create_model_stream(tokio_stream::iter(pages("a", specs(30), 10)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.tensor_count, 30);
    assert!(d.terminate().await.success());
}

#[tokio::test]
async fn published_tensors_are_sealed_with_checksums() {
    let s = Scratch::new();
    let d = DaemonBuilder::new(&s).start().await.unwrap();
    let mut c = d.client().await;
    common::cpu_pool(&mut c, "p", 4 * MIB).await;
    let specs = vec![
        TensorSpec {
            name: "model.layers.0.mlp.w".into(),
            dtype: "F8_E4M3".into(),
            shape: vec![64, 32],
        },
        TensorSpec {
            name: "model.layers.1.mlp.w".into(),
            dtype: "BF16".into(),
            shape: vec![10],
        },
    ];
    let m = c
        .create_model(CreateModelRequest {
            name: "pub".into(),
            pool: "p".into(),
            tensors: specs,
            backend: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.state(), ModelState::AwaitingSeal);
    assert_eq!(m.publish_token.len(), 32, "an unguessable token");
    let token = m.publish_token.clone();
    assert_eq!(m.tensors.len(), 2);
    assert_eq!(m.tensors[0].length, 2048);
    assert_eq!(m.tensors[1].length, 20);
    let data: Vec<Vec<u8>> = m
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| ckpt::bytes(t.length as usize, i as u64 + 7))
        .collect();
    let writes = m
        .tensors
        .iter()
        .zip(&data)
        .map(|(t, b)| (t.offset, b.clone()));
    assert_eq!(
        write(&mut c, "pub", &token, writes.collect())
            .await
            .unwrap(),
        2068
    );
    let sealed = c
        .seal_model(seal("pub", &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sealed.state(), ModelState::Ready);
    assert!(sealed.durable, "{}", sealed.not_durable_reason);
    assert!(
        sealed.publish_token.is_empty(),
        "only CreateModel answers the token"
    );
    let m = c
        .get_model(GetModelRequest {
            name: "pub".into(),
            include_tensors: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for (t, bytes) in m.tensors.iter().zip(&data) {
        assert_eq!(t.crc32c, crc32c::crc32c(bytes));
    }
    let err = c.seal_model(seal("pub", &token)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = c
        .create_model(CreateModelRequest {
            name: "bad".into(),
            pool: "p".into(),
            tensors: vec![TensorSpec {
                name: "x".into(),
                dtype: "F128".into(),
                shape: vec![1],
            }],
            backend: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("F128"));
    assert!(d.terminate().await.success());
}
