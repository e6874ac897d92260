//! `transfer`: a verified, resumable QUIC transport for directory trees.
//!
//! The crate is split so that protocol logic is testable without sockets:
//! - sans-io: [`wire`] (frames), [`manifest`] (what may be staged), [`tracker`] (verified
//!   chunks, retry limit, root hash), [`compress`] (the `auto` decision), [`admission`] (a
//!   receiver's slots and line), [`gitdir`] (git's transient files), [`units`], and the two
//!   protocol state machines [`send::session::SenderSession`] and
//!   [`recv::session::ReceiverSession`] (`handle(input) -> outputs`, quinn-proto style);
//! - I/O: [`scan`] (source tree), [`send::source`] and [`send::codec`] (reading and encoding
//!   chunks), [`staging`] and [`recv::store`] (receiver's disk side), [`identity`] (keys,
//!   pinned-fingerprint TLS), [`quic`] (endpoint tuning, congestion control; [`background`] is
//!   the delay-based controller of `--congestion background`), [`io`] (frames on any
//!   `AsyncRead`/`AsyncWrite`), and the two thin async drivers [`send`] and [`recv`] used by
//!   the `shardsend` / `shardrecv` binaries; for running `shardrecv` as a service,
//!   [`notify`] (systemd readiness), [`recv::config`] (its config file) and
//!   [`recv::metrics`] (Prometheus).
//!
//! See `ARCHITECTURE.md` at the repository root for the data flow and invariants.

pub mod admission;
pub mod background;
pub mod bbr;
pub mod cli;
pub mod compress;
pub mod dissociate;
pub mod error;
pub mod failpoint;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod git_maintenance;
pub mod gitdir;
pub mod handshake_limit;
pub mod identity;
pub mod io;
pub mod manifest;
pub mod notify;
pub mod owner;
pub mod path_memory;
mod phases;
pub mod quic;
pub mod recv;
pub mod scan;
pub mod scan_cache;
pub mod send;
pub mod space;
pub mod staging;
pub mod ticket;
pub mod tracker;
pub mod units;
pub mod wire;

pub use error::{exit, Error};
