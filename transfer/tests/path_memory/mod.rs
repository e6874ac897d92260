//! A sender remembers each receiver's path and starts the next transfer there from half the
//! window the last one reached (careful resume, `transfer::path_memory`): over an emulated
//! WAN link (`linkemu`, root only), and on loopback for what is written where.

use std::path::Path;

use crate::util::*;

const MIB: usize = 1 << 20;

fn memories(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn a_second_transfer_over_a_wan_link_starts_from_the_first_ones_window() {
    if !is_root() {
        eprintln!("skipping a_second_transfer_over_a_wan_link_starts_from_the_first_ones_window: needs root (linkemu)");
        return;
    }
    let Some(linkemu) = linkemu() else {
        eprintln!(
            "skipping a_second_transfer_over_a_wan_link_starts_from_the_first_ones_window: \
             linkemu is not built (`cargo build -p bench --bin linkemu`)"
        );
        return;
    };
    let keys = Keys::new();
    let root = keys.path("root");
    let link = Link::start(&linkemu, "mem", &["--rate", "100M", "--delay", "25ms"]);
    let exec_b = link.exec('b');
    let exec_b: Vec<&str> = exec_b.iter().map(String::as_str).collect();
    let d = Daemon::start_in(&keys, &root, &format!("{}:0", link.addr_b), &exec_b);
    let src = keys.path("src");
    std::fs::create_dir(&src).unwrap();
    write_random(&src.join("pack"), 4 * MIB, 21);
    let exec_a = link.exec('a');
    let exec_a: Vec<&str> = exec_a.iter().map(String::as_str).collect();
    let memory = keys.path("paths");
    let run = |dest: &str, extra: &[&str]| {
        let mut args = vec!["--compress", "off", "--congestion", "bbr"];
        args.extend_from_slice(extra);
        let out = send_cmd_in(&exec_a, &keys, &src, &d.addr, dest, &args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        json(&out)
    };
    let memory_arg = memory.to_str().unwrap();
    let first = run("one", &["--path-memory", memory_arg]);
    assert!(first["quic"]["resumed_window"].is_null(), "{first}");
    let port = d.addr.rsplit(':').next().unwrap();
    assert_eq!(
        memories(&memory),
        [format!("{}-{port}-bbr.json", link.addr_b)]
    );
    let second = run("two", &["--path-memory", memory_arg]);
    let resumed = second["quic"]["resumed_window"]
        .as_u64()
        .unwrap_or_else(|| panic!("the second transfer started cold: {second}"));
    // Half of what 100 Mbit/s x 50 ms needs (625 KB and headroom), far above ten packets.
    assert!(
        (200_000..2_000_000).contains(&resumed),
        "resumed from {resumed} bytes: {second}"
    );
    let cold = run("three", &["--no-path-memory"]);
    assert!(cold["quic"]["resumed_window"].is_null(), "{cold}");
    for dest in ["one", "two", "three"] {
        assert_same_tree(&src, &root.join(dest));
    }
}

#[test]
fn memories_are_kept_per_receiver_and_controller_and_only_for_ours() {
    let keys = Keys::new();
    let root = keys.path("root");
    let d = Daemon::start(&keys, &root);
    let src = keys.path("src");
    std::fs::create_dir(&src).unwrap();
    write_random(&src.join("pack"), MIB, 22);
    let memory = keys.path("paths");
    let memory_arg = memory.to_str().unwrap();
    let send = |dest: &str, congestion: &str| {
        let out = send_cmd(
            &keys,
            &src,
            &d.addr,
            dest,
            &["--congestion", congestion, "--path-memory", memory_arg],
        )
        .output()
        .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        json(&out)
    };
    // Cubic (auto's choice on loopback) starts cold and leaves nothing.
    let j = send("a", "auto");
    assert!(j["quic"].get("resumed_window").is_some(), "{j}");
    assert_eq!(memories(&memory), Vec::<String>::new());
    send("b", "background");
    send("c", "bbr");
    let port = d.addr.rsplit(':').next().unwrap();
    assert_eq!(
        memories(&memory),
        [
            format!("127.0.0.1-{port}-background.json"),
            format!("127.0.0.1-{port}-bbr.json")
        ]
    );
    // The default place is the cache directory (XDG_CACHE_HOME, the test's own).
    let out = send_cmd(&keys, &src, &d.addr, "d", &["--congestion", "bbr"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        memories(&keys.path("cache").join("shardsend/paths")),
        [format!("127.0.0.1-{port}-bbr.json")]
    );
    let out = send_cmd(
        &keys,
        &src,
        &d.addr,
        "e",
        &["--path-memory", memory_arg, "--no-path-memory"],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}
