//! `offloadd`: the daemon binary. Parses flags, loads config, and hands off to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use offloadd::config::{self, Config, ConfigSources};
use offloadd::vllm_env::VllmEnv;

/// A mixture of experts' table is 100k–200k names and shapes, each its own allocation, built
/// at every registration and every restart: mimalloc made a restart that adopts 100k tensors
/// 1.6× faster than glibc's malloc did, a registration of them 1.2× (docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for a configuration the daemon refuses to start with (bad file, unknown key,
/// unparsable vLLM variable).
const EXIT_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "offloadd",
    version,
    about = "Weight-offload daemon: host weight pools and onload-to-static for inference workers"
)]
struct Cli {
    /// TOML config file.
    #[arg(long, short = 'c', global = true, env = "OFFLOADD_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon until SIGTERM or SIGINT.
    Serve(Overrides),
    /// Inspect configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Ask a running daemon's health service over its Unix socket (server.uds_path): exits 0
    /// when it is SERVING, 1 otherwise. For exec probes, which work whatever the TCP listener
    /// does (kubelet's native gRPC probe cannot speak TLS).
    Health(Overrides),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration (defaults < file < OFFLOADD_* env < flags) as TOML.
    Print(Overrides),
    /// Validate a TOML file on its own (no environment, no flags); exits 2 with the reason.
    Check {
        /// The file to check.
        path: PathBuf,
    },
}

/// Flags that override any other source.
#[derive(Args, Default)]
struct Overrides {
    /// server.uds_path
    #[arg(long)]
    uds_path: Option<String>,
    /// server.tcp_addr, e.g. 127.0.0.1:50051 (port 0 picks a free port)
    #[arg(long)]
    tcp_addr: Option<String>,
    /// pools.dir
    #[arg(long)]
    pools_dir: Option<String>,
    /// metrics.addr
    #[arg(long)]
    metrics_addr: Option<String>,
    /// log.format: text or json
    #[arg(long)]
    log_format: Option<String>,
    /// Any other key, e.g. --set pools.max_host_bytes=8589934592 (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

impl Overrides {
    fn pairs(&self) -> Result<Vec<(String, String)>, config::ConfigError> {
        let named = [
            ("server.uds_path", &self.uds_path),
            ("server.tcp_addr", &self.tcp_addr),
            ("pools.dir", &self.pools_dir),
            ("metrics.addr", &self.metrics_addr),
            ("log.format", &self.log_format),
        ];
        let mut pairs: Vec<(String, String)> = named
            .into_iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), v.clone())))
            .collect();
        for flag in &self.set {
            pairs.push(config::parse_override(flag)?);
        }
        Ok(pairs)
    }

    fn load(&self, file: Option<PathBuf>) -> Result<Config, config::ConfigError> {
        config::load(&ConfigSources::from_process(file, self.pairs()?))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(flags) => serve(cli.config, &flags),
        Command::Config(ConfigCommand::Print(flags)) => match flags.load(cli.config) {
            Ok(c) => {
                print!(
                    "{}",
                    toml::to_string(&c).expect("config serializes to TOML")
                );
                ExitCode::SUCCESS
            }
            Err(e) => config_error(e),
        },
        Command::Health(flags) => match flags.load(cli.config) {
            Ok(c) => health(&c.server.uds_path),
            Err(e) => config_error(e),
        },
        Command::Config(ConfigCommand::Check { path }) => {
            let sources = ConfigSources {
                file: Some(path.clone()),
                ..ConfigSources::default()
            };
            match config::load(&sources) {
                Ok(_) => {
                    println!("{}: ok", path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => config_error(e),
            }
        }
    }
}

fn health(uds: &std::path::Path) -> ExitCode {
    use tonic_health::pb::health_check_response::ServingStatus;
    let ask = async {
        let channel = offloadd::client::connect_uds(uds).await?;
        let reply = tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await?;
        anyhow::Ok(reply.into_inner().status())
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
    match rt.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(5), ask).await })
    {
        Ok(Ok(ServingStatus::Serving)) => {
            println!("SERVING");
            ExitCode::SUCCESS
        }
        Ok(Ok(other)) => {
            println!("{}", other.as_str_name());
            ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            eprintln!("offloadd health: {}: {e:#}", uds.display());
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("offloadd health: {}: no answer within 5 s", uds.display());
            ExitCode::FAILURE
        }
    }
}

fn config_error(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("offloadd: {e}");
    ExitCode::from(EXIT_CONFIG)
}

fn serve(file: Option<PathBuf>, flags: &Overrides) -> ExitCode {
    let config = match flags.load(file) {
        Ok(c) => c,
        Err(e) => return config_error(e),
    };
    let vllm_env = match VllmEnv::from_process() {
        Ok(v) => v,
        Err(e) => return config_error(e),
    };
    offloadd::init_telemetry(&config.log);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        disable_pin_memory = vllm_env.disable_pin_memory,
        disable_uva = vllm_env.disable_uva,
        "offloadd starting"
    );
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.server.worker_threads > 0 {
        builder.worker_threads(config.server.worker_threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("offloadd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(offloadd::run(config, vllm_env)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "offloadd failed");
            eprintln!("offloadd: {e}");
            ExitCode::FAILURE
        }
    }
}
