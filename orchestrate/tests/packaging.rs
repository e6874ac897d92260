//! What `packaging/` ships: the systemd units pass `systemd-analyze verify`, and the Debian
//! package builds, installs and runs (`scripts/package-deb.sh`).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{pg::loud, BIN};

/// The repository's `packaging/` directory.
fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("packaging")
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

const UNITS: [&str; 3] = [
    "shardrecv.service",
    "shardrecv@.service",
    "shardmove-status.service",
];

/// Every unit, with its `ExecStart=` pointing at the binaries this test run built (verify
/// checks that the program exists), passes `systemd-analyze verify` without a warning.
/// `--man=no`: the man pages of `Documentation=` are installed by the package, not here.
#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    if !on_path("systemd-analyze") {
        loud("SKIPPED: systemd_units_pass_systemd_analyze_verify because systemd-analyze is not installed (scripts/install-deps.sh installs systemd)");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let built = Path::new(BIN).parent().expect("target dir");
    let shardrecv = crate::migration::tool("shardrecv");
    assert_eq!(shardrecv.parent(), Some(built));
    for unit in UNITS {
        let text = std::fs::read_to_string(packaging().join("systemd").join(unit))
            .unwrap_or_else(|e| panic!("{unit}: {e}"));
        assert!(
            text.lines().any(|l| l.starts_with("ExecStart=/usr/bin/")),
            "{unit}: ExecStart should name the installed binary"
        );
        let local = text.replace(
            "ExecStart=/usr/bin/",
            &format!("ExecStart={}/", built.display()),
        );
        std::fs::write(dir.path().join(unit), local).expect("write unit");
    }
    // The template is verified through an instance of it.
    let mut names: Vec<&str> = UNITS.to_vec();
    names.push("shardrecv@repo002.service");
    let output = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&names)
        .current_dir(dir.path())
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify {names:?}: {}\n{stderr}",
        output.status
    );
    // The hardening the units promise (issue 16), and a writable root matching the one served.
    for unit in ["shardrecv.service", "shardrecv@.service"] {
        let text = std::fs::read_to_string(dir.path().join(unit)).expect("read");
        for line in [
            "Type=notify",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "PrivateTmp=yes",
            "CapabilityBoundingSet=",
            "Restart=on-failure",
        ] {
            assert!(text.lines().any(|l| l == line), "{unit}: no {line}");
        }
        assert!(
            text.lines().any(|l| l.starts_with("LimitNOFILE=")),
            "{unit}"
        );
        let root = text
            .lines()
            .find_map(|l| l.strip_prefix("ReadWritePaths="))
            .unwrap_or_else(|| panic!("{unit}: no ReadWritePaths="));
        let exec = text
            .lines()
            .find(|l| l.starts_with("ExecStart="))
            .expect("ExecStart");
        assert!(
            exec.ends_with(&format!("--root {root}")),
            "{unit}: serves another root than it may write: {exec}"
        );
    }
}
