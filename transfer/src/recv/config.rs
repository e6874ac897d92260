//! `shardrecv serve`'s config file (`/etc/shard/shardrecv.toml` by default, `--config PATH`):
//! the same settings as the flags, for a daemon started by systemd or a package, where a
//! file under `/etc` is what an operator edits and a configuration manager writes.
//!
//! Flags override the file, key by key, so a unit can pin one setting (`--listen`) and leave
//! the rest to the file. The file is TOML read with `deny_unknown_fields`: a misspelt key is
//! an error naming it, not a setting silently ignored; a badly typed value names its key and
//! line too. Relative paths in the file are relative to the file's directory, so a config
//! and its keys can move together. The default path is read only when it exists; a path
//! given with `--config` must exist.
//!
//! On SIGHUP the daemon reads the file again for `identity` and `allow` (the identities and
//! the allow-list are reloaded together; see `shardrecv`'s `serve` help): the other settings
//! need a restart. `identity` takes one key file or a list (a key rotation serves two for a
//! while; the first is the primary, see [`crate::identity`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

use crate::cli::LogFormat;
use crate::error::Error;
use crate::identity::Fingerprint;
use crate::quic::{Congestion, TransportOptions};

use super::{DEFAULT_MAX_QUEUED, DEFAULT_MAX_TRANSFERS};

/// Read when it exists and no `--config` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/shard/shardrecv.toml";

/// The file's keys; every one optional (a flag may give it instead).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// UDP address to listen on, e.g. `"0.0.0.0:7400"`.
    pub listen: Option<SocketAddr>,
    /// Directory that receives the trees.
    pub root: Option<PathBuf>,
    /// Our identity keys: `"recv.key"` or `["old.key", "new.key"]` (the first is the primary).
    #[serde(default, deserialize_with = "identities")]
    pub identity: Option<Vec<PathBuf>>,
    /// Allow-list file of sender fingerprints (re-read on SIGHUP).
    pub allow: Option<PathBuf>,
    pub max_transfers: Option<usize>,
    pub max_queued: Option<usize>,
    #[serde(default, deserialize_with = "congestion")]
    pub congestion: Option<Congestion>,
    /// Connection receive window, `"64M"`-style or a number of bytes.
    #[serde(default, deserialize_with = "window")]
    pub window: Option<u64>,
    /// TCP address of the Prometheus `/metrics` endpoint.
    pub metrics: Option<SocketAddr>,
    pub log_format: Option<LogFormat>,
    /// Fingerprints of the orchestrator keys whose transfer tickets are honoured; any given
    /// makes tickets required.
    pub ticket_signers: Option<Vec<String>>,
    /// Bytes of the root's disk never promised to transfers, `"10G"`-style or a number.
    #[serde(default, deserialize_with = "size")]
    pub keep_free: Option<u64>,
    /// Failed handshakes per second per source address (0: unlimited).
    pub handshake_rate: Option<u32>,
    /// Handshakes in progress at once.
    pub max_handshakes: Option<usize>,
}

fn congestion<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Congestion>, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map(Some).map_err(serde::de::Error::custom)
}

/// `identity`: one path, or a non-empty list of them.
fn identities<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<PathBuf>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }
    match OneOrMany::deserialize(d)
        .map_err(|_| serde::de::Error::custom("expected a key file path or a list of them"))?
    {
        OneOrMany::One(p) => Ok(Some(vec![p])),
        OneOrMany::Many(v) if v.is_empty() => Err(serde::de::Error::custom(
            "an empty list: give at least one key file",
        )),
        OneOrMany::Many(v) => Ok(Some(v)),
    }
}

/// A window as `"64M"` or as a plain number of bytes.
fn window<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Window {
        Bytes(u64),
        Text(String),
    }
    let text = match Window::deserialize(d)? {
        Window::Bytes(n) => n.to_string(),
        Window::Text(t) => t,
    };
    crate::quic::parse_window(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// A size as `"10G"` (binary suffixes) or as a plain number of bytes.
fn size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Bytes(n) => Ok(Some(n)),
        Size::Text(t) => crate::units::parse_size(&t)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

/// A TOML error as one line naming the line and, for a bad value, its key (the file is
/// flat: the key is what stands before `=` on that line); unknown keys are named by the
/// message itself.
fn describe(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end();
    let Some(start) = e.span().map(|s| s.start) else {
        return e.to_string().trim_end().to_string();
    };
    let before = text.get(..start).unwrap_or(text);
    let line_no = before.matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or_default();
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim())
        .filter(|k| !k.is_empty());
    match key {
        Some(key) if !message.starts_with("unknown field") => {
            format!("line {line_no}: key `{key}`: {message}")
        }
        _ => format!("line {line_no}: {message}"),
    }
}

impl FileConfig {
    /// Reads and checks `path`; relative paths in it become relative to its directory.
    pub fn load(path: &Path) -> Result<FileConfig, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut cfg: FileConfig = toml::from_str(&text).map_err(|e| {
            Error::Input(format!(
                "config file {}: {}",
                path.display(),
                describe(&text, &e)
            ))
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let identities = cfg.identity.iter_mut().flatten();
        for p in [&mut cfg.root, &mut cfg.allow]
            .into_iter()
            .flatten()
            .chain(identities)
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }

    /// `--config PATH` if given (it must exist), else the default path if it exists, else
    /// nothing. Returns the file read, if any, with its settings.
    pub fn find(explicit: Option<&Path>) -> Result<Option<(PathBuf, FileConfig)>, Error> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None => {
                let p = PathBuf::from(DEFAULT_CONFIG_PATH);
                if !p.exists() {
                    return Ok(None);
                }
                p
            }
        };
        let cfg = FileConfig::load(&path)?;
        Ok(Some((path, cfg)))
    }
}

/// `shardrecv serve`'s flags as given (`None`: not on the command line).
#[derive(Debug, Clone, Default)]
pub struct ServeFlags {
    pub listen: Option<SocketAddr>,
    pub root: Option<PathBuf>,
    /// `--identity`s (empty: not given).
    pub identity: Vec<PathBuf>,
    pub allow: Option<PathBuf>,
    pub max_transfers: Option<usize>,
    pub max_queued: Option<usize>,
    pub congestion: Option<Congestion>,
    pub window: Option<u64>,
    pub metrics: Option<SocketAddr>,
    pub log_format: Option<LogFormat>,
    /// `--ticket-signer`s (empty: not given).
    pub ticket_signers: Vec<Fingerprint>,
    pub keep_free: Option<u64>,
    pub handshake_rate: Option<u32>,
    pub max_handshakes: Option<usize>,
}

/// The settings a daemon runs with: flags over the file over the defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeSettings {
    pub listen: SocketAddr,
    pub root: PathBuf,
    /// Key files, never empty; the first is the primary.
    pub identity: Vec<PathBuf>,
    pub allow: PathBuf,
    pub max_transfers: usize,
    pub max_queued: usize,
    pub transport: TransportOptions,
    pub metrics: Option<SocketAddr>,
    pub log_format: LogFormat,
    /// Orchestrator keys whose tickets are required and honoured (empty: tickets off).
    pub ticket_signers: Vec<Fingerprint>,
    /// Disk bytes never promised to transfers ([`crate::space`]).
    pub keep_free: u64,
    /// Handshakes per second per source address, and at once ([`crate::handshake_limit`]).
    pub handshake_rate: u32,
    pub max_handshakes: usize,
    /// The config file read, if any (re-read on SIGHUP for `identity` and `allow`).
    pub config_file: Option<PathBuf>,
    /// Whether `allow` came from the flag (then a SIGHUP reloads that file, whatever the
    /// config file says).
    pub allow_from_flag: bool,
    /// Whether the identities came from `--identity` flags (then a SIGHUP reloads those
    /// files, whatever the config file says).
    pub identity_from_flag: bool,
}

/// What a SIGHUP reads: the key files and the allow-list file as they are named now.
#[derive(Debug, Clone, PartialEq)]
pub struct ReloadPaths {
    pub identities: Vec<PathBuf>,
    pub allow: PathBuf,
}

impl ServeSettings {
    /// Merges `flags` over `file` (read from `config_file`) over the defaults; a required
    /// setting given by neither is an error saying both ways to give it.
    pub fn merge(
        flags: ServeFlags,
        file: Option<(PathBuf, FileConfig)>,
    ) -> Result<ServeSettings, Error> {
        let (config_file, file) = match file {
            Some((p, f)) => (Some(p), f),
            None => (None, FileConfig::default()),
        };
        let missing = |flag: &str, key: &str| {
            let source = match &config_file {
                Some(p) => format!("`{key}` in {}", p.display()),
                None => format!("`{key}` in a config file ({DEFAULT_CONFIG_PATH} or --config)"),
            };
            Error::Input(format!("missing {flag}: give it, or {source}"))
        };
        let allow_from_flag = flags.allow.is_some();
        let identity_from_flag = !flags.identity.is_empty();
        let ticket_signers = if flags.ticket_signers.is_empty() {
            let in_file = |fp: &String| {
                Fingerprint::parse(fp).map_err(|e| {
                    Error::Input(format!(
                        "`ticket_signers` in {}: {e}",
                        config_file
                            .as_ref()
                            .map_or("the config file".into(), |p| p.display().to_string())
                    ))
                })
            };
            file.ticket_signers
                .iter()
                .flatten()
                .map(in_file)
                .collect::<Result<Vec<_>, _>>()?
        } else {
            flags.ticket_signers
        };
        Ok(ServeSettings {
            ticket_signers,
            listen: flags
                .listen
                .or(file.listen)
                .ok_or_else(|| missing("--listen", "listen"))?,
            root: flags
                .root
                .or(file.root)
                .ok_or_else(|| missing("--root", "root"))?,
            identity: match identity_from_flag {
                true => flags.identity,
                false => file
                    .identity
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| missing("--identity", "identity"))?,
            },
            allow: flags
                .allow
                .or(file.allow)
                .ok_or_else(|| missing("--allow", "allow"))?,
            max_transfers: flags
                .max_transfers
                .or(file.max_transfers)
                .unwrap_or(DEFAULT_MAX_TRANSFERS),
            max_queued: flags
                .max_queued
                .or(file.max_queued)
                .unwrap_or(DEFAULT_MAX_QUEUED),
            transport: TransportOptions {
                congestion: flags.congestion.or(file.congestion).unwrap_or_default(),
                window: flags.window.or(file.window),
                resume: None,
            },
            metrics: flags.metrics.or(file.metrics),
            keep_free: flags.keep_free.or(file.keep_free).unwrap_or(0),
            handshake_rate: flags
                .handshake_rate
                .or(file.handshake_rate)
                .unwrap_or(crate::handshake_limit::DEFAULT_RATE),
            max_handshakes: flags
                .max_handshakes
                .or(file.max_handshakes)
                .unwrap_or(crate::handshake_limit::DEFAULT_MAX_IN_PROGRESS),
            log_format: flags.log_format.or(file.log_format).unwrap_or_default(),
            config_file,
            allow_from_flag,
            identity_from_flag,
        })
    }

    /// What a SIGHUP reloads: the flags' files, else the config file's `identity` and `allow`
    /// as they are now. An unreadable config file, or one that lost either key, is an error
    /// (the caller keeps what it serves).
    pub fn reload_paths_now(&self) -> Result<ReloadPaths, Error> {
        let file = match (
            &self.config_file,
            self.allow_from_flag && self.identity_from_flag,
        ) {
            (Some(path), false) => Some((path, FileConfig::load(path)?)),
            _ => None,
        };
        let removed = |path: &Path, key: &str| {
            Error::Input(format!(
                "config file {}: `{key}` was removed",
                path.display()
            ))
        };
        let identities = match (&file, self.identity_from_flag) {
            (Some((path, cfg)), false) => cfg
                .identity
                .clone()
                .ok_or_else(|| removed(path, "identity"))?,
            _ => self.identity.clone(),
        };
        let allow = match (&file, self.allow_from_flag) {
            (Some((path, cfg)), false) => {
                cfg.allow.clone().ok_or_else(|| removed(path, "allow"))?
            }
            _ => self.allow.clone(),
        };
        Ok(ReloadPaths { identities, allow })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("shardrecv.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn every_key_reads_and_relative_paths_follow_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            r#"
listen = "0.0.0.0:7400"
root = "/srv/repos"
identity = "recv.key"
allow = "/etc/shard/senders.txt"
max_transfers = 4
max_queued = 9
congestion = "cubic"
window = "64M"
metrics = "127.0.0.1:9400"
log_format = "json"
keep_free = "2G"
handshake_rate = 5
max_handshakes = 64
"#,
        );
        let f = FileConfig::load(&p).unwrap();
        assert_eq!(f.listen, Some("0.0.0.0:7400".parse().unwrap()));
        assert_eq!(f.identity, Some(vec![d.path().join("recv.key")]));
        assert_eq!(f.allow, Some(PathBuf::from("/etc/shard/senders.txt")));
        assert_eq!(f.max_transfers, Some(4));
        assert_eq!(f.congestion, Some(Congestion::Cubic));
        assert_eq!(f.window, Some(64 << 20));
        assert_eq!(f.log_format, Some(LogFormat::Json));
        assert_eq!(f.keep_free, Some(2 << 30));
        assert_eq!((f.handshake_rate, f.max_handshakes), (Some(5), Some(64)));
        let s = ServeSettings::merge(ServeFlags::default(), Some((p.clone(), f))).unwrap();
        assert_eq!(
            (s.keep_free, s.handshake_rate, s.max_handshakes),
            (2 << 30, 5, 64)
        );
        let p = write(d.path(), "keep_free = 1048576\n");
        assert_eq!(FileConfig::load(&p).unwrap().keep_free, Some(1 << 20));
        // A plain number of bytes is a window too.
        let p = write(d.path(), "window = 8388608\n");
        assert_eq!(FileConfig::load(&p).unwrap().window, Some(8 << 20));
    }

    #[test]
    fn unknown_and_badly_typed_keys_are_errors_naming_the_key() {
        let d = tempfile::tempdir().unwrap();
        for (text, key) in [
            (
                "listen = \"0.0.0.0:7400\"\nmax_transfer = 4\n",
                "max_transfer",
            ),
            ("max_transfers = \"four\"\n", "max_transfers"),
            ("listen = \"nowhere\"\n", "listen"),
            ("congestion = \"fast\"\n", "congestion"),
            ("window = \"1G\"\n", "window"),
            ("log_format = \"xml\"\n", "log_format"),
            ("keep_free = \"lots\"\n", "keep_free"),
            ("handshake_rate = -1\n", "handshake_rate"),
            ("identity = []\n", "identity"),
            ("identity = 7\n", "identity"),
            ("identity = [\"a.key\", 7]\n", "identity"),
        ] {
            let p = write(d.path(), text);
            let err = FileConfig::load(&p).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?}: {err}");
            assert!(err.contains("shardrecv.toml"), "{err}");
        }
    }

    #[test]
    fn flags_override_the_file_and_missing_settings_say_how_to_give_them() {
        let file = FileConfig {
            listen: Some("0.0.0.0:7400".parse().unwrap()),
            root: Some("/srv/a".into()),
            identity: Some(vec!["/k".into()]),
            allow: Some("/allow".into()),
            max_transfers: Some(4),
            ..FileConfig::default()
        };
        let flags = ServeFlags {
            root: Some("/srv/b".into()),
            max_transfers: Some(8),
            ..ServeFlags::default()
        };
        let s = ServeSettings::merge(flags, Some(("/etc/x.toml".into(), file.clone()))).unwrap();
        assert_eq!(s.root, PathBuf::from("/srv/b"));
        assert_eq!(s.max_transfers, 8);
        assert_eq!(s.listen, "0.0.0.0:7400".parse().unwrap());
        assert_eq!(s.max_queued, DEFAULT_MAX_QUEUED);
        assert!(!s.allow_from_flag);
        let err = ServeSettings::merge(
            ServeFlags::default(),
            Some((
                "/etc/x.toml".into(),
                FileConfig {
                    allow: None,
                    ..file
                },
            )),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--allow") && err.contains("`allow` in /etc/x.toml"),
            "{err}"
        );
    }

    #[test]
    fn identity_takes_one_path_or_a_list_and_a_reload_rereads_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "listen = \"127.0.0.1:0\"\nroot = \"/r\"\nidentity = [\"old.key\", \"/etc/new.key\"]\nallow = \"a\"\n",
        );
        let f = FileConfig::load(&p).unwrap();
        assert_eq!(
            f.identity,
            Some(vec![
                d.path().join("old.key"),
                PathBuf::from("/etc/new.key")
            ])
        );
        let s = ServeSettings::merge(ServeFlags::default(), Some((p.clone(), f))).unwrap();
        assert_eq!(s.identity.len(), 2);
        assert!(!s.identity_from_flag && !s.allow_from_flag);
        // The operator switches the primary and reloads: the file as it is now counts.
        std::fs::write(
            &p,
            "listen = \"127.0.0.1:0\"\nroot = \"/r\"\nidentity = [\"/etc/new.key\", \"old.key\"]\nallow = \"b\"\n",
        )
        .unwrap();
        let now = s.reload_paths_now().unwrap();
        assert_eq!(
            now.identities,
            vec![PathBuf::from("/etc/new.key"), d.path().join("old.key")]
        );
        assert_eq!(now.allow, d.path().join("b"));
        // A file that lost `identity`, or that no longer parses, reloads nothing.
        std::fs::write(&p, "allow = \"b\"\n").unwrap();
        let err = s.reload_paths_now().unwrap_err().to_string();
        assert!(err.contains("`identity` was removed"), "{err}");
        std::fs::write(&p, "identity = [\n").unwrap();
        assert!(s.reload_paths_now().is_err());
        // Flags win over the file, at the start and at every reload.
        let flags = ServeFlags {
            identity: vec!["/flag-a.key".into(), "/flag-b.key".into()],
            allow: Some("/flag-allow".into()),
            ..ServeFlags::default()
        };
        std::fs::write(
            &p,
            "listen = \"127.0.0.1:0\"\nroot = \"/r\"\nidentity = \"x.key\"\n",
        )
        .unwrap();
        let s =
            ServeSettings::merge(flags, Some((p.clone(), FileConfig::load(&p).unwrap()))).unwrap();
        assert!(s.identity_from_flag);
        std::fs::write(&p, "garbage").unwrap();
        let now = s.reload_paths_now().unwrap();
        assert_eq!(
            now.identities,
            vec![PathBuf::from("/flag-a.key"), PathBuf::from("/flag-b.key")]
        );
        assert_eq!(now.allow, PathBuf::from("/flag-allow"));
    }
}
