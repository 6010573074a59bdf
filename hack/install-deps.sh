#!/usr/bin/env bash
# Installs the Debian packages the test suite uses, when they are missing and we are root.
# Without root it only reports what is missing; tests that need a missing tool skip with a reason.
set -euo pipefail

packages=(wireguard-tools)
commands=(wg)

missing=()
for i in "${!commands[@]}"; do
  command -v "${commands[$i]}" >/dev/null 2>&1 || missing+=("${packages[$i]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-deps: missing ${missing[*]} (needs root and apt-get); dependent tests will skip" >&2
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
