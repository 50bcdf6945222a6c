#!/usr/bin/env bash
# Build the test control plane (and helm) into a cache outside the checkout, keyed by what
# they are built from, so warm runs take seconds. Prints `NAME=PATH` lines.
#   AMBER_CACHE   cache folder (default ~/.cache/amber)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${AMBER_CACHE:-$HOME/.cache/amber}/bin"
helm_version="v3.19.5"
mkdir -p "$cache"

key=$(cat "$here/go.mod" "$here/go.sum" "$here/main.go" | sha256sum | cut -c1-16)
cluster="$cache/testcluster-$key"
if [ ! -x "$cluster" ]; then
  echo "building testcluster ($key): a few minutes on a cold cache" >&2
  start=$(date +%s)
  (cd "$here" && go build -trimpath -o "$cluster.tmp" .)
  mv "$cluster.tmp" "$cluster"
  echo "built testcluster in $(( $(date +%s) - start ))s" >&2
fi

helm="$cache/helm-$helm_version/helm"
if [ ! -x "$helm" ]; then
  echo "building helm $helm_version" >&2
  GOBIN="$cache/helm-$helm_version" go install "helm.sh/helm/v3/cmd/helm@$helm_version"
fi

echo "testcluster=$cluster"
echo "helm=$helm"
