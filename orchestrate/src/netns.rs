//! Two network namespaces of this machine joined by a veth pair: the demo's two shard hosts.
//!
//! [`NetnsPair::create`] makes `PREFIX-a` and `PREFIX-b`, each with `lo` up and one end of a
//! veth pair addressed from a private /30 ([`ADDR_A`], [`ADDR_B`]). The veth is created inside
//! `PREFIX-a` with its peer placed straight into `PREFIX-b`, and the addresses exist only
//! inside the namespaces, so no interface, address or route of the machine's own namespace is
//! ever touched, and two pairs never clash. Any failure removes what was already created, and
//! the error says which `ip` step failed (that is how the demo learns namespaces are not
//! available here, e.g. in a container without the needed capabilities).
//!
//! [`NetnsPair::teardown`] first kills every process still inside each namespace (a namespace
//! outlives `ip netns del` while a process holds it, and with it the veth), then deletes the
//! veth and the namespaces. It also runs on drop, so an error return or a panic cannot leave
//! them behind. Everything here is blocking `ip` invocations (a few milliseconds each); async
//! callers run it through `spawn_blocking`.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::names;

/// Address of the `a` side's veth end (a /30 that exists only inside the two namespaces).
pub const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 250, 77, 1);
/// Address of the `b` side's veth end.
pub const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 250, 77, 2);
const PREFIX_LEN: u8 = 30;
/// Interface names inside the namespaces (they never exist in the machine's own namespace).
const VETH_A: &str = "shardmove-a";
const VETH_B: &str = "shardmove-b";

/// One side of the pair.
#[derive(Debug, Clone)]
pub struct Side {
    /// Namespace name (as `ip netns` knows it).
    pub name: String,
    /// This side's veth address.
    pub addr: Ipv4Addr,
}

/// Two linked namespaces, removed by [`NetnsPair::teardown`] or on drop.
#[derive(Debug)]
pub struct NetnsPair {
    pub a: Side,
    pub b: Side,
    /// Namespaces created and not yet deleted.
    live: Vec<String>,
}

impl NetnsPair {
    /// Creates `PREFIX-a` and `PREFIX-b` linked by a veth pair; needs root and iproute2.
    pub fn create(prefix: &str) -> Result<NetnsPair> {
        let a = format!("{prefix}-a");
        let b = format!("{prefix}-b");
        names::check_name("network namespace", &a)?;
        names::check_name("network namespace", &b)?;
        let mut pair = NetnsPair {
            a: Side {
                name: a.clone(),
                addr: ADDR_A,
            },
            b: Side {
                name: b.clone(),
                addr: ADDR_B,
            },
            live: Vec::new(),
        };
        // On any error `pair` is dropped, which removes what exists so far.
        for name in [&a, &b] {
            ip(&["netns", "add", name])?;
            pair.live.push(name.clone());
        }
        ip(&[
            "-n", &a, "link", "add", VETH_A, "type", "veth", "peer", "name", VETH_B, "netns", &b,
        ])?;
        for (ns, dev, addr) in [(&a, VETH_A, ADDR_A), (&b, VETH_B, ADDR_B)] {
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/{PREFIX_LEN}"),
                "dev",
                dev,
            ])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        // `ip netns exec` also needs a private mount namespace and a fresh /sys: probe that
        // path too, since it is the one every command of the demo takes.
        for ns in [&a, &b] {
            ip(&["netns", "exec", ns, "true"])?;
        }
        Ok(pair)
    }

    /// Kills the processes left inside the namespaces, then deletes the veth and both
    /// namespaces. Idempotent; reports the first failure after trying everything.
    pub fn teardown(&mut self) -> Result<()> {
        let mut first_error = None;
        for name in std::mem::take(&mut self.live) {
            if let Err(e) = remove_namespace(&name) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("shardmove: warning: removing network namespaces: {e}");
        }
    }
}

/// Kills every process in namespace `name` (waiting up to 10 s for them to go), removes its
/// interfaces other than `lo` and deletes the namespace.
fn remove_namespace(name: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = pids_in(name)?;
        if pids.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            return Err(Error::Refused(format!(
                "processes {pids:?} in network namespace {name} survived SIGKILL; namespace kept"
            )));
        }
        for pid in pids {
            // SAFETY: kill(2) has no memory effects; the pid was just read from the namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Deleting one end removes its peer as well; the other side then finds nothing to delete.
    for dev in [VETH_A, VETH_B] {
        let _ = ip_quiet(&["-n", name, "link", "del", dev]);
    }
    ip(&["netns", "del", name])
}

/// Pids of the processes inside namespace `name` (none when it no longer exists).
fn pids_in(name: &str) -> Result<Vec<i32>> {
    let out = ip_output(&["netns", "pids", name])?;
    if !out.status.success() {
        // Gone already (deleted by hand, or never created): nothing to kill.
        if !list()?.iter().any(|n| n == name) {
            return Ok(Vec::new());
        }
        return Err(ip_error(&["netns", "pids", name], &out));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|&p: &i32| p > 0 && p != std::process::id() as i32)
        .collect())
}

/// Names of the network namespaces `ip netns list` shows.
pub fn list() -> Result<Vec<String>> {
    let out = ip_output(&["netns", "list"])?;
    if !out.status.success() {
        return Err(ip_error(&["netns", "list"], &out));
    }
    // Lines look like "NAME" or "NAME (id: 3)".
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Whether this process runs as root (namespaces need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

fn ip_output(args: &[&str]) -> Result<std::process::Output> {
    Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::HostCommand {
            host: "localhost".into(),
            command: format!("ip {}", args.join(" ")),
            status: "not started".into(),
            stderr: if e.kind() == std::io::ErrorKind::NotFound {
                "ip (iproute2) is not installed".into()
            } else {
                e.to_string()
            },
        })
}

fn ip_error(args: &[&str], out: &std::process::Output) -> Error {
    Error::HostCommand {
        host: "localhost".into(),
        command: format!("ip {}", args.join(" ")),
        status: format!("{}", out.status),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = ip_output(args)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ip_error(args, &out))
    }
}

fn ip_quiet(args: &[&str]) -> Result<()> {
    Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(drop)
        .map_err(|e| Error::Io {
            context: "running",
            path: "ip".into(),
            source: e,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As root with working namespaces: a pair comes up linked and leaves nothing behind,
    /// even with a process still running inside.
    #[test]
    fn pair_is_created_linked_and_removed() {
        if !is_root() {
            println!("skipped: not root");
            return;
        }
        let prefix = format!("shardmove-unit-{}", std::process::id());
        let mut pair = match NetnsPair::create(&prefix) {
            Ok(pair) => pair,
            Err(e) => {
                println!("skipped: network namespaces unavailable: {e}");
                return;
            }
        };
        let names = list().expect("ip netns list");
        assert!(names.contains(&pair.a.name) && names.contains(&pair.b.name));
        // a reaches b's address through its veth end.
        let route = Command::new("ip")
            .args(["-n", &pair.a.name, "route", "get", &ADDR_B.to_string()])
            .output()
            .expect("ip route get");
        assert!(
            String::from_utf8_lossy(&route.stdout).contains(VETH_A),
            "{route:?}"
        );
        let sleeper = Command::new("ip")
            .args(["netns", "exec", &pair.b.name, "sleep", "600"])
            .spawn()
            .expect("sleep in namespace");
        pair.teardown().expect("teardown");
        let names = list().expect("ip netns list");
        assert!(!names.iter().any(|n| n.starts_with(&prefix)), "{names:?}");
        let mut sleeper = sleeper;
        let status = sleeper.wait().expect("wait");
        assert!(!status.success(), "the process inside was killed");
    }

    #[test]
    fn bad_prefix_is_refused_before_any_ip_command() {
        for bad in ["", "../x", "a b", "-x", "a/b"] {
            assert!(NetnsPair::create(bad).is_err(), "{bad:?}");
        }
    }
}
