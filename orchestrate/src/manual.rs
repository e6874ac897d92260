//! `shardmove completions SHELL` and `shardmove man`: shell completion scripts and manual pages,
//! generated from the clap definitions in [`crate::cli`] (clap_complete, clap_mangen) so they
//! can never say something `--help` does not. `scripts/package-deb.sh` runs these commands to
//! put the pages and scripts into the Debian package; nothing is generated at build time.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

use crate::cli::{Cli, Command};
use crate::error::{Error, Result};

pub use clap_complete::Shell;

/// Carries out `completions` and `man` (writing to `out`, or the pages into `--out-dir` and
/// their paths to `out`); `false` for any other command.
pub fn run(command: &Command, out: &mut dyn Write) -> Result<bool> {
    let io = |source| Error::Io {
        context: "writing to",
        path: PathBuf::from("standard output"),
        source,
    };
    match command {
        Command::Completions { shell } => completions(*shell, out),
        Command::Man { out_dir: None } => man_page(out).map_err(io)?,
        Command::Man { out_dir: Some(dir) } => {
            for page in man_pages(dir)? {
                writeln!(out, "{}", page.display()).map_err(io)?;
            }
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// The command tree as the pages and completions see it: built (so every subcommand knows its
/// full name, `shardmove-migrate-status`), without clap's implicit `help` subcommand.
fn command() -> clap::Command {
    let mut command = Cli::command().disable_help_subcommand(true);
    command.build();
    command
}

/// Writes the completion script for `shell` to `out`.
pub fn completions(shell: Shell, out: &mut dyn Write) {
    let mut command = command();
    clap_complete::generate(shell, &mut command, "shardmove", out);
}

/// Writes the manual page of `shardmove` itself (section 1, roff) to `out`.
pub fn man_page(out: &mut dyn Write) -> std::io::Result<()> {
    clap_mangen::Man::new(command()).render(out)
}

/// Writes one page per command and subcommand into `dir` (`shardmove.1`,
/// `shardmove-migrate.1`, `shardmove-service-add.1`, ...), creating `dir`; returns their paths,
/// parents before children.
pub fn man_pages(dir: &Path) -> Result<Vec<PathBuf>> {
    let io = |source| Error::Io {
        context: "writing manual pages to",
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut written = Vec::new();
    let mut pending = vec![command()];
    while let Some(command) = pending.pop() {
        pending.extend(
            command
                .get_subcommands()
                .filter(|sub| !sub.is_hide_set())
                .cloned(),
        );
        written.push(
            clap_mangen::Man::new(command)
                .generate_to(dir)
                .map_err(io)?,
        );
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bash_completion_knows_the_subcommands_and_their_options() {
        let mut out = Vec::new();
        completions(Shell::Bash, &mut out);
        let script = String::from_utf8(out).expect("utf-8");
        assert!(script.contains("complete -F _shardmove"), "{script}");
        for word in [
            "migrate",
            "doctor",
            "completions",
            "--parallel",
            "--out-dir",
        ] {
            assert!(script.contains(word), "no {word} in the bash completion");
        }
    }

    #[test]
    fn one_page_per_subcommand_with_full_names() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pages = man_pages(dir.path()).expect("pages");
        let names: Vec<String> = pages
            .iter()
            .map(|p| {
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        for expected in [
            "shardmove.1",
            "shardmove-migrate.1",
            "shardmove-migrate-status.1",
            "shardmove-service-add.1",
            "shardmove-status-serve.1",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "no {expected} in {names:?}"
            );
        }
        assert!(!names.iter().any(|n| n.contains("-help")), "{names:?}");
        let top = std::fs::read_to_string(dir.path().join("shardmove.1")).expect("read");
        assert!(
            top.starts_with(".ie") || top.contains(".TH shardmove 1"),
            "{top}"
        );
        assert!(
            top.contains("Exit codes"),
            "the epilogue is part of the page"
        );
        let mut stdout = Vec::new();
        man_page(&mut stdout).expect("render");
        assert_eq!(String::from_utf8_lossy(&stdout), top);
    }
}
