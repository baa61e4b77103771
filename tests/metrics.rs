//! The Prometheus endpoint, scraped over real HTTP from the running daemon.

mod common;

use common::{DaemonBuilder, Scratch, ckpt, sample};
use offloadd::proto::{
    AttachWorkerRequest, CreatePoolRequest, GetPoolRequest, OnloadToStaticRequest, PrefetchConfig,
    RegisterModelRequest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

#[tokio::test]
async fn metrics_follow_pools_models_leases_rpcs_and_onloads() {
    let s = Scratch::new();
    let root = s.models();
    ckpt::write_file(&root.join("m.safetensors"), &ckpt::llama(3, 64, 64));
    let d = DaemonBuilder::new(&s)
        .roots(&[&root])
        .arg("--metrics-addr")
        .arg("127.0.0.1:0")
        .start()
        .await
        .unwrap();
    let addr = d.metrics.expect("metrics address in the ready line");
    let mut c = d.client().await;
    let info = c
        .get_info(offloadd::proto::GetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        info.config.unwrap().metrics_addr,
        addr.to_string(),
        "GetInfo shows the bound address"
    );
    c.create_pool(CreatePoolRequest {
        name: "p".into(),
        device: "cpu".into(),
        size_bytes: 4 << 20,
    })
    .await
    .unwrap();
    let pf = PrefetchConfig {
        group_size: 1,
        num_in_group: 1,
        prefetch_step: 1,
        params: vec![],
    };
    let registered = c
        .register_model(RegisterModelRequest {
            name: "m".into(),
            pool: "p".into(),
            path: root.join("m.safetensors").display().to_string(),
            wait: true,
            backend: Some(pf.into()),
        })
        .await
        .unwrap()
        .into_inner();
    let lease = c
        .attach_worker(AttachWorkerRequest {
            model: "m".into(),
            worker_name: "w".into(),
            ttl_ms: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let r = c
        .onload_to_static(OnloadToStaticRequest {
            lease_id: lease.lease_id.clone(),
            layer: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The same layer over the fast path, once fine and once for a layer that does not exist.
    let mut fast = offloadd::fast::client::FastClient::connect(&d.uds, &lease.lease_id)
        .unwrap()
        .unwrap();
    assert_eq!(fast.onload(1).unwrap().bytes, r.bytes);
    assert_eq!(
        fast.onload(99).unwrap().code,
        tonic::Code::InvalidArgument as u32
    );
    let _ = c
        .get_pool(GetPoolRequest {
            name: "missing".into(),
        })
        .await
        .unwrap_err();
    let used = c
        .get_pool(GetPoolRequest { name: "p".into() })
        .await
        .unwrap()
        .into_inner()
        .used_bytes;

    let (head, body) = get(addr, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    assert_eq!(
        sample(&body, r#"offloadd_pool_size_bytes{pool="p",device="cpu"}"#),
        (4 << 20) as f64
    );
    assert_eq!(
        sample(&body, r#"offloadd_pool_used_bytes{pool="p",device="cpu"}"#),
        used as f64
    );
    assert_eq!(
        sample(&body, r#"offloadd_pool_pinned{pool="p",device="cpu"}"#),
        1.0
    );
    assert_eq!(
        sample(
            &body,
            r#"offloadd_model_state{model="m",pool="p",state="READY"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &body,
            r#"offloadd_model_load_progress_ratio{model="m",pool="p"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(&body, r#"offloadd_model_load_seconds{model="m",pool="p"}"#),
        registered.load_seconds,
        "the load's duration, as GetModel says it"
    );
    assert_eq!(sample(&body, "offloadd_leases_active "), 1.0);
    assert_eq!(
        sample(&body, "offloadd_pools_committed_bytes "),
        ((4 << 20) + lease.segments[1].size_bytes) as f64,
        "the pool and the lease's cpu static buffers"
    );
    assert!(sample(&body, "offloadd_pools_budget_bytes ") >= (4 << 20) as f64);
    assert_eq!(
        sample(&body, "offloadd_onload_bytes_total "),
        (2 * r.bytes) as f64,
        "the RPC's and the fast path's"
    );
    assert_eq!(sample(&body, "offloadd_fast_connections "), 1.0);
    assert_eq!(
        sample(&body, r#"offloadd_fast_onloads_total{code="Ok"}"#),
        1.0
    );
    assert_eq!(
        sample(
            &body,
            r#"offloadd_fast_onloads_total{code="InvalidArgument"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &body,
            r#"offloadd_rpc_requests_total{method="/offloadd.v1.Offload/GetPool",code="NotFound"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &body,
            r#"offloadd_rpc_requests_total{method="/offloadd.v1.Offload/OnloadToStatic",code="Ok"}"#
        ),
        1.0
    );
    assert!(
        sample(
            &body,
            r#"offloadd_rpc_duration_seconds_count{method="/offloadd.v1.Offload/CreatePool"}"#
        ) >= 1.0
    );

    // The lease's table is kept encoded (its rows, and where each ends); GetModel's is added
    // beside it, and both go with the model.
    let rows = |lens: Vec<usize>| (lens.iter().sum::<usize>() + 8 * lens.len()) as f64;
    let lease_table = rows(
        lease
            .tensors
            .iter()
            .map(prost::Message::encoded_len)
            .collect(),
    );
    assert_eq!(sample(&body, "offloadd_table_cache_bytes "), lease_table);
    let model_table = c
        .get_model(offloadd::proto::GetModelRequest {
            name: "m".into(),
            include_tensors: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tensors;
    let model_table = rows(
        model_table
            .iter()
            .map(prost::Message::encoded_len)
            .collect(),
    );
    let (_, body) = get(addr, "/metrics").await;
    assert_eq!(
        sample(&body, "offloadd_table_cache_bytes "),
        lease_table + model_table
    );
    drop(fast);
    c.detach_worker(offloadd::proto::DetachWorkerRequest {
        lease_id: lease.lease_id.clone(),
    })
    .await
    .unwrap();
    c.unregister_model(offloadd::proto::UnregisterModelRequest { name: "m".into() })
        .await
        .unwrap();
    let (_, body) = get(addr, "/metrics").await;
    assert_eq!(sample(&body, "offloadd_table_cache_bytes "), 0.0);

    let (head, _) = get(addr, "/other").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    assert!(d.terminate().await.success());
}

#[tokio::test]
async fn metrics_are_off_unless_configured() {
    let s = Scratch::new();
    let d = DaemonBuilder::new(&s).start().await.unwrap();
    assert!(d.metrics.is_none());
    assert!(d.terminate().await.success());
}
