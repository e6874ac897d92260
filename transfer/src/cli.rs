//! Helpers shared by the two binaries: logging setup and error reporting.

use std::io::IsTerminal;

use crate::error::Error;

/// Logs go to stderr; `RUST_LOG` overrides the default level.
pub fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
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
