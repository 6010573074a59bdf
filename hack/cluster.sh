#!/usr/bin/env bash
# A local Kubernetes control plane without Docker: etcd, kube-apiserver and kube-controller-manager
# as local processes on loopback (the way controller-runtime's envtest does it), with RBAC on.
#
# Usage: hack/cluster.sh up|down|env|status|token SERVICEACCOUNT [NAMESPACE]
#   up      build the binaries if needed, start the control plane, install crds/, write
#           $KAKUREMICHI_CLUSTER_DIR/kubeconfig (default .cluster/kubeconfig); idempotent
#   down    stop it and remove its state
#   env     print `export KUBECONFIG=...` (use: eval "$(hack/cluster.sh env)")
#   status  say whether it is up
#   token   mint a token for a ServiceAccount (TokenRequest API), e.g. to run the operator with
#           the chart's RBAC instead of the admin token
#
# Environment: KAKUREMICHI_CLUSTER_DIR (state folder, default <repo>/.cluster),
# KAKUREMICHI_API_PORT (default: a free port), KAKUREMICHI_CACHE (see hack/build-binaries.sh).
# The admin credential is a static token of a user in group system:masters; the controllers run
# are the serviceaccount, serviceaccount-token, namespace, garbage-collector, root-ca publisher
# and daemonset controllers. No scheduler or kubelet runs: a DaemonSet's pods are made but stay
# unbound until someone binds them (pods/binding), as the demo and the tests do for the gateway.
# New Nodes are not tainted not-ready (TaintNodesByCondition is off): no kubelet would report
# them Ready and no node lifecycle controller would lift the taint, so no DaemonSet would run.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=binaries/versions.env disable=SC1091
. "${repo}/hack/binaries/versions.env"
state=${KAKUREMICHI_CLUSTER_DIR:-${repo}/.cluster}
pki="${state}/pki"
kubeconfig="${state}/kubeconfig"
service_range=10.0.0.0/24 # outside the agent pool (10.1-254.0.0/24)
# Without these there is no default ServiceAccount (Pods are refused), no owner-reference
# cleanup, and namespaces never finish deleting; the DaemonSet controller makes the gateway pools'
# pods, whose projected tokens prove them to control.
controllers=serviceaccount-controller,serviceaccount-token-controller,namespace-controller,garbage-collector-controller,root-ca-certificate-publisher-controller,daemonset-controller

log() { printf '[cluster] %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# Three distinct free ports at once (the sockets are held until all are chosen).
free_ports() {
  python3 -c 'import socket; s=[socket.socket() for _ in range(3)]; [x.bind(("127.0.0.1",0)) for x in s]; print(*[x.getsockname()[1] for x in s])'
}

bin_dir() {
  "${repo}/hack/build-binaries.sh" kube-apiserver kube-controller-manager kubectl etcd
}

running() { [ -f "${state}/$1.pid" ] && kill -0 "$(cat "${state}/$1.pid")" 2>/dev/null; }

start() {
  local name=$1
  shift
  if running "$name"; then return 0; fi
  setsid "$@" >>"${state}/logs/${name}.log" 2>&1 </dev/null &
  echo $! >"${state}/${name}.pid"
}

# wait_for PROCESS WHAT TIMEOUT COMMAND...: run COMMAND until it succeeds; fail early when
# PROCESS (one started by `start`) has exited, with the end of its log.
wait_for() {
  local process=$1 what=$2 timeout=$3
  shift 3
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if ! running "$process"; then
      tail -n 5 "${state}/logs/${process}.log" >&2 || true
      die "${process} exited while waiting for ${what}"
    fi
    [ $SECONDS -lt $deadline ] || die "timed out after ${timeout}s waiting for ${what} (logs in ${state}/logs)"
    sleep 0.2
  done
}

make_pki() {
  [ -f "${pki}/admin.token" ] && return 0
  mkdir -p "$pki"
  chmod 700 "$pki"
  (
    cd "$pki"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
      -subj "/CN=kakuremichi-local-ca" -keyout ca.key -out ca.crt 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -subj "/CN=kube-apiserver" -keyout apiserver.key -out apiserver.csr 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\n' >apiserver.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
      -extfile apiserver.ext -out apiserver.crt 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    head -c 32 /dev/urandom | base64 | tr -d '/+=' | head -c 40 >admin.token
    printf '%s,admin,admin,system:masters\n' "$(cat admin.token)" >tokens.csv
  )
}

write_kubeconfig() {
  local port=$1 file=$2 token=$3
  cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://127.0.0.1:${port}
    certificate-authority: ${pki}/ca.crt
users:
- name: admin
  user:
    token: ${token}
contexts:
- name: local
  context: {cluster: local, user: admin}
current-context: local
EOF
  chmod 600 "$file"
}

# The folder of the pinned Gateway API release's standard CRDs (fetched once into Go's module
# cache, verified against the checksum database).
gateway_api_crds() {
  command -v go >/dev/null 2>&1 || return 1
  local dir
  dir=$(GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/gateway-api@${PIN_GATEWAY_API}" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -d "${dir}/config/crd/standard" ] || return 1
  echo "${dir}/config/crd/standard"
}

up() {
  local bins port etcd_port peer_port
  bins=$(bin_dir)
  mkdir -p "${state}/logs"
  make_pki
  # Ports are chosen once and kept, so `up` after `up` finds the same cluster.
  if [ ! -f "${state}/ports.env" ]; then
    local chosen
    read -r -a chosen <<<"$(free_ports)"
    printf 'port=%s\netcd_port=%s\npeer_port=%s\n' \
      "${KAKUREMICHI_API_PORT:-${chosen[0]}}" "${chosen[1]}" "${chosen[2]}" >"${state}/ports.env"
  fi
  # shellcheck disable=SC1091
  . "${state}/ports.env"

  start etcd "${bins}/etcd" --name local --data-dir "${state}/etcd" \
    --listen-client-urls "http://127.0.0.1:${etcd_port}" --advertise-client-urls "http://127.0.0.1:${etcd_port}" \
    --listen-peer-urls "http://127.0.0.1:${peer_port}" --initial-advertise-peer-urls "http://127.0.0.1:${peer_port}" \
    --initial-cluster "local=http://127.0.0.1:${peer_port}" --unsafe-no-fsync --log-level warn
  wait_for etcd "etcd" 60 curl -sf "http://127.0.0.1:${etcd_port}/health"

  start kube-apiserver "${bins}/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:${etcd_port}" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$port" \
    --endpoint-reconciler-type none \
    --tls-cert-file "${pki}/apiserver.crt" --tls-private-key-file "${pki}/apiserver.key" \
    --client-ca-file "${pki}/ca.crt" --token-auth-file "${pki}/tokens.csv" \
    --authorization-mode RBAC --allow-privileged=true \
    --disable-admission-plugins TaintNodesByCondition \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "${pki}/sa.pub" --service-account-signing-key-file "${pki}/sa.key" \
    --service-cluster-ip-range "$service_range" --cert-dir "${state}/apiserver-certs"
  write_kubeconfig "$port" "$kubeconfig" "$(cat "${pki}/admin.token")"
  wait_for kube-apiserver "kube-apiserver /readyz" 120 curl -sf --cacert "${pki}/ca.crt" \
    -H "Authorization: Bearer $(cat "${pki}/admin.token")" "https://127.0.0.1:${port}/readyz"

  start kube-controller-manager "${bins}/kube-controller-manager" \
    --kubeconfig "$kubeconfig" --authentication-kubeconfig "$kubeconfig" \
    --authorization-kubeconfig "$kubeconfig" \
    --controllers "$controllers" \
    --service-account-private-key-file "${pki}/sa.key" --root-ca-file "${pki}/ca.crt" \
    --leader-elect=false --bind-address 127.0.0.1 --secure-port 0
  # A private discovery cache, so the first kubectl a user runs sees the CRDs installed here.
  local kubectl=("${bins}/kubectl" --kubeconfig "$kubeconfig" --cache-dir "${state}/kubectl-cache")
  wait_for kube-controller-manager "the default ServiceAccount" 120 "${kubectl[@]}" get serviceaccount default -n default
  "${kubectl[@]}" apply --server-side -f "${repo}/crds/" >/dev/null
  wait_for kube-apiserver "CRDs to be established" 60 "${kubectl[@]}" wait --for condition=Established --timeout 5s \
    -f "${repo}/crds/"
  # The Gateway API's standard CRDs, as a cluster that routes with it has them (its Gateway
  # shares a plural with ours: everything of ours names gateways.kakuremichi.io in full).
  local gateway_api file crds=()
  if gateway_api=$(gateway_api_crds); then
    "${kubectl[@]}" apply --server-side -f "$gateway_api" >/dev/null
    for file in "$gateway_api"/*.yaml; do # (not the admission policy that comes with them)
      if grep -q '^kind: CustomResourceDefinition' "$file"; then crds+=(-f "$file"); fi
    done
    wait_for kube-apiserver "Gateway API CRDs to be established" 60 "${kubectl[@]}" wait \
      --for condition=Established --timeout 5s "${crds[@]}"
  else
    log "up: no Go toolchain to fetch the Gateway API CRDs (${PIN_GATEWAY_API}); not installed"
  fi
  log "up: API server https://127.0.0.1:${port}; eval \"\$(hack/cluster.sh env)\" to use kubectl"
  echo "$kubeconfig"
}

down() {
  local name pid
  for name in kube-controller-manager kube-apiserver etcd; do
    if running "$name"; then
      pid=$(cat "${state}/${name}.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  rm -rf -- "$state"
  log "down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) echo "export KUBECONFIG=${kubeconfig}" ;;
  status)
    if running kube-apiserver; then echo "up: ${kubeconfig}"; else
      echo "down"
      exit 1
    fi
    ;;
  token)
    [ -n "${2:-}" ] || die "usage: hack/cluster.sh token SERVICEACCOUNT [NAMESPACE]"
    "$(bin_dir)/kubectl" --kubeconfig "$kubeconfig" create token "$2" -n "${3:-default}" --duration 24h
    ;;
  *)
    sed -n '2,20s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
    exit 2
    ;;
esac
