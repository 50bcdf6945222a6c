#!/usr/bin/env bash
# Build the images of images/ with buildah (no Docker daemon) for the real-node tests
# (tests/node.py): a Debian base made here by mmdebstrap (no registry but Debian's packages is
# reachable), the pause image from the Kubernetes release's own source, the operator, and the
# CPU variant of the trainer. Each is saved as an image archive, tagged with the chart's
# default name, in a cache outside the checkout keyed by the hash of its inputs; buildah's
# layers are kept there too, so a change to Amber's sources rebuilds only the last layers.
# Prints `NAME=ARCHIVE REFERENCE` lines, and each image's size on stderr.
#   AMBER_CACHE   cache folder (default ~/.cache/amber)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${AMBER_CACHE:-$HOME/.cache/amber}/images"
mkdir -p "$cache"
# RUN steps in chroot isolation: no OCI runtime and no cgroups, so the build does not depend
# on the host's cgroup layout (crun refuses a hybrid v1/v2 layout with a controller in v2,
# which some machines of this kind have; tests/test_node.py's build checks it on the host).
export BUILDAH_ISOLATION=chroot
buildah=(buildah --root "$cache/buildah" --runroot /run/amber-buildah --storage-driver overlay)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/pyproject.toml")

for tool in buildah mmdebstrap; do
  command -v "$tool" >/dev/null || missing="${missing:-} $tool"
done
if [ -n "${missing:-}" ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi

hash() { sha256sum | cut -c1-16; }
# The files a build reads from the checkout, by content (git's view: ignored files excluded).
sources() { (cd "$root" && git ls-files -co --exclude-standard -- "$@" | LC_ALL=C sort | xargs sha256sum); }

report() {  # NAME ARCHIVE REFERENCE
  echo "$1: $(du -h "$2" | cut -f1) ($(basename "$2"))" >&2
  echo "$1=$2 $3"
}

# The base: Debian's minimal system with Python, and the certificate authorities this machine
# trusts (the package registries may be reached through a proxy of its own).
suite=bookworm
packages=python3,python3-venv,python-is-python3,ca-certificates,passwd,libgomp1
cas=$(ls /usr/local/share/ca-certificates/*.crt 2>/dev/null || true)
base_key=$( (echo "$suite $packages"; [ -z "$cas" ] || cat $cas) | hash)
base="localhost/amber-base:$base_key"
if ! "${buildah[@]}" inspect --type image "$base" >/dev/null 2>&1; then
  echo "building the base image ($suite, $base_key)" >&2
  work=$(mktemp -d)
  mmdebstrap --quiet --variant=minbase --include="$packages" "$suite" "$work/rootfs.tar"
  mkdir -p "$work/cas"
  [ -z "$cas" ] || cp $cas "$work/cas/"
  printf 'FROM scratch\nADD rootfs.tar /\nCOPY cas/ /usr/local/share/ca-certificates/\n%s\n%s\n' \
    'RUN update-ca-certificates' 'CMD ["bash"]' > "$work/Dockerfile"
  "${buildah[@]}" bud --quiet --network host -t "$base" "$work" >/dev/null
  rm -rf "$work"
fi

# The sandbox image every pod starts with, built as the Kubernetes release builds it.
k8s=$(awk '$1 == "k8s.io/kubernetes" {print $2}' "$root/tests/cluster/go.mod")
pause_src="$(go env GOMODCACHE)/k8s.io/kubernetes@$k8s/build/pause"
[ -d "$pause_src" ] || (cd "$root/tests/cluster" && go mod download k8s.io/kubernetes)
pause_tag=$(sed -n 's/^TAG ?= //p' "$pause_src/Makefile")
pause_key=$(cat "$pause_src/linux/pause.c" <(echo "$pause_tag") | hash)
pause="$cache/pause-$pause_key.tar"
if [ ! -s "$pause" ]; then
  work=$(mktemp -d)
  gcc -Os -Wall -static -DVERSION="v$pause_tag" -o "$work/pause" "$pause_src/linux/pause.c"
  printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' > "$work/Dockerfile"
  "${buildah[@]}" bud --quiet -t "registry.k8s.io/pause:$pause_tag" "$work" >/dev/null
  "${buildah[@]}" push --quiet "registry.k8s.io/pause:$pause_tag" \
    "docker-archive:$pause.tmp:registry.k8s.io/pause:$pause_tag" && mv "$pause.tmp" "$pause"
  rm -rf "$work"
fi
report pause "$pause" "registry.k8s.io/pause:$pause_tag"

build() {  # NAME BUILD-ARGS...: images/NAME/Dockerfile as ghcr.io/amber-dev/amber-NAME:VERSION
  local name=$1; shift
  local tag="ghcr.io/amber-dev/amber-$name:$version"
  local key
  key=$( (echo "$base_key $*"; sources "images/$name" pyproject.toml README.md amber operator trainer .dockerignore) | hash)
  local archive="$cache/$name-$key.tar"
  if [ ! -s "$archive" ]; then
    echo "building $tag ($key)" >&2
    local start=$SECONDS
    args=()
    for arg in "$@"; do args+=(--build-arg "$arg"); done
    # The build stage is tagged too, so that pruning below keeps its layers (torch's above all)
    # for the next build; what no tagged image descends from (older builds) goes.
    for target in build final; do
      local target_args=(-t "$tag")
      [ "$target" = final ] || target_args=(--target build -t "localhost/amber-$name-build:cache")
      "${buildah[@]}" bud --quiet --layers --network host "${args[@]}" "${target_args[@]}" \
        -f "$root/images/$name/Dockerfile" "$root" >/dev/null
    done
    "${buildah[@]}" rm --all >/dev/null
    "${buildah[@]}" rmi --prune >/dev/null
    rm -f "$cache/$name"-*.tar  # one archive per image: the previous build's is stale
    "${buildah[@]}" push --quiet "$tag" "docker-archive:$archive.tmp:$tag" && mv "$archive.tmp" "$archive"
    echo "built $tag in $((SECONDS - start))s" >&2
  fi
  report "$name" "$archive" "$tag"
}

build operator "BASE=$base"
build trainer "BUILD_BASE=$base" "RUNTIME_BASE=$base" PYTHON=python3.11 \
  TORCH_INDEX=https://pypi.org/simple "DEEPSPEED_OPS=DS_ACCELERATOR=cpu DS_BUILD_SHM_COMM=1"
