#!/usr/bin/env bash
# Installs the Debian packages the test suite and the demo use (and, with `bench`, the benchmarks), when they are missing and we are
# root. Without root it only reports what is missing; tests that need a missing tool skip with
# the reason. Go (for hack/build-binaries.sh) must already be installed: Debian's is too old.
set -euo pipefail

# command:package pairs. Not wireguard-go: hack/build-binaries.sh builds the current release
# (Debian's package is 0.0.20220316, without TUN offloads); wg still comes from wireguard-tools.
wanted=(
  wg:wireguard-tools
  ip:iproute2
  curl:curl
  openssl:openssl
  setsid:util-linux
  flock:util-linux
  shellcheck:shellcheck
  testssl:testssl.sh
  nft:nftables
  # real servers and clients of the TCP, UDP and TLS-passthrough tests
  redis-server:redis-server
  redis-cli:redis-tools
  dnsmasq:dnsmasq-base
  dig:bind9-dnsutils
  nginx:nginx
  haproxy:haproxy
  ss:iproute2
)
# `hack/install-deps.sh bench`: also what `make bench` measures with and against.
if [ "${1:-}" = "bench" ]; then
  wanted+=(wrk:wrk)
fi

missing=()
for pair in "${wanted[@]}"; do
  # (dnsmasq, nginx, haproxy live in /usr/sbin, which a non-login PATH may lack)
  command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] \
    || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-deps: missing ${missing[*]} (needs root and apt-get); dependent tests will skip" >&2
  else
    echo "install-deps: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # Servers the tests start themselves: their packages must not start them as services
    # (nginx, haproxy, redis would take ports 80, 6379... on this machine).
    temporary_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      temporary_policy=/usr/sbin/policy-rc.d
      trap 'rm -f "$temporary_policy"' EXIT
      printf '#!/bin/sh\nexit 101\n' > "$temporary_policy"
      chmod +x "$temporary_policy"
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi
command -v go >/dev/null 2>&1 || echo "install-deps: go is not installed; hack/build-binaries.sh needs it" >&2
exit 0
