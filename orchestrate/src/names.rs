//! Validation of everything an operator types: names, property keys and values, upstream
//! URLs. Pure functions, so bad input is refused before any transaction or host command
//! starts ("changes nothing").
//!
//! Names end up in paths on shard hosts (`ROOT/INSTANCE/REPO.git`), in pid file names and in
//! shell command templates, so they are restricted to a conservative alphabet.

use crate::error::{Error, Result};

/// Longest accepted name (services, devices, instances, repositories).
pub const MAX_NAME_LEN: usize = 64;

/// Checks a name: 1-64 of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn check_name(kind: &str, name: &str) -> Result<()> {
    let invalid = |reason: &str| Err(Error::invalid(format!("{kind} name {name:?}"), reason));
    if name.is_empty() {
        return invalid("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return invalid("longer than 64 characters");
    }
    if name.starts_with('.') || name.starts_with('-') {
        return invalid("must not start with '.' or '-'");
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return invalid(&format!(
            "character {bad:?} not allowed (use letters, digits, '.', '_', '-')"
        ));
    }
    Ok(())
}

/// Property keys with a meaning to the orchestrator.
pub const PROP_CLOSED: &str = "closed";
/// See [`PROP_CLOSED`].
pub const PROP_NO_DAEMONS: &str = "no-daemons";

/// Checks a binding property and normalises its value: `closed` and `no-daemons` take
/// `true`/`false` (also `1`/`0`, `yes`/`no`, normalised to `true`/`false`); other keys are
/// free-form (`[a-z0-9][a-z0-9._-]*`, value up to 1024 characters, no control characters).
pub fn check_property(key: &str, value: &str) -> Result<String> {
    let key_ok = !key.is_empty()
        && key.len() <= MAX_NAME_LEN
        && key.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if !key_ok {
        return Err(Error::invalid(
            format!("property key {key:?}"),
            "use lowercase letters, digits, '.', '_', '-'",
        ));
    }
    if key == PROP_CLOSED || key == PROP_NO_DAEMONS {
        return parse_flag(value).map(|b| b.to_string()).ok_or_else(|| {
            Error::invalid(
                format!("value {value:?} for {key}"),
                "expected true or false",
            )
        });
    }
    if value.len() > 1024 || value.chars().any(char::is_control) {
        return Err(Error::invalid(
            format!("value for {key}"),
            "at most 1024 characters, no control characters",
        ));
    }
    Ok(value.to_string())
}

/// Reads a boolean flag value as stored or typed.
pub fn parse_flag(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Checks the upstream URL of an observed repository: `https://`, `http://`, `ssh://`,
/// `git://` or `file://` followed by a non-empty remainder, without whitespace or control
/// characters (the URL is passed to `git fetch` as one argument, never through a shell).
pub fn check_upstream_url(url: &str) -> Result<()> {
    let invalid = |reason: &str| Err(Error::invalid(format!("upstream url {url:?}"), reason));
    let Some((scheme, rest)) = url.split_once("://") else {
        return invalid("expected SCHEME://..., one of https, http, ssh, git, file");
    };
    if !matches!(scheme, "https" | "http" | "ssh" | "git" | "file") {
        return invalid(&format!(
            "scheme {scheme:?} not supported (https, http, ssh, git, file)"
        ));
    }
    if rest.is_empty() || rest == "/" {
        return invalid("nothing after the scheme");
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return invalid("whitespace or control characters");
    }
    if scheme != "file" && rest.starts_with('/') {
        return invalid("missing host");
    }
    if scheme == "file" && !rest.starts_with('/') {
        return invalid("file urls need an absolute path (file:///...)");
    }
    Ok(())
}

/// Longest maintenance message.
pub const MAX_MESSAGE_LEN: usize = 1000;

/// Checks a maintenance message (what a refused push shows): 1-1000 characters, not only
/// whitespace, no NUL (it is written into a hook file on the shard hosts).
pub fn check_maintenance_message(message: &str) -> Result<()> {
    if message.trim().is_empty() || message.len() > MAX_MESSAGE_LEN || message.contains('\0') {
        return Err(Error::invalid(
            "maintenance message",
            format!("must be 1-{MAX_MESSAGE_LEN} characters"),
        ));
    }
    Ok(())
}

/// Checks a device root: an absolute path without `..`, whitespace or control characters.
pub fn check_root(root: &str) -> Result<()> {
    let invalid = |reason: &str| Err(Error::invalid(format!("device root {root:?}"), reason));
    if !root.starts_with('/') {
        return invalid("must be an absolute path");
    }
    if root.split('/').any(|part| part == "..") {
        return invalid("must not contain '..'");
    }
    if root.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return invalid("whitespace or control characters");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("service", "repo001").is_ok());
        assert!(check_name("service", "a.b_c-d").is_ok());
        for bad in ["", ".x", "-x", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(check_name("service", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn properties() {
        assert_eq!(check_property("closed", "YES").unwrap(), "true");
        assert_eq!(check_property("no-daemons", "0").unwrap(), "false");
        assert!(check_property("closed", "maybe").is_err());
        assert!(check_property("Closed", "true").is_err());
        assert_eq!(check_property("weight", "3").unwrap(), "3");
        assert!(check_property("note", "a\nb").is_err());
    }

    #[test]
    fn maintenance_messages() {
        assert!(check_maintenance_message("moving to repo002").is_ok());
        assert!(check_maintenance_message(&"x".repeat(MAX_MESSAGE_LEN)).is_ok());
        for bad in ["", "  \n", "a\0b", &"x".repeat(MAX_MESSAGE_LEN + 1)] {
            assert!(check_maintenance_message(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn urls() {
        for ok in [
            "https://example.org/a.git",
            "file:///srv/x.git",
            "ssh://git@h/x",
        ] {
            assert!(check_upstream_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "example.org/a",
            "ftp://x/y",
            "https://",
            "https:///x",
            "file://rel",
            "https://a b",
        ] {
            assert!(check_upstream_url(bad).is_err(), "{bad}");
        }
    }
}
