//! Making a [`Core`]. The daemon builds one from its config and the devices it found; a test
//! builds one the same way over a temporary directory and the cpu device, so the orchestration
//! of pools, models, leases and restarts is tested in-process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::journal::Journal;
use super::leases::{Leases, LeasesParams};
use super::models::{Models, ModelsParams};
use super::pools::{PoolError, Pools, PoolsParams};
use super::recovery::{AdoptParams, Adopted, Recovery, adopt};
use super::scrub::ScrubStats;
use super::{Core, Node, NodeParams};
use crate::config::{Config, DEFAULT_BUDGET_FRACTION};
use crate::device::{Device, Devices, cpu};
use crate::vllm_env::VllmEnv;

/// What a core is made from besides its config.
pub struct CoreParams {
    pub config: Config,
    pub vllm_env: VllmEnv,
    /// The cpu device first, then any CUDA devices found.
    pub devices: Vec<Arc<dyn Device>>,
    /// Why there is no CUDA device, for GetInfo.
    pub cuda_absent_reason: Option<String>,
    /// The addresses actually bound, for GetInfo.
    pub tcp_bound: Option<SocketAddr>,
    pub metrics_bound: Option<SocketAddr>,
}

/// A core that has adopted what the journal still matched. Its background work (the adopted
/// models' verifications, the adopted pools' pins, the lease reaper, the scrubber) starts
/// with [`Built::start`].
pub struct Built {
    core: Arc<Core>,
    adopted: Adopted,
}

impl Core {
    /// Locks `pools.dir`, reads the journal and adopts the pools and models that match it and
    /// the config; sweeps everything else. Blocking (file reads, mapping, maybe driver calls).
    pub fn build(p: CoreParams) -> Result<Built, PoolError> {
        let config = p.config;
        let max_host_bytes = config.pools.max_host_bytes.unwrap_or_else(default_budget);
        let journal = Journal::new(&config.pools.dir, config.journal.required);
        let pools = Pools::open(PoolsParams {
            dir: config.pools.dir.clone(),
            journal: journal.clone(),
            budget: max_host_bytes,
            devices: Devices::new(p.devices),
            env: p.vllm_env,
            pin: config.pin.clone(),
            prefault_threads: config.pools.prefault_threads,
        })?;
        let leases = Arc::new(Leases::new(LeasesParams {
            default_ttl: Duration::from_millis(config.leases.default_ttl_ms),
            max_per_model: config.leases.max_per_model,
            max_total: config.leases.max_total,
            max_static_bytes_per_device: config.leases.max_static_bytes_per_device,
            static_dir: config.pools.dir.clone(),
            disable_uva: p.vllm_env.disable_uva,
        }));
        // Idle leases' spare static buffers are the first bytes a pool short of room gets back.
        let spares = leases.spares();
        pools.set_reclaimer(Box::new(move || spares.clear()));
        let models = Models::new(ModelsParams {
            roots: config.models.roots.clone(),
            layer_patterns: config.models.layer_patterns.clone(),
            load_threads: config.models.load_threads,
            chunk_bytes: config.models.chunk_bytes,
            max_load_bytes_per_sec: config.models.max_load_bytes_per_sec,
            remotes: std::sync::Arc::new(crate::core::remote::Remotes::new(
                config.models.remotes.clone(),
                crate::core::remote::FetchParams {
                    concurrency: config.models.fetch_concurrency,
                    part_bytes: config.models.fetch_part_bytes,
                    retries: config.models.fetch_retries,
                    timeout: std::time::Duration::from_secs(config.models.fetch_timeout_secs),
                },
            )),
            evict_idle: config.pools.evict_idle,
            journal: journal.clone(),
        });
        let core = Arc::new(Core {
            scrub: ScrubStats::new(config.models.scrub_bytes_per_second),
            node: Node::new(NodeParams {
                config,
                vllm_env: p.vllm_env,
                cuda_absent_reason: p.cuda_absent_reason,
                tcp_bound: p.tcp_bound,
                metrics_bound: p.metrics_bound,
                max_host_bytes,
            }),
            pools,
            models,
            leases,
            recovery: Recovery::default(),
        });
        let c = &core.node.params.config;
        let adopted = adopt(
            &core,
            &AdoptParams {
                journal: &journal,
                verify: c.models.verify_on_adopt,
                config_pools: &c.pools.create,
                config_models: &c.models.register,
            },
        );
        Ok(Built { core, adopted })
    }
}

impl Built {
    /// The core, before its background work has started.
    #[cfg(test)]
    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Starts the adopted models' verifications and the adopted pools' pins (a blocking thread
    /// each), the lease reaper and the scrubber. Call from within the tokio runtime.
    pub fn start(self) -> std::io::Result<Arc<Core>> {
        let Adopted {
            verifications,
            pins,
        } = self.adopted;
        for pin in pins {
            std::thread::Builder::new()
                .name("offloadd-pin".into())
                .spawn(move || pin.run())?;
        }
        for job in verifications {
            let core = Arc::clone(&self.core);
            tokio::task::spawn_blocking(move || {
                let ended = core.models.verify(job, &core.recovery);
                drop(core);
                ended.signal();
            });
        }
        tokio::spawn(Arc::clone(&self.core.leases).run_reaper());
        super::scrub::start(&self.core)?;
        Ok(self.core)
    }
}

/// The host budget when `pools.max_host_bytes` is unset: a fraction of what is available now.
fn default_budget() -> u64 {
    let available = cpu::meminfo_bytes("MemAvailable").unwrap_or(0);
    (available as f64 * DEFAULT_BUDGET_FRACTION) as u64
}
