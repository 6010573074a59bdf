#!/bin/sh
# kakuremichi @ROLE@ installer, served by the control plane at /install/@ROLE@.sh:
#
#   curl -sSL @CONTROL_URL@/install/@ROLE@.sh | sh -s -- --api-key=KEY [--control-url=URL]
#
# Installs kakuremichi into a virtualenv, writes /etc/kakuremichi/@ROLE@.conf (mode 0600), and
# creates, enables and starts the systemd unit kakuremichi-@ROLE@. Running it again updates the
# installation and the configuration in place. When the control plane serves a wheelhouse, it
# installs from that alone (no package index needed). Without kernel WireGuard (after trying
# to load the module) and without wireguard-go, it installs the control plane's wireguard-go
# build into /opt/kakuremichi/bin, checked against the SHA-256 written below; with nothing to
# get, it says so in one line and exits with status @EXIT_NO_WIREGUARD@.
#
# Options:
#   --api-key=KEY        the @ROLE@'s API key (required; or KAKUREMICHI_API_KEY in the
#                        environment, which other users cannot read in the process list)
#   --control-url=URL    where the control plane is (default: @CONTROL_URL@)
#   --wheel=PATH|URL     install this wheel (default: from the control plane's wheelhouse or its
#                        own release's wheel when it serves them, else the package index's)
#   --ca-file=PATH       CA bundle to trust for an https control URL signed by a private CA
#                        (kept as /etc/kakuremichi/control-ca.pem for the service)
#   --index-url=URL      install from this package index
#   --allow-index        when the control plane's wheelhouse has nothing for this host (its
#                        Python, its architecture), take the dependencies from the package index
#   --package=SPEC       what to install (default: kakuremichi)
#   --prefix=DIR         install below DIR instead of / (no root or systemd needed; nothing started)
#   --no-start           write everything, but do not enable or start the unit
#   --no-firewall        run the edge without its nftables packet filter on the WireGuard
#                        interface (by default nft is installed when missing, and required)
set -eu
umask 022

# All of it in a function, so that a download cut short runs nothing at all.
main() {
ROLE="@ROLE@"
CONTROL_URL="@CONTROL_URL@"
API_KEY="${KAKUREMICHI_API_KEY:-}"
WHEEL=""
SERVED_WHEEL="@SERVED_WHEEL@"
VERSION="@VERSION@"
WHEELHOUSE="@WHEELHOUSE@"
WIREGUARD_GO="@WIREGUARD_GO@" # architecture:sha256 of each wireguard-go build control serves
NO_WIREGUARD='@NO_WIREGUARD@'
NO_WIREGUARD_STATUS="@EXIT_NO_WIREGUARD@"

CA_FILE=""
INDEX_URL=""
PACKAGE="kakuremichi"
PREFIX=""
START=1
FIREWALL=1
ALLOW_INDEX=0

fail() {
  echo "kakuremichi installer: $*" >&2
  exit 1
}

for arg in "$@"; do
  case "$arg" in
    --api-key=*) API_KEY="${arg#*=}" ;;
    --control-url=*) CONTROL_URL="${arg#*=}" ;;
    --wheel=*) WHEEL="${arg#*=}" ;;
    --ca-file=*) CA_FILE="${arg#*=}" ;;
    --index-url=*) INDEX_URL="${arg#*=}" ;;
    --package=*) PACKAGE="${arg#*=}" ;;
    --prefix=*) PREFIX="${arg#*=}" ;;
    --no-start) START=0 ;;
    --no-firewall) FIREWALL=0 ;;
    --allow-index) ALLOW_INDEX=1 ;;
    -h | --help)
      echo "usage: sh $ROLE.sh --api-key=KEY [options]: see the comments at the top of $CONTROL_URL/install/$ROLE.sh"
      exit 0
      ;;
    *) fail "unknown option: $arg (see --help)" ;;
  esac
done

[ -n "$API_KEY" ] || fail "--api-key=KEY is required"
case "$API_KEY" in
  agt_* | gtw_*) ;;
  *) fail "--api-key does not look like a kakuremichi API key (agt_... or gtw_...)" ;;
esac
case "$CONTROL_URL" in
  https://*) ;;
  http://127.0.0.1 | http://127.0.0.1[:/]* | http://localhost | http://localhost[:/]* | http://\[::1\]*) ;;
  http://*) fail "--control-url=$CONTROL_URL is plain HTTP: anyone on the way could change what this installs as root; use the https:// URL of the control channel" ;;
  *) fail "--control-url must be an http:// or https:// URL, got '$CONTROL_URL'" ;;
esac
[ -z "$CA_FILE" ] || [ -r "$CA_FILE" ] || fail "--ca-file=$CA_FILE: no such readable file"

# Paths given relative to where it was started, then away from there: Python would otherwise
# import modules from that folder (perhaps a shared one) while it runs as root.
absolute() {
  case "$1" in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s/%s\n' "$(pwd)" "$1" ;;
  esac
}
[ -z "$CA_FILE" ] || CA_FILE=$(absolute "$CA_FILE")
case "$WHEEL" in
  "" | http://* | https://*) ;;
  *) WHEEL=$(absolute "$WHEEL") ;;
esac
if [ -n "$PREFIX" ]; then
  mkdir -p "$PREFIX" || fail "cannot create $PREFIX"
  PREFIX=$(CDPATH='' cd -- "$PREFIX" && pwd)
fi
cd /
# What it downloads, and the CA file read once (it may be read again by curl, Python and pip).
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kakuremichi-install.XXXXXX") || fail "cannot make a temporary folder"
trap 'rm -rf "$WORK"' EXIT
if [ -n "$CA_FILE" ]; then
  cp "$CA_FILE" "$WORK/ca.pem" || fail "cannot read $CA_FILE"
  CA_FILE="$WORK/ca.pem"
fi

if [ -n "$PREFIX" ]; then
  START=0
else
  [ "$(id -u)" -eq 0 ] || fail "run as root (it writes /etc and /opt and installs a systemd unit)"
  [ -d /run/systemd/system ] || fail "systemd is not running here; this installer needs it (or use --prefix and run 'kakuremichi $ROLE' yourself)"
fi

# The edge's packet filter on its WireGuard interface needs nft (Debian's nftables).
if [ "$FIREWALL" = 1 ] && ! command -v nft >/dev/null 2>&1; then
  if [ -n "$PREFIX" ]; then
    echo "kakuremichi installer: nft (nftables) is not installed; the $ROLE needs it to start (or --no-firewall)" >&2
  elif command -v apt-get >/dev/null 2>&1; then
    echo "kakuremichi installer: installing nftables (the $ROLE's packet filter)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq nftables >/dev/null 2>&1 ||
      { apt-get update -qq && apt-get install -y -qq nftables >/dev/null; } ||
      fail "cannot install nftables (apt-get install nftables), or rerun with --no-firewall"
  elif command -v dnf >/dev/null 2>&1; then
    dnf install -y -q nftables || fail "cannot install nftables, or rerun with --no-firewall"
  elif command -v apk >/dev/null 2>&1; then
    apk add -q nftables || fail "cannot install nftables, or rerun with --no-firewall"
  else
    fail "nft (nftables) is required for the $ROLE's packet filter: install it, or rerun with --no-firewall"
  fi
fi

PYTHON=$(command -v python3 || true)
[ -n "$PYTHON" ] || fail "python3 (3.11 or newer) is required"
"$PYTHON" -I -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
  fail "python3 3.11 or newer with the venv module is required ($("$PYTHON" --version 2>&1))"

APP="$PREFIX/opt/kakuremichi"
CONF_DIR="$PREFIX/etc/kakuremichi"
CONF="$CONF_DIR/$ROLE.conf"
UNIT="$PREFIX/etc/systemd/system/kakuremichi-$ROLE.service"

# WireGuard: the kernel's (loaded if it can be), a wireguard-go where the edge will look (for
# the service, the system's folders, not the PATH of whoever runs this; with --prefix, where
# they run the edge themselves, their PATH), or the control plane's build, which the edge finds
# in $APP/bin.
wireguard_here() {
  [ -d /sys/module/wireguard ] && return 0
  if [ -z "$PREFIX" ] && command -v modprobe >/dev/null 2>&1 && modprobe wireguard 2>/dev/null; then
    return 0
  fi
  for dir in /usr/local/sbin /usr/local/bin /usr/sbin /usr/bin /sbin /bin; do
    [ -x "$dir/wireguard-go" ] && return 0
  done
  [ -n "$PREFIX" ] && command -v wireguard-go >/dev/null 2>&1
}
if ! wireguard_here; then
  case "$(uname -m)" in
    x86_64 | amd64) ARCH=amd64 ;;
    aarch64 | arm64) ARCH=arm64 ;;
    *) ARCH="" ;;
  esac
  SUM=""
  for build in $WIREGUARD_GO; do
    [ "${build%%:*}" != "$ARCH" ] || SUM="${build#*:}"
  done
  if [ -z "$SUM" ]; then
    echo "kakuremichi $ROLE: $NO_WIREGUARD" >&2
    exit "$NO_WIREGUARD_STATUS"
  fi
  echo "kakuremichi installer: no kernel WireGuard here; installing the control plane's wireguard-go ($ARCH) into $APP/bin"
  mkdir -p "$APP/bin" || fail "cannot create $APP/bin"
  "$PYTHON" -I -c '
import hashlib, os, ssl, sys, urllib.request
url, out, expected, ca = sys.argv[1:]
if os.path.isfile(out) and hashlib.sha256(open(out, "rb").read()).hexdigest() == expected:
    sys.exit(0)
tls = ssl.create_default_context(cafile=ca or None)
with urllib.request.urlopen(url, context=tls, timeout=300) as got:
    data = got.read()
if hashlib.sha256(data).hexdigest() != expected:
    sys.exit("the downloaded wireguard-go does not match its SHA-256: not installed")
with open(out + ".tmp", "wb") as binary:
    binary.write(data)
os.chmod(out + ".tmp", 0o755)
os.replace(out + ".tmp", out)
' "$CONTROL_URL/install/wireguard-go/linux-$ARCH" "$APP/bin/wireguard-go" "$SUM" "$CA_FILE" ||
    fail "cannot install wireguard-go from $CONTROL_URL (for a private CA, add --ca-file=PATH)"
fi

# The control plane's own release, so the edge speaks its protocol. Python fetches it (it is
# needed anyway), trusting --ca-file too: pip would trust only its own CA bundle.
download_served_wheel() {
  WHEEL="$WORK/$SERVED_WHEEL"
  echo "kakuremichi installer: downloading $CONTROL_URL/install/$SERVED_WHEEL"
  "$PYTHON" -I -c '
import ssl, sys, urllib.request
url, out, ca = sys.argv[1:]
tls = ssl.create_default_context(cafile=ca or None)
with urllib.request.urlopen(url, context=tls, timeout=300) as got, open(out, "wb") as wheel:
    wheel.write(got.read())
' "$CONTROL_URL/install/$SERVED_WHEEL" "$WHEEL" "$CA_FILE" || fail "cannot download the wheel from $CONTROL_URL (for a private CA, add --ca-file=PATH)"
}

# pip install of kakuremichi: from the wheelhouse alone (1), or the usual way (0).
pip_install() {
  from_wheelhouse=$1
  set -- --quiet --upgrade
  if [ "$from_wheelhouse" = 1 ]; then
    # The control plane's release and every dependency, from control alone: no links or
    # index of pip's own configuration (PIP_* variables, pip.conf) join in.
    set -- "$@" --no-index --find-links "$CONTROL_URL/install/wheels/" "kakuremichi==$VERSION"
    if [ -n "$CA_FILE" ]; then
      # (requests, under pip, prefers REQUESTS_CA_BUNDLE from the environment to --cert.)
      set -- REQUESTS_CA_BUNDLE="$CA_FILE" PIP_CERT="$CA_FILE" "$APP/venv/bin/python" -I -m pip install "$@"
    else
      set -- "$APP/venv/bin/python" -I -m pip install "$@"
    fi
    env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_NO_INDEX \
      PIP_CONFIG_FILE=/dev/null "$@"
    return
  fi
  [ -z "$INDEX_URL" ] || set -- "$@" --index-url "$INDEX_URL"
  if [ -n "$WHEEL" ]; then
    set -- "$@" "$WHEEL"
  elif [ "$PACKAGE" = kakuremichi ] && [ -n "$VERSION" ]; then
    set -- "$@" "kakuremichi==$VERSION" # the control plane's release, never another's
  else
    set -- "$@" "$PACKAGE"
  fi
  "$APP/venv/bin/python" -I -m pip install "$@"
}

DEFAULT_PACKAGE=0
[ -n "$WHEEL" ] || [ -n "$INDEX_URL" ] || [ "$PACKAGE" != kakuremichi ] || DEFAULT_PACKAGE=1
echo "kakuremichi installer: installing the $ROLE into $APP"
[ -x "$APP/venv/bin/python" ] || "$PYTHON" -I -m venv "$APP/venv" || fail "cannot create a virtualenv in $APP/venv"
INSTALLED=0
if [ "$DEFAULT_PACKAGE" = 1 ] && [ -n "$WHEELHOUSE" ]; then
  echo "kakuremichi installer: installing from $CONTROL_URL/install/wheels/"
  if pip_install 1; then
    INSTALLED=1
  elif [ "$ALLOW_INDEX" = 1 ]; then
    # The wheelhouse holds the platforms the control plane's image runs on; this host may be
    # another (its Python, its architecture): the release's wheel and the package index then.
    echo "kakuremichi installer: the control plane's wheelhouse did not install here; trying the package index (--allow-index)" >&2
  else
    # Never the index unasked: a wheelhouse that fails (perhaps made to fail on the way) must
    # not turn into dependencies from wherever pip is pointed.
    fail "installing from the control plane's wheelhouse failed (pip says why above): it holds wheels for the control plane's own platform and Python, perhaps not this host's. Rerun with --allow-index to take the dependencies from the package index"
  fi
fi
if [ "$INSTALLED" = 0 ]; then
  [ "$DEFAULT_PACKAGE" = 0 ] || [ -z "$SERVED_WHEEL" ] || download_served_wheel
  pip_install 0 || fail "installing kakuremichi failed"
fi
"$APP/venv/bin/kakuremichi" --version >/dev/null || fail "the installed kakuremichi does not run"

umask 077
mkdir -p "$CONF_DIR"
tmp="$CONF.tmp.$$"
cat >"$tmp" <<EOF
# Written by the kakuremichi installer. Read by kakuremichi-$ROLE.service.
KAKUREMICHI_API_KEY=$API_KEY
KAKUREMICHI_CONTROL_URL=$CONTROL_URL
EOF
[ "$FIREWALL" = 1 ] || echo "KAKUREMICHI_NO_FIREWALL=1" >>"$tmp"
if [ -n "$CA_FILE" ]; then
  cp "$CA_FILE" "$CONF_DIR/control-ca.pem" || fail "cannot copy $CA_FILE"
  echo "KAKUREMICHI_CA_FILE=/etc/kakuremichi/control-ca.pem" >>"$tmp"
fi
chmod 600 "$tmp"
mv -f "$tmp" "$CONF"

umask 022
mkdir -p "$(dirname "$UNIT")"
cat >"$UNIT" <<EOF
[Unit]
Description=kakuremichi $ROLE
Documentation=https://kakuremichi.io
Wants=network-online.target
After=network-online.target

[Service]
EnvironmentFile=/etc/kakuremichi/$ROLE.conf
ExecStart=/opt/kakuremichi/venv/bin/kakuremichi $ROLE --state-dir /var/lib/kakuremichi
StateDirectory=kakuremichi
StateDirectoryMode=0700
Restart=always
RestartSec=3
# 2: bad settings, 3: no packet filter (nft), 4: no WireGuard: restarting would not help.
RestartPreventExitStatus=2 3 4
AmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE
CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE
NoNewPrivileges=yes

[Install]
WantedBy=multi-user.target
EOF

if [ "$START" -eq 1 ]; then
  systemctl daemon-reload
  systemctl enable "kakuremichi-$ROLE.service" >/dev/null
  systemctl restart "kakuremichi-$ROLE.service"
  echo "kakuremichi installer: kakuremichi-$ROLE is running (journalctl -u kakuremichi-$ROLE)"
else
  echo "kakuremichi installer: installed; not started (start: systemctl enable --now kakuremichi-$ROLE)"
fi
}

main "$@"
