#!/usr/bin/env bash
# The Gateway API conformance suite (the pinned release's, PIN_GATEWAY_API in
# hack/binaries/versions.env) against kakuremichi on a kind cluster, for a machine with Docker
# (make gateway-conformance). make test cannot run it: the local control plane has no kubelet,
# so the suite's echo pods never run.
#
#   1. hack/kind-up.sh: a kind cluster with the edge image and the chart (the cluster agent on);
#   2. the Gateway API's standard CRDs, from the sigs.k8s.io/gateway-api module (go mod
#      download, checked against the checksum database), then hack/kind-up.sh again, so that
#      the chart makes the GatewayClass kakuremichi now that the cluster has the API;
#   3. the suite (module sigs.k8s.io/gateway-api/conformance), profiles GATEWAY-HTTP,
#      GATEWAY-TLS and GATEWAY-GRPC, with the
#      features docs/gateway-api.md claims; its report is written to $REPORT.
#
# What to expect: kakuremichi serves HTTP listeners on port 80 the way its gateways serve port
# 80 (the redirect to HTTPS, and ACME's HTTP-01), so the suite's tests that send plain HTTP
# through such a listener fail by design; docs/gateway-api.md lists which features are claimed
# and why the others are not.
#
# Usage: hack/gateway-conformance.sh [-h]
# Environment: those of hack/kind-up.sh, and
#   REPORT      where the conformance report goes (default: gateway-conformance-report.yaml)
#   FEATURES    the supported features (default: the claimed ones below)
#   GO_TEST_ARGS more arguments for go test, split on spaces (e.g. "-run TestConformance/HTTPRouteWeight")
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "${script_dir}/.." && pwd)
# shellcheck source=binaries/versions.env disable=SC1091
. "${repo}/hack/binaries/versions.env"

if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,26p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 0
fi

# Claimed (docs/gateway-api.md): core Gateway, HTTPRoute and ReferenceGrant, with these extended
# features.
CLAIMED="Gateway,HTTPRoute,ReferenceGrant,HTTPRouteQueryParamMatching,HTTPRouteMethodMatching,HTTPRouteParentRefPort,TLSRoute,GRPCRoute,TCPRoute,UDPRoute"
FEATURES=${FEATURES:-$CLAIMED}
REPORT=${REPORT:-${repo}/gateway-conformance-report.yaml}
cluster=${KIND_CLUSTER:-kakuremichi}

for tool in docker kind helm kubectl go; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "gateway-conformance: needs $tool on PATH" >&2
    exit 1
  }
done

module_dir() {
  GOFLAGS=-mod=mod go mod download -json "$1" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p'
}

crds="$(module_dir "sigs.k8s.io/gateway-api@${PIN_GATEWAY_API}")/config/crd/standard"
suite=$(module_dir "sigs.k8s.io/gateway-api/conformance@${PIN_GATEWAY_API}")
if [ ! -d "$crds" ] || [ ! -d "$suite" ]; then
  echo "gateway-conformance: the Gateway API ${PIN_GATEWAY_API} modules could not be fetched" >&2
  exit 1
fi

"${repo}/hack/kind-up.sh"
kubectl --context "kind-${cluster}" apply --server-side -f "$crds"
"${repo}/hack/kind-up.sh" # (again: helm now sees the Gateway API and makes the GatewayClass)
kubectl --context "kind-${cluster}" wait --for condition=Accepted --timeout 120s \
  gatewayclasses.gateway.networking.k8s.io/kakuremichi

# The module cache is read-only: the suite runs from a copy, laid out as the repository is
# (its go.mod replaces sigs.k8s.io/gateway-api with ../).
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -R "$(dirname "$crds")/../../." "$work"
mkdir -p "$work/conformance"
cp -R "$suite/." "$work/conformance"
chmod -R u+w "$work"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "${repo}/pyproject.toml" | head -n 1)
read -r -a extra <<<"${GO_TEST_ARGS:-}"
kubectl config use-context "kind-${cluster}" >/dev/null
(
  cd "$work/conformance"
  GOWORK=off go test ./ -run TestConformance -timeout 90m "${extra[@]}" -args \
    --gateway-class=kakuremichi --supported-features="$FEATURES" \
    --conformance-profiles=GATEWAY-HTTP,GATEWAY-TLS,GATEWAY-GRPC,GATEWAY-TCP,GATEWAY-UDP --report-output="$REPORT" \
    --organization=kakuremichi --project=kakuremichi --version="v${version}" \
    --url=https://github.com/kakuremichi/kakuremichi --contact=@kakuremichi/maintainers \
    --mode=default --allow-crds-mismatch
)
echo "gateway-conformance: report in $REPORT"
