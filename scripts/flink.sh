#!/usr/bin/env bash
# Builds the Flink integration (integrations/flink) without Maven or Gradle: fetches
# Apache Flink 2.3.0's jars from PyPI (`apache-flink-libraries`, whose pyflink/lib
# holds them) into $FLUMEN_DEPS/flink (default .deps/flink) once, then compiles the
# provider with javac for Java 11 into target/flink/flumen-flink.jar, and the test
# jobs into target/flink/test-classes. Idempotent; prints the classpath of Flink's
# jars (for running a local cluster from a Java main).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
deps=${FLUMEN_DEPS:-$root/.deps}
lib=$deps/flink/lib
stamp=$deps/flink/.installed-2.3.0
if [ ! -f "$stamp" ]; then
    echo "fetching apache-flink-libraries==2.3.0 (Flink's jars) into $deps/flink" >&2
    rm -rf "$deps/flink"
    mkdir -p "$deps/flink/wheel" "$lib"
    python3 -m pip download -q --no-deps "apache-flink-libraries==2.3.0" -d "$deps/flink/wheel" >&2
    python3 - "$deps/flink/wheel" "$lib" <<'PY'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("*.whl"))
out = pathlib.Path(sys.argv[2])
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("pyflink/lib/") and name.endswith(".jar"):
            (out / pathlib.Path(name).name).write_bytes(z.read(name))
PY
    rm -rf "$deps/flink/wheel"
    touch "$stamp"
fi
cp=$(ls "$lib"/*.jar | tr '\n' ':')
src=$root/integrations/flink/src
out=$root/target/flink
rm -rf "$out/classes" "$out/test-classes"
mkdir -p "$out/classes" "$out/test-classes"
javac --release 11 -Xlint:all,-options,-serial -Werror -d "$out/classes" -cp "$cp" \
    $(find "$src/main/java" -name '*.java') >&2
cp -r "$src/main/resources/." "$out/classes/"
jar --create --file "$out/flumen-flink.jar" -C "$out/classes" . >&2
javac --release 11 -d "$out/test-classes" -cp "$cp$out/flumen-flink.jar" \
    $(find "$src/test/java" -name '*.java') >&2
cp -r "$src/test/resources/." "$out/test-classes/"
echo "$cp"
