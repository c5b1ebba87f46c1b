#!/usr/bin/env bash
# Debian packages the tests need, installed once (idempotent):
#   nats-server  — a real NATS JetStream server for the NATS connector's tests
#   a JDK (javac, jar, java; 17) — to build the Flink provider and run Flink 2.3
#   Node.js and npm — to run the official `openai` npm client against the gateway
#   redis-server — a real Redis for the shared result cache and its failure tests
#   prometheus — a real Prometheus that scrapes the gateway in the metrics test
#   chromium — a headless browser that drives the status page in its test
# Runs apt-get only when something is missing (as root, or through sudo).
set -euo pipefail
missing=()
command -v nats-server >/dev/null || missing+=(nats-server)
command -v javac >/dev/null || missing+=(openjdk-17-jdk-headless)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v prometheus >/dev/null || missing+=(prometheus)
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}" >&2
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq -o=Dpkg::Use-Pty=0 "${missing[@]}" >/dev/null
fi
