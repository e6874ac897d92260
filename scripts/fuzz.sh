#!/usr/bin/env bash
# Runs the transfer crate's cargo-fuzz targets (issue 10 item 5): each target for N
# executions, then prints executions and crashes per target; optionally minimises the
# corpus (cargo fuzz cmin) and reports coverage (cargo fuzz coverage + llvm-cov).
#
#   scripts/fuzz.sh [--runs N] [--target T]... [--minimise] [--coverage] [--no-run]
#
#   --runs N     executions per target (default 1000000)
#   --target T   only this target (repeatable); default: all of them
#   --minimise   after the run, keep only the corpus files that add coverage
#   --coverage   build with coverage instrumentation, replay the corpus and print llvm-cov's
#                per-file region/branch/line summary for wire.rs, manifest.rs, tracker.rs and
#                recv/session.rs (plus fuzzing.rs, the harness)
#   --no-run     skip the fuzzing itself (only --minimise / --coverage)
#
# Needs the nightly toolchain with llvm-tools (rustup component add llvm-tools-preview
# --toolchain nightly) and cargo-fuzz. Runs niced, one job per target (-jobs=1): the
# machines are shared. The corpus lives in transfer/fuzz/corpus/TARGET (committed, replayed
# on stable by transfer/tests/fuzz_corpus.rs); hand-made seeds for what the fuzzer did not
# find by itself in transfer/fuzz/seeds/TARGET (read, never rewritten: cmin leaves them be);
# crash inputs land in
# transfer/fuzz/artifacts/TARGET (not committed: copy one to transfer/fuzz/regressions/TARGET
# with the fix). Exit status: 1 if any target crashed.
set -euo pipefail
cd "$(dirname "$0")/../transfer"

ALL_TARGETS=(wire_control wire_chunk_header manifest_builder chunk_tracker recv_session)
runs=1000000
targets=()
minimise=0
coverage=0
run=1
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) runs="$2"; shift 2 ;;
        --target) targets+=("$2"); shift 2 ;;
        --minimise|--minimize) minimise=1; shift ;;
        --coverage) coverage=1; shift ;;
        --no-run) run=0; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "fuzz.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ ${#targets[@]} -gt 0 ] || targets=("${ALL_TARGETS[@]}")

host=$(rustc +nightly -vV | sed -n 's/^host: //p')
llvm_bin=$(echo "$(rustc +nightly --print sysroot)/lib/rustlib/$host/bin")
if [ "$coverage" = 1 ] && [ ! -x "$llvm_bin/llvm-cov" ]; then
    echo "fuzz.sh: no llvm-cov in $llvm_bin: rustup component add llvm-tools-preview --toolchain nightly" >&2
    exit 2
fi

mkdir -p fuzz/logs
summary=()
crashed=0
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    seeds=()
    [ -d "fuzz/seeds/$t" ] && seeds=("fuzz/seeds/$t")
    if [ "$run" = 1 ]; then
        before=$(find "fuzz/artifacts/$t" -type f | wc -l)
        log="fuzz/logs/$t.log"
        start=$(date +%s)
        status=0
        # One process (no -jobs: its workers write fuzz-N.log here). -max_len: structured
        # inputs need a few KB; -timeout/-rss_limit_mb: a slow or
        # memory-hungry input is a finding too.
        nice -n 10 cargo +nightly fuzz run "$t" "fuzz/corpus/$t" "${seeds[@]}" -- -runs="$runs" -max_len=4096 \
            -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1 || status=$?
        secs=$(( $(date +%s) - start ))
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
        after=$(find "fuzz/artifacts/$t" -type f | wc -l)
        crashes=$((after - before))
        if [ "$status" != 0 ] && [ "$crashes" = 0 ]; then crashes="?(exit $status)"; fi
        [ "$status" = 0 ] || crashed=1
        corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
        line="$t: executions ${execs:-?}, crashes $crashes, ${secs}s, corpus $corpus files"
        echo "$line"
        summary+=("$line")
        if [ "$status" != 0 ]; then
            echo "  see transfer/$log and transfer/fuzz/artifacts/$t" >&2
        fi
    fi
    if [ "$minimise" = 1 ]; then
        before=$(find "fuzz/corpus/$t" -type f | wc -l)
        # -use_counters=0: keep a file for the edges it reaches, not for how often (hit-count
        # buckets would keep thousands of files for the same region coverage).
        nice -n 10 cargo +nightly fuzz cmin "$t" -- -max_len=4096 -use_counters=0 \
            >"fuzz/logs/$t.cmin.log" 2>&1
        after=$(find "fuzz/corpus/$t" -type f | wc -l)
        line="$t: corpus minimised $before -> $after files ($(du -sk "fuzz/corpus/$t" | cut -f1) KiB)"
        echo "$line"
        summary+=("$line")
    fi
    if [ "$coverage" = 1 ]; then
        nice -n 10 cargo +nightly fuzz coverage "$t" "fuzz/corpus/$t" "${seeds[@]}" >"fuzz/logs/$t.coverage.log" 2>&1
        bin="target/$host/coverage/$host/release/$t"
        echo "$t: coverage (llvm-cov report; Regions / Functions / Lines / Branches: total, missed, cover)"
        "$llvm_bin/llvm-cov" report "$bin" -instr-profile="fuzz/coverage/$t/coverage.profdata" \
            -show-branch-summary \
            | awk 'NR <= 2 || /src\/(wire|manifest|tracker|fuzzing)\.rs|src\/recv\/session\.rs/' \
            | sed 's|^.*/transfer/src/|  src/|'
    fi
done

if [ ${#summary[@]} -gt 0 ]; then
    echo
    echo "summary ($(date -u +%FT%TZ), runs=$runs):"
    printf '  %s\n' "${summary[@]}"
fi
exit "$crashed"
