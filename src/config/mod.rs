//! Typed configuration. Every struct rejects unknown keys so a typo in a ConfigMap fails loudly
//! at startup instead of silently falling back to a default.

mod load;
pub mod remotes;
pub mod validate;

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use load::{ConfigSources, load, parse_override};
pub use validate::validate;

/// The whole daemon configuration (`offloadd config print` shows it as TOML).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub pools: PoolsConfig,
    pub pin: PinConfig,
    pub models: ModelsConfig,
    pub leases: LeasesConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub journal: JournalConfig,
}

/// The journal in `pools.dir` that lets a restart adopt pools and models.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    /// Refuse a pool, registration or publication whose journal record cannot be written
    /// (RESOURCE_EXHAUSTED when `pools.dir` is full, FAILED_PRECONDITION otherwise) instead of
    /// serving it with `durable = false`, lost at the next restart.
    pub required: bool,
}

/// Where the control plane listens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Unix socket path; the parent directory is created if missing.
    pub uds_path: PathBuf,
    /// Optional TCP listener. Off by default; prefer a loopback address.
    pub tcp_addr: Option<SocketAddr>,
    /// How long SIGTERM waits for in-flight calls before closing anyway.
    pub drain_timeout_ms: u64,
    /// Threads of the async runtime that serves RPCs; 0 means one per CPU. Copies, loads and
    /// driver calls run on their own threads, so the control plane needs few: on 2 cores one
    /// thread gave the lowest OnloadToStatic latency (p50 35 µs vs 59 µs with two).
    pub worker_threads: usize,
    /// gRPC connections each listener serves at once; more are closed as they arrive, so a
    /// flood of idle connections cannot take every fd (the other listener keeps answering).
    pub max_connections: usize,
    /// Connections one peer may hold on a listener at once: one uid (SO_PEERCRED) on the Unix
    /// socket, one IP address on TCP. More from that peer are closed as they arrive, so one
    /// party holding silent connections cannot shut the listener for the others. 0: no cap
    /// besides `max_connections`.
    pub max_connections_per_peer: usize,
    /// A connection must finish its handshake (TLS, and the HTTP/2 preface or the fast path's
    /// hello) within this long, or it is closed and its slot freed.
    pub handshake_timeout_ms: u64,
    /// A gRPC connection with no call in flight for this long is closed; clients reconnect on
    /// their next call. 0 keeps idle connections open.
    pub idle_timeout_ms: u64,
    /// HTTP/2 keepalive ping interval; a peer that does not answer within 20 s is dropped.
    /// 0 turns pings off.
    pub keepalive_ms: u64,
    /// Onload fast-path connections (each holds a daemon thread) across all leases.
    pub max_fast_connections: usize,
    /// File holding the bearer token that TCP callers must send (`authorization: Bearer
    /// <token>`) for every offloadd.v1.Offload method; health and reflection stay open.
    pub auth_token_file: Option<PathBuf>,
    /// Serve TCP without authentication (neither a token nor client certificates) where that
    /// is refused by default: on a non-loopback address, or on any address while
    /// `allowed_uids`/`allowed_gids` restrict Unix-socket callers (TCP would go around them).
    pub tcp_insecure: bool,
    /// PEM certificate chain for TLS on the TCP listener; with `tls_key_file`. Unset: plaintext.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA certificates that TCP clients' certificates must chain to (mutual TLS). Set, it
    /// authenticates callers by itself; a token, if also set, is required as well.
    pub tls_client_ca_file: Option<PathBuf>,
    /// Unix-socket callers allowed by uid (SO_PEERCRED), besides the socket's 0660 mode.
    /// Empty together with `allowed_gids`: anyone who can open the socket.
    pub allowed_uids: Vec<u32>,
    /// Unix-socket callers allowed by primary gid.
    pub allowed_gids: Vec<u32>,
}

/// The default socket lives under /tmp so `offloadd serve` works for any user on a development
/// machine; Kubernetes manifests point it at a shared emptyDir instead.
pub const DEFAULT_UDS_PATH: &str = "/tmp/offloadd/offloadd.sock";

impl ServerConfig {
    /// The TCP address when other hosts can reach it and nothing authenticates its callers (no
    /// token file, no client CA): startup refuses it unless `tcp_insecure`, and warns if so.
    pub fn unauthenticated_public_tcp(&self) -> Option<SocketAddr> {
        self.tcp_addr.filter(|a| {
            !a.ip().is_loopback()
                && self.auth_token_file.is_none()
                && self.tls_client_ca_file.is_none()
        })
    }

    /// The TCP address when `allowed_uids` or `allowed_gids` restrict Unix-socket callers but
    /// nothing authenticates TCP callers: any local user would reach the daemon around them over
    /// loopback TCP. Startup refuses it unless `tcp_insecure`, and warns if so.
    pub fn tcp_around_peer_checks(&self) -> Option<SocketAddr> {
        self.tcp_addr.filter(|_| {
            (!self.allowed_uids.is_empty() || !self.allowed_gids.is_empty())
                && self.auth_token_file.is_none()
                && self.tls_client_ca_file.is_none()
        })
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            uds_path: PathBuf::from(DEFAULT_UDS_PATH),
            tcp_addr: None,
            drain_timeout_ms: 10_000,
            worker_threads: 1,
            max_connections: 512,
            max_connections_per_peer: 128,
            handshake_timeout_ms: 3_000,
            idle_timeout_ms: 300_000,
            keepalive_ms: 30_000,
            max_fast_connections: 256,
            auth_token_file: None,
            tcp_insecure: false,
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
        }
    }
}

/// Host weight pools.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolsConfig {
    /// Directory holding the pool files; must be on a memory-backed filesystem.
    pub dir: PathBuf,
    /// Cap on all pools together. Unset: `DEFAULT_BUDGET_FRACTION` of MemAvailable at startup.
    pub max_host_bytes: Option<u64>,
    /// Evict idle models (no attached workers), least recently used first, when a pool is full.
    pub evict_idle: bool,
    /// Threads that pre-fault a new pool; 0 picks the number of CPUs.
    pub prefault_threads: usize,
    /// On SIGTERM keep the pools and the journal, so the next start adopts them instead of
    /// reloading every model (what a sidecar restart or an upgrade wants). `false` removes every
    /// pool file after the drain, giving the host memory back at once.
    pub keep_on_exit: bool,
    /// Pools created at startup.
    pub create: Vec<PoolSpec>,
}

/// Fraction of MemAvailable that pools may take when `pools.max_host_bytes` is unset; the rest
/// stays for the inference server, page cache and the kernel.
pub const DEFAULT_BUDGET_FRACTION: f64 = 0.5;

impl Default for PoolsConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/dev/shm/offloadd"),
            max_host_bytes: None,
            evict_idle: false,
            prefault_threads: 0,
            keep_on_exit: true,
            create: Vec::new(),
        }
    }
}

/// A pool declared in the config file (`[[pools.create]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    pub name: String,
    #[serde(default = "default_device")]
    pub device: String,
    pub size_bytes: u64,
}

fn default_device() -> String {
    "cpu".to_string()
}

/// Inputs to the shared pin policy that come from configuration rather than the environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PinConfig {
    /// On coherent platforms (GH200/GB200) pinned host memory is carved out of GPU memory and buys
    /// little, so decline to pin there.
    pub avoid_on_coherent: bool,
    /// Pinned staging ring per cuda device for copies from unpinned pools (two buffers of half
    /// this each). 0: copy straight from pageable memory (synchronous and slower, nothing
    /// pinned). Coherent platforms never get one.
    pub staging_bytes: u64,
}

impl Default for PinConfig {
    fn default() -> Self {
        Self {
            avoid_on_coherent: true,
            staging_bytes: 128 << 20,
        }
    }
}

/// Checkpoint sources and loading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    /// Directories that checkpoints may be read from; anything else is refused.
    pub roots: Vec<PathBuf>,
    /// Parallel readers per load; 0 picks the number of CPUs.
    pub load_threads: usize,
    /// Bytes per `pread`; also the largest intermediate buffer a load may use.
    pub chunk_bytes: u64,
    /// Cap on the read rate of each load, so a large registration does not starve a co-located
    /// inference server of I/O; 0 means unlimited.
    pub max_load_bytes_per_sec: u64,
    /// Dotted prefixes followed by the layer number, tried in order. Empty (the default): the
    /// first all-digit dotted segment of a tensor's name is its layer, as in vLLM.
    pub layer_patterns: Vec<String>,
    /// How a model the journal brings back at start is checked before it is READY again:
    /// `crc` reads every byte and compares each tensor's CRC32C, `none` trusts the journal.
    pub verify_on_adopt: VerifyOnAdopt,
    /// Rate at which the scrubber re-reads READY models in the background and compares each
    /// tensor's CRC32C with its table (0 turns it off). A mismatch takes the model out of
    /// service. The default, 32 MiB/s, costs under 1% of a core (docs/performance.md).
    pub scrub_bytes_per_second: u64,
    /// Models registered at startup.
    pub register: Vec<ModelSpec>,
    /// Object stores that checkpoints may be streamed from (`s3://`, `gs://`, `az://`,
    /// `https://`); a URL under none of them is refused, as a path outside `roots` is.
    pub remotes: Vec<RemoteSpec>,
    /// Ranged GETs in flight per remote load.
    pub fetch_concurrency: usize,
    /// Bytes per ranged GET. A load holds at most about `fetch_concurrency` parts' worth of
    /// network buffers: each part is written into the pool as it arrives.
    pub fetch_part_bytes: u64,
    /// Retries of one request (throttling, 5xx, timeouts, a connection dropped mid-body), with
    /// exponential back-off; a retry resumes where the part stopped.
    pub fetch_retries: usize,
    /// Seconds one request may take, from sending it to its last byte, before it is retried.
    pub fetch_timeout_secs: u64,
}

/// One allowed object-store location (`[[models.remotes]]`).
///
/// Credentials never go here (validation refuses them): they come from the standard chains
/// (`AWS_*` environment variables, web identity as with IRSA, instance metadata; the GCP and
/// Azure equivalents) or from `credentials_file`, typically a mounted Kubernetes Secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteSpec {
    /// A bucket or a prefix in it (`s3://bucket/models/`), or an HTTPS URL prefix. Only URLs
    /// that start with it may be registered.
    pub url: String,
    /// The object_store client's settings for this remote, by their documented names: e.g.
    /// `aws_endpoint`, `aws_region`, `aws_virtual_hosted_style_request`, `allow_http`.
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, String>,
    /// A TOML file of more settings, credentials among them (`aws_access_key_id = "..."`),
    /// read at each registration so a rotated Secret is picked up.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyOnAdopt {
    #[default]
    Crc,
    None,
}

/// A model declared in the config file (`[[models.register]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    pub pool: String,
    pub path: PathBuf,
    pub uva: Option<UvaSpec>,
    pub prefetch: Option<PrefetchSpec>,
}

/// `uva` backend settings (docs/design.md, "Workers, backends and leases").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UvaSpec {
    pub cpu_offload_bytes: u64,
    #[serde(default)]
    pub params: Vec<String>,
}

/// `prefetch` backend settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefetchSpec {
    pub group_size: u32,
    pub num_in_group: u32,
    pub prefetch_step: u32,
    #[serde(default)]
    pub params: Vec<String>,
}

impl Default for ModelsConfig {
    fn default() -> Self {
        Self {
            roots: Vec::new(),
            load_threads: 0,
            chunk_bytes: 16 << 20,
            max_load_bytes_per_sec: 0,
            layer_patterns: Vec::new(),
            verify_on_adopt: VerifyOnAdopt::Crc,
            scrub_bytes_per_second: 32 << 20,
            register: Vec::new(),
            remotes: Vec::new(),
            fetch_concurrency: 16,
            fetch_part_bytes: 8 << 20,
            fetch_retries: 10,
            fetch_timeout_secs: 60,
        }
    }
}

/// Worker leases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeasesConfig {
    /// Lease time-to-live used when a worker asks for 0.
    pub default_ttl_ms: u64,
    /// Most leases one model may have at once (one per worker process).
    pub max_per_model: usize,
    /// Most leases the daemon grants at once, over all models.
    pub max_total: usize,
    /// Most bytes of static buffers the live leases may hold on one device (on cuda, GPU memory
    /// beside the inference engine's; on cpu also counted in pools.max_host_bytes). Unset: only
    /// what the device has free bounds them.
    pub max_static_bytes_per_device: Option<u64>,
    /// cuda: pace asynchronous onloads from pinned pools so one lease's queued layers cannot
    /// hold a GPU's copy engine for the others: at most this many bytes are let through at once,
    /// in 16 MiB pieces (e.g. 67108864). 0 (the default): unpaced; the engine runs every lease's
    /// copies in the order they were issued.
    pub copy_window_bytes: u64,
}

impl Default for LeasesConfig {
    fn default() -> Self {
        Self {
            default_ttl_ms: 10_000,
            max_per_model: 64,
            max_total: 1024,
            max_static_bytes_per_device: None,
            copy_window_bytes: 0,
        }
    }
}

/// Prometheus endpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port` for the HTTP metrics endpoint; off when unset.
    pub addr: Option<SocketAddr>,
}

/// Log output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// tracing `EnvFilter` directives; `OFFLOADD_LOG` or `RUST_LOG` override it.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Problems with the configuration; all are reported before the daemon binds anything.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: {0}")]
    Source(#[from] ::config::ConfigError),
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("--set {0}: expected KEY=VALUE, e.g. --set server.tcp_addr=127.0.0.1:50051")]
    BadOverride(String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}
