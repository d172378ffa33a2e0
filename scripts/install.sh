#!/usr/bin/env bash
# Install everything kcr-trio's test suite needs on a fresh Debian 12 machine:
# the Python package with its test extras, the 13 language toolchains, redis-server, bubblewrap,
# podman with runc and mmdebstrap (the image tests build images from Debian packages), and the Node
# clients the keep-alive tests drive. Idempotent; run as root or with sudo.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

APT_PACKAGES=(
  # services and sandboxing the tests start themselves
  redis-server bubblewrap procps
  # language toolchains (py is the running Python; js/ts use the machine's Node)
  gcc g++ golang-go default-jdk-headless php-cli rustc r-base-core gfortran ldc
  # container images: build and run them (tests/integration/images, scripts/build-images.sh)
  podman runc mmdebstrap
  # the HTTP-cost benchmark's load generator (kcr-trio bench --scenario http-cost)
  wrk
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
command -v node >/dev/null 2>&1 || missing+=(nodejs npm)
if [ "${#missing[@]}" -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]'

# Node packages: the LibreChat HTTP stack for the keep-alive tests, and TypeScript for `ts`.
(cd tests/node && npm install --no-audit --no-fund --loglevel=error)
