//! One object in a store: its identity (size, ETag, last-modified) and ranged reads that must
//! all see the same version of it.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore};
use serde::{Deserialize, Serialize};

use super::RemoteError;

/// What an object was when it was read: the journal keeps it, GetModel reports it, and every
/// ranged read of a load must find the same ETag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectStamp {
    pub url: String,
    pub size: u64,
    /// Empty when the store sends none (a plain HTTP server may not).
    pub etag: String,
    pub last_modified_ms: i64,
}

/// An object (or a prefix, for a checkpoint directory) in a store, with the client to read it.
#[derive(Debug, Clone)]
pub struct Object {
    store: Arc<dyn ObjectStore>,
    pub url: String,
    key: Path,
}

impl Object {
    pub(super) fn new(store: Arc<dyn ObjectStore>, url: &str) -> Self {
        let key = key_of(url);
        Self {
            store,
            url: url.to_string(),
            key: Path::from_iter(key.split('/').filter(|s| !s.is_empty())),
        }
    }

    /// The object `name` below this prefix, on the same client.
    pub fn child(&self, name: &str) -> Result<Object, RemoteError> {
        if name.is_empty()
            || name
                .split('/')
                .any(|s| s.is_empty() || s == "." || s == "..")
        {
            return Err(RemoteError::BadUrl(format!(
                "{:?} under {} is not a plain relative object name",
                name, self.url
            )));
        }
        let url = format!("{}/{}", self.url.trim_end_matches('/'), name);
        Ok(Object::new(Arc::clone(&self.store), &url))
    }

    /// Whether the URL names an object itself rather than a checkpoint directory.
    pub fn is_file(&self) -> bool {
        self.url.ends_with(".safetensors")
    }

    /// Size, ETag and last-modified, by a HEAD request.
    pub async fn stamp(&self) -> Result<ObjectStamp, RemoteError> {
        let meta = self
            .store
            .get_opts(
                &self.key,
                GetOptions {
                    head: true,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| self.error(e))?
            .meta;
        Ok(ObjectStamp {
            url: self.url.clone(),
            size: meta.size,
            etag: meta.e_tag.unwrap_or_default(),
            last_modified_ms: meta.last_modified.timestamp_millis(),
        })
    }

    /// Starts a ranged read of the version `stamp` recorded: the store refuses another version
    /// (If-Match), and a store that ignores If-Match is caught by the answer's own ETag.
    pub async fn get(
        &self,
        stamp: &ObjectStamp,
        range: Range<u64>,
    ) -> Result<object_store::GetResult, RemoteError> {
        let want = range.clone();
        let got = self
            .store
            .get_opts(
                &self.key,
                GetOptions {
                    if_match: (!stamp.etag.is_empty()).then(|| stamp.etag.clone()),
                    range: Some(GetRange::Bounded(range)),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| self.error(e))?;
        self.same_version(stamp, got.meta.e_tag.as_deref(), got.meta.size)?;
        if got.range != want {
            return Err(RemoteError::Short {
                url: self.url.clone(),
                why: format!(
                    "asked for bytes {want:?}, the store answered {:?}; the object is shorter than its header says",
                    got.range
                ),
            });
        }
        Ok(got)
    }

    /// A whole small object (an index), read in one ranged GET of the recorded version.
    pub async fn read_all(&self, stamp: &ObjectStamp) -> Result<Bytes, RemoteError> {
        self.read_range(stamp, 0..stamp.size).await
    }

    /// A small range of the recorded version, in memory (a header).
    pub async fn read_range(
        &self,
        stamp: &ObjectStamp,
        range: Range<u64>,
    ) -> Result<Bytes, RemoteError> {
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        let want = range.end - range.start;
        let bytes = self
            .get(stamp, range)
            .await?
            .bytes()
            .await
            .map_err(|e| self.error(e))?;
        if bytes.len() as u64 != want {
            return Err(RemoteError::Short {
                url: self.url.clone(),
                why: format!("asked for {want} bytes, got {}", bytes.len()),
            });
        }
        Ok(bytes)
    }

    fn same_version(
        &self,
        stamp: &ObjectStamp,
        etag: Option<&str>,
        size: u64,
    ) -> Result<(), RemoteError> {
        let etag = etag.unwrap_or_default();
        if etag != stamp.etag || size != stamp.size {
            return Err(RemoteError::Changed {
                url: self.url.clone(),
                why: format!(
                    "ETag {:?} and {} bytes, was {:?} and {} bytes",
                    etag, size, stamp.etag, stamp.size
                ),
            });
        }
        Ok(())
    }

    /// Names what went wrong by what the store said, with the bucket and key, never a
    /// credential (object_store's messages carry the status and the store's own text).
    pub fn error(&self, e: object_store::Error) -> RemoteError {
        use object_store::Error as E;
        let url = self.url.clone();
        match e {
            E::NotFound { .. } => RemoteError::NotFound { url, hint: "" },
            E::PermissionDenied { source, .. } | E::Unauthenticated { source, .. } => {
                RemoteError::Denied {
                    bucket: bucket_of(&url).to_string(),
                    key: self.key.to_string(),
                    url,
                    why: source.to_string(),
                }
            }
            E::Precondition { .. } => RemoteError::Changed {
                url,
                why: "its ETag no longer matches (HTTP 412)".into(),
            },
            other => RemoteError::Unavailable {
                url,
                why: other.to_string(),
            },
        }
    }
}

/// The key part of a URL: after `scheme://bucket/` (or `https://host/`).
fn key_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split_once('/').map_or("", |(_, key)| key)
}

/// The bucket (or host) of a URL.
fn bucket_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_buckets_come_from_the_url() {
        assert_eq!(key_of("s3://b/m/x.safetensors"), "m/x.safetensors");
        assert_eq!(key_of("s3://b"), "");
        assert_eq!(bucket_of("s3://b/m/x"), "b");
        assert_eq!(bucket_of("https://h:9/p"), "h:9");
    }
}
