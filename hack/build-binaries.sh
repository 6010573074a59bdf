#!/usr/bin/env bash
# Builds the test binaries (kube-apiserver, kube-controller-manager, kubectl, etcd, helm, pebble,
# pebble-challtestsrv) and the wireguard-go the tests, the demo and the benchmark run, at the
# versions pinned in hack/binaries/versions.env, from the Go module proxy with the ordinary go
# tools, into a cache outside the clone. Binaries already built are reused, so a second run is a
# fast no-op.
#
# Usage: hack/build-binaries.sh [-h] [COMPONENT...]
#   COMPONENT: kube-apiserver kube-controller-manager kubectl etcd helm pebble pebble-challtestsrv
#              wireguard-go, or the groups "kubernetes" (the three Kubernetes binaries) and "all"
#              (the default).
#
# Environment:
#   KAKUREMICHI_CACHE   cache root (default: $HOME/.cache/kakuremichi). Layout:
#                         bin/<component>-<version>/<component>   the built binaries
#                         bin/current/<component>                 symlinks to the pinned ones
#                         src/<module>-<version>/                 throw-away build modules
#   KUBEBUILDER_ASSETS  envtest convention: when it holds an executable kube-apiserver, etcd or
#                       kubectl, that one is linked instead of being built.
#   Go's own variables (GOMODCACHE, GOCACHE, GOPROXY, GOTOOLCHAIN, ...) are honoured.
#
# Stdout gets one line: the folder holding all the requested binaries (bin/current). Logs,
# including the build time of each component, go to stderr. So: PATH="$(hack/build-binaries.sh):$PATH"
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
script_path="${script_dir}/$(basename "${BASH_SOURCE[0]}")"
# shellcheck source-path=SCRIPTDIR source=binaries/versions.env disable=SC1091
. "${script_dir}/binaries/versions.env"

all_components=(kube-apiserver kube-controller-manager kubectl etcd helm pebble pebble-challtestsrv wireguard-go)
cache=${KAKUREMICHI_CACHE:-${HOME}/.cache/kakuremichi}
current="${cache}/bin/current"
tmp_paths=()

log() { printf '[build-binaries] %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}
usage() { sed -n '2,24s/^# \{0,1\}//p' "$script_path"; }

# shellcheck disable=SC2317  # only invoked by the EXIT trap
cleanup() {
  local p
  for p in "${tmp_paths[@]+"${tmp_paths[@]}"}"; do rm -rf -- "$p"; done
}
trap cleanup EXIT

version_of() {
  case "$1" in
    kube-apiserver | kube-controller-manager | kubectl) echo "$PIN_KUBERNETES" ;;
    etcd) echo "$PIN_ETCD" ;;
    helm) echo "$PIN_HELM" ;;
    pebble | pebble-challtestsrv) echo "$PIN_PEBBLE" ;;
    wireguard-go) echo "$PIN_WIREGUARD_GO" ;;
    *) die "unknown component: $1" ;;
  esac
}

pinned_path() { echo "${cache}/bin/$1-$(version_of "$1")/$1"; }

# The binary from KUBEBUILDER_ASSETS, for the components envtest ships.
assets_path() {
  case "$1" in
    kube-apiserver | etcd | kubectl)
      if [ -n "${KUBEBUILDER_ASSETS:-}" ] && [ -x "${KUBEBUILDER_ASSETS}/$1" ]; then
        echo "${KUBEBUILDER_ASSETS}/$1"
        return 0
      fi
      ;;
  esac
  return 1
}

# Prints the path of a file in the module download cache for module@version (after fetching it):
# field is GoMod, Info or Zip.
mod_download_file() {
  local module=$1 version=$2 field=$3 json
  if ! json=$(go mod download -json "${module}@${version}"); then
    printf '%s\n' "$json" | sed -n 's/^[[:space:]]*"Error": "\(.*\)",\{0,1\}$/\1/p' >&2
    die "go mod download ${module}@${version} failed"
  fi
  printf '%s\n' "$json" | sed -n "s/^[[:space:]]*\"${field}\": \"\\(.*\\)\",\\{0,1\\}\$/\\1/p"
}

# Release time of module@version from the proxy's .info, as 2006-01-02T15:04:05Z.
mod_time() {
  local info
  info=$(mod_download_file "$1" "$2" Info)
  sed -n 's/.*"Time": *"\([^"]*\)".*/\1/p' "$info" | sed 's/\.[0-9]*Z$/Z/'
}

# Writes a throw-away module in $1 that requires $2@$3 (plus the go.mod text in $4) and imports
# the packages $5... from a tools.go, then runs go mod tidy. Skipped when already done with the
# same inputs.
prepare_module() {
  local dir=$1 module=$2 version=$3 extra=$4
  shift 4
  local upstream_mod go_line godebug wanted pkg
  upstream_mod=$(mod_download_file "$module" "$version" GoMod)
  [ -s "$upstream_mod" ] || die "no go.mod for ${module}@${version}"
  # Keep the upstream go and godebug lines, so the binary gets the language version and the
  # GODEBUG defaults its authors built it with.
  go_line=$(grep -m1 -E '^go [0-9]' "$upstream_mod" || echo "go 1.22")
  godebug=$(awk '/^godebug \(/{b=1} b{print} b&&/^\)/{b=0} /^godebug [^(]/{print}' "$upstream_mod")
  wanted=$(
    printf 'module kakuremichi.invalid/build\n\n%s\ntoolchain %s\n\n' "$go_line" "$PIN_GO_TOOLCHAIN"
    [ -z "$godebug" ] || printf '%s\n\n' "$godebug"
    printf 'require %s %s\n' "$module" "$version"
    [ -z "$extra" ] || printf '\n%s\n' "$extra"
  )
  if [ -f "${dir}/.ready" ] && [ "$(cat "${dir}/go.mod.in" 2>/dev/null)" = "$wanted" ]; then
    return 0
  fi
  log "preparing build module ${dir}"
  rm -rf -- "$dir"
  mkdir -p -- "$dir"
  printf '%s\n' "$wanted" >"${dir}/go.mod.in"
  cp -- "${dir}/go.mod.in" "${dir}/go.mod"
  {
    printf '//go:build tools\n\n// Package tools pins the main packages this module builds.\npackage tools\n\nimport (\n'
    for pkg in "$@"; do printf '\t_ "%s"\n' "$pkg"; done
    printf ')\n'
  } >"${dir}/tools.go"
  (cd "$dir" && go mod tidy) || die "go mod tidy failed in ${dir}"
  touch "${dir}/.ready"
}

# Moves the freshly built $1 into place as the pinned binary of component $2.
install_binary() {
  local built=$1 c=$2 dest
  dest=$(pinned_path "$c")
  mkdir -p -- "$(dirname "$dest")"
  chmod 0755 "$built"
  mv -f -- "$built" "$dest"
}

# Sets tmp to a new temporary output folder inside the cache (same file system, so mv is a
# rename); it is removed on exit.
tmp=""
make_tmp_dir() {
  mkdir -p -- "${cache}/bin"
  tmp=$(mktemp -d "${cache}/bin/.tmp.XXXXXX")
  tmp_paths+=("$tmp")
}

build_kubernetes() {
  local c=$1 v=$PIN_KUBERNETES src upstream_mod replaces staging date major minor ldflags x
  src="${cache}/src/kubernetes-${v}"
  # k8s.io/kubernetes requires its staging modules (k8s.io/api, ...) at v0.0.0 and replaces them
  # with ./staging/src/...; point each at its published tag v0.<minor>.<patch> instead.
  staging=v0.${v#v1.}
  upstream_mod=$(mod_download_file k8s.io/kubernetes "$v" GoMod)
  replaces=$(
    printf 'replace (\n'
    awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {print $1}' "$upstream_mod" | sort -u |
      while read -r x; do printf '\t%s => %s %s\n' "$x" "$x" "$staging"; done
    printf ')'
  )
  prepare_module "$src" k8s.io/kubernetes "$v" "$replaces" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kubectl
  date=$(mod_time k8s.io/kubernetes "$v")
  major=${v#v}
  major=${major%%.*}
  minor=${v#v*.}
  minor=${minor%%.*}
  ldflags="-s -w"
  for x in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X ${x}.gitVersion=${v} -X ${x}.gitMajor=${major} -X ${x}.gitMinor=${minor}"
    ldflags+=" -X ${x}.gitTreeState=clean -X ${x}.buildDate=${date}"
  done
  make_tmp_dir
  (cd "$src" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "${tmp}/${c}" "k8s.io/kubernetes/cmd/${c}") ||
    die "go build k8s.io/kubernetes/cmd/${c}@${v} failed"
  install_binary "${tmp}/${c}" "$c"
}

build_etcd() {
  local v=$PIN_ETCD src
  src="${cache}/src/etcd-${v}"
  # go.etcd.io/etcd/server/v3 has replace directives, so "go install ...@version" refuses it:
  # build its main package (the module root, a thin wrapper around etcdmain) from a module.
  prepare_module "$src" go.etcd.io/etcd/server/v3 "$v" "" go.etcd.io/etcd/server/v3
  make_tmp_dir
  (cd "$src" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "${tmp}/etcd" go.etcd.io/etcd/server/v3) ||
    die "go build go.etcd.io/etcd/server/v3@${v} failed"
  install_binary "${tmp}/etcd" etcd
}

build_helm() {
  local v=$PIN_HELM module helm_mod k8s_version k8s_major k8s_minor ldflags
  module="helm.sh/helm/${v%%.*}"
  # helm's Makefile stamps its version and the Kubernetes version of its client-go (used for
  # .Capabilities.KubeVersion in "helm template" and by "helm lint").
  helm_mod=$(mod_download_file "$module" "$v" GoMod)
  k8s_version=$(awk '$1 == "k8s.io/client-go" {print $2; exit}' "$helm_mod")
  k8s_major=${k8s_version#v}
  k8s_major=$((${k8s_major%%.*} + 1))
  k8s_minor=${k8s_version#v*.}
  k8s_minor=${k8s_minor%%.*}
  ldflags="-s -w -X ${module}/internal/version.version=${v} -X ${module}/internal/version.gitTreeState=clean"
  ldflags+=" -X ${module}/pkg/chartutil.k8sVersionMajor=${k8s_major} -X ${module}/pkg/chartutil.k8sVersionMinor=${k8s_minor}"
  ldflags+=" -X ${module}/pkg/lint/rules.k8sVersionMajor=${k8s_major} -X ${module}/pkg/lint/rules.k8sVersionMinor=${k8s_minor}"
  make_tmp_dir
  GOBIN=$tmp CGO_ENABLED=0 go install -trimpath -ldflags "$ldflags" "${module}/cmd/helm@${v}" ||
    die "go install ${module}/cmd/helm@${v} failed"
  install_binary "${tmp}/helm" helm
}

# Prints the path of the Debian pebble binary $1, installing the package when root; fails if absent.
pebble_from_debian() {
  local c=$1
  if [ ! -x "/usr/bin/${c}" ] && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "falling back to Debian's pebble package (its version, not ${PIN_PEBBLE})"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends pebble >&2 ||
      { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends pebble >&2; } ||
      true
  fi
  [ -x "/usr/bin/${c}" ] && echo "/usr/bin/${c}"
}

# Builds pebble or pebble-challtestsrv; on failure (no go, proxy unreachable) falls back to
# Debian's package and sets fallback to the path of that binary.
fallback=""
build_pebble() {
  local c=$1 v=$PIN_PEBBLE
  make_tmp_dir
  if command -v go >/dev/null 2>&1 &&
    GOBIN=$tmp CGO_ENABLED=0 go install -trimpath -ldflags "-s -w -X main.version=${v}" \
      "github.com/letsencrypt/pebble/v2/cmd/${c}@${v}"; then
    install_binary "${tmp}/${c}" "$c"
    return 0
  fi
  log "go install github.com/letsencrypt/pebble/v2/cmd/${c}@${v} failed"
  fallback=$(pebble_from_debian "$c") || die "no ${c}: the Go build failed and Debian's pebble package is not available"
}

build_wireguard_go() {
  local v=$PIN_WIREGUARD_GO
  # The module root is wireguard-go's main package, so "go install" names the binary after the
  # module (wireguard); it is installed as wireguard-go, the name the edges and the tests run.
  # Its version is a constant in its source: nothing to stamp.
  make_tmp_dir
  GOBIN=$tmp CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" "golang.zx2c4.com/wireguard@${v}" ||
    die "go install golang.zx2c4.com/wireguard@${v} failed"
  install_binary "${tmp}/wireguard" wireguard-go
}

# Makes sure component $1 exists; sets target to the binary to link and status to what was done.
target="" status=""
ensure() {
  local c=$1 start
  fallback=""
  if target=$(assets_path "$c"); then
    status="from KUBEBUILDER_ASSETS"
    log "${c}: using ${target} (KUBEBUILDER_ASSETS)"
    return 0
  fi
  target=$(pinned_path "$c")
  if [ -x "$target" ]; then
    status="reused"
    log "${c} $(version_of "$c"): reusing ${target}"
    return 0
  fi
  case "$c" in
    kube-apiserver | kube-controller-manager | kubectl | etcd | helm | wireguard-go)
      command -v go >/dev/null 2>&1 || die "go is not on PATH; it is needed to build ${c}"
      ;;
  esac
  log "${c} $(version_of "$c"): building"
  start=$(date +%s)
  case "$c" in
    kube-apiserver | kube-controller-manager | kubectl) build_kubernetes "$c" ;;
    etcd) build_etcd ;;
    helm) build_helm ;;
    pebble | pebble-challtestsrv) build_pebble "$c" ;;
    wireguard-go) build_wireguard_go ;;
  esac
  if [ -n "$fallback" ]; then
    target=$fallback
    status="Debian package instead of $(version_of "$c"), $(($(date +%s) - start))s"
  else
    [ -x "$target" ] || die "${c}: build produced no ${target}"
    status="built in $(($(date +%s) - start))s"
  fi
  log "${c} $(version_of "$c"): ${status} -> ${target}"
}

link() { ln -sfn -- "$1" "${current}/$2"; }

main() {
  local requested=() c r seen t v existing total_start
  declare -A targets=() statuses=()
  for r in "$@"; do
    case "$r" in
      -h | --help)
        usage
        return 0
        ;;
      all) requested+=("${all_components[@]}") ;;
      kubernetes) requested+=(kube-apiserver kube-controller-manager kubectl) ;;
      kube-apiserver | kube-controller-manager | kubectl | etcd | helm | pebble | pebble-challtestsrv | wireguard-go)
        requested+=("$r")
        ;;
      *)
        log "unknown component: ${r}"
        usage >&2
        return 2
        ;;
    esac
  done
  [ ${#requested[@]} -gt 0 ] || requested=("${all_components[@]}")

  mkdir -p -- "$current"
  # Absolute paths (GOBIN must be one), and go commands run outside any Go module or workspace
  # that the caller's directory may belong to.
  cache=$(cd -- "$cache" && pwd)
  current="${cache}/bin/current"
  cd -- "$cache"
  export GOWORK=off
  # One run at a time per cache: a second run waits, then finds everything built.
  if command -v flock >/dev/null 2>&1; then
    exec 9>"${cache}/.lock"
    flock -n 9 || {
      log "waiting for another build-binaries run (lock ${cache}/.lock)"
      flock 9
    }
  fi

  total_start=$(date +%s)
  for c in "${all_components[@]}"; do
    seen=""
    for r in "${requested[@]}"; do [ "$r" = "$c" ] && seen=1; done
    [ -n "$seen" ] || continue
    ensure "$c"
    targets[$c]=$target
    statuses[$c]=$status
  done

  # bin/current: the requested components as just resolved; the others point at their pinned
  # (or KUBEBUILDER_ASSETS) binary when present, keep a Debian fallback, and are dropped otherwise
  # (e.g. a link to a version that is no longer pinned).
  for c in "${all_components[@]}"; do
    if [ -n "${targets[$c]:-}" ]; then
      link "${targets[$c]}" "$c"
    elif t=$(assets_path "$c") || { t=$(pinned_path "$c") && [ -x "$t" ]; }; then
      link "$t" "$c"
    else
      existing=$(readlink -- "${current}/${c}" 2>/dev/null || true)
      case "$existing" in
        /usr/bin/*) [ -x "$existing" ] || rm -f -- "${current:?}/${c}" ;;
        *) rm -f -- "${current:?}/${c}" ;;
      esac
    fi
  done

  for c in "${all_components[@]}"; do
    [ -n "${statuses[$c]:-}" ] || continue
    v=$(version_of "$c")
    case "${statuses[$c]}" in "from KUBEBUILDER_ASSETS" | Debian*) v="-" ;; esac
    log "$(printf '%-24s %-9s %s' "$c" "$v" "${statuses[$c]}")"
  done
  log "total: $(($(date +%s) - total_start))s; binaries in ${current}"
  echo "$current"
}

# "exit" on the same line: bash never reads past it, even if this file is edited while it runs.
main "$@"; exit
