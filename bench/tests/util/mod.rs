//! Helpers for the bench crate's integration tests: root check and a `linkemu` process.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether we may create namespaces; prints why a test is skipped otherwise.
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipping {test}: needs root (network namespaces and TUN devices)");
    }
    root
}

/// A `linkemu` process started with `--json`, and the namespaces its ready line named.
pub struct LinkemuProcess {
    pub child: Child,
    pub stdout: BufReader<ChildStdout>,
    pub ns_a: String,
    pub ns_b: String,
    pub addr_b: std::net::Ipv4Addr,
}

impl LinkemuProcess {
    /// Starts `linkemu --json --name PREFIX ARGS...` and waits for its ready line.
    pub fn start(prefix: &str, args: &[&str]) -> LinkemuProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_linkemu"))
            .args(["--json", "--name", prefix])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start linkemu");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("ready line");
        let ready: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("ready line {line:?} is not JSON: {e}"));
        assert_eq!(ready["event"], "ready");
        LinkemuProcess {
            child,
            stdout,
            ns_a: ready["ns_a"].as_str().expect("ns_a").to_string(),
            ns_b: ready["ns_b"].as_str().expect("ns_b").to_string(),
            addr_b: ready["addr_b"]
                .as_str()
                .expect("addr_b")
                .parse()
                .expect("addr"),
        }
    }

    /// `count` UDP echo probes A -> B -> A, 2 ms apart, waiting 300 ms for stragglers.
    pub fn echo(&self, count: u64) -> bench::linkemu::probe::EchoResult {
        bench::linkemu::probe::udp_echo(
            &self.ns_a,
            &self.ns_b,
            self.addr_b,
            count,
            Duration::from_millis(2),
            Duration::from_millis(300),
        )
        .expect("UDP echo probe")
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }
}

impl Drop for LinkemuProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn namespace_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

/// Waits up to `limit` for both namespaces to disappear.
pub fn namespaces_gone(names: &[&str], limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if names.iter().all(|n| !namespace_exists(n)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A namespace prefix unique to this test process and `tag`.
pub fn prefix(tag: &str) -> String {
    format!("lt{}{tag}", std::process::id() % 100_000)
}
