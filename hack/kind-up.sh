#!/usr/bin/env bash
# kakuremichi on a local kind cluster, for a machine with Docker (make kind-up):
#
#   1. a kind cluster of one node, labelled kakuremichi.io/gateway-node=true (the nodeSelector of
#      examples/quickstart's Gateway pool), with the gateway's ports published on this machine:
#      TCP 80 and 443, UDP 51820;
#   2. the edge image built from edge-image/Dockerfile and loaded into the cluster;
#   3. the chart charts/kakuremichi, with that image for the operator and for the edges;
#   4. examples/quickstart/ applied, and what to do next.
#
# Idempotent: an existing cluster of that name is reused, the chart upgraded, the examples
# re-applied. hack/kind-down.sh (make kind-down) deletes the cluster. Needs docker, kind (0.20 or
# newer), helm and kubectl; touches only the kubectl context kind-<cluster>.
#
# Usage: hack/kind-up.sh [-h]
#
# Environment:
#   KIND_CLUSTER        cluster name (default: kakuremichi)
#   IMAGE_REPOSITORY    edge image repository (default: kakuremichi/edge)
#   IMAGE_TAG           edge image tag (default: the version in pyproject.toml)
#   CHART               the chart's folder (default: charts/kakuremichi of this repository)
#   CHART_NAMESPACE     namespace of the chart's release (default: kakuremichi-system)
#   HTTP_PORT, HTTPS_PORT, WIREGUARD_PORT
#                       ports of this machine published to the gateway's 80, 443 and 51820
#                       (defaults: 80, 443, 51820); used when the cluster is created
#   HELM_ARGS           more arguments for helm upgrade --install, split on spaces
#                       (e.g. "--set acme.email=you@example.com")
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "${script_dir}/.." && pwd)
script_path="${script_dir}/$(basename "${BASH_SOURCE[0]}")"

# The label of the node that runs the gateway: examples/quickstart/10-gateway.yaml selects it.
GATEWAY_NODE_LABEL="kakuremichi.io/gateway-node"
# kind's Pod and Service ranges (its defaults, written into the cluster's config below): agent
# subnets 10.N.0.0/24 that overlap them are skipped.
kind_pod_cidr="10.244.0.0/16"
kind_service_cidr="10.96.0.0/16"

log() { printf '[kind-up] %s\n' "$*" >&2; }
die() {
  printf '[kind-up] error: %s\n' "$*" >&2
  exit 1
}
usage() { sed -n '2,27s/^# \{0,1\}//p' "$script_path"; }

case "${1:-}" in
  -h | --help)
    usage
    exit 0
    ;;
  "") ;;
  *)
    usage >&2
    exit 2
    ;;
esac

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "${repo}/pyproject.toml" | head -n 1)
[ -n "$version" ] || die "no version in ${repo}/pyproject.toml"

cluster=${KIND_CLUSTER:-kakuremichi}
context="kind-${cluster}"
image_repository=${IMAGE_REPOSITORY:-kakuremichi/edge}
image_tag=${IMAGE_TAG:-$version}
image="${image_repository}:${image_tag}"
chart=${CHART:-${repo}/charts/kakuremichi}
chart_namespace=${CHART_NAMESPACE:-kakuremichi-system}
http_port=${HTTP_PORT:-80}
https_port=${HTTPS_PORT:-443}
wireguard_port=${WIREGUARD_PORT:-51820}
helm_args=()
[ -z "${HELM_ARGS:-}" ] || read -r -a helm_args <<<"$HELM_ARGS"

for port in "$http_port" "$https_port" "$wireguard_port"; do
  case "$port" in
    '' | *[!0-9]*) die "ports must be numbers, got '${port}'" ;;
  esac
done

missing=()
for tool in docker kind helm kubectl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  die "missing ${missing[*]}: this script needs docker (https://docs.docker.com/engine/install/), kind (https://kind.sigs.k8s.io/docs/user/quick-start/#installation), helm (https://helm.sh/docs/intro/install/) and kubectl (https://kubernetes.io/docs/tasks/tools/)"
fi
docker info >/dev/null 2>&1 ||
  die "cannot reach the Docker daemon (docker info failed): is Docker running, and may you use it?"
[ -f "${chart}/Chart.yaml" ] || die "no Helm chart at ${chart}"

# 1. The cluster.
if kind get clusters 2>/dev/null | grep -qx -- "$cluster"; then
  log "reusing the kind cluster ${cluster} (its port mappings are the ones it was created with)"
else
  log "creating the kind cluster ${cluster}: ports ${http_port}/tcp, ${https_port}/tcp, ${wireguard_port}/udp -> the gateway"
  kind create cluster --name "$cluster" --wait 120s --config=- <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  podSubnet: "${kind_pod_cidr}"
  serviceSubnet: "${kind_service_cidr}"
nodes:
  - role: control-plane
    labels:
      ${GATEWAY_NODE_LABEL}: "true"
    extraPortMappings:
      - containerPort: 80
        hostPort: ${http_port}
        protocol: TCP
      - containerPort: 443
        hostPort: ${https_port}
        protocol: TCP
      - containerPort: 51820
        hostPort: ${wireguard_port}
        protocol: UDP
EOF
fi

# 2. The image: one for the operator, the gateway and the agent.
revision=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)
log "building ${image}"
docker build -f "${repo}/edge-image/Dockerfile" -t "$image" \
  --build-arg "VERSION=${version}" --build-arg "REVISION=${revision}" "$repo"
log "loading ${image} into ${cluster}"
kind load docker-image "$image" --name "$cluster"

# 3. The chart.
log "installing the chart into ${chart_namespace}"
helm upgrade --install kakuremichi "$chart" \
  --kube-context "$context" --namespace "$chart_namespace" --create-namespace \
  --set "image.repository=${image_repository}" --set "image.tag=${image_tag}" \
  --set "image.pullPolicy=IfNotPresent" \
  --set "edgeImage.repository=${image_repository}" --set "edgeImage.tag=${image_tag}" \
  --set "excludeCIDRs={${kind_pod_cidr},${kind_service_cidr}}" \
  --wait --timeout 5m "${helm_args[@]+"${helm_args[@]}"}"

# 4. The quickstart.
log "applying examples/quickstart/"
kubectl --context "$context" apply -f "${repo}/examples/quickstart/"
if ! kubectl --context "$context" -n quickstart rollout status deployment/web --timeout=180s; then
  log "the quickstart's web server is not running yet; look at:"
  log "  kubectl --context ${context} -n quickstart describe pod -l app.kubernetes.io/name=web"
  log "  kubectl --context ${context} -n ${chart_namespace} get pods    # and the operator's logs"
  exit 1
fi

https_suffix=""
[ "$https_port" = 443 ] || https_suffix=":${https_port}"
cat <<EOF

kakuremichi runs on the kind cluster ${cluster} (kubectl context ${context}):

  kubectl --context ${context} get kakuremichi -A
  kubectl --context ${context} -n quickstart get pod        # web: 2/2, whoami + the agent sidecar

The quickstart Tunnel publishes hello.example.com with a Let's Encrypt certificate: make it a
domain of yours (examples/quickstart/40-tunnel.yaml) whose DNS points at this machine, with ports
80 and 443 reaching it, then apply it again. To try the path right here, give a Tunnel a
certificate of your own (examples/secret-certificate/README.md) and call it through the
gateway on this machine:

  curl --cacert tls.crt --resolve secure.example.com:${https_port}:127.0.0.1 https://secure.example.com${https_suffix}/

More: examples/README.md. Remove it all: make kind-down
EOF
