//! Integration tests of the bench crate: `linkemu` as a real process between real namespaces.

mod util;

use std::io::BufRead;
use std::time::Duration;

use bench::linkemu::probe;
use util::{namespaces_gone, prefix, root_or_skip, LinkemuProcess};

#[test]
fn linkemu_applies_delay_loss_and_cuts_and_sigkill_removes_its_namespaces() {
    if !root_or_skip("linkemu_applies_delay_loss_and_cuts_and_sigkill_removes_its_namespaces") {
        return;
    }
    let p = prefix("k");
    let emu = LinkemuProcess::start(&p, &["--delay", "20ms", "--loss", "10%"]);
    let echo = emu.echo(400);
    // 20 ms each way; 10% per direction loses 1 - 0.9^2 = 19% of round trips.
    assert!(echo.min_rtt_ms >= 40.0, "{echo:?}");
    assert!((0.08..0.35).contains(&echo.loss), "{echo:?}");

    // SIGUSR1 cuts the link: nothing comes back. SIGUSR2 restores it.
    emu.signal(libc::SIGUSR1);
    std::thread::sleep(Duration::from_millis(100));
    let cut = emu.echo(50);
    assert_eq!(cut.received, 0, "{cut:?}");
    emu.signal(libc::SIGUSR2);
    std::thread::sleep(Duration::from_millis(100));
    let back = emu.echo(50);
    assert!(back.received > 0, "{back:?}");

    let (a, b) = (emu.ns_a.clone(), emu.ns_b.clone());
    emu.signal(libc::SIGKILL);
    assert!(
        namespaces_gone(&[&a, &b], Duration::from_secs(10)),
        "namespaces {a} {b} left behind after SIGKILL"
    );
}

#[test]
fn linkemu_rate_caps_a_tcp_stream_and_sigterm_reports_and_cleans_up() {
    if !root_or_skip("linkemu_rate_caps_a_tcp_stream_and_sigterm_reports_and_cleans_up") {
        return;
    }
    let p = prefix("t");
    let mut emu = LinkemuProcess::start(&p, &["--rate", "20M", "--delay", "5ms"]);
    let stream = probe::tcp_stream(&emu.ns_a, &emu.ns_b, emu.addr_b, Duration::from_secs(2))
        .expect("stream");
    // The line can never carry more than its rate (plus the headers TCP does not count).
    assert!(stream.mbit_per_s <= 20.5, "{stream:?}");
    assert!(stream.bytes > 0, "{stream:?}");
    emu.signal(libc::SIGTERM);
    let mut line = String::new();
    emu.stdout.read_line(&mut line).expect("stats line");
    let stats: serde_json::Value = serde_json::from_str(&line).expect("stats JSON");
    assert_eq!(stats["event"], "stats");
    let delivered = stats["stats"]["a_to_b"]["bytes_out"]
        .as_u64()
        .expect("bytes_out");
    assert!(delivered >= stream.bytes, "{delivered} < {}", stream.bytes);
    let status = emu.child.wait().expect("wait");
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    assert!(namespaces_gone(
        &[&emu.ns_a, &emu.ns_b],
        Duration::from_secs(1)
    ));
}

#[test]
fn linkemu_sigint_from_a_background_shell_job_still_cleans_up() {
    // Ctrl-C's signal, sent to a linkemu that a script started in the background (where the
    // shell sets SIGINT to "ignore"): it must still end the link and remove the namespaces.
    if !root_or_skip("linkemu_sigint_from_a_background_shell_job_still_cleans_up") {
        return;
    }
    let p = prefix("i");
    let script = format!(
        "{} --name {p} --rate 10M >/dev/null 2>&1 & pid=$!; \
         for i in $(seq 100); do [ -e /run/netns/{p}-b ] && break; sleep 0.05; done; \
         sleep 0.3; kill -INT $pid; \
         for i in $(seq 100); do kill -0 $pid 2>/dev/null || break; sleep 0.05; done; \
         if kill -0 $pid 2>/dev/null; then kill -KILL $pid; wait $pid; exit 99; fi; wait $pid",
        env!("CARGO_BIN_EXE_linkemu")
    );
    let status = std::process::Command::new("sh")
        .args(["-c", &script])
        .status()
        .expect("run sh");
    // 99: linkemu ignored SIGINT and had to be killed.
    assert_eq!(status.code(), Some(128 + libc::SIGINT));
    let a = format!("{p}-a");
    let b = format!("{p}-b");
    assert!(namespaces_gone(&[&a, &b], Duration::from_secs(1)));
}

#[test]
fn linkemu_runs_a_command_and_passes_its_exit_code() {
    if !root_or_skip("linkemu_runs_a_command_and_passes_its_exit_code") {
        return;
    }
    let p = prefix("c");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_linkemu"))
        .args(["--name", &p, "--rate", "100M", "--delay", "1ms", "--"])
        .args([
            "sh",
            "-c",
            "test -e /run/netns/$LINKEMU_NS_A && test -e /run/netns/$LINKEMU_NS_B \
             && test \"$LINKEMU_ADDR_B\" = 10.250.88.2 && exit 7",
        ])
        .output()
        .expect("run linkemu");
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let a = format!("{p}-a");
    let b = format!("{p}-b");
    assert!(namespaces_gone(&[&a, &b], Duration::from_secs(1)));
}

#[test]
fn linkemu_refuses_bad_values_with_a_reason() {
    for (args, needle) in [
        (vec!["--rate", "10X"], "unknown rate unit"),
        (vec!["--delay", "25"], "give a unit"),
        (vec!["--loss", "150%"], "between 0% and 100%"),
        (vec!["--cut", "10s"], "START+LENGTH"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_linkemu"))
            .args(&args)
            .output()
            .expect("run linkemu");
        assert!(!out.status.success(), "{args:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
