#!/usr/bin/env bash
# Installs the Debian packages the tests, benchmarks and demo need. Idempotent; run as root.
# Anything the project needs is installed here, never by hand.
set -euo pipefail
# chromium: the status page is tested in headless Chromium (DESIGN.md 6).
# postgresql: the orchestrate tests start a throwaway cluster with its initdb/pg_ctl when
# SHARDMOVE_TEST_PG is not set (orchestrate/tests/util/pg.rs), so `cargo test --workspace`
# runs the PostgreSQL variants too.
# systemd: systemd-analyze verifies the units in packaging/systemd (orchestrate/tests/packaging/).
# The rest: what ../shared/phorge-lab/setup.sh needs (orchestrate/tests/phorge). Installed here,
# before the tests, because the lab installs what is missing itself, inside the test run, and
# its apt-get then holds the dpkg lock that the packaging test's `dpkg -i` needs (CI of stop 27
# failed on exactly that).
pkgs=(git socat openssh-server openssh-client rsync iproute2 time procps bc chromium postgresql systemd
  php-cli php-mysql php-curl php-mbstring php-gd php-zip php-xml php-apcu php-intl
  mariadb-server-core mariadb-client util-linux mount python3 curl sudo)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing packages ${missing[*]}; run as root to install them" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "install-deps: ok"
