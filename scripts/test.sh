#!/usr/bin/env bash
# The whole test run on a fresh Debian machine: installs what the tests need, starts a
# private PostgreSQL, runs formatting, lint and every test, and stops what it started.
#
#   scripts/test.sh            everything
#   scripts/test.sh -- ARGS    extra arguments for `cargo test` (a test name filter, say)
set -euo pipefail
cd "$(dirname "$0")/.."

PG_VERSION=15
PG_BIN="/usr/lib/postgresql/$PG_VERSION/bin"
# Each Debian package the tests need, with the file that shows it is there. Checking the file
# rather than the package keeps a machine whose Node.js (and npm) came from elsewhere working.
# chromium and npm: the dashboard's browser test (tests/api_browser.rs).
NEEDS=(
    "mosquitto:/usr/sbin/mosquitto"
    "mosquitto-clients:/usr/bin/mosquitto_pub"
    "postgresql-$PG_VERSION:$PG_BIN/initdb"
    "openssl:/usr/bin/openssl"
    "chromium:/usr/bin/chromium"
    "npm:npm"
)

log() { printf '\n==> %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_packages() {
    local missing=()
    for need in "${NEEDS[@]}"; do
        command -v "${need#*:}" >/dev/null 2>&1 || missing+=("${need%%:*}")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing ${missing[*]}"
        as_root apt-get update -qq
        # policy-rc.d keeps Debian's packages from starting their own services: the tests
        # start private instances on free ports instead.
        as_root env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
            apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# PostgreSQL refuses to run as root, so as root the instance runs as the postgres user, in a
# directory that user owns.
PG_DIR=""
PG_USER="$(id -un)"
start_postgres() {
    PG_DIR="$(mktemp -d /tmp/telemon-test-pg.XXXXXX)"
    local run=()
    if [ "$(id -u)" -eq 0 ]; then
        PG_USER=postgres
        chown postgres:postgres "$PG_DIR"
        run=(runuser -u postgres --)
    fi
    PG_PORT="$(free_port)"
    log "starting a private PostgreSQL $PG_VERSION on 127.0.0.1:$PG_PORT ($PG_DIR)"
    "${run[@]}" "$PG_BIN/initdb" -D "$PG_DIR/data" -A trust -U "$PG_USER" >/dev/null
    "${run[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/log" -w start \
        -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c max_connections=300 \
            -c fsync=off" >/dev/null
    PG_RUN=("${run[@]}")
    export TELEMON_TEST_DATABASE_URL="postgres://$PG_USER@127.0.0.1:$PG_PORT/postgres"
}

stop_postgres() {
    if [ -n "$PG_DIR" ] && [ -f "$PG_DIR/data/postmaster.pid" ]; then
        "${PG_RUN[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null || true
    fi
    [ -n "$PG_DIR" ] && rm -rf "$PG_DIR"
}
trap stop_postgres EXIT

# playwright-core for the browser test, at the version the lock file pins; it drives
# Debian's chromium, so no browser is downloaded.
install_browser_driver() {
    if [ ! -d tests/browser/node_modules/playwright-core ]; then
        log "npm ci in tests/browser"
        (cd tests/browser && npm ci --no-audit --no-fund >/dev/null)
    fi
}

install_packages
install_browser_driver
start_postgres

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (warnings denied)"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "cargo test"
shift_args=()
if [ "${1:-}" = "--" ]; then shift; shift_args=("$@"); fi
cargo test --workspace --locked --no-fail-fast -- "${shift_args[@]}"

log "all checks passed"
