#!/usr/bin/env bash
# Build kcr-trio's container images with podman: the API server (Containerfile) and the execution
# (sidecar) images, one per language family (sidecar/docker/Dockerfile).
#
#   scripts/build-images.sh                    # base, api and every language image
#   scripts/build-images.sh api py node bash   # only these
#   REGISTRY=registry.example.com/me TAG=1.2.3 PUSH=1 scripts/build-images.sh
#
# Names (what the Helm chart's defaults expect, with REGISTRY=ghcr.io/kcr-trio and TAG = the chart's
# appVersion):  $REGISTRY/kcr-trio:$TAG   and   $REGISTRY/kcr-trio-sidecar-<suffix>:$TAG  with the
# suffixes python javascript typescript go java c-cpp php rust r fortran d bash (the node image is
# tagged for javascript and typescript, the c-cpp image serves c and cpp).
#
# Environment:
#   REGISTRY     image name prefix (default ghcr.io/kcr-trio)
#   TAG          image tag (default: appVersion from charts/kcr-trio/Chart.yaml)
#   BASE_IMAGE   base of every image. Unset: a local Debian bookworm base made from Debian packages
#                with mmdebstrap (no container registry needed); e.g.
#                BASE_IMAGE=docker.io/library/python:3.11.13-slim-bookworm for the official one.
#   PUSH=1       push every built name afterwards (log in first: `podman login <registry>`)
#   PODMAN_FLAGS global podman flags (default "--runtime runc --cgroup-manager=cgroupfs": crun
#                refuses hybrid cgroup hosts; set PODMAN_FLAGS= to use podman's defaults)
#   ULIMIT_FLAGS build ulimits (default nofile and nproc 4096: podman's defaults can exceed the hard
#                limits of a container host)
#
# Idempotent: the local base is rebuilt only when its recipe changes (a content key in a label),
# and podman's layer cache keys every build step by its inputs, so an unchanged tree rebuilds in
# seconds. Prints build times and image sizes at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

REGISTRY="${REGISTRY:-ghcr.io/kcr-trio}"
TAG="${TAG:-$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' charts/kcr-trio/Chart.yaml)}"
PUSH="${PUSH:-0}"
read -r -a PODMAN <<< "podman ${PODMAN_FLAGS---runtime runc --cgroup-manager=cgroupfs}"
read -r -a ULIMITS <<< "${ULIMIT_FLAGS---ulimit nofile=4096:4096 --ulimit nproc=4096:4096}"
LOCAL_BASE="localhost/kcr-trio-base:bookworm"

LANG_TARGETS=(py node bash go java c-cpp php rs r f90 d)
declare -A SUFFIXES=(
  [py]="python" [node]="javascript typescript" [bash]="bash" [go]="go" [java]="java"
  [c-cpp]="c-cpp" [php]="php" [rs]="rust" [r]="r" [f90]="fortran" [d]="d"
)

targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(base api "${LANG_TARGETS[@]}")
for t in "${targets[@]}"; do
  [ "$t" = base ] || [ "$t" = api ] || [ -n "${SUFFIXES[$t]+x}" ] || {
    echo "unknown target: $t (known: base api ${LANG_TARGETS[*]})" >&2; exit 2; }
done

built=()
timings=()
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------------------------------------
# The local base: Debian bookworm minbase + python3 (venv) + CA certificates. Certificates the
# host added locally (/usr/local/share/ca-certificates) are trusted inside too, so that pip, npm
# and apt-get work in builds behind a TLS-inspecting proxy exactly as they do on the host.
build_base() {
  local certs=() key tmp
  shopt -s nullglob
  certs=(/usr/local/share/ca-certificates/*.crt)
  shopt -u nullglob
  local recipe="bookworm minbase python3 python3-venv ca-certificates v1"
  key=$( { echo "$recipe"; [ "${#certs[@]}" -eq 0 ] || cat "${certs[@]}"; } | sha256sum | cut -c1-16)
  if "${PODMAN[@]}" image exists "$LOCAL_BASE" \
     && [ "$("${PODMAN[@]}" image inspect -f '{{index .Labels "io.kcr-trio.base-key"}}' "$LOCAL_BASE")" = "$key" ]; then
    echo "base: $LOCAL_BASE is up to date (key $key)"
    return
  fi
  command -v mmdebstrap >/dev/null || { echo "mmdebstrap is needed for the local base (apt-get install mmdebstrap), or set BASE_IMAGE" >&2; exit 1; }
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  local hooks=()
  if [ "${#certs[@]}" -gt 0 ]; then
    hooks+=(--customize-hook='mkdir -p "$1/usr/local/share/ca-certificates"'
            --customize-hook="copy-in ${certs[*]} /usr/local/share/ca-certificates"
            --customize-hook='chroot "$1" update-ca-certificates')
  fi
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
    "${hooks[@]}" bookworm "$tmp/rootfs.tar"
  "${PODMAN[@]}" import \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt' \
    --change "LABEL io.kcr-trio.base-key=$key" \
    "$tmp/rootfs.tar" "$LOCAL_BASE" >/dev/null
  echo "base: built $LOCAL_BASE (key $key)"
}

build() {  # build FILE TARGET NAME...
  local file="$1" target="$2"; shift 2
  local tags=()
  for n in "$@"; do tags+=(-t "$n"); done
  "${PODMAN[@]}" build --network host "${ULIMITS[@]}" --build-arg "BASE_IMAGE=$BASE" \
    -f "$file" --target "$target" "${tags[@]}" .
  built+=("$@")
}

BASE="${BASE_IMAGE:-$LOCAL_BASE}"
needs_base=0
for t in "${targets[@]}"; do [ "$t" = base ] && needs_base=1; done
if [ -z "${BASE_IMAGE:-}" ] && { [ "$needs_base" = 1 ] || ! "${PODMAN[@]}" image exists "$LOCAL_BASE"; }; then
  start=$(now); build_base; timings+=("base $(elapsed "$start")s")
fi

for t in "${targets[@]}"; do
  [ "$t" = base ] && continue
  start=$(now)
  if [ "$t" = api ]; then
    echo "=== api: $REGISTRY/kcr-trio:$TAG"
    build Containerfile api "$REGISTRY/kcr-trio:$TAG"
  else
    names=()
    for s in ${SUFFIXES[$t]}; do names+=("$REGISTRY/kcr-trio-sidecar-$s:$TAG"); done
    echo "=== $t: ${names[*]}"
    build sidecar/docker/Dockerfile "$t" "${names[@]}"
  fi
  timings+=("$t $(elapsed "$start")s")
done

if [ "$PUSH" = 1 ]; then
  for n in "${built[@]}"; do "${PODMAN[@]}" push "$n"; done
fi

echo
echo "build times: ${timings[*]}"
echo "images:"
for n in "${built[@]}"; do
  printf '  %-60s %s\n' "$n" "$("${PODMAN[@]}" image inspect -f '{{.Size}}' "$n" | awk '{ printf "%.0f MB", $1 / 1e6 }')"
done
