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

const UNITS: [&str; 5] = [
    "shardrecv.service",
    "shardrecv@.service",
    "shardmove-status.service",
    "shardmove-doctor.service",
    "shardmove-doctor.timer",
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
            unit.ends_with(".timer") || text.lines().any(|l| l.starts_with("ExecStart=/usr/bin/")),
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

/// Runs dpkg, waiting (up to ten minutes) while another process holds its lock: the phorge lab's
/// setup.sh may be installing packages in the same test run, and dpkg itself has no wait option.
fn dpkg(args: &[&str]) -> std::process::Output {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        let out = Command::new("dpkg").args(args).output().expect("run dpkg");
        let locked = String::from_utf8_lossy(&out.stderr).contains("lock");
        if out.status.success() || !locked || std::time::Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
}

/// Removes the package when the test ends, passed or not.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        // Purge, not just remove: the example config is a conffile and would stay behind.
        let _ = dpkg(&["--purge", "shardmove"]);
    }
}

/// `scripts/package-deb.sh` builds the package (from the binaries this test run built: the
/// dev profile, to spare a release build), `dpkg -i` installs it, the installed binaries run,
/// its units verify where they are installed, `dpkg --purge` removes it. Needs root and cargo-deb;
/// refuses to touch a `shardmove` package that was installed before it.
#[test]
fn debian_package_installs_and_its_binaries_run() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        loud("SKIPPED: debian_package_installs_and_its_binaries_run because dpkg -i needs root");
        return;
    }
    if !on_path("cargo-deb") || !on_path("dpkg") {
        loud("SKIPPED: debian_package_installs_and_its_binaries_run because cargo-deb or dpkg is missing (cargo install --locked cargo-deb; scripts/package-deb.sh installs it)");
        return;
    }
    let already = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "shardmove"])
        .output()
        .expect("dpkg-query");
    if String::from_utf8_lossy(&already.stdout).contains("installed") {
        loud("SKIPPED: debian_package_installs_and_its_binaries_run because a shardmove package is already installed here (not ours to remove)");
        return;
    }
    let built = Path::new(BIN).parent().expect("debug dir");
    for tool in ["shardsend", "shardrecv"] {
        crate::migration::tool(tool);
    }
    let target = built.parent().expect("target dir");
    let root = packaging().parent().expect("workspace root").to_path_buf();
    let output = Command::new(root.join("scripts/package-deb.sh"))
        .args(["--profile", "dev", "--no-build"])
        .env("CARGO_TARGET_DIR", target)
        .current_dir(&root)
        .output()
        .expect("run package-deb.sh");
    assert!(
        output.status.success(),
        "package-deb.sh: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let deb = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let deb = root.join(deb);
    assert!(deb.is_file(), "no {}", deb.display());

    let _installed = Installed;
    let install = dpkg(&["-i", &deb.to_string_lossy()]);
    assert!(install.status.success(), "dpkg -i: {install:?}");
    let run = |program: &str, arg: &str| {
        let out = Command::new(program).arg(arg).output().expect(program);
        assert!(out.status.success(), "{program} {arg}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(run("/usr/bin/shardsend", "--version").starts_with("shardsend "));
    assert!(run("/usr/bin/shardrecv", "--help").contains("serve"));
    assert!(run("/usr/bin/shardmove", "--version").starts_with("shardmove "));
    for file in [
        "/usr/share/man/man1/shardmove.1.gz",
        "/usr/share/man/man1/shardmove-migrate.1.gz",
        "/usr/share/bash-completion/completions/shardmove",
        "/usr/share/zsh/vendor-completions/_shardmove",
        "/usr/share/fish/vendor_completions.d/shardmove.fish",
        "/usr/share/man/man1/shardsend.1.gz",
        "/usr/share/man/man1/shardrecv.1.gz",
        "/usr/share/bash-completion/completions/shardsend",
        "/usr/share/bash-completion/completions/shardrecv",
        "/usr/share/zsh/vendor-completions/_shardrecv",
        "/usr/share/fish/vendor_completions.d/shardsend.fish",
        "/etc/shard/shardrecv.toml.example",
        "/lib/systemd/system/shardrecv@.service",
        "/lib/systemd/system/shardmove-doctor.timer",
    ] {
        assert!(
            Path::new(file).is_file(),
            "the package did not install {file}"
        );
    }
    if on_path("systemd-analyze") {
        let verify = Command::new("systemd-analyze")
            .args([
                "verify",
                "--man=no",
                "/lib/systemd/system/shardrecv.service",
                "/lib/systemd/system/shardmove-status.service",
                "/lib/systemd/system/shardmove-doctor.service",
                "/lib/systemd/system/shardmove-doctor.timer",
                "shardrecv@repo002.service",
            ])
            .output()
            .expect("systemd-analyze");
        assert!(
            verify.status.success() && verify.stderr.is_empty(),
            "installed units: {}",
            String::from_utf8_lossy(&verify.stderr)
        );
    }
}
