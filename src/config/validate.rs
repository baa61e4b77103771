//! The one place that decides whether a configuration is acceptable.

use std::collections::HashSet;
use std::path::Path;

use super::{Config, ConfigError};

/// Names of pools and models end up in file names and metric labels, so keep them tame.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.')
}

/// Checks every rule that serde's types cannot express. Returns the first problem found.
pub fn validate(c: &Config) -> Result<(), ConfigError> {
    let invalid = |m: String| Err(ConfigError::Invalid(m));
    require_absolute("server.uds_path", &c.server.uds_path)?;
    require_absolute("pools.dir", &c.pools.dir)?;
    if c.server.max_connections == 0 || c.server.max_fast_connections == 0 {
        return invalid(format!(
            "server.max_connections = {} and server.max_fast_connections = {} must both be at least 1",
            c.server.max_connections, c.server.max_fast_connections
        ));
    }
    let srv = &c.server;
    for (setting, file) in [
        ("server.auth_token_file", &srv.auth_token_file),
        ("server.tls_cert_file", &srv.tls_cert_file),
        ("server.tls_key_file", &srv.tls_key_file),
        ("server.tls_client_ca_file", &srv.tls_client_ca_file),
    ] {
        if let Some(file) = file {
            require_absolute(setting, file)?;
        }
    }
    if srv.tls_cert_file.is_some() != srv.tls_key_file.is_some() {
        return invalid(
            "server.tls_cert_file and server.tls_key_file go together: set both for TLS, or neither".into(),
        );
    }
    if srv.tls_client_ca_file.is_some() && srv.tls_cert_file.is_none() {
        return invalid(
            "server.tls_client_ca_file asks TCP clients for certificates, which needs TLS: set server.tls_cert_file and server.tls_key_file too".into(),
        );
    }
    if let Some(addr) = srv.unauthenticated_public_tcp()
        && !srv.tcp_insecure
    {
        return invalid(format!(
            "server.tcp_addr = {addr} is reachable from other hosts and neither server.auth_token_file nor \
             server.tls_client_ca_file is set: anyone who reaches it could control the daemon. Set \
             server.auth_token_file (clients send `authorization: Bearer <token>`; with \
             server.tls_cert_file/tls_key_file it travels encrypted), or mutual TLS (server.tls_cert_file, \
             server.tls_key_file, server.tls_client_ca_file), bind a loopback address, or set \
             server.tcp_insecure = true to serve it unauthenticated anyway"
        ));
    }
    if let Some(addr) = srv.tcp_around_peer_checks()
        && !srv.tcp_insecure
    {
        return invalid(format!(
            "server.allowed_uids/allowed_gids admit only some Unix-socket callers, but server.tcp_addr = {addr} \
             authenticates nobody: any local user could call the daemon over TCP around them, loopback \
             included. Set server.auth_token_file or mutual TLS (server.tls_cert_file, server.tls_key_file, \
             server.tls_client_ca_file), drop server.tcp_addr, or set server.tcp_insecure = true to accept it"
        ));
    }
    let window = c.leases.copy_window_bytes;
    if window != 0 && window < 16 << 20 {
        return invalid(format!(
            "leases.copy_window_bytes = {window} is below one 16 MiB piece; use 0 (unpaced) or at least 16777216, e.g. 67108864"
        ));
    }
    let stage = c.pin.staging_bytes;
    if stage != 0 && (stage < 2 << 20 || stage % (2 << 20) != 0) {
        return invalid(format!(
            "pin.staging_bytes = {stage} must be 0 (no staging) or a multiple of 2 MiB (two buffers of whole MiB); the default is 134217728"
        ));
    }
    if c.pools.max_host_bytes == Some(0) {
        return invalid("pools.max_host_bytes must be > 0; leave it unset for the default".into());
    }
    let mut names = HashSet::new();
    for p in &c.pools.create {
        if !is_valid_name(&p.name) {
            return invalid(format!(
                "pools.create: pool name {:?} must be 1-64 characters of [A-Za-z0-9._-], not starting with '.'",
                p.name
            ));
        }
        if !names.insert(p.name.as_str()) {
            return invalid(format!("pools.create: pool {:?} is declared twice", p.name));
        }
        if p.size_bytes == 0 {
            return invalid(format!(
                "pools.create: pool {:?} needs size_bytes > 0",
                p.name
            ));
        }
    }
    for root in &c.models.roots {
        require_absolute("models.roots", root)?;
    }
    if c.models.chunk_bytes < 4096 {
        return invalid(format!(
            "models.chunk_bytes = {} is too small; use at least 4096 (default 16 MiB)",
            c.models.chunk_bytes
        ));
    }
    if c.models
        .layer_patterns
        .iter()
        .any(|p| p.is_empty() || !p.ends_with('.'))
    {
        return invalid(format!(
            "models.layer_patterns {:?}: each pattern is a dotted prefix ending in '.', e.g. \"model.layers.\"",
            c.models.layer_patterns
        ));
    }
    let mut models = HashSet::new();
    for m in &c.models.register {
        if !is_valid_name(&m.name) {
            return invalid(format!(
                "models.register: model name {:?} must be 1-64 characters of [A-Za-z0-9._-]",
                m.name
            ));
        }
        if !models.insert(m.name.as_str()) {
            return invalid(format!(
                "models.register: model {:?} is declared twice",
                m.name
            ));
        }
        if m.uva.is_some() && m.prefetch.is_some() {
            return invalid(format!(
                "models.register: model {:?} sets both uva and prefetch; choose one",
                m.name
            ));
        }
        // A checkpoint is a local path or a URL under models.remotes (checked at registration).
        match m.path.to_str().filter(|p| p.contains("://")) {
            Some(url) => {
                super::remotes::check_url(url)
                    .map_err(|e| ConfigError::Invalid(format!("models.register.path: {e}")))?;
            }
            None => require_absolute("models.register.path", &m.path)?,
        }
    }
    for r in &c.models.remotes {
        super::remotes::check(r).map_err(ConfigError::Invalid)?;
    }
    let m = &c.models;
    if m.fetch_concurrency == 0 || m.fetch_part_bytes < 64 << 10 || m.fetch_timeout_secs == 0 {
        return invalid(format!(
            "models.fetch_concurrency = {}, models.fetch_part_bytes = {} and models.fetch_timeout_secs = {} must be at least 1, 65536 and 1 (defaults 16, 8388608, 60)",
            m.fetch_concurrency, m.fetch_part_bytes, m.fetch_timeout_secs
        ));
    }
    if c.leases.max_per_model == 0 || c.leases.max_total == 0 {
        return invalid(format!(
            "leases.max_per_model = {} and leases.max_total = {} must both be at least 1",
            c.leases.max_per_model, c.leases.max_total
        ));
    }
    if c.leases.max_static_bytes_per_device == Some(0) {
        return invalid(
            "leases.max_static_bytes_per_device must be > 0; leave it unset for no limit".into(),
        );
    }
    if c.leases.default_ttl_ms == 0 {
        return invalid("leases.default_ttl_ms must be > 0".into());
    }
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&c.log.filter) {
        return invalid(format!("log.filter {:?}: {e}", c.log.filter));
    }
    Ok(())
}

fn require_absolute(key: &str, path: &Path) -> Result<(), ConfigError> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "{key} = {:?} must be an absolute path",
            path.display().to_string()
        )))
    }
}
