# Sourced by the migration benchmarks (bench-migrate, bench-migrate-wan, bench-busy): their
# fixtures and the two-shard registry each run starts from.

# make_mixed_fixtures BIN DIR REPOS TOTAL: REPOS repositories DIR/r0.git ... (mkfixture, bare
# and loose in turn, sizes weighted 1:2:4:8:16 so small and large mix) adding up to about
# TOTAL. DIR/made records the set; a later call asking for the same set reuses it.
make_mixed_fixtures() {
  local bin=$1 dir=$2 repos=$3 total=$4
  [ "$(cat "$dir/made" 2>/dev/null)" = "$repos $total" ] && return 0
  local total_bytes weights=(1 2 4 8 16) sum=0 i size kind
  total_bytes=$(numfmt --from=iec "$total")
  for i in $(seq 0 $((repos - 1))); do sum=$((sum + weights[i % 5])); done
  echo "generating $repos repositories, ~$total in all..." >&2
  rm -rf "$dir"
  mkdir -p "$dir"
  for i in $(seq 0 $((repos - 1))); do
    size=$((total_bytes * weights[i % 5] / sum))
    [ "$size" -lt 65536 ] && size=65536
    kind=bare; [ $((i % 2)) = 1 ] && kind=loose
    "$bin/mkfixture" "$kind" --size "$size" --seed "$((i + 1))" --out "$dir/r$i.git" >/dev/null
  done
  echo "$repos $total" > "$dir/made"
  # Dirty pages would bias whichever run reads the fixtures first.
  sync
}

# register_two_shards BIN DB ROOT_A ROOT_B RECV_ADDR RECV_FP_FILE: a registry at DB with
# services a and b, devices a1 (shard root ROOT_A) and b1 (ROOT_B, its shardrecv at
# RECV_ADDR with the fingerprint in RECV_FP_FILE), and instance t bound to a.
register_two_shards() {
  local sm=("$1/shardmove" --db "$2") root_a=$3 root_b=$4 recv_addr=$5 recv_fp=$6
  "${sm[@]}" service add a >/dev/null
  "${sm[@]}" service add b >/dev/null
  "${sm[@]}" device add a1 --service a --host localhost --transfer 127.0.0.1:9 --root "$root_a" >/dev/null
  "${sm[@]}" device add b1 --service b --host localhost --transfer "$recv_addr" --root "$root_b" \
    --fingerprint "$(cat "$recv_fp")" >/dev/null
  "${sm[@]}" instance add t >/dev/null
  "${sm[@]}" binding add --instance t --service a >/dev/null
}

# create_fixture_repos BIN DB FIXTURES ROOT_A REPOS: repositories t/r0 ... in the registry at
# DB, each a mirror of FIXTURES/rN.git on shard a (ROOT_A).
create_fixture_repos() {
  local sm=("$1/shardmove" --db "$2") fixtures=$3 root_a=$4 repos=$5 i
  for i in $(seq 0 $((repos - 1))); do
    "${sm[@]}" repo create --instance t "r$i" >/dev/null
    git -C "$fixtures/r$i.git" push -q --mirror "$root_a/t/r$i.git"
  done
}
