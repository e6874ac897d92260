//! What an operator running `shardrecv` as a service relies on (issue 16): the config file,
//! JSON logs, systemd's readiness protocol, SIGHUP reloading the allow-list without
//! dropping transfers in flight, the `/metrics` endpoint, completions and man pages.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use transfer::identity::Identity;

use crate::util::*;

fn serve_flags(keys: &Keys, root: &Path) -> Vec<String> {
    vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--root".into(),
        root.to_str().unwrap().into(),
        "--identity".into(),
        keys.recv_key.to_str().unwrap().into(),
        "--allow".into(),
        keys.allow.to_str().unwrap().into(),
    ]
}

#[test]
fn config_file_alone_runs_the_daemon_and_flags_override_it() {
    let keys = Keys::new();
    let root_a = keys.path("root-a");
    let root_b = keys.path("root-b");
    let config = keys.path("shardrecv.toml");
    // `identity` relative to the file's directory.
    std::fs::write(
        &config,
        format!(
            "# shardrecv test config\nlisten = \"127.0.0.1:0\"\nroot = {}\nidentity = \"recv.key\"\n\
             allow = {}\nmax_transfers = 2\nlog_format = \"text\"\n",
            toml_path(&root_a),
            toml_path(&keys.allow)
        ),
    )
    .unwrap();
    let src = small_tree(keys.dir.path(), 300_000);
    let cfg = config.to_str().unwrap();

    let d = Served::start(keys.dir.path(), &["--config", cfg], &[]);
    assert_ok(&send(&keys, &src, &d.addr, "r1.git", &[]));
    assert_same_tree(&src, &root_a.join("r1.git"));
    drop(d);

    let d = Served::start(
        keys.dir.path(),
        &["--config", cfg, "--root", root_b.to_str().unwrap()],
        &[],
    );
    assert_ok(&send(&keys, &src, &d.addr, "r2.git", &[]));
    assert_same_tree(&src, &root_b.join("r2.git"));
    assert!(!root_a.join("r2.git").exists());
}

fn serve_output(args: &[&str]) -> Output {
    Command::new(shardrecv())
        .arg("serve")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn bad_config_keys_and_values_are_refused_naming_the_key() {
    let keys = Keys::new();
    let config = keys.path("bad.toml");
    for (text, key) in [
        (
            "listen = \"127.0.0.1:0\"\nlisten_addr = \"x\"\n",
            "listen_addr",
        ),
        ("max_transfers = \"many\"\n", "max_transfers"),
        ("max_queued = -1\n", "max_queued"),
    ] {
        std::fs::write(&config, text).unwrap();
        let out = serve_output(&["--config", config.to_str().unwrap()]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{text:?}: {err}");
        assert!(err.contains(key), "{text:?}: {err}");
        assert!(err.contains("bad.toml"), "{err}");
    }
    // A --config that does not exist is an error; the default path only counts if present.
    let out = serve_output(&["--config", keys.path("missing.toml").to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("missing.toml"), "{}", stderr(&out));
    // Nothing given at all: say what is missing and both ways to give it.
    std::fs::write(&config, "# empty\n").unwrap();
    let out = serve_output(&["--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--listen"), "{}", stderr(&out));
}

#[test]
fn log_format_json_makes_every_log_line_a_json_object() {
    let keys = Keys::new();
    let root = keys.path("root");
    let mut args = serve_flags(&keys, &root);
    args.extend(["--log-format".into(), "json".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Served::start(keys.dir.path(), &args, &[]);
    let src = small_tree(keys.dir.path(), 100_000);
    let out = send_cmd(&keys, &src, &d.addr, "r.git", &["--log-format", "json"])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert_ok(&out);
    let recv_log = d.log();
    drop(d);
    let check = |text: &str, who: &str| {
        let mut messages = 0;
        for line in text.lines().filter(|l| !l.is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{who}: not JSON ({e}): {line}"));
            if v.get("event").is_some() {
                continue; // shardsend --json's own events
            }
            assert!(
                v["level"].is_string() && v["timestamp"].is_string(),
                "{line}"
            );
            if v["message"].is_string() {
                messages += 1;
            }
        }
        assert!(messages > 0, "{who} logged nothing:\n{text}");
    };
    check(&recv_log, "shardrecv");
    assert!(recv_log.contains("\"installed\""), "{recv_log}");
    check(&stderr(&out), "shardsend");
}

#[test]
fn sd_notify_and_sighup_reload_of_the_allow_list_keep_transfers_in_flight() {
    let keys = Keys::new();
    let root = keys.path("root");
    let notify = NotifySocket::new(keys.dir.path());
    let new_key = keys.path("new-sender.key");
    let new_fp = Identity::generate(&new_key).unwrap().fingerprint;
    let mut args = serve_flags(&keys, &root);
    args.extend(["--log-format".into(), "json".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Served::start(
        keys.dir.path(),
        &args,
        &[("NOTIFY_SOCKET", notify.path.to_str().unwrap())],
    );
    assert_eq!(notify.next(), "READY=1");

    // The usual sender starts a transfer of ~3 s; the new one is not allowed yet.
    let big = small_tree(keys.dir.path(), 12 << 20);
    let mut in_flight = send_cmd(&keys, &big, &d.addr, "big.git", &["--bwlimit", "4M"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let small = small_tree(keys.dir.path(), 50_000);
    let refused = send_as(&keys, &new_key, &small, &d.addr, "new.git", &[])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(3), "{}", stderr(&refused));
    assert!(wait_for(Duration::from_secs(10), || journal_records(
        &root, "big.git"
    ) >= 1));

    // The operator swaps the usual sender for the new one and reloads.
    std::fs::write(&keys.allow, format!("{new_fp}  # the new sender\n")).unwrap();
    d.signal(libc::SIGHUP);
    assert!(notify.next().starts_with("RELOADING=1\nMONOTONIC_USEC="));
    assert_eq!(notify.next(), "READY=1");

    assert_ok(
        &send_as(&keys, &new_key, &small, &d.addr, "new.git", &[])
            .output()
            .unwrap(),
    );
    assert_same_tree(&small, &root.join("new.git"));
    let removed = send(
        &keys,
        &small,
        &d.addr,
        "again.git",
        &["--connect-timeout", "5"],
    );
    assert_eq!(removed.status.code(), Some(3), "{}", stderr(&removed));
    assert!(!root.join("again.git").exists());

    // The transfer that was in flight when its key was removed finishes.
    let mut out = String::new();
    in_flight
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let status = in_flight.wait().unwrap();
    assert!(status.success(), "in-flight transfer failed: {out}");
    assert_same_tree(&big, &root.join("big.git"));
    assert!(d.log().contains("allow-list reloaded"), "{}", d.log());

    // A bad allow-list on reload keeps the current one.
    std::fs::write(&keys.allow, "not a fingerprint\n").unwrap();
    d.signal(libc::SIGHUP);
    assert!(notify.next().starts_with("RELOADING=1"));
    assert_eq!(notify.next(), "READY=1");
    assert_ok(
        &send_as(&keys, &new_key, &small, &d.addr, "new2.git", &[])
            .output()
            .unwrap(),
    );

    d.signal(libc::SIGTERM);
    assert_eq!(notify.next(), "STOPPING=1");
}

/// `GET /metrics` over plain TCP: (status line, body).
pub fn scrape(addr: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// Every sample `name{labels} value` with a numeric value, every family with HELP and
/// TYPE; returns the samples.
fn parse_metrics(body: &str) -> Vec<(String, f64)> {
    let mut typed = Vec::new();
    let mut helped = Vec::new();
    let mut samples = Vec::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.push(rest.split(' ').next().unwrap().to_string());
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.push(rest.split(' ').next().unwrap().to_string());
        } else if line.starts_with('#') {
            assert!(line == "# EOF" || line.starts_with("# UNIT "), "{line}");
        } else {
            let (name, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not `name value`: {line}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("not a number: {line}"));
            let family = name.split('{').next().unwrap();
            assert!(
                family
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{line}"
            );
            if name.contains('{') {
                assert!(name.ends_with('}'), "{line}");
            }
            assert!(
                typed.iter().any(|t| family.starts_with(t.as_str())),
                "no TYPE for {line}"
            );
            samples.push((name.to_string(), value));
        }
    }
    assert_eq!(typed, helped, "HELP and TYPE for every family");
    samples
}

fn sample(samples: &[(String, f64)], name: &str) -> f64 {
    samples
        .iter()
        .find(|(n, _)| n == name)
        .map_or(0.0, |(_, v)| *v)
}

#[test]
fn metrics_scraped_during_a_transfer_move_and_parse() {
    let keys = Keys::new();
    let root = keys.path("root");
    let mut args = serve_flags(&keys, &root);
    args.extend(["--metrics".into(), "127.0.0.1:0".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut d = Served::start(keys.dir.path(), &args, &[]);
    let line = d.next_line();
    let metrics = line
        .strip_prefix("metrics http://")
        .and_then(|l| l.trim().strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no metrics address: {line:?}"))
        .to_string();
    assert!(metrics.starts_with("127.0.0.1:"), "{metrics}");

    let (status, before) = scrape(&metrics);
    assert_eq!(status, "HTTP/1.1 200 OK");
    let before = parse_metrics(&before);
    assert_eq!(sample(&before, "shardrecv_received_bytes_total"), 0.0);

    let big = small_tree(keys.dir.path(), 12 << 20);
    let mut in_flight = send_cmd(&keys, &big, &d.addr, "big.git", &["--bwlimit", "4M"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_for(Duration::from_secs(10), || journal_records(
        &root, "big.git"
    ) >= 1));
    let during = parse_metrics(&scrape(&metrics).1);
    assert_eq!(
        sample(&during, "shardrecv_transfers_active"),
        1.0,
        "{during:?}"
    );
    assert_eq!(sample(&during, "shardrecv_transfers_admitted_total"), 1.0);
    let moved = sample(&during, "shardrecv_received_bytes_total");
    assert!(moved > 0.0, "{during:?}");
    // A second scrape later in the transfer sees more bytes.
    std::thread::sleep(Duration::from_millis(700));
    let later = parse_metrics(&scrape(&metrics).1);
    assert!(sample(&later, "shardrecv_received_bytes_total") > moved);
    // A sender not in the allow-list is counted as refused.
    let stranger = keys.path("stranger.key");
    Identity::generate(&stranger).unwrap();
    let small = small_tree(keys.dir.path(), 1000);
    let out = send_as(&keys, &stranger, &small, &d.addr, "x.git", &[])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(in_flight.wait().unwrap().success());

    let after = parse_metrics(&scrape(&metrics).1);
    assert_eq!(sample(&after, "shardrecv_transfers_active"), 0.0);
    assert_eq!(
        sample(
            &after,
            "shardrecv_transfers_completed_total{outcome=\"installed\"}"
        ),
        1.0,
        "{after:?}"
    );
    assert_eq!(
        sample(
            &after,
            "shardrecv_transfers_refused_total{reason=\"not_allowed\"}"
        ),
        1.0,
        "{after:?}"
    );
    assert_eq!(sample(&after, "shardrecv_install_seconds_count"), 1.0);
    assert!(sample(&after, "shardrecv_received_bytes_total") >= (12 << 20) as f64);
    assert_eq!(sample(&after, "shardrecv_chunk_retries_total"), 0.0);
    // Only /metrics is served.
    let mut s = std::net::TcpStream::connect(&metrics).unwrap();
    write!(s, "GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
    d.signal(libc::SIGTERM);
    let _ = d.child.wait();
}

#[test]
fn completions_and_man_pages_name_each_binarys_flags() {
    let run = |bin: &str, args: &[&str]| {
        let out = Command::new(bin).args(args).output().unwrap();
        assert!(out.status.success(), "{bin} {args:?}: {}", stderr(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    for shell in ["bash", "zsh", "fish"] {
        let send = run(shardsend(), &["completions", shell]);
        assert!(send.contains("shardsend"), "{shell}");
        assert!(
            send.contains("bwlimit") && send.contains("resume"),
            "{shell}: {send}"
        );
        let recv = run(shardrecv(), &["completions", shell]);
        assert!(recv.contains("shardrecv"), "{shell}");
        assert!(
            recv.contains("max-transfers") && recv.contains("config"),
            "{shell}"
        );
    }
    let man = run(shardsend(), &["man"]);
    assert!(man.starts_with(".ie") || man.contains(".TH"), "{man}");
    assert!(man.contains(".TH shardsend"), "{man}");
    assert!(
        man.contains("bwlimit") && man.contains("log\\-format"),
        "{man}"
    );
    let man = run(shardrecv(), &["man"]);
    assert!(man.contains(".TH shardrecv"), "{man}");
    // shardrecv's page carries its subcommands' options (serve's are the daemon's).
    assert!(
        man.contains("max\\-transfers") && man.contains("metrics"),
        "{man}"
    );
    assert!(man.contains("SIGHUP"), "{man}");
}
