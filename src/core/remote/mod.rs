//! Object storage: which URLs may be read (`models.remotes`), a client per registration built
//! by Apache Arrow's `object_store` with the standard credential chains, and ranged reads
//! streamed straight into pool ranges ([`fetch`]). It knows nothing of models: the model
//! registry asks it for bytes.
//!
//! Its I/O runs on a runtime of its own, so a slow store never occupies the threads that answer
//! RPCs; the registry's blocking threads wait on it with [`Remotes::block_on`].

mod fetch;
mod object;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use object_store::{ClientOptions, ObjectStore, RetryConfig};

use crate::config::RemoteSpec;
use crate::config::remotes::{Scheme, check_url};

pub use fetch::{FetchJob, Span, fetch};
pub use object::{Object, ObjectStamp};

/// Why a remote read failed. Messages name the bucket (or host) and key, never a credential.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(
        "{url} is under none of models.remotes {allowed:?}; add its bucket or prefix to models.remotes"
    )]
    NotAllowed { url: String, allowed: Vec<String> },
    #[error("{0}")]
    BadUrl(String),
    #[error("{url}: no such object{hint}")]
    NotFound { url: String, hint: &'static str },
    #[error(
        "{url}: access denied (bucket {bucket:?}, key {key:?}): {why}; check the credentials the daemon gets (environment, service account, credentials_file) and the bucket's policy"
    )]
    Denied {
        url: String,
        bucket: String,
        key: String,
        why: String,
    },
    #[error(
        "{url} changed while it was read ({why}); register the model again once the upload is complete"
    )]
    Changed { url: String, why: String },
    #[error("{url}: {why}")]
    Short { url: String, why: String },
    #[error("{url}: the object store did not answer in time or failed after retries: {why}")]
    Unavailable { url: String, why: String },
    #[error("{file}: {why}")]
    CredentialsFile { file: String, why: String },
    #[error("cancelled")]
    Cancelled,
}

/// What kind of failure a [`RemoteError`] is, kept after its message (a load that failed in
/// the background reports it when RegisterModel waits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteKind {
    NotAllowed,
    BadUrl,
    NotFound,
    Denied,
    Changed,
    Short,
    Unavailable,
    CredentialsFile,
    Cancelled,
}

impl RemoteError {
    pub fn kind(&self) -> RemoteKind {
        match self {
            RemoteError::NotAllowed { .. } => RemoteKind::NotAllowed,
            RemoteError::BadUrl(_) => RemoteKind::BadUrl,
            RemoteError::NotFound { .. } => RemoteKind::NotFound,
            RemoteError::Denied { .. } => RemoteKind::Denied,
            RemoteError::Changed { .. } => RemoteKind::Changed,
            RemoteError::Short { .. } => RemoteKind::Short,
            RemoteError::Unavailable { .. } => RemoteKind::Unavailable,
            RemoteError::CredentialsFile { .. } => RemoteKind::CredentialsFile,
            RemoteError::Cancelled => RemoteKind::Cancelled,
        }
    }
}

/// How a load reads: from `[models]`.
#[derive(Debug, Clone)]
pub struct FetchParams {
    pub concurrency: usize,
    pub part_bytes: u64,
    pub retries: usize,
    pub timeout: Duration,
}

/// The allowed remotes and the runtime their I/O runs on.
#[derive(Debug)]
pub struct Remotes {
    specs: Vec<RemoteSpec>,
    pub params: FetchParams,
    runtime: OnceLock<tokio::runtime::Runtime>,
}

impl Remotes {
    pub fn new(specs: Vec<RemoteSpec>, params: FetchParams) -> Self {
        Self {
            specs,
            params,
            runtime: OnceLock::new(),
        }
    }

    /// Whether `path` names an object-store URL rather than a local file.
    pub fn is_remote(path: &str) -> bool {
        Scheme::of(path).is_some()
    }

    /// Finds the remote `url` lies under, and builds a client for it.
    pub fn resolve(&self, url: &str) -> Result<Object, RemoteError> {
        check_url(url).map_err(RemoteError::BadUrl)?;
        let spec = self
            .specs
            .iter()
            .filter(|s| under(url, &s.url))
            .max_by_key(|s| s.url.len())
            .ok_or_else(|| RemoteError::NotAllowed {
                url: url.to_string(),
                allowed: self.specs.iter().map(|s| s.url.clone()).collect(),
            })?;
        let store = self.store(spec)?;
        Ok(Object::new(store, url))
    }

    /// Runs `f` on the remote runtime and waits for it. Called from blocking threads only.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.runtime().block_on(f)
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.get_or_init(|| {
            // Two workers copy and checksum what arrives; the network waits cost no thread.
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("offloadd-fetch")
                .enable_all()
                .build()
                .expect("the fetch runtime starts")
        })
    }

    fn store(&self, spec: &RemoteSpec) -> Result<Arc<dyn ObjectStore>, RemoteError> {
        // reqwest's rustls comes without a crypto provider (aws-lc-rs is a long C build): it
        // uses the process default, ring, as the TLS listener does. Installed once; a second
        // call only reports the first.
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        let mut options: Vec<(String, String)> = spec
            .options
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect();
        if let Some(file) = &spec.credentials_file {
            options.extend(read_credentials(file)?);
        }
        let retry = RetryConfig {
            max_retries: self.params.retries,
            retry_timeout: self.params.timeout * (self.params.retries as u32 + 1),
            ..Default::default()
        };
        let client = ClientOptions::new().with_timeout(self.params.timeout);
        let bad = |e: object_store::Error| RemoteError::BadUrl(format!("{}: {e}", spec.url));
        let scheme = Scheme::of(&spec.url).expect("validated at startup");
        // Each builder starts from the environment: the standard credential chains (AWS_*
        // and web identity for IRSA, GOOGLE_*, AZURE_*), then instance metadata. The options
        // come last: client settings such as allow_http live in the client options, which
        // `with_client_options` would otherwise replace.
        let store: Arc<dyn ObjectStore> = match scheme {
            Scheme::S3 => {
                let b = options.iter().fold(
                    object_store::aws::AmazonS3Builder::from_env()
                        .with_url(&spec.url)
                        .with_retry(retry)
                        .with_client_options(client),
                    |b, (k, v)| match k.parse() {
                        Ok(k) => b.with_config(k, v),
                        Err(_) => b,
                    },
                );
                Arc::new(b.build().map_err(bad)?)
            }
            Scheme::Gcs => {
                let b = options.iter().fold(
                    object_store::gcp::GoogleCloudStorageBuilder::from_env()
                        .with_url(&spec.url)
                        .with_retry(retry)
                        .with_client_options(client),
                    |b, (k, v)| match k.parse() {
                        Ok(k) => b.with_config(k, v),
                        Err(_) => b,
                    },
                );
                Arc::new(b.build().map_err(bad)?)
            }
            Scheme::Azure => {
                let b = options.iter().fold(
                    object_store::azure::MicrosoftAzureBuilder::from_env()
                        .with_url(&spec.url)
                        .with_retry(retry)
                        .with_client_options(client),
                    |b, (k, v)| match k.parse() {
                        Ok(k) => b.with_config(k, v),
                        Err(_) => b,
                    },
                );
                Arc::new(b.build().map_err(bad)?)
            }
            Scheme::Http => {
                let base = origin(&spec.url);
                let b = options.iter().fold(
                    object_store::http::HttpBuilder::new()
                        .with_url(base)
                        .with_retry(retry)
                        .with_client_options(client),
                    |b, (k, v)| match k.parse() {
                        Ok(k) => b.with_config(k, v),
                        Err(_) => b,
                    },
                );
                Arc::new(b.build().map_err(bad)?)
            }
        };
        Ok(store)
    }
}

impl Drop for Remotes {
    fn drop(&mut self) {
        // The last handle on the core may go on a runtime thread, where dropping a runtime
        // (which waits for its threads) panics.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Whether `url` is `prefix` or below it: a prefix that does not end in '/' covers a whole
/// path segment only (`s3://b/m` covers `s3://b/m/x`, not `s3://b/mx`).
fn under(url: &str, prefix: &str) -> bool {
    let Some(rest) = url.strip_prefix(prefix) else {
        return false;
    };
    prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/')
}

/// `scheme://host[:port]` of an HTTP URL: the HTTP store's base, object keys are the path.
pub(crate) fn origin(url: &str) -> &str {
    let after = url.find("://").map_or(0, |i| i + 3);
    url[after..]
        .find('/')
        .map_or(url, |slash| &url[..after + slash])
}

/// A credentials file: TOML of string settings (`aws_access_key_id = "..."`), as a Kubernetes
/// Secret mounts it. Read at each registration, so a rotated Secret is picked up.
fn read_credentials(file: &std::path::Path) -> Result<Vec<(String, String)>, RemoteError> {
    let err = |why: String| RemoteError::CredentialsFile {
        file: file.display().to_string(),
        why,
    };
    let text = std::fs::read_to_string(file).map_err(|e| err(e.to_string()))?;
    let table: toml::Table = text
        .parse()
        // The parser's message quotes the offending line, which may hold a secret.
        .map_err(|_| err("not valid TOML of `key = \"value\"` lines".into()))?;
    table
        .into_iter()
        .map(|(k, v)| match v {
            toml::Value::String(s) => Ok((k.to_ascii_lowercase(), s)),
            _ => Err(err(format!("{k}: values must be strings"))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_covers_whole_segments() {
        assert!(under("s3://b/m/x.safetensors", "s3://b/m/"));
        assert!(under("s3://b/m/x", "s3://b/m"));
        assert!(under("s3://b/m", "s3://b/m"));
        assert!(!under("s3://b/mx/y", "s3://b/m"));
        assert!(!under("s3://other/m", "s3://b/"));
        assert_eq!(origin("https://h:8/a/b"), "https://h:8");
        assert_eq!(origin("https://h"), "https://h");
    }

    #[test]
    fn the_longest_matching_remote_wins_and_others_are_refused() {
        let spec = |url: &str| RemoteSpec {
            url: url.into(),
            options: [("aws_region".to_string(), "us-east-1".to_string())].into(),
            credentials_file: None,
        };
        let remotes = Remotes::new(
            vec![spec("s3://b/"), spec("s3://b/m/")],
            FetchParams {
                concurrency: 1,
                part_bytes: 1 << 20,
                retries: 0,
                timeout: Duration::from_secs(1),
            },
        );
        assert!(remotes.resolve("s3://b/m/x").is_ok());
        let e = remotes.resolve("s3://c/m/x").unwrap_err();
        assert!(matches!(e, RemoteError::NotAllowed { .. }), "{e}");
        let e = remotes.resolve("s3://b/../c").unwrap_err();
        assert!(matches!(e, RemoteError::BadUrl(_)), "{e}");
    }

    #[test]
    fn a_credentials_file_error_never_quotes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("creds");
        std::fs::write(&f, "aws_secret_access_key = SUPERSECRET\n").unwrap();
        let e = read_credentials(&f).unwrap_err().to_string();
        assert!(!e.contains("SUPERSECRET"), "{e}");
        std::fs::write(&f, "aws_secret_access_key = \"SUPERSECRET\"\n").unwrap();
        assert_eq!(read_credentials(&f).unwrap()[0].1, "SUPERSECRET");
    }
}
