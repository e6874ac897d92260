//! The crate's one error type, with the exit code each kind maps to in the binaries.

use std::path::Path;

use thiserror::Error;

use crate::manifest::ManifestError;
use crate::wire::{FailCode, WireError};

/// Exit codes of `shardsend` / `shardrecv` (documented in their `--help`).
pub mod exit {
    /// Success: the tree is installed and verified.
    pub const OK: i32 = 0;
    /// Unexpected failure (I/O, internal).
    pub const FAILURE: i32 = 1;
    /// Bad input on our side: arguments, source tree, identity files.
    pub const USAGE: i32 = 2;
    /// Could not connect, or the peer's key was not the pinned one, or we were not allowed.
    pub const CONNECT: i32 = 3;
    /// The receiver refused the transfer (busy destination, no space, bad request).
    pub const REFUSED: i32 = 4;
    /// Data failed verification (corruption that retries did not fix, root hash mismatch).
    pub const VERIFY: i32 = 5;
    /// The connection was lost mid-transfer: run again with `--resume`.
    pub const INTERRUPTED: i32 = 6;
    /// git's gc/repack still rewrote the source repository after `--repack-wait`.
    pub const SOURCE_BUSY: i32 = 7;
}

#[derive(Debug, Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("protocol error: {0}")]
    Wire(#[from] WireError),
    #[error("invalid manifest: {0}")]
    Manifest(#[from] ManifestError),
    #[error("identity: {0}")]
    Identity(String),
    #[error("{0}")]
    Input(String),
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    /// No answer from the address (nothing listening, or no path to it): unlike a refused
    /// key, worth trying again when a connection that worked was lost.
    #[error("cannot connect to {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("receiver refused the transfer: {message}")]
    Refused { code: FailCode, message: String },
    #[error("verification failed: {0}")]
    Verification(String),
    #[error("connection lost: {0} (run again with --resume to continue)")]
    Interrupted(String),
    #[error("source changed while being sent: {0}")]
    SourceChanged(String),
    /// A git gc/repack still rewrote the source after the wait (`--repack-wait`).
    #[error("{0}")]
    SourceBusy(String),
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }

    /// Exit code for a binary that failed with this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Input(_) | Error::Identity(_) => exit::USAGE,
            Error::Connect { .. } | Error::Unreachable { .. } => exit::CONNECT,
            Error::Refused { code, .. } => match code {
                FailCode::Verification => exit::VERIFY,
                _ => exit::REFUSED,
            },
            Error::Verification(_) => exit::VERIFY,
            Error::Interrupted(_) | Error::SourceChanged(_) => exit::INTERRUPTED,
            Error::SourceBusy(_) => exit::SOURCE_BUSY,
            Error::Io { .. } | Error::Wire(_) | Error::Manifest(_) | Error::Other(_) => {
                exit::FAILURE
            }
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
