#!/usr/bin/env bash
# Gives the orchestrate tests a PostgreSQL server: installs Debian's package if missing, starts
# the cluster, creates role `shardmove` (password `shardmove`, CREATEDB) and database
# `shardmove_test` if they do not exist, and prints the URL on stdout (the only stdout line).
# Idempotent; run as root. The tests start a throwaway cluster without it; handy to test against
# a standing server:
#   export SHARDMOVE_TEST_PG=$(scripts/ci-postgres.sh)
set -euo pipefail
log() { echo "ci-postgres: $*" >&2; }
if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  log "installing postgresql"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >/dev/null
fi
# The newest installed major version (15 on Debian 12).
version=$(ls /usr/lib/postgresql | sort -n | tail -n 1)
if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main"' | grep -q .; then
  log "creating cluster $version/main"
  pg_createcluster "$version" main >&2
fi
if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" && $4 == "online"' | grep -q .; then
  log "starting cluster $version/main"
  pg_ctlcluster "$version" main start >&2
fi
port=$(pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $3}')
psql_admin() { (cd / && su postgres -c "psql -p $port -v ON_ERROR_STOP=1 -qtA $*"); }
for _ in $(seq 1 30); do
  psql_admin "-c 'select 1'" >/dev/null 2>&1 && break
  sleep 1
done
if [ "$(psql_admin "-c \"select 1 from pg_roles where rolname = 'shardmove'\"")" != "1" ]; then
  log "creating role shardmove"
  psql_admin "-c \"create role shardmove login password 'shardmove' createdb\"" >&2
fi
if [ "$(psql_admin "-c \"select 1 from pg_database where datname = 'shardmove_test'\"")" != "1" ]; then
  log "creating database shardmove_test"
  psql_admin "-c \"create database shardmove_test owner shardmove\"" >&2
fi
echo "postgres://shardmove:shardmove@127.0.0.1:$port/shardmove_test"
