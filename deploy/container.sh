#!/usr/bin/env bash
# Containerize a Bento without a Docker engine: `bentoml containerize --backend buildah`
# on a local stand-in for the python:3.11-slim base image that the Bento's Dockerfile starts
# from (no container registry is reachable from these machines).
#
#   deploy/container.sh [BENTO_TAG] [IMAGE_TAG]   build (default: recsys:latest, the Bento's tag)
#   deploy/container.sh --dry-run [BENTO_TAG] [IMAGE_TAG]
#                                                 say which tools, base and commands it would use
#   deploy/container.sh --base-key                print the base image's key and stop
#
# Tools: BENTOML and UV name the binaries; unset, they come from PATH, else from the project's
# .venv if there is one. uv is optional (unfound, the image's build pip-installs BentoML's
# pinned uv); bentoml is not. Building needs buildah, runc and debootstrap (Debian:
# apt-get install buildah runc debootstrap), as root.
#
# The base is a Debian bookworm rootfs (python3 3.11, python3-venv, ca-certificates) made with
# debootstrap, plus the uv binary, committed as localhost/recsys-base:<key> and tagged as
# python:3.11-slim. The key is a hash of everything the base is built from: the debootstrap
# suite, variant and packages, the mirror, the digests of the host's CA bundle and of the uv
# binary (or its absence), and the code of build_base below. A change of any of them builds a
# new base; an unchanged base is reused. It trusts the host's CA bundle, so that package
# downloads during the build work behind a TLS-intercepting proxy. The image runs as
# BentoML's non-root user.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=build
case "${1:-}" in
  --base-key) MODE=key; shift ;;
  --dry-run) MODE=dry-run; shift ;;
  -*) echo "error: unknown option $1 (valid: --base-key, --dry-run)" >&2; exit 2 ;;
esac
BENTO=${1:-recsys:latest}
IMAGE=${2:-}
BASE=${BASE_IMAGE:-python:3.11-slim}
BASE_REPO=localhost/recsys-base
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
HOST_CA=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
SUITE=bookworm
VARIANT=minbase
PACKAGES=python3,python3-venv,python3-pip,ca-certificates
# vfs and chroot isolation work where overlayfs and user namespaces do not (CI sandboxes).
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}

# find_tool NAME SETTING: the path of tool NAME, from $SETTING if set (then it must be
# executable), else PATH, else the project's .venv; empty if none has it.
find_tool() {
  local name=$1 setting=$2
  local given=${!setting:-}
  if [ -n "$given" ]; then
    if ! command -v "$given" >/dev/null 2>&1 || [ ! -x "$(command -v "$given")" ]; then
      echo "error: $setting=$given is not an executable $name" >&2
      return 2
    fi
    command -v "$given"
  elif command -v "$name" >/dev/null 2>&1; then
    command -v "$name"
  elif [ -x ".venv/bin/$name" ]; then
    echo "$PWD/.venv/bin/$name"
  fi
  return 0
}

UV_PATH=$(find_tool uv UV)
[ -r "$HOST_CA" ] || { echo "error: host CA bundle $HOST_CA not readable (set HOST_CA_BUNDLE)" >&2; exit 2; }

build_base() {  # build_base TAG: the base rootfs, committed as TAG
  local tag=$1
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant="$VARIANT" --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >/dev/null
  # The host's bundle, twice: as the bundle, and where update-ca-certificates (run again by
  # apt inside the build) picks it up, so that it survives.
  cp "$HOST_CA" "$rootfs/etc/ssl/certs/ca-certificates.crt"
  cp "$HOST_CA" "$rootfs/usr/local/share/ca-certificates/host-bundle.crt"
  # uv (BentoML's installer); without it the Dockerfile pip-installs a pinned one.
  if [ -n "$UV_PATH" ]; then cp "$UV_PATH" "$rootfs/usr/local/bin/uv"; fi
  ln -sf python3 "$rootfs/usr/bin/python"
  # Like the python:3.11-slim it stands in for: pip may install into this Python (Debian
  # marks its own as externally managed, PEP 668, and the Dockerfile's pip install of uv,
  # without a uv here, then failed).
  rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
  rm -rf "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/lib/apt/lists/"*
  local ctr
  ctr=$(buildah from scratch)
  buildah copy --quiet "$ctr" "$rootfs" / >/dev/null
  buildah config --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd python3 "$ctr"
  buildah commit --quiet --rm "$ctr" "$tag" >/dev/null
  rm -rf "$rootfs"
}

base_key() {  # the hash of every input of build_base; declare -f drops comments, keeps code
  {
    echo "suite=$SUITE variant=$VARIANT packages=$PACKAGES mirror=$MIRROR"
    echo "ca=$(sha256sum <"$HOST_CA" | cut -d' ' -f1)"
    if [ -n "$UV_PATH" ]; then echo "uv=$(sha256sum <"$UV_PATH" | cut -d' ' -f1)"; else echo "uv=absent"; fi
    declare -f build_base
  } | sha256sum | cut -c1-16
}

KEY=$(base_key)
if [ "$MODE" = key ]; then echo "$KEY"; exit 0; fi

BENTOML_PATH=$(find_tool bentoml BENTOML)
if [ -z "$BENTOML_PATH" ]; then
  echo "error: bentoml not found: set BENTOML=/path/to/bentoml, put it on PATH, or make the project's .venv (make install)" >&2
  exit 2
fi
if [ -z "$UV_PATH" ]; then
  echo "note: uv not found (UV, PATH, .venv): the base has none; the image's build pip-installs BentoML's pinned uv" >&2
fi
args=(containerize --backend buildah "$BENTO")
if [ -n "$IMAGE" ]; then args+=(-t "$IMAGE"); fi

if [ "$MODE" = dry-run ]; then
  echo "bentoml: $BENTOML_PATH"
  echo "uv: ${UV_PATH:-absent}"
  echo "base: $BASE_REPO:$KEY, tagged $BASE"
  echo "run: $BENTOML_PATH ${args[*]}"
  exit 0
fi

for tool in buildah runc debootstrap; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install buildah runc debootstrap)" >&2; exit 2; }
done
if buildah inspect --type image "$BASE_REPO:$KEY" >/dev/null 2>&1; then
  echo "== base image $BASE_REPO:$KEY: reused (its inputs are unchanged) =="
else
  echo "== base image $BASE_REPO:$KEY: debootstrap $SUITE ($VARIANT), uv: ${UV_PATH:-absent} =="
  build_base "$BASE_REPO:$KEY"
fi
# The Dockerfile names $BASE: point that name at this key's base (an older one loses it).
buildah tag "$BASE_REPO:$KEY" "$BASE"

echo "== bentoml containerize $BENTO (buildah) =="
# From /: containerize renders the Bento's docker.dockerfile_template out of a temporary
# directory and refuses a template outside the working directory (bentoml 1.4.40,
# utils/filesystem.py resolve_user_filepath); every path in / is inside it.
BENTOML_PATH=$(realpath -s "$BENTOML_PATH")
if [ -n "${BENTOML_HOME:-}" ]; then export BENTOML_HOME; BENTOML_HOME=$(realpath -ms "$BENTOML_HOME"); fi
cd /
"$BENTOML_PATH" "${args[@]}"
