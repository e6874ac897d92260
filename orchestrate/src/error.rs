//! The one error type of the `orchestrate` library, and the exit code each kind maps to.
//!
//! Errors come in two tiers (as in cargo-nextest): the expected ones, caused by the operator's
//! input or by the world (unknown names, duplicates, a refusal that `--force` would lift, a
//! host command that failed), and the unexpected ones (database failures). Every variant
//! carries the names it is about, so the message alone tells the operator what to fix.
//! Messages are lowercase fragments without a trailing period.

use std::path::PathBuf;

/// Everything that can go wrong in a registry operation or a step on a shard host.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Malformed input: a bad name, URL, property value or option combination.
    #[error("invalid {what}: {reason}")]
    Invalid { what: String, reason: String },

    /// A name that the registry does not know.
    #[error("unknown {kind} {name:?}")]
    NotFound { kind: &'static str, name: String },

    /// An `add` of something that already exists.
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: &'static str, name: String },

    /// The operation is understood but refused in the current state; the reason says why and
    /// whether `--force` lifts it.
    #[error("{0}")]
    Refused(String),

    /// Pushes that were already past the hook did not finish within the allowed wait.
    #[error("repository {repo} still has pushes in flight after {waited_secs}s ({detail}); maintenance was lifted again")]
    PushesInFlight {
        repo: String,
        waited_secs: u64,
        detail: String,
    },

    /// A command run on a shard host failed.
    #[error("on {host}: `{command}` failed ({status}): {stderr}")]
    HostCommand {
        host: String,
        command: String,
        status: String,
        stderr: String,
    },

    /// A local file operation failed (pid files, logs).
    #[error("{context} {}: {source}", path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },

    /// A migration batch ended with repositories not moved.
    #[error("migration {id} ended with {left} repositories not moved (see above); `shardmove migrate` of the same services goes on with it")]
    MigrationIncomplete { id: i64, left: usize },

    /// `doctor` found problems it did not (or could not) fix.
    #[error("doctor found {count} problems (see above)")]
    ProblemsFound { count: usize },

    /// The registry database failed (connection, query, constraint).
    #[error("registry: {0}")]
    Database(#[from] sqlx::Error),

    /// The registry schema could not be brought up to date.
    #[error("registry migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Result alias of the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Documented process exit codes of `shardmove` (also listed in its `--help`).
pub mod exit_code {
    /// Success.
    pub const OK: i32 = 0;
    /// Unexpected internal failure.
    pub const INTERNAL: i32 = 1;
    /// Bad input: invalid arguments, names, URLs or values (also clap's usage errors).
    pub const INVALID: i32 = 2;
    /// An unknown service, device, instance, binding or repository.
    pub const NOT_FOUND: i32 = 3;
    /// The thing to add already exists.
    pub const ALREADY_EXISTS: i32 = 4;
    /// Refused in the current state (often lifted by `--force`; the message says).
    pub const REFUSED: i32 = 5;
    /// Maintenance could not start: pushes still in flight after `--wait`.
    pub const PUSHES_IN_FLIGHT: i32 = 6;
    /// A command on a shard host failed (git, hook install, daemon start).
    pub const HOST_COMMAND: i32 = 7;
    /// The registry database failed.
    pub const DATABASE: i32 = 8;
    /// A migration ended with repositories not moved (rolled back or stuck).
    pub const MIGRATION_INCOMPLETE: i32 = 9;
    /// `doctor` found problems (left after `--fix`).
    pub const PROBLEMS_FOUND: i32 = 10;
}

impl Error {
    /// The process exit code for this error (see [`exit_code`]).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Invalid { .. } => exit_code::INVALID,
            Error::NotFound { .. } => exit_code::NOT_FOUND,
            Error::AlreadyExists { .. } => exit_code::ALREADY_EXISTS,
            Error::Refused(_) => exit_code::REFUSED,
            Error::PushesInFlight { .. } => exit_code::PUSHES_IN_FLIGHT,
            Error::HostCommand { .. } => exit_code::HOST_COMMAND,
            Error::Io { .. } => exit_code::INTERNAL,
            Error::MigrationIncomplete { .. } => exit_code::MIGRATION_INCOMPLETE,
            Error::ProblemsFound { .. } => exit_code::PROBLEMS_FOUND,
            Error::Database(_) | Error::Migrate(_) => exit_code::DATABASE,
        }
    }

    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }
}
