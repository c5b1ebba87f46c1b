#!/usr/bin/env bash
# Debian packages the build and the tests need, installed once (idempotent):
#   cmake        — builds librdkafka for the Kafka connector (rdkafka's cmake-build)
#   nats-server  — a real NATS JetStream server for the NATS connector's tests
# Runs apt-get only when something is missing (as root, or through sudo).
set -euo pipefail
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v nats-server >/dev/null || missing+=(nats-server)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}" >&2
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >&2
fi
