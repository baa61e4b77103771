//! Logging through tracing-subscriber, to stderr so stdout stays free for machine-readable
//! output (the readiness line, `config print`).

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Environment variables that override `log.filter`, in order of preference.
const FILTER_VARS: &[&str] = &["OFFLOADD_LOG", "RUST_LOG"];

/// Installs the global subscriber. The filter comes from `OFFLOADD_LOG`, else `RUST_LOG`, else
/// the config; an unparsable variable falls back to the config with a warning, because a typo in
/// a log filter is no reason to keep weights offline.
pub fn init(log: &LogConfig) {
    let mut bad_var = None;
    let filter = FILTER_VARS
        .iter()
        .find_map(|var| {
            let value = std::env::var(var).ok()?;
            match EnvFilter::try_new(&value) {
                Ok(f) => Some(f),
                Err(e) => {
                    bad_var = Some(format!("{var}={value:?}: {e}"));
                    None
                }
            }
        })
        .unwrap_or_else(|| EnvFilter::new(&log.filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
    if let Some(problem) = bad_var {
        tracing::warn!(%problem, "ignoring unparsable log filter; using log.filter");
    }
}
