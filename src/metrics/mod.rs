//! Prometheus metrics. Counters and histograms are updated where things happen (RPCs,
//! onloads); gauges that mirror state (pools, models, leases) are refreshed from `core` at scrape
//! time, so they can never drift from what GetPool/GetModel report.

mod http;

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub use http::{MetricsError, bind, serve};

use crate::core::Core;
use crate::core::models::state_name;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: String,
    device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
    pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelStateLabels {
    model: String,
    pool: String,
    state: String,
}

type GaugeF = Gauge<f64, std::sync::atomic::AtomicU64>;
type CounterF = Counter<f64, std::sync::atomic::AtomicU64>;

pub struct Metrics {
    registry: Mutex<Registry>,
    rpc_requests: Family<RpcLabels, Counter>,
    rpc_seconds: Family<MethodLabels, Histogram, fn() -> Histogram>,
    onload_bytes: Counter,
    onload_seconds: CounterF,
    fast_onloads: Family<CodeLabels, Counter>,
    fast_connections: Gauge,
    connections_refused: Family<ListenerLabels, Counter>,
    connections_closed_idle: Family<ListenerLabels, Counter>,
    connections_refused_peer: Family<ListenerLabels, Counter>,
    auth_denied: Family<ListenerLabels, Counter>,
    pool_size: Family<PoolLabels, Gauge>,
    pool_used: Family<PoolLabels, Gauge>,
    pool_pinned: Family<PoolLabels, Gauge>,
    model_state: Family<ModelStateLabels, Gauge>,
    model_bytes: Family<ModelLabels, Gauge>,
    model_loaded_bytes: Family<ModelLabels, Gauge>,
    model_load_progress: Family<ModelLabels, GaugeF>,
    model_load_seconds: Family<ModelLabels, GaugeF>,
    leases_active: Gauge,
    pools_committed: Gauge,
    pools_budget: Gauge,
    table_cache: Gauge,
    journal_write_failures: Gauge,
    not_durable: Gauge,
    scrub_checked: Gauge,
    out_of_service: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn rpc_histogram() -> Histogram {
    // 20 µs .. ~10 s
    Histogram::new(exponential_buckets(20e-6, 2.0, 20))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("offloadd");
        let m = Self {
            registry: Mutex::new(Registry::default()),
            rpc_requests: Family::default(),
            rpc_seconds: Family::new_with_constructor(rpc_histogram),
            onload_bytes: Counter::default(),
            onload_seconds: CounterF::default(),
            fast_onloads: Family::default(),
            fast_connections: Gauge::default(),
            connections_refused: Family::default(),
            connections_closed_idle: Family::default(),
            connections_refused_peer: Family::default(),
            auth_denied: Family::default(),
            pool_size: Family::default(),
            pool_used: Family::default(),
            pool_pinned: Family::default(),
            model_state: Family::default(),
            model_bytes: Family::default(),
            model_loaded_bytes: Family::default(),
            model_load_progress: Family::default(),
            model_load_seconds: Family::default(),
            leases_active: Gauge::default(),
            pools_committed: Gauge::default(),
            pools_budget: Gauge::default(),
            table_cache: Gauge::default(),
            journal_write_failures: Gauge::default(),
            not_durable: Gauge::default(),
            scrub_checked: Gauge::default(),
            out_of_service: Gauge::default(),
        };
        r.register(
            "rpc_requests",
            "gRPC calls by method and status code",
            m.rpc_requests.clone(),
        );
        r.register(
            "rpc_duration_seconds",
            "gRPC call latency by method",
            m.rpc_seconds.clone(),
        );
        r.register(
            "onload_bytes",
            "Bytes copied into static buffers by OnloadToStatic",
            m.onload_bytes.clone(),
        );
        r.register(
            "onload_seconds",
            "Seconds spent copying into static buffers",
            m.onload_seconds.clone(),
        );
        r.register(
            "fast_onloads",
            "Onloads over the fast path on the Unix socket, by status code",
            m.fast_onloads.clone(),
        );
        r.register(
            "fast_connections",
            "Open onload fast-path connections",
            m.fast_connections.clone(),
        );
        r.register(
            "connections_refused",
            "Connections closed on arrival: the listener was at server.max_connections (fast: server.max_fast_connections)",
            m.connections_refused.clone(),
        );
        r.register(
            "connections_closed_idle",
            "gRPC connections closed after server.idle_timeout_ms with no call in flight",
            m.connections_closed_idle.clone(),
        );
        r.register(
            "connections_refused_peer",
            "Connections closed on arrival because their peer (a uid on the Unix socket, an address on TCP) held server.max_connections_per_peer already",
            m.connections_refused_peer.clone(),
        );
        r.register(
            "auth_denied",
            "Calls refused for a missing or wrong bearer token (tcp) or a peer outside server.allowed_uids/gids (uds)",
            m.auth_denied.clone(),
        );
        r.register(
            "pool_size_bytes",
            "Size of each host weight pool",
            m.pool_size.clone(),
        );
        r.register(
            "pool_used_bytes",
            "Bytes of each pool holding model weights",
            m.pool_used.clone(),
        );
        r.register(
            "pool_pinned",
            "1 if the pool is pinned (mlock or cuMemHostRegister)",
            m.pool_pinned.clone(),
        );
        r.register(
            "model_state",
            "1 for the model's current state (LOADING, READY, FAILED, AWAITING_SEAL)",
            m.model_state.clone(),
        );
        r.register(
            "model_bytes",
            "Bytes of tensor data of each model",
            m.model_bytes.clone(),
        );
        r.register(
            "model_loaded_bytes",
            "Bytes read into the pool so far",
            m.model_loaded_bytes.clone(),
        );
        r.register(
            "model_load_progress_ratio",
            "Fraction of a model's bytes loaded",
            m.model_load_progress.clone(),
        );
        r.register(
            "model_load_seconds",
            "How long a READY model's bytes took to read from its checkpoint and checksum",
            m.model_load_seconds.clone(),
        );
        r.register(
            "leases_active",
            "Worker leases currently held",
            m.leases_active.clone(),
        );
        r.register(
            "pools_committed_bytes",
            "Host bytes promised to pools (existing and being created) and to the cpu static buffers of leases",
            m.pools_committed.clone(),
        );
        r.register(
            "pools_budget_bytes",
            "pools.max_host_bytes after defaults",
            m.pools_budget.clone(),
        );
        r.register(
            "table_cache_bytes",
            "Heap bytes of the encoded tensor tables kept for GetModel and AttachWorker pages (about 70 a row, per model and per lease backend)",
            m.table_cache.clone(),
        );
        r.register(
            "journal_write_failures",
            "Journal writes that failed since the daemon started (GetInfo durability.last_failure says why)",
            m.journal_write_failures.clone(),
        );
        r.register(
            "not_durable",
            "Pools and models served now that a restart would not bring back, their journal write having failed",
            m.not_durable.clone(),
        );
        r.register(
            "scrub_checked_bytes",
            "Bytes of READY models the scrubber re-read and checksummed since the daemon started",
            m.scrub_checked.clone(),
        );
        r.register(
            "models_out_of_service",
            "Models taken out of service because the scrubber found their bytes changed",
            m.out_of_service.clone(),
        );
        *m.registry.lock().expect("registry lock") = r;
        m
    }

    /// The gauge the table cache keeps at its size; a handle on the same value.
    pub fn table_cache_gauge(&self) -> Gauge {
        self.table_cache.clone()
    }

    /// A connection closed on arrival because its peer was at its own cap.
    pub fn connection_refused_peer(&self, listener: &str) {
        self.connections_refused_peer
            .get_or_create(&ListenerLabels {
                listener: listener.to_string(),
            })
            .inc();
    }

    /// One finished RPC.
    pub fn rpc(&self, method: &str, code: tonic::Code, latency: Duration) {
        self.rpc_requests
            .get_or_create(&RpcLabels {
                method: method.to_string(),
                code: format!("{code:?}"),
            })
            .inc();
        self.rpc_seconds
            .get_or_create(&MethodLabels {
                method: method.to_string(),
            })
            .observe(latency.as_secs_f64());
    }

    pub fn connection_refused(&self, listener: &str) {
        self.connections_refused
            .get_or_create(&ListenerLabels {
                listener: listener.to_string(),
            })
            .inc();
    }

    pub fn connection_closed_idle(&self, listener: &str) {
        self.connections_closed_idle
            .get_or_create(&ListenerLabels {
                listener: listener.to_string(),
            })
            .inc();
    }

    pub fn auth_denied(&self, listener: &str) {
        self.auth_denied
            .get_or_create(&ListenerLabels {
                listener: listener.to_string(),
            })
            .inc();
    }

    /// One onload answered over the fast path (which the RPC counters do not see).
    pub fn fast_onload(&self, code: tonic::Code) {
        self.fast_onloads
            .get_or_create(&CodeLabels {
                code: format!("{code:?}"),
            })
            .inc();
    }

    /// One completed OnloadToStatic.
    pub fn onload(&self, bytes: u64, took: Duration) {
        self.onload_bytes.inc_by(bytes);
        self.onload_seconds.inc_by(took.as_secs_f64());
    }

    /// Refreshes the state gauges from `core` and renders the OpenMetrics text.
    pub fn render(&self, core: &Core) -> String {
        // Held from the first clear to the end of encoding: two scrapes at once would otherwise
        // clear the families under each other and emit partial series.
        let registry = self.registry.lock().expect("registry lock");
        for f in [&self.pool_size, &self.pool_used, &self.pool_pinned] {
            f.clear();
        }
        for p in core.pools.list() {
            let l = PoolLabels {
                pool: p.name.clone(),
                device: p.device.info().id.clone(),
            };
            self.pool_size.get_or_create(&l).set(p.size_bytes as i64);
            self.pool_used.get_or_create(&l).set(p.used_bytes() as i64);
            self.pool_pinned
                .get_or_create(&l)
                .set(i64::from(p.pinned()));
        }
        self.model_state.clear();
        self.model_bytes.clear();
        self.model_loaded_bytes.clear();
        self.model_load_progress.clear();
        self.model_load_seconds.clear();
        for m in core.models.list() {
            let l = ModelLabels {
                model: m.name.clone(),
                pool: m.pool().name.clone(),
            };
            let p = m.progress();
            self.model_state
                .get_or_create(&ModelStateLabels {
                    model: l.model.clone(),
                    pool: l.pool.clone(),
                    state: state_name(p.state).to_string(),
                })
                .set(1);
            self.model_bytes.get_or_create(&l).set(m.bytes as i64);
            self.model_loaded_bytes
                .get_or_create(&l)
                .set(p.loaded_bytes as i64);
            let ratio = if p.total_bytes == 0 {
                1.0
            } else {
                p.loaded_bytes as f64 / p.total_bytes as f64
            };
            self.model_load_progress.get_or_create(&l).set(ratio);
            if let Some(t) = p.load_time {
                self.model_load_seconds
                    .get_or_create(&l)
                    .set(t.as_secs_f64());
            }
        }
        self.leases_active.set(core.leases.count() as i64);
        self.fast_connections
            .set(core.leases.fast_connections() as i64);
        self.pools_committed.set(core.pools.committed() as i64);
        self.pools_budget.set(core.pools.budget() as i64);
        let d = core.pools.journal().durability();
        self.journal_write_failures.set(d.failures() as i64);
        let stale_pools = d.pools().map_or(0, |_| core.pools.list().len());
        self.not_durable
            .set((stale_pools + d.models().len()) as i64);
        self.scrub_checked.set(core.scrub.bytes_checked() as i64);
        self.out_of_service
            .set(core.scrub.out_of_service().len() as i64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }
}
