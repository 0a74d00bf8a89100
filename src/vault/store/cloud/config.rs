//! From a vault URL and the environment to a configured `object_store` client.
//!
//! `s3://BUCKET/PREFIX` and `az://CONTAINER/PREFIX`; credentials, region and endpoint come from
//! the variables `object_store` itself reads (`AWS_*`, `AZURE_*`, `AZURITE_BLOB_STORAGE_URL`),
//! never from the URL or the command line. What blockvault adds:
//! - HTTPS only, unless `BLOCKVAULT_ALLOW_HTTP=1`: an `http://` endpoint (an emulator's
//!   default included) is refused before any request, since data and signed requests would
//!   cross the network in the clear;
//! - `BLOCKVAULT_CA_CERT=FILE`: PEM certificates trusted beside the system roots (a private
//!   CA in front of an on-premises store);
//! - S3 requests are signed with `UNSIGNED-PAYLOAD` unless `AWS_UNSIGNED_PAYLOAD=false`: the
//!   signature still covers the method, key, headers and conditions, not a SHA-256 of the
//!   body. Hashing every pack cost both ends a pass over the data (0.6 CPU-s here and 1 in
//!   SeaweedFS per GB of packs). HTTPS protects the body in transit; on plain HTTP (allowed
//!   only explicitly) someone on the path could alter a body, which is the damage the
//!   storage holder can always do: every object is authenticated when read (packs are
//!   named by their BLAKE3 hash, frames and everything else are sealed) and `verify` finds it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::prefix::PrefixStore;
use object_store::{Certificate, ClientOptions, ObjectStore, RetryConfig};

use super::super::names::check_key;
use crate::error::{Error, Result};

/// The variable that allows plain-HTTP endpoints.
pub const ALLOW_HTTP: &str = "BLOCKVAULT_ALLOW_HTTP";
/// The variable naming a PEM file of extra trusted CA certificates.
pub const CA_CERT: &str = "BLOCKVAULT_CA_CERT";

/// Azurite's well-known development account and key (public: Microsoft documents them).
const EMULATOR_ACCOUNT: &str = "devstoreaccount1";
const EMULATOR_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// One request may take this long: a 32 MiB pack at 10 Mbit/s needs half a minute, so the
/// client's 30 s default is too short for a slow uplink.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Which service a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// Amazon S3 and compatibles (`s3://`).
    S3,
    /// Azure Blob Storage (`az://`).
    Azure,
}

/// A parsed object-store vault URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudUrl {
    /// The service.
    pub service: Service,
    /// Bucket or container.
    pub bucket: String,
    /// Folder inside it, without leading or trailing `/` (may be empty).
    pub prefix: String,
}

impl CloudUrl {
    /// The canonical spelling: `s3://bucket/prefix` (no trailing slash).
    pub fn canonical(&self) -> String {
        let scheme = match self.service {
            Service::S3 => "s3",
            Service::Azure => "az",
        };
        if self.prefix.is_empty() {
            format!("{scheme}://{}", self.bucket)
        } else {
            format!("{scheme}://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// Parse `s3://BUCKET[/PREFIX]` or `az://CONTAINER[/PREFIX]`.
pub fn parse(url: &str) -> Result<CloudUrl> {
    let bad = |why: &str| Error::usage(format!("vault URL {url}: {why}"));
    let (service, rest) = if let Some(rest) = url.strip_prefix("s3://") {
        (Service::S3, rest)
    } else if let Some(rest) = url.strip_prefix("az://") {
        (Service::Azure, rest)
    } else {
        return Err(bad("not an s3:// or az:// URL"));
    };
    if rest.contains(['?', '#']) {
        return Err(bad(
            "query strings and fragments are not allowed (credentials and options come from \
             the environment)",
        ));
    }
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let prefix = prefix.trim_matches('/');
    let (what, allowed): (&str, fn(char) -> bool) = match service {
        // S3 bucket names: 3–63 of a-z 0-9 . - (AWS naming rules).
        Service::S3 => ("bucket", |c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-'
        }),
        // Azure container names: 3–63 of a-z 0-9 -.
        Service::Azure => ("container", |c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
        }),
    };
    if !(3..=63).contains(&bucket.len())
        || !bucket.chars().all(allowed)
        || !bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !bucket.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Err(bad(&format!(
            "{what} name {bucket:?} is not valid (3 to 63 lowercase letters, digits{}, \
             starting and ending with a letter or digit)",
            if service == Service::S3 {
                ", dots and hyphens"
            } else {
                " and hyphens"
            }
        )));
    }
    if !prefix.is_empty() {
        check_key(prefix).map_err(|_| bad(&format!("prefix {prefix:?} is not a valid folder")))?;
    }
    Ok(CloudUrl {
        service,
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
    })
}

/// The settings an object store is built from: the `AWS_*`, `AZURE_*`, `AZURITE_*` and
/// `BLOCKVAULT_*` variables, from the process environment or given explicitly (tests,
/// embedders). Its `Debug` shows names only: the values hold credentials.
#[derive(Clone, Default)]
pub struct CloudConfig {
    vars: BTreeMap<String, String>,
}

impl std::fmt::Debug for CloudConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.vars.keys()).finish()
    }
}

impl CloudConfig {
    /// The relevant variables of the process environment.
    pub fn from_env() -> Self {
        Self::from_pairs(std::env::vars())
    }

    /// Settings from `(name, value)` pairs; names other than `AWS_*`, `AZURE_*`, `AZURITE_*`
    /// and `BLOCKVAULT_*` are ignored.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let vars = pairs
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .filter(|(k, _)| {
                ["AWS_", "AZURE_", "AZURITE_", "BLOCKVAULT_"]
                    .iter()
                    .any(|p| k.starts_with(p))
            })
            .collect();
        CloudConfig { vars }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn flag(&self, name: &str) -> bool {
        self.get(name)
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
    }

    /// Values that must never be shown (secret keys, tokens, SAS signatures): every value of
    /// a variable whose name says it holds a secret.
    pub(super) fn secrets(&self) -> Vec<String> {
        self.vars
            .iter()
            .filter(|(k, _)| {
                ["SECRET", "KEY", "TOKEN", "SAS", "PASSWORD"]
                    .iter()
                    .any(|w| k.contains(w))
                    && !k.ends_with("ACCESS_KEY_ID")
            })
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The endpoint requests will go to, where the settings name one (else the service's
    /// public HTTPS endpoint).
    fn endpoint(&self, service: Service) -> Option<String> {
        match service {
            Service::S3 => ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
                .iter()
                .find_map(|k| self.get(k)),
            Service::Azure if self.flag("AZURE_STORAGE_USE_EMULATOR") => Some(
                self.get("AZURITE_BLOB_STORAGE_URL")
                    .unwrap_or("http://127.0.0.1:10000"),
            ),
            Service::Azure => ["AZURE_STORAGE_ENDPOINT", "AZURE_ENDPOINT"]
                .iter()
                .find_map(|k| self.get(k)),
        }
        .map(str::to_string)
    }

    /// Client options: timeouts, the private CA, plain HTTP only if allowed.
    fn client_options(&self, url: &CloudUrl) -> Result<ClientOptions> {
        let allow_http = self.flag(ALLOW_HTTP);
        if let Some(endpoint) = self.endpoint(url.service) {
            if endpoint.to_ascii_lowercase().starts_with("http://") && !allow_http {
                return Err(Error::usage(format!(
                    "vault {}: the endpoint {endpoint} is plain HTTP, which would send data and \
                     signed requests in the clear; use https://, or set {ALLOW_HTTP}=1 to allow \
                     it (a test server on loopback)",
                    url.canonical()
                )));
            }
        }
        let mut options = ClientOptions::new()
            .with_timeout(REQUEST_TIMEOUT)
            .with_allow_http(allow_http);
        if let Some(file) = self.get(CA_CERT) {
            let pem = std::fs::read(file).map_err(|e| {
                Error::usage(format!(
                    "{CA_CERT}={file}: cannot read the CA certificate file"
                ))
                .with_source(e)
            })?;
            let certs = Certificate::from_pem_bundle(&pem).map_err(|e| {
                Error::usage(format!(
                    "{CA_CERT}={file}: not a PEM certificate file ({e})"
                ))
            })?;
            if certs.is_empty() {
                return Err(Error::usage(format!(
                    "{CA_CERT}={file}: no certificate in the file"
                )));
            }
            for cert in certs {
                options = options.with_root_certificate(cert);
            }
        }
        Ok(options)
    }

    /// Every variable named `prefix*` that the builder knows, set on it the way the builder's
    /// own `from_env` would (lowercased name as the config key), except the emulator flag.
    fn apply<B, K: std::str::FromStr>(
        &self,
        prefix: &str,
        builder: B,
        set: impl Fn(B, K, &str) -> B,
    ) -> B {
        self.vars
            .iter()
            .filter(|(k, _)| k.starts_with(prefix) && *k != "AZURE_STORAGE_USE_EMULATOR")
            .filter_map(|(k, v)| Some((k.to_ascii_lowercase().parse::<K>().ok()?, v)))
            .fold(builder, |b, (key, v)| set(b, key, v))
    }

    /// The client for `url`, scoped to its prefix.
    pub fn build(&self, url: &CloudUrl) -> Result<Arc<dyn ObjectStore>> {
        let options = self.client_options(url)?;
        let configured = |e: object_store::Error| {
            Error::usage(format!(
                "vault {}: the object store settings are incomplete or invalid: {}",
                url.canonical(),
                super::errors::redact(&e.to_string(), &self.secrets())
            ))
        };
        let store: Arc<dyn ObjectStore> = match url.service {
            Service::S3 => {
                let unsigned = AmazonS3Builder::new().with_unsigned_payload(true);
                let b = self.apply("AWS_", unsigned, |b, k, v| b.with_config(k, v));
                Arc::new(
                    b.with_bucket_name(&url.bucket)
                        .with_client_options(options)
                        .with_retry(RetryConfig::default())
                        .build()
                        .map_err(configured)?,
                )
            }
            Service::Azure => {
                // The emulator flag is not passed on (`apply` skips it): object_store would
                // then read its endpoint from the process environment and allow plain HTTP
                // by itself. It becomes an explicit path-style endpoint under the policy
                // above instead.
                let mut b = self.apply("AZURE_", MicrosoftAzureBuilder::new(), |b, k, v| {
                    b.with_config(k, v)
                });
                if self.flag("AZURE_STORAGE_USE_EMULATOR") {
                    let account = self
                        .get("AZURE_STORAGE_ACCOUNT_NAME")
                        .unwrap_or(EMULATOR_ACCOUNT);
                    let endpoint = self.endpoint(Service::Azure).unwrap_or_default();
                    b = b
                        .with_account(account)
                        .with_endpoint(format!("{}/{account}", endpoint.trim_end_matches('/')));
                    let has_credential = [
                        "AZURE_STORAGE_ACCOUNT_KEY",
                        "AZURE_STORAGE_ACCESS_KEY",
                        "AZURE_STORAGE_SAS_TOKEN",
                        "AZURE_STORAGE_SAS_KEY",
                        "AZURE_STORAGE_TOKEN",
                    ]
                    .iter()
                    .any(|k| self.get(k).is_some());
                    if !has_credential {
                        b = b.with_access_key(EMULATOR_KEY);
                    }
                }
                Arc::new(
                    b.with_container_name(&url.bucket)
                        .with_client_options(options)
                        .with_retry(RetryConfig::default())
                        .build()
                        .map_err(configured)?,
                )
            }
        };
        Ok(if url.prefix.is_empty() {
            store
        } else {
            Arc::new(PrefixStore::new(store, url.prefix.as_str()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn urls_parse_and_refuse_what_they_should() {
        let u = parse("s3://my-bucket/vaults/a/").unwrap();
        assert_eq!(
            (u.service, u.bucket.as_str(), u.prefix.as_str()),
            (Service::S3, "my-bucket", "vaults/a")
        );
        assert_eq!(u.canonical(), "s3://my-bucket/vaults/a");
        let u = parse("az://backups").unwrap();
        assert_eq!((u.service, u.prefix.as_str()), (Service::Azure, ""));
        assert_eq!(u.canonical(), "az://backups");
        for bad in [
            "s3://ab/x",
            "s3://Upper/x",
            "s3:///x",
            "az://dots.not.allowed/x",
            "s3://bucket/a/../b",
            "s3://bucket/a//b",
            "s3://bucket/x?sig=secret",
            "s3://-bucket/x",
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Usage, "{bad}");
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn plain_http_needs_permission() {
        let url = parse("s3://bucket/p").unwrap();
        let c = CloudConfig::from_pairs([("AWS_ENDPOINT_URL", "http://127.0.0.1:9")]);
        let e = c.client_options(&url).unwrap_err();
        assert!(e.to_string().contains(ALLOW_HTTP), "{e}");
        let c = CloudConfig::from_pairs([
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
            (ALLOW_HTTP, "1"),
        ]);
        assert!(c.client_options(&url).is_ok());
        // The emulator's default endpoint is plain HTTP too.
        let url = parse("az://container/p").unwrap();
        let c = CloudConfig::from_pairs([("AZURE_STORAGE_USE_EMULATOR", "true")]);
        assert!(c.client_options(&url).is_err());
    }

    #[test]
    fn secrets_are_recognised_and_debug_shows_names_only() {
        let c = CloudConfig::from_pairs([
            ("AWS_ACCESS_KEY_ID", "AKIDPUBLIC"),
            ("AWS_SECRET_ACCESS_KEY", "s3cr3t-value"),
            ("AZURE_STORAGE_SAS_TOKEN", "sv=1&sig=abc"),
            ("HOME", "/root"),
        ]);
        let s = c.secrets();
        assert!(s.contains(&"s3cr3t-value".to_string()));
        assert!(s.contains(&"sv=1&sig=abc".to_string()));
        assert!(!s.contains(&"AKIDPUBLIC".to_string()));
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cr3t") && shown.contains("AWS_SECRET_ACCESS_KEY"),
            "{shown}"
        );
        assert!(!shown.contains("HOME"));
    }
}
