//! systemd's readiness protocol (`sd_notify`), for `shardrecv serve` under a `Type=notify`
//! unit: `READY=1` once it listens, `RELOADING=1` … `READY=1` around a SIGHUP reload of the
//! allow-list, `STOPPING=1` when it begins to shut down.
//!
//! The protocol is one datagram of `KEY=VALUE` lines to the unix socket named by
//! `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace); without the variable it
//! is a no-op. A few lines of `std` rather than a crate: nothing else is needed (no fd
//! passing, no watchdog), and the test listens on a unix datagram socket of its own.

use std::io;
use std::os::unix::net::UnixDatagram;

/// The environment variable systemd sets for a `Type=notify` service.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` (newline-separated `KEY=VALUE` lines) to `$NOTIFY_SOCKET`. Returns false
/// when the variable is not set (not run by systemd, or not `Type=notify`).
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(target) = std::env::var_os(NOTIFY_SOCKET) else {
        return Ok(false);
    };
    let target = target.to_string_lossy().into_owned();
    send_to(&target, state)?;
    Ok(true)
}

/// Sends `state` to the socket `target` (`/path` or `@abstract`).
pub fn send_to(target: &str, state: &str) -> io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    let sent = if let Some(name) = target.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        socket.send_to_addr(state.as_bytes(), &addr)?
    } else if target.starts_with('/') {
        socket.send_to(state.as_bytes(), target)?
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{NOTIFY_SOCKET}={target:?} is neither an absolute path nor @abstract"),
        ));
    };
    if sent != state.len() {
        return Err(io::Error::other("short datagram write"));
    }
    Ok(())
}

/// `RELOADING=1` with the `MONOTONIC_USEC` systemd wants alongside it (`Type=notify-reload`).
pub fn reloading_message() -> String {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let usec = (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000;
    format!("RELOADING=1\nMONOTONIC_USEC={usec}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_reaches_a_path_and_an_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        send_to(path.to_str().unwrap(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("shardmove-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let abstract_listener = UnixDatagram::bind_addr(&addr).unwrap();
        send_to(&format!("@{name}"), "STOPPING=1").unwrap();
        let n = abstract_listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");

        assert!(send_to("relative.sock", "READY=1").is_err());
        assert!(reloading_message().starts_with("RELOADING=1\nMONOTONIC_USEC="));
    }
}
