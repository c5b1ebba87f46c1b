#!/usr/bin/env bash
# The project's test command, as the README gives it and CI runs it: every test of
# every crate (unit, simulation scenarios, property tests, the CLI end to end,
# doc tests), then the docs, which must build without warnings.
#
# Installs nothing yet: every test so far needs only the Rust toolchain. Scripts
# that install test peers (servers, brokers, Python clients) will be called from
# here, idempotently.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace --all-features --locked
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --all-features --no-deps --locked
