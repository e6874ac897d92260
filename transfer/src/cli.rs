//! Helpers shared by the two binaries: logging setup (`--log-format text|json`), error
//! reporting, and the identity subcommands (`keygen`, `fingerprint`) both have.

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
6 interrupted (connection lost or source kept changing: run again with --resume).";

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
