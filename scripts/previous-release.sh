#!/usr/bin/env bash
# Builds the previous release's `shardsend` and `shardrecv` from this repository's history, for
# the compatibility test (transfer/tests/compat) and for trying a mixed fleet by hand:
#
#   scripts/previous-release.sh            # builds (once; cached), prints the binaries' directory
#
# The recipe: the release below is a commit of this repository (tagged when tags travel with
# the clone); its tree is exported with `git archive` and built with its own Cargo.lock into
# target/previous-release/, apart from this tree's build. Release N's compatibility is with
# release N-1 (the upgrade rule in transfer/src/wire.rs): when a release is cut, this file
# moves on to name it.
#
# Exit status: 0 built (the directory on stdout), 3 this checkout has no such commit (an
# exported or shallow checkout: fetch the history), 1 anything else.
set -euo pipefail
cd "$(dirname "$0")/.."

RELEASE=v0.1.0                                   # protocol version 6 (ALPN shardxfer/1)
COMMIT=ba484b28a5d6108f671408a199ca4f47c869f669

out=$PWD/target/previous-release
bin=$out/$RELEASE-${COMMIT:0:12}/bin
if [ -x "$bin/shardsend" ] && [ -x "$bin/shardrecv" ]; then
  echo "$bin"
  exit 0
fi
if ! git rev-parse --git-dir >/dev/null 2>&1 || ! git cat-file -e "$COMMIT^{commit}" 2>/dev/null; then
  echo "previous-release: commit $COMMIT ($RELEASE) is not in this checkout's history;" \
       "an exported or shallow checkout cannot build it (git fetch --unshallow)" >&2
  exit 3
fi
src=$out/$RELEASE-${COMMIT:0:12}/src
rm -rf "$src"
mkdir -p "$src"
git archive --format=tar "$COMMIT" | tar -x -C "$src"
echo "previous-release: building $RELEASE ($COMMIT) in $src" >&2
# Its own target directory: the tree's crates would otherwise overwrite this tree's binaries.
# --locked: exactly the dependencies that release shipped with.
env -u CARGO_TARGET_DIR -u RUSTFLAGS -u CARGO_BUILD_TARGET_DIR \
  cargo build --locked --quiet --manifest-path "$src/Cargo.toml" -p transfer --bins \
  --target-dir "$out/target"
mkdir -p "$bin"
for b in shardsend shardrecv; do
  cp "$out/target/debug/$b" "$bin/$b.tmp"
  mv "$bin/$b.tmp" "$bin/$b"
done
echo "$bin"
