#!/bin/sh
# How the edge image installs kakuremichi. edge-image/Dockerfile runs these steps, and
# tests/integration/test_edge_image.py runs the same steps, read from the Dockerfile's RUN lines,
# on this machine: one source of truth for the image's Python install.
#
# Usage:
#   edge-image/install.sh wheels SRC WHEELHOUSE
#       Build the kakuremichi wheel from the source tree SRC, then download the wheels of its
#       dependencies at the versions pinned in SRC/edge-image/constraints.txt into WHEELHOUSE.
#       Binary wheels only: the image has no compiler.
#   edge-image/install.sh venv WHEELHOUSE DEST
#       Create a virtualenv at DEST and install kakuremichi from WHEELHOUSE alone (no package
#       index), drop pip and setuptools from it, and check that DEST/bin/kakuremichi runs.
#   edge-image/install.sh lock SRC
#       For maintainers: resolve the newest dependencies pyproject.toml allows and print a new
#       constraints file (edge-image/install.sh lock . >edge-image/constraints.txt).
#
# Environment: PYTHON, the interpreter (default python3). pip's own variables (PIP_INDEX_URL,
# PIP_CACHE_DIR, ...) are honoured.
set -eu

PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

# One temporary folder for everything, made when first needed and removed on exit (also after
# a failure).
WORK=""
trap '[ -z "$WORK" ] || rm -rf "$WORK"' EXIT
work_dir() {
  [ -n "$WORK" ] || WORK=$(mktemp -d "${TMPDIR:-/tmp}/kakuremichi-install.XXXXXX") ||
    fail "cannot make a temporary folder"
}

fail() {
  echo "edge-image/install.sh: $*" >&2
  exit 1
}

usage() {
  sed -n '2,20s/^# \{0,1\}//p' "$0"
}

# A throw-away virtualenv holding only pip (the image's Debian Python has no pip of its own);
# sets BUILD_PYTHON.
build_venv() {
  work_dir
  "$PYTHON" -m venv "$WORK/build" || fail "cannot create a virtualenv with $PYTHON"
  BUILD_PYTHON="$WORK/build/bin/python"
}

# The wheel of kakuremichi in $1 (exactly one).
the_wheel() {
  set -- "$1"/kakuremichi-*.whl
  if [ $# -ne 1 ] || [ ! -f "$1" ]; then fail "expected exactly one kakuremichi wheel, found: $*"; fi
  echo "$1"
}

# wheels SRC WHEELHOUSE [CONSTRAINTS]
wheels() {
  src=$1 wheelhouse=$2 constraints=${3-}
  [ -f "$src/pyproject.toml" ] || fail "$src has no pyproject.toml"
  mkdir -p "$wheelhouse"
  rm -f "$wheelhouse"/kakuremichi-*.whl
  build_venv
  "$BUILD_PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$wheelhouse" "$src" ||
    fail "building the kakuremichi wheel failed"
  wheel=$(the_wheel "$wheelhouse")
  if [ -n "$constraints" ]; then set -- --constraint "$constraints"; else set --; fi
  "$BUILD_PYTHON" -m pip wheel --quiet --only-binary=:all: --wheel-dir "$wheelhouse" "$@" "$wheel" ||
    fail "downloading the dependencies' wheels failed"
}

# venv WHEELHOUSE DEST
venv() {
  wheelhouse=$1 dest=$2
  wheel=$(the_wheel "$wheelhouse")
  "$PYTHON" -m venv "$dest" || fail "cannot create a virtualenv at $dest"
  "$dest/bin/python" -m pip install --quiet --no-index --find-links "$wheelhouse" "$wheel" ||
    fail "installing kakuremichi from $wheelhouse failed"
  "$dest/bin/python" -m pip uninstall --quiet --yes pip setuptools >/dev/null 2>&1 || true
  "$dest/bin/kakuremichi" --version >/dev/null || fail "the installed kakuremichi does not run"
}

[ $# -ge 1 ] || {
  usage >&2
  exit 2
}
command=$1
shift
case "$command" in
  wheels)
    [ $# -eq 2 ] || fail "usage: wheels SRC WHEELHOUSE"
    wheels "$1" "$2" "$1/edge-image/constraints.txt"
    ;;
  venv)
    [ $# -eq 2 ] || fail "usage: venv WHEELHOUSE DEST"
    venv "$1" "$2"
    ;;
  lock)
    [ $# -eq 1 ] || fail "usage: lock SRC"
    work_dir
    work="$WORK/lock"
    wheels "$1" "$work/wheels" ""
    venv "$work/wheels" "$work/venv"
    echo "# Versions of kakuremichi's dependencies in the edge image; pip installs exactly these."
    echo "# Refresh: edge-image/install.sh lock . >edge-image/constraints.txt (then run"
    echo "# tests/integration/test_edge_image.py). Generated with $("$work/venv/bin/python" --version)."
    "$work/venv/bin/python" - <<'PY'
import importlib.metadata as metadata

pins = {(d.metadata["Name"], d.version) for d in metadata.distributions()}
for name, version in sorted(pins, key=lambda pin: pin[0].lower()):
    if name.lower() != "kakuremichi":
        print(f"{name}=={version}")
PY
    ;;
  -h | --help) usage ;;
  *)
    usage >&2
    exit 2
    ;;
esac
