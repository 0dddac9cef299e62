//! Where sessions live, as the operator says it: `memory`, or a Redis URL
//! (`redis://`, `rediss://` for TLS) that may carry a password.
//!
//! The URL can come from `--store`, from a file (`--store-file`) or from
//! the environment (`NUMSTREAM_STORE`), the last two keeping the password
//! out of the process's command line. It is parsed here, after argument
//! parsing, rather than by clap, so that no error message, log line,
//! metric or help text ever repeats it: errors say what is wrong, never
//! what was given, and the only rendering of a URL is redacted.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

/// The environment variable the store URL is read from when neither
/// `--store` nor `--store-file` is given.
pub(crate) const STORE_ENV: &str = "NUMSTREAM_STORE";

/// Where sessions live.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum StoreUrl {
    /// In this process; sessions end with it.
    Memory,
    /// A Redis URL, already checked to parse. Its `Debug` and `Display`
    /// hide any password; [`StoreUrl::expose`] is the only way to the
    /// URL itself, for connecting.
    Redis(String),
}

impl StoreUrl {
    /// The `store` metrics label (what `SessionStore::kind` will say).
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            StoreUrl::Memory => "memory",
            StoreUrl::Redis(_) => "redis",
        }
    }

    /// The URL with its secret, for the store's connection and nothing
    /// else.
    pub(crate) fn expose(&self) -> &str {
        match self {
            StoreUrl::Memory => "memory",
            StoreUrl::Redis(url) => url,
        }
    }
}

/// Shows scheme, host, port and database; user name and password become
/// `***`.
impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Memory => f.write_str("memory"),
            // Seed nodes, comma-separated: not one URL to parse; the
            // credentials, if any, end at the last `@`.
            StoreUrl::Redis(url) if url.starts_with(CLUSTER_SCHEME) => {
                match url[CLUSTER_SCHEME.len()..].rsplit_once('@') {
                    Some((_, nodes)) => write!(f, "{CLUSTER_SCHEME}***@{nodes}"),
                    None => f.write_str(url),
                }
            }
            StoreUrl::Redis(url) => match redis::parse_redis_url(url) {
                Some(parsed) => {
                    let credentials = if parsed.username().is_empty() && parsed.password().is_none()
                    {
                        ""
                    } else {
                        "***@"
                    };
                    write!(
                        f,
                        "{}://{credentials}{}",
                        parsed.scheme(),
                        parsed.host_str().unwrap_or("")
                    )?;
                    if let Some(port) = parsed.port() {
                        write!(f, ":{port}")?;
                    }
                    f.write_str(parsed.path())
                }
                None => f.write_str("redis://<unparsable>"),
            },
        }
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreUrl({self})")
    }
}

/// Why no store URL could be had. Never contains the URL or any part of
/// it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum StoreUrlError {
    #[error(
        "{origin}: expected `memory`, `redis://[USER:PASSWORD@]HOST:PORT/DB`, \
         `rediss://[USER:PASSWORD@]HOST:PORT/DB` or `redis-cluster://HOST:PORT[,HOST:PORT…]` \
         (the value is not shown: it may hold a password)"
    )]
    UnknownScheme { origin: Source },
    #[error(
        "{origin}: the Redis URL does not parse: {reason} (the value is not shown: it may hold a password)"
    )]
    Invalid { origin: Source, reason: String },
    #[error(
        "{origin}: `#insecure` would turn off the verification of the Redis server's \
         certificate; give it a certificate the system trusts (or SSL_CERT_FILE) instead"
    )]
    Insecure { origin: Source },
    #[error("--store-file {}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    #[error("{STORE_ENV} is not valid UTF-8")]
    EnvNotUtf8,
}

/// Where the URL came from, so an error can say which to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    Flag,
    File(PathBuf),
    Env,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag => f.write_str("--store"),
            Source::File(path) => write!(f, "--store-file {}", path.display()),
            Source::Env => f.write_str(STORE_ENV),
        }
    }
}

/// The store URL from the first of `flag` (`--store`), `file`
/// (`--store-file`) and `env` (`NUMSTREAM_STORE`) that is given, or
/// `memory` when none is.
pub(crate) fn resolve(
    flag: Option<&str>,
    file: Option<&Path>,
    env: Option<OsString>,
) -> Result<StoreUrl, StoreUrlError> {
    if let Some(text) = flag {
        return parse(text, Source::Flag);
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|error| StoreUrlError::File {
            path: path.to_owned(),
            reason: match error.kind() {
                // The OS's words, which never quote the file.
                std::io::ErrorKind::InvalidData => "not valid UTF-8".to_owned(),
                _ => error.to_string(),
            },
        })?;
        return parse(&text, Source::File(path.to_owned()));
    }
    if let Some(value) = env {
        let text = value.into_string().map_err(|_| StoreUrlError::EnvNotUtf8)?;
        return parse(&text, Source::Env);
    }
    Ok(StoreUrl::Memory)
}

/// Parses one store URL; surrounding white space (a file's final newline)
/// is ignored.
pub(crate) fn parse(text: &str, origin: Source) -> Result<StoreUrl, StoreUrlError> {
    let text = text.trim();
    if text == "memory" {
        return Ok(StoreUrl::Memory);
    }
    if text.starts_with(CLUSTER_SCHEME) {
        return parse_cluster(text, origin);
    }
    if !(text.starts_with("redis://") || text.starts_with("rediss://")) {
        return Err(StoreUrlError::UnknownScheme { origin });
    }
    let Some(parsed) = redis::parse_redis_url(text) else {
        return Err(StoreUrlError::Invalid {
            origin,
            reason: "not a URL".to_owned(),
        });
    };
    if parsed.fragment() == Some("insecure") {
        return Err(StoreUrlError::Insecure { origin });
    }
    // redis-rs's own check, with its message kept only if it repeats no
    // part of the URL that could be secret.
    if let Err(error) = redis::IntoConnectionInfo::into_connection_info(parsed.clone()) {
        let message = error.to_string();
        let secrets = [parsed.password().unwrap_or(""), parsed.username()];
        let leaks = secrets
            .iter()
            .any(|secret| !secret.is_empty() && message.contains(secret));
        return Err(StoreUrlError::Invalid {
            origin,
            reason: if leaks {
                "redis-rs refused it".to_owned()
            } else {
                message
            },
        });
    }
    Ok(StoreUrl::Redis(text.to_owned()))
}

/// The scheme of a Redis Cluster URL: seed nodes, comma-separated.
const CLUSTER_SCHEME: &str = "redis-cluster://";

/// A `redis-cluster://` URL, checked by the store's own parser (no I/O),
/// with its message kept only if it repeats nothing that could be secret.
fn parse_cluster(text: &str, origin: Source) -> Result<StoreUrl, StoreUrlError> {
    let config = numstream_store_redis::RedisStoreConfig::default();
    match numstream_store_redis::RedisStore::connect_lazy(text, config) {
        Ok(_) => Ok(StoreUrl::Redis(text.to_owned())),
        Err(error) => {
            let message = error.to_string();
            let credentials = text[CLUSTER_SCHEME.len()..]
                .rsplit_once('@')
                .map_or("", |(credentials, _)| credentials);
            let leaks = credentials
                .split(':')
                .any(|part| !part.is_empty() && message.contains(part));
            Err(StoreUrlError::Invalid {
                origin,
                reason: if leaks {
                    "the cluster URL was refused".to_owned()
                } else {
                    message
                },
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "s3cr3t-Pa55";

    #[test]
    fn memory_and_redis_urls_parse_from_every_source() {
        assert_eq!(resolve(None, None, None), Ok(StoreUrl::Memory));
        assert_eq!(parse(" memory\n", Source::Flag), Ok(StoreUrl::Memory));
        let url = format!("redis://:{SECRET}@127.0.0.1:6379/0");
        assert_eq!(
            resolve(Some(&url), None, None),
            Ok(StoreUrl::Redis(url.clone()))
        );
        assert_eq!(
            resolve(None, None, Some(OsString::from(format!("{url}\n")))),
            Ok(StoreUrl::Redis(url.clone()))
        );
        let dir = std::env::temp_dir().join(format!("numstream-store-url-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("store");
        std::fs::write(&file, format!("{url}\n")).expect("write");
        assert_eq!(
            resolve(None, Some(&file), Some(OsString::from("memory"))),
            Ok(StoreUrl::Redis(url.clone())),
            "the file comes before the environment"
        );
        assert_eq!(
            resolve(Some("memory"), Some(&file), None),
            Ok(StoreUrl::Memory),
            "the flag comes first"
        );
        let tls = StoreUrl::Redis("rediss://127.0.0.1:6380/0".to_owned());
        assert_eq!(parse("rediss://127.0.0.1:6380/0", Source::Env), Ok(tls));
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn no_rendering_shows_the_password() {
        let url = parse(
            &format!("redis://numstream:{SECRET}@10.0.0.5:6379/3"),
            Source::Flag,
        )
        .expect("valid");
        assert_eq!(url.to_string(), "redis://***@10.0.0.5:6379/3");
        assert!(!format!("{url:?}").contains(SECRET));
        assert_eq!(
            parse("rediss://10.0.0.5:6380/0", Source::Flag)
                .expect("valid")
                .to_string(),
            "rediss://10.0.0.5:6380/0"
        );
        let cluster = parse(
            &format!("redis-cluster://numstream:{SECRET}@10.0.0.1:7000,10.0.0.2:7000"),
            Source::Env,
        )
        .expect("valid");
        assert_eq!(
            cluster.to_string(),
            "redis-cluster://***@10.0.0.1:7000,10.0.0.2:7000"
        );
        assert!(!format!("{cluster:?}").contains(SECRET));
        let refused = parse(&format!("redis-cluster://numstream:{SECRET}@"), Source::Env)
            .expect_err("no seed node");
        assert!(!refused.to_string().contains(SECRET), "{refused}");
    }

    #[test]
    fn errors_name_the_source_and_never_the_value() {
        let dir = std::env::temp_dir().join(format!("numstream-store-err-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("store");
        for bad in [
            format!("http://:{SECRET}@host:1/0"),
            format!("redis://:{SECRET}@host:99999999/0"),
            format!("redis://:{SECRET}@host:6379/notadb"),
            format!("rediss://:{SECRET}@host:6379/0#insecure"),
            SECRET.to_owned(),
        ] {
            std::fs::write(&file, &bad).expect("write");
            for (result, source) in [
                (resolve(Some(&bad), None, None), "--store"),
                (resolve(None, Some(&file), None), "--store-file"),
                (resolve(None, None, Some(OsString::from(&bad))), STORE_ENV),
            ] {
                let error = result.expect_err(&bad).to_string();
                assert!(!error.contains(SECRET), "{error}");
                assert!(error.starts_with(source), "{error}");
            }
        }
        let missing = resolve(None, Some(&dir.join("absent")), None).expect_err("no such file");
        assert!(missing.to_string().contains("No such file"), "{missing}");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
