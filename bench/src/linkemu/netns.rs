//! The two network namespaces of an emulated link and their TUN devices.
//!
//! Each namespace gets `lo` and one TUN device, `lemu0`, configured point to point: side A is
//! [`ADDR_A`] with peer [`ADDR_B`], side B the reverse. A packet side A sends to B leaves
//! through A's TUN, which the forwarder reads, and enters B's stack when the forwarder
//! writes it to B's TUN: no address rewriting, no routes, no bridge. The addresses exist only
//! inside these namespaces, so nothing of the machine's own network is touched.
//!
//! A TUN device belongs to the namespace of the thread that created it, so [`open_tun`]
//! does its work on a short-lived thread that first `setns`es into the namespace; the file
//! descriptor it returns keeps working from any thread. [`in_namespace`] does the same for
//! callers (tests, the ceiling measurement) that need a socket inside a namespace.
//!
//! [`remove`] kills whatever still runs inside a namespace (a namespace outlives
//! `ip netns del` while a process holds it) and deletes it; it is idempotent, because the
//! main process and its watchdog may both call it.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};

use super::forward::Framing;
use super::offload::{TUN_OFFLOADS, VNET_HDR_LEN};

/// Side A's address (a /30 that exists only inside the two namespaces).
pub const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 250, 88, 1);
/// Side B's address.
pub const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 250, 88, 2);
/// Name of the TUN device inside each namespace.
pub const TUN_NAME: &str = "lemu0";
/// MTU of the TUN devices: an Ethernet path.
pub const MTU: u32 = 1500;

/// Runs `ip ARGS`, turning a failure into an error that names the step.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!(
                "cannot run `ip {}` (is iproute2 installed?)",
                args.join(" ")
            )
        })?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Creates namespace `name` with `lo` up.
pub fn create(name: &str) -> Result<()> {
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])
}

/// Whether `ip netns` knows `name`.
pub fn exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

/// Kills every process inside `name`, then deletes it. Missing namespaces are fine.
pub fn remove(name: &str) {
    if !exists(name) {
        return;
    }
    if let Ok(out) = Command::new("ip")
        .args(["netns", "pids", name])
        .stderr(Stdio::null())
        .output()
    {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<libc::pid_t>() {
                // SAFETY: kill(2) with a pid read from the kernel; no memory involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _ = ip(&["netns", "del", name]);
}

/// Runs `f` on a new thread that lives in namespace `name`, and returns its result.
pub fn in_namespace<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = std::path::Path::new("/run/netns").join(name);
    let ns = File::open(&path).with_context(|| format!("open {}", path.display()))?;
    std::thread::spawn(move || -> Result<T> {
        // SAFETY: setns on a valid namespace fd affects only this thread.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns");
        }
        f()
    })
    .join()
    .map_err(|_| anyhow!("thread inside namespace panicked"))?
}

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Opens a TUN device called [`TUN_NAME`] inside namespace `ns` and configures it as side
/// `local` talking to `peer`. The returned descriptor is non-blocking. With
/// [`Framing::Offload`] every packet carries a `virtio_net_hdr` and the device accepts
/// TCP and UDP super-packets ([`super::offload`]).
pub fn open_tun(ns: &str, local: Ipv4Addr, peer: Ipv4Addr, framing: Framing) -> Result<OwnedFd> {
    let fd = in_namespace(ns, move || {
        // SAFETY: open(2) with a NUL-terminated path.
        let raw = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("open /dev/net/tun");
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: match framing {
                Framing::Plain => libc::IFF_TUN | libc::IFF_NO_PI,
                Framing::Offload => libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR,
            } as libc::c_short,
            _pad: [0; 22],
        };
        for (dst, src) in req.name.iter_mut().zip(TUN_NAME.bytes()) {
            *dst = src as libc::c_char;
        }
        // SAFETY: TUNSETIFF reads and writes an ifreq-sized struct we own.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(std::io::Error::last_os_error()).context("TUNSETIFF");
        }
        if framing == Framing::Offload {
            let hdr_len = VNET_HDR_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads an int we own; TUNSETOFFLOAD takes its argument
            // by value.
            if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
                return Err(std::io::Error::last_os_error()).context("TUNSETVNETHDRSZ");
            }
            // SAFETY: as above.
            if unsafe {
                libc::ioctl(
                    fd.as_raw_fd(),
                    libc::TUNSETOFFLOAD,
                    TUN_OFFLOADS as libc::c_ulong,
                )
            } < 0
            {
                return Err(std::io::Error::last_os_error())
                    .context("TUNSETOFFLOAD (segmentation offload; --offload off avoids it)");
            }
        }
        // Router solicitations and other IPv6 chatter would only add noise to the link.
        for f in ["all", "default"] {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{f}/disable_ipv6"), "1");
        }
        Ok(fd)
    })?;
    let local_s = local.to_string();
    let peer_s = format!("{peer}/32");
    ip(&[
        "-n", ns, "addr", "add", &local_s, "peer", &peer_s, "dev", TUN_NAME,
    ])?;
    let mtu = MTU.to_string();
    ip(&[
        "-n",
        ns,
        "link",
        "set",
        TUN_NAME,
        "mtu",
        &mtu,
        "txqueuelen",
        "1000",
        "up",
    ])?;
    Ok(fd)
}
