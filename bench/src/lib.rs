//! `bench`: measurements behind shardmove's compression and hashing choices.
//!
//! The design says compression must be chosen from measurement, not configured blindly.
//! This crate measures: [`codecs`] streams a repository as tar through each candidate codec
//! (compress *and* decompress, with bounded memory) and [`report`] turns the figures into
//! breakpoints (the link speed below which compressing pays), a markdown table, CSV and an
//! SVG chart. The `breakpoints` binary drives it; `benches/micro.rs` holds criterion
//! micro-benchmarks of BLAKE3 and zstd on pack and text chunks.
//!
//! [`linkemu`] emulates WAN links (rate, delay, loss, cuts) between two network namespaces,
//! for `scripts/bench-wan.sh` and for tests; its binary is `linkemu`.

pub mod codecs;
pub mod linkemu;
pub mod report;
pub mod shardsend_codec;
