#!/usr/bin/env bash
# Regenerate go.mod's replace block for another Kubernetes release: ./pin.sh 1.36.3
set -euo pipefail
cd "$(dirname "$0")"
release=${1:?usage: pin.sh 1.X.Y}
staging="v0.${release#1.}"
gomod=$(go mod download -json "k8s.io/kubernetes@v${release}" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
etcd=$(sed -n 's#^\s*go.etcd.io/etcd/server/v3 \(v[^ ]*\).*#\1#p' "$gomod")
{
  printf 'module amber.dev/testcluster\n\ngo 1.26.0\n\nrequire (\n'
  printf '\tgo.etcd.io/etcd/server/v3 %s\n\tk8s.io/kubernetes v%s\n)\n\n' "$etcd" "$release"
  printf '// Generated from k8s.io/kubernetes v%s'"'"'s go.mod by tests/cluster/pin.sh: every staging\n' "$release"
  printf '// module pinned to the matching %s release.\nreplace (\n' "$staging"
  sed -n 's#^\s*\(k8s.io/[^ ]*\) => ./staging/.*#\t\1 => \1 '"$staging"'#p' "$gomod"
  printf ')\n'
} > go.mod
go mod tidy
