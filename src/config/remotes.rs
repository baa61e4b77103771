//! `[[models.remotes]]`: which object-store URLs a checkpoint may come from, checked once here.
//! The object_store client parses each option's name, so a typo fails at startup.

use std::str::FromStr;

use object_store::ClientConfigKey;
use object_store::aws::AmazonS3ConfigKey;
use object_store::azure::AzureConfigKey;
use object_store::gcp::GoogleConfigKey;

use super::RemoteSpec;

/// The kinds of store a remote URL may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    S3,
    Gcs,
    Azure,
    Http,
}

impl Scheme {
    /// The scheme of `url`, if it names an object store (`s3://`, `gs://`, `az://`, `https://`;
    /// `http://` too, for stores on a private network).
    pub fn of(url: &str) -> Option<Scheme> {
        let (scheme, _) = url.split_once("://")?;
        Some(match scheme {
            "s3" | "s3a" => Scheme::S3,
            "gs" => Scheme::Gcs,
            "az" | "azure" => Scheme::Azure,
            "https" | "http" => Scheme::Http,
            _ => return None,
        })
    }

    /// Whether `key` names a setting of this store's client.
    pub fn knows(self, key: &str) -> bool {
        let key = key.to_ascii_lowercase();
        match self {
            Scheme::S3 => AmazonS3ConfigKey::from_str(&key).is_ok(),
            Scheme::Gcs => GoogleConfigKey::from_str(&key).is_ok(),
            Scheme::Azure => AzureConfigKey::from_str(&key).is_ok(),
            Scheme::Http => ClientConfigKey::from_str(&key).is_ok(),
        }
    }
}

/// Settings that are credentials: they belong in the environment or in `credentials_file`,
/// never in the config, which `offloadd config print` shows and ConfigMaps hold in clear.
fn is_credential(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "secret",
        "token",
        "access_key",
        "account_key",
        "sas",
        "password",
        "service_account_key",
        "application_credentials",
    ]
    .iter()
    .any(|c| key.contains(c))
}

/// Refuses what a registration URL must not carry: credentials (`user:pass@`), a query (a SAS
/// token, a presigned signature) or a fragment, all of which would end up in logs and answers,
/// and `.`/`..` segments, which would step outside the allowed prefix.
pub fn check_url(url: &str) -> Result<Scheme, String> {
    let scheme = Scheme::of(url).ok_or_else(|| {
        format!("{url:?} is not an object-store URL: use s3://, gs://, az:// or https://")
    })?;
    let (_, rest) = url.split_once("://").expect("Scheme::of found it");
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(format!("{url:?} names no bucket or host"));
    }
    if authority.contains('@') {
        return Err(format!(
            "{url:?} carries credentials; give them through the environment or a remote's credentials_file"
        ));
    }
    if rest.contains(['?', '#']) {
        return Err(format!(
            "{url:?} has a query or fragment; name the object or prefix alone (credentials go in the environment or credentials_file)"
        ));
    }
    if rest.split('/').skip(1).any(|s| s == "." || s == "..") {
        return Err(format!("{url:?} has a '.' or '..' segment"));
    }
    Ok(scheme)
}

/// Checks one remote: its URL, and each option's name against its store's client.
pub fn check(spec: &RemoteSpec) -> Result<(), String> {
    let scheme = check_url(&spec.url).map_err(|e| format!("models.remotes: {e}"))?;
    for key in spec.options.keys() {
        if is_credential(key) {
            return Err(format!(
                "models.remotes {:?}: option {key:?} is a credential; put it in the environment or in the remote's credentials_file (a mounted Secret), not in the config",
                spec.url
            ));
        }
        if !scheme.knows(key) {
            return Err(format!(
                "models.remotes {:?}: unknown option {key:?}; see the object_store crate's {} for the names",
                spec.url,
                match scheme {
                    Scheme::S3 => "AmazonS3ConfigKey",
                    Scheme::Gcs => "GoogleConfigKey",
                    Scheme::Azure => "AzureConfigKey",
                    Scheme::Http => "ClientConfigKey",
                }
            ));
        }
    }
    if let Some(file) = &spec.credentials_file
        && !file.is_absolute()
    {
        return Err(format!(
            "models.remotes {:?}: credentials_file = {:?} must be an absolute path",
            spec.url,
            file.display().to_string()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(url: &str, options: &[(&str, &str)]) -> RemoteSpec {
        RemoteSpec {
            url: url.into(),
            options: options
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            credentials_file: None,
        }
    }

    #[test]
    fn urls_that_would_leak_or_escape_are_refused() {
        assert_eq!(check_url("s3://b/m/"), Ok(Scheme::S3));
        assert_eq!(check_url("gs://b"), Ok(Scheme::Gcs));
        assert_eq!(check_url("https://h/p/x.safetensors"), Ok(Scheme::Http));
        for bad in [
            "/models/x",
            "ftp://h/x",
            "s3://",
            "s3:///key",
            "s3://AKIA:secret@b/m",
            "https://h/x?sig=abc",
            "s3://b/m/../other",
            "s3://b/./m",
        ] {
            assert!(check_url(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn options_are_names_the_client_knows_and_never_credentials() {
        assert!(
            check(&spec(
                "s3://b/",
                &[
                    ("aws_endpoint", "http://127.0.0.1:9000"),
                    ("allow_http", "true")
                ]
            ))
            .is_ok()
        );
        let e = check(&spec("s3://b/", &[("aws_secret_access_key", "x")])).unwrap_err();
        assert!(e.contains("credential"), "{e}");
        let e = check(&spec("s3://b/", &[("aws_endpiont", "x")])).unwrap_err();
        assert!(e.contains("unknown option \"aws_endpiont\""), "{e}");
        assert!(check(&spec("gs://b/", &[("aws_region", "x")])).is_err());
    }
}
