#!/usr/bin/env bash
# Deletes the kind cluster hack/kind-up.sh made (make kind-down), and with it everything in it.
# The edge image stays in Docker (docker image rm kakuremichi/edge:<version> removes it).
#
# Usage: hack/kind-down.sh [-h]
#
# Environment:
#   KIND_CLUSTER   cluster name (default: kakuremichi)
set -euo pipefail

script_path="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"

die() {
  printf '[kind-down] error: %s\n' "$*" >&2
  exit 1
}

case "${1:-}" in
  -h | --help)
    sed -n '2,8s/^# \{0,1\}//p' "$script_path"
    exit 0
    ;;
  "") ;;
  *)
    sed -n '2,8s/^# \{0,1\}//p' "$script_path" >&2
    exit 2
    ;;
esac

cluster=${KIND_CLUSTER:-kakuremichi}
command -v kind >/dev/null 2>&1 ||
  die "kind is not installed (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)"
if kind get clusters 2>/dev/null | grep -qx -- "$cluster"; then
  kind delete cluster --name "$cluster"
else
  printf '[kind-down] no kind cluster named %s; nothing to do\n' "$cluster" >&2
fi
