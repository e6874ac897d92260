#!/usr/bin/env bash
# Builds the Debian package `shardmove` (the three binaries, systemd units, man pages,
# bash/zsh/fish completions, /etc/shard/shardrecv.toml.example) with cargo-deb, from the
# metadata in orchestrate/Cargo.toml; prints the .deb's path (the only stdout line).
#   scripts/package-deb.sh                  # release build, then package
#   scripts/package-deb.sh --profile dev --no-build   # package what `cargo test` built
# Installs cargo-deb from crates.io (cargo install --locked) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "package-deb: $*" >&2; }
profile=release
build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    *) echo "usage: $0 [--profile release|dev] [--no-build]" >&2; exit 2 ;;
  esac
done
# cargo's output directory of a profile: dev builds land in target/debug.
case "$profile" in
  dev) outdir=debug ;;
  *) outdir=$profile ;;
esac
# CARGO_TARGET_DIR as cargo (and cargo-deb) read it.
target=${CARGO_TARGET_DIR:-target}
if ! command -v cargo-deb >/dev/null 2>&1; then
  log "installing cargo-deb"
  cargo install --locked cargo-deb >&2
fi
if [ "$build" = 1 ]; then
  log "building the binaries ($profile)"
  cargo build --profile "$profile" -p transfer -p orchestrate --bins >&2
fi
bin=$target/$outdir
for b in shardmove shardsend shardrecv; do
  [ -x "$bin/$b" ] || { log "$bin/$b is missing (build it, or drop --no-build)"; exit 1; }
done

# Man pages and completions, generated from the binaries' clap definitions.
# Beside the binaries: cargo-deb maps target/release/ in the metadata to the profile's directory.
assets=$bin/deb-assets
rm -rf "$assets"
mkdir -p "$assets/man" "$assets/bash" "$assets/zsh" "$assets/fish"
"$bin/shardmove" man --out-dir "$assets/man" >/dev/null
"$bin/shardmove" completions bash > "$assets/bash/shardmove"
"$bin/shardmove" completions zsh > "$assets/zsh/_shardmove"
"$bin/shardmove" completions fish > "$assets/fish/shardmove.fish"
# The transfer tools print their own man page and completions (`man`, `completions SHELL`).
for tool in shardsend shardrecv; do
  "$bin/$tool" man > "$assets/man/$tool.1"
  "$bin/$tool" completions bash > "$assets/bash/$tool"
  "$bin/$tool" completions zsh > "$assets/zsh/_$tool"
  "$bin/$tool" completions fish > "$assets/fish/$tool.fish"
done
gzip -9n "$assets"/man/*.1

# cargo-deb resolves target/release/* in the assets to the chosen profile's directory.
mkdir -p "$target/debian"
deb=$(cargo deb -p orchestrate --no-build --profile "$profile" --output "$target/debian" 2> >(cat >&2) | tail -n 1)
log "built $deb"
echo "$deb"
