//! Layering: defaults < TOML file < `OFFLOADD_*` environment < command-line flags.

use std::collections::HashMap;
use std::path::PathBuf;

use config::{Environment, File, FileFormat};

use super::{Config, ConfigError};

/// Environment variables that configure how the config is found, not the config itself; they
/// must not be mistaken for `OFFLOADD_<KEY>` overrides.
const NOT_CONFIG_KEYS: &[&str] = &["OFFLOADD_CONFIG", "OFFLOADD_LOG"];

/// Keys whose environment or flag values are comma-separated lists.
const LIST_KEYS: &[&str] = &["models.roots", "server.allowed_uids", "server.allowed_gids"];

/// Everything `load` reads, passed in so that tests and `config check` control it exactly.
#[derive(Debug, Default, Clone)]
pub struct ConfigSources {
    /// The TOML file (`--config` or `OFFLOADD_CONFIG`).
    pub file: Option<PathBuf>,
    /// A snapshot of the process environment.
    pub env: Vec<(String, String)>,
    /// `KEY=VALUE` pairs from command-line flags, applied last.
    pub overrides: Vec<(String, String)>,
}

impl ConfigSources {
    /// Reads the real process environment; non-UTF-8 variables cannot be config and are skipped.
    pub fn from_process(file: Option<PathBuf>, overrides: Vec<(String, String)>) -> Self {
        Self {
            file,
            env: std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
            overrides,
        }
    }
}

/// Builds the effective configuration and validates it.
pub fn load(sources: &ConfigSources) -> Result<Config, ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(path) = &sources.file {
        if !path.is_file() {
            return Err(ConfigError::File {
                path: path.clone(),
                message: "no such file; pass an existing TOML file to --config".into(),
            });
        }
        builder = builder.add_source(File::from(path.as_path()).format(FileFormat::Toml));
    }
    let env: HashMap<String, String> = sources
        .env
        .iter()
        .filter(|(k, _)| k.starts_with("OFFLOADD_") && !NOT_CONFIG_KEYS.contains(&k.as_str()))
        .cloned()
        .collect();
    let mut environment = Environment::with_prefix("OFFLOADD")
        .prefix_separator("_")
        .separator("__")
        .list_separator(",")
        // config only splits lists when it also parses scalars.
        .try_parsing(true)
        .source(Some(env));
    for key in LIST_KEYS {
        environment = environment.with_list_parse_key(key);
    }
    builder = builder.add_source(environment);
    for (key, value) in &sources.overrides {
        builder = if LIST_KEYS.contains(&key.as_str()) {
            let items: Vec<String> = value
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            builder.set_override(key.as_str(), items)?
        } else {
            builder.set_override(key.as_str(), value.as_str())?
        };
    }
    let config: Config = builder.build()?.try_deserialize()?;
    super::validate(&config)?;
    Ok(config)
}

/// Splits a `--set KEY=VALUE` flag.
pub fn parse_override(flag: &str) -> Result<(String, String), ConfigError> {
    match flag.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(ConfigError::BadOverride(flag.to_string())),
    }
}
