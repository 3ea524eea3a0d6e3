#!/usr/bin/env bash
# Build (once) a runnable Apicurio Registry from Maven Central and print its jar's path.
#
# Maven Central has the registry's plain application jar but no runnable build, so
# pom.xml here lets the Quarkus Maven plugin make one (in-memory H2 storage, the
# Confluent-compatible API at /apis/ccompat/v7). The result is cached in
# $QRSIGHT_REGISTRY_HOME (default: <repo>/.kafka/registry, git-ignored) and rebuilt only
# when pom.xml or src/ change. A cold run downloads ~150 MB into ~/.m2 and takes a few
# minutes; a warm one about 40 s; a cached one returns at once.
#
# Usage: deploy/local/registry/fetch.sh      (needs java 17+ and mvn on PATH)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../../.." && pwd)
home=${QRSIGHT_REGISTRY_HOME:-$root/.kafka/registry}
app=$home/app
jar=$app/qrsight-schema-registry-1-runner.jar

stamp() { (cd "$here" && find pom.xml src -type f -print0 | sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-16; }

built() { [[ -f $jar && -f $app/stamp && $(cat "$app/stamp") == "$(stamp)" ]]; }

if built; then echo "$jar"; exit 0; fi

for tool in java mvn; do
  command -v "$tool" >/dev/null || { echo "fetch.sh: $tool not found on PATH (apt-get install openjdk-17-jdk-headless maven)" >&2; exit 1; }
done

mkdir -p "$home"
exec 9>"$home/fetch.lock"
flock 9
if built; then echo "$jar"; exit 0; fi

build=$home/build
rm -rf "$build" "$app.new"
mkdir -p "$build"
cp -r "$here/pom.xml" "$here/src" "$build/"
echo "fetch.sh: building the schema registry (log: $home/build.log)" >&2
if ! mvn -B -q -f "$build/pom.xml" package -Dmaven.test.skip=true >"$home/build.log" 2>&1; then
  tail -n 40 "$home/build.log" >&2
  echo "fetch.sh: the registry build failed; full log in $home/build.log" >&2
  exit 1
fi
mkdir -p "$app.new"
cp "$build"/target/*-runner.jar "$app.new/"
cp -r "$build/target/lib" "$app.new/lib"
stamp >"$app.new/stamp"
rm -rf "$app" "$build"
mv "$app.new" "$app"
echo "$jar"
