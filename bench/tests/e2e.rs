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

/// `setsockopt(fd, SOL_UDP, opt, value)` for an int option, panicking with the option's name.
fn set_udp_option(socket: &std::net::UdpSocket, opt: libc::c_int, value: libc::c_int, name: &str) {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt on a socket we own, reading an int we own.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            opt,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "{name}: {}", std::io::Error::last_os_error());
}

#[test]
fn linkemu_offload_judges_each_wire_packet_of_a_super_packet_and_delivers_runs_coalesced() {
    // A sender's UDP GSO batch crosses the TUN device whole; linkemu must still lose single
    // wire packets (20% here) and hand the receiver the survivors intact, coalesced in runs
    // (what GRO gives a real receiver). Then a TCP stream (TSO super-packets) crosses the
    // same loss byte-exact.
    const UDP_SEGMENT: libc::c_int = 103;
    const UDP_GRO: libc::c_int = 104;
    const SEGMENT: usize = 1200;
    const PER_BATCH: usize = 10;
    const BATCHES: u32 = 300;
    if !root_or_skip(
        "linkemu_offload_judges_each_wire_packet_of_a_super_packet_and_delivers_runs_coalesced",
    ) {
        return;
    }
    let p = prefix("o");
    let mut emu = LinkemuProcess::start(&p, &["--loss", "20%", "--delay", "1ms"]);
    let addr_b = emu.addr_b;
    let rx = bench::linkemu::netns::in_namespace(&emu.ns_b, move || {
        Ok(std::net::UdpSocket::bind((addr_b, 0))?)
    })
    .expect("receiving socket in B");
    set_udp_option(&rx, UDP_GRO, 1, "UDP_GRO");
    rx.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let target = rx.local_addr().expect("address");
    let tx = bench::linkemu::netns::in_namespace(&emu.ns_a, || {
        Ok(std::net::UdpSocket::bind("0.0.0.0:0")?)
    })
    .expect("sending socket in A");
    set_udp_option(&tx, UDP_SEGMENT, SEGMENT as libc::c_int, "UDP_SEGMENT");
    let receiver = std::thread::spawn(move || {
        let mut seen = std::collections::HashSet::new();
        let mut largest = 0usize;
        let mut buf = vec![0u8; 65_536];
        while let Ok(n) = rx.recv(&mut buf) {
            largest = largest.max(n);
            assert_eq!(
                n % SEGMENT,
                0,
                "a datagram of {n} bytes is not whole segments"
            );
            for seg in buf[..n].chunks(SEGMENT) {
                let id = u32::from_le_bytes(seg[..4].try_into().expect("4 bytes"));
                let fill = id as u8;
                assert!(seg[4..].iter().all(|b| *b == fill), "segment {id} damaged");
                assert!(seen.insert(id), "segment {id} delivered twice");
            }
        }
        (seen, largest)
    });
    let mut batch = vec![0u8; SEGMENT * PER_BATCH];
    for b in 0..BATCHES {
        for (i, seg) in batch.chunks_mut(SEGMENT).enumerate() {
            let id = b * PER_BATCH as u32 + i as u32;
            seg[..4].copy_from_slice(&id.to_le_bytes());
            seg[4..].fill(id as u8);
        }
        tx.send_to(&batch, target).expect("send a GSO batch");
        // ~12 MB/s: the receiver's socket buffer must not be what loses segments.
        std::thread::sleep(Duration::from_millis(1));
    }
    let (seen, largest) = receiver.join().expect("receiver");
    let sent = BATCHES as usize * PER_BATCH;
    let delivered = seen.len() as f64 / sent as f64;
    assert!(
        (0.72..0.88).contains(&delivered),
        "{} of {sent} segments arrived through 20% loss",
        seen.len()
    );
    assert!(
        largest >= 2 * SEGMENT,
        "no coalesced run reached the receiver (largest datagram {largest} bytes)"
    );

    // TCP: a known pattern, checked byte for byte, through the same loss.
    let stream_b = std::net::SocketAddrV4::new(addr_b, 5301);
    let listener = bench::linkemu::netns::in_namespace(&emu.ns_b, move || {
        Ok(std::net::TcpListener::bind(stream_b)?)
    })
    .expect("listener in B");
    const TCP_BYTES: usize = 4 << 20;
    let pattern = |i: usize| (i % 251) as u8;
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let (mut conn, _) = listener.accept().expect("accept");
        let mut got = Vec::new();
        conn.read_to_end(&mut got).expect("read");
        got
    });
    let mut conn = bench::linkemu::netns::in_namespace(&emu.ns_a, move || {
        Ok(std::net::TcpStream::connect(stream_b)?)
    })
    .expect("connect from A");
    let data: Vec<u8> = (0..TCP_BYTES).map(pattern).collect();
    std::io::Write::write_all(&mut conn, &data).expect("write");
    drop(conn);
    let got = reader.join().expect("reader");
    assert_eq!(got.len(), TCP_BYTES);
    assert!(got == data, "the TCP stream arrived altered");

    emu.signal(libc::SIGTERM);
    let mut line = String::new();
    emu.stdout.read_line(&mut line).expect("stats line");
    let stats: serde_json::Value = serde_json::from_str(&line).expect("stats JSON");
    let a_to_b = &stats["stats"]["a_to_b"];
    assert_eq!(a_to_b["write_errors"], 0, "{stats}");
    assert!(
        a_to_b["lost_random"].as_u64().expect("lost") >= (sent as u64) / 10,
        "losses are counted per wire packet: {stats}"
    );
}
