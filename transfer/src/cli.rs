//! Helpers shared by the two binaries: logging setup (`--log-format text|json`), error
//! reporting, the identity subcommands (`keygen`, `fingerprint`) and the documentation ones
//! (`completions SHELL`, `man`) both have, the same way `shardmove completions SHELL` works.
//! Completions and man pages are generated from the clap definitions (clap_complete,
//! clap_mangen), so they cannot drift from `--help`; both print to stdout, for a package
//! build to redirect.

use std::io::IsTerminal;
use std::path::PathBuf;

use crate::error::Error;
use crate::identity::Identity;

/// How log lines look (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line per event for people (colours on a terminal).
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, the message and the event's
    /// fields at the top level), for journald or a log shipper.
    Json,
}

/// Logs go to stderr; `RUST_LOG` overrides the default level.
pub fn init_logging(default_level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
}

/// Prints `err` (to stderr, and as JSON on stdout with `--json`) and returns its exit code.
pub fn report_error(err: &Error, json: bool) -> i32 {
    let code = err.exit_code();
    eprintln!("error: {err}");
    if json {
        use std::io::Write;
        let obj = serde_json::json!({ "ok": false, "error": err.to_string(), "exit_code": code });
        let _ = writeln!(std::io::stdout(), "{obj}");
    }
    code
}

/// Text for `--help`: exit codes of both binaries.
pub const EXIT_CODES_HELP: &str =
    "Exit codes: 0 success (installed and verified), 1 unexpected failure, \
2 bad input (arguments, source, identity), 3 cannot connect or peer key mismatch/not allowed, \
4 refused by the receiver (busy destination, no space, bad request), 5 verification failed, \
6 interrupted (connection lost or source kept changing: run again with --resume), \
7 the source repository was still being repacked after --repack-wait.";

/// Which binary runs an [`IdentityCommand`]: says where its fingerprint goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Sender,
    Receiver,
}

/// `keygen` and `fingerprint`, the same in `shardsend` and `shardrecv`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum IdentityCommand {
    /// Create a new identity key and print its fingerprint (a sender's goes into the
    /// receiver's --allow file, a receiver's is what senders pin with --peer)
    Keygen {
        /// Where to write the private key (mode 0600; never overwritten)
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the fingerprint of an existing identity key
    Fingerprint {
        #[arg(long)]
        identity: PathBuf,
    },
}

/// `completions` and `man`, the same in `shardsend` and `shardrecv`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum DocCommand {
    /// Print a shell completion script on stdout (bash's goes to
    /// /usr/share/bash-completion/completions/ under the binary's name)
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff, section 1, every subcommand's options included) on stdout
    /// (it goes to /usr/share/man/man1/ as the binary's name plus .1)
    Man,
}

impl DocCommand {
    /// Prints the completion script or man page of `cmd` (the binary's whole command line).
    pub fn run(&self, cmd: clap::Command) -> Result<(), Error> {
        use std::io::Write;
        let mut out = Vec::new();
        match self {
            DocCommand::Completions { shell } => {
                let mut cmd = cmd;
                let name = cmd.get_name().to_string();
                clap_complete::generate(*shell, &mut cmd, name, &mut out);
            }
            DocCommand::Man => man_page(cmd, &mut out)?,
        }
        std::io::stdout()
            .lock()
            .write_all(&out)
            .map_err(|e| Error::io("stdout", e))
    }
}

/// The binary's page, then a section per subcommand with its synopsis, description and
/// options (`shardrecv serve`'s are the daemon's): one page, so one file to install.
fn man_page(cmd: clap::Command, out: &mut Vec<u8>) -> Result<(), Error> {
    let io = |e| Error::io("man page", e);
    let mut cmd = cmd;
    cmd.build();
    clap_mangen::Man::new(cmd.clone()).render(out).map_err(io)?;
    let bin = cmd.get_name().to_string();
    for sub in cmd.get_subcommands() {
        let name = sub.get_name();
        if sub.is_hide_set() || matches!(name, "help" | "completions" | "man") {
            continue;
        }
        let full = format!("{bin} {name}");
        let man = clap_mangen::Man::new(sub.clone().bin_name(full.clone()));
        let mut section = Vec::new();
        man.render_synopsis_section(&mut section).map_err(io)?;
        man.render_description_section(&mut section).map_err(io)?;
        man.render_options_section(&mut section).map_err(io)?;
        let text = String::from_utf8_lossy(&section);
        out.extend_from_slice(format!(".SH \"{}\"\n", full.to_uppercase()).as_bytes());
        for line in text.lines() {
            // Its sections become subsections of the command's.
            let line = match line.strip_prefix(".SH ") {
                Some(title) => format!(".SS {title}"),
                None => line.to_string(),
            };
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
        }
    }
    Ok(())
}

impl IdentityCommand {
    /// Runs the command: the fingerprint on stdout, what to do with it on stderr.
    pub fn run(&self, role: Role) -> Result<(), Error> {
        match self {
            IdentityCommand::Keygen { out } => {
                let id = Identity::generate(out)?;
                let next = match role {
                    Role::Sender => "add this fingerprint to the receiver's allow-list",
                    Role::Receiver => "senders pin this fingerprint with --peer",
                };
                eprintln!("wrote {}; {next}:", out.display());
                println!("{}", id.fingerprint);
            }
            IdentityCommand::Fingerprint { identity } => {
                println!("{}", Identity::load(identity)?.fingerprint);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Bin {
        #[command(subcommand)]
        command: IdentityCommand,
    }

    #[test]
    fn keygen_then_fingerprint() {
        let t = tempfile::tempdir().unwrap();
        let key = t.path().join("k");
        let key_arg = key.to_str().unwrap();
        let keygen = Bin::try_parse_from(["bin", "keygen", "--out", key_arg]).unwrap();
        assert_eq!(keygen.command, IdentityCommand::Keygen { out: key.clone() });
        keygen.command.run(Role::Sender).unwrap();
        let fp = Bin::try_parse_from(["bin", "fingerprint", "--identity", key_arg]).unwrap();
        fp.command.run(Role::Receiver).unwrap();
        assert!(Identity::load(&key).is_ok());
        // Never overwritten.
        assert!(keygen.command.run(Role::Receiver).is_err());
        assert!(Bin::try_parse_from(["bin", "keygen"]).is_err());
    }
}
