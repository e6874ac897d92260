//! `transfer`: a verified, resumable QUIC transport for directory trees.
//!
//! The crate is split so that protocol logic is testable without sockets:
//! - sans-io: [`wire`] (frames), [`manifest`] (what may be staged), [`tracker`] (verified
//!   chunks, root hash), [`compress`] (the `auto` decision), [`units`];
//! - I/O: [`scan`] (source tree), [`staging`] (receiver's disk side), [`identity`] (keys,
//!   pinned-fingerprint TLS), [`quic`] (endpoint tuning, congestion control; [`background`] is
//!   the delay-based controller of `--congestion background`), [`io`] (frames on streams),
//!   [`send`] and [`recv`] (the two drivers used by the `shardsend` / `shardrecv` binaries).
//!
//! See `ARCHITECTURE.md` at the repository root for the data flow and invariants.

pub mod background;
pub mod cli;
pub mod compress;
pub mod error;
pub mod identity;
pub mod io;
pub mod manifest;
pub mod quic;
pub mod recv;
pub mod scan;
pub mod send;
pub mod staging;
pub mod tracker;
pub mod units;
pub mod wire;

pub use error::{exit, Error};
