#!/usr/bin/env bash
# The project's test command, as the README gives it and CI runs it: every test of
# every crate (unit, simulation scenarios, property tests, the CLI end to end,
# doc tests), then the docs, which must build without warnings.
#
# Test peers are installed first, idempotently, by the project's own scripts:
# a real Triton server (scripts/triton.sh) for the KServe v2 backend's tests, and the
# official `openai` and `tritonclient` Python clients (scripts/pyclients.sh) for the
# gateway's.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/triton.sh >/dev/null
bash scripts/pyclients.sh >/dev/null

cargo test --workspace --all-features --locked
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --all-features --no-deps --locked
