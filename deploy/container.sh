#!/usr/bin/env bash
# Containerize a Bento without a Docker engine: `bentoml containerize --backend buildah`
# on a local stand-in for the python:3.11-slim base image that the Bento's Dockerfile starts
# from (no container registry is reachable from these machines).
#
#   deploy/container.sh [BENTO_TAG] [IMAGE_TAG]      (default: recsys:latest, the Bento's tag)
#
# Needs buildah, runc and debootstrap (Debian: apt-get install buildah runc debootstrap), as
# root. The base is a Debian bookworm rootfs (python3 3.11, python3-venv, ca-certificates)
# built once with debootstrap, plus the uv binary of this project's venv, committed as
# python:3.11-slim. It trusts the host's CA bundle, so that package downloads during the
# build work behind a TLS-intercepting proxy. The image runs as BentoML's non-root user.
set -euo pipefail
cd "$(dirname "$0")/.."

BENTO=${1:-recsys:latest}
IMAGE=${2:-}
BASE=${BASE_IMAGE:-python:3.11-slim}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BIN=${VENV_BIN:-.venv/bin}
HOST_CA=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
# vfs and chroot isolation work where overlayfs and user namespaces do not (CI sandboxes).
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}

for tool in buildah runc debootstrap; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install buildah runc debootstrap)" >&2; exit 2; }
done

if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
  echo "== base image $BASE: debootstrap bookworm (minbase) =="
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" "$MIRROR" >/dev/null
  # The host's bundle, twice: as the bundle, and where update-ca-certificates (run again by
  # apt inside the build) picks it up, so that it survives.
  cp "$HOST_CA" "$rootfs/etc/ssl/certs/ca-certificates.crt"
  cp "$HOST_CA" "$rootfs/usr/local/share/ca-certificates/host-bundle.crt"
  # uv (BentoML's installer); without it the Dockerfile pip-installs a pinned one.
  if [ -x "$BIN/uv" ]; then cp "$BIN/uv" "$rootfs/usr/local/bin/uv"; fi
  ln -sf python3 "$rootfs/usr/bin/python"
  rm -rf "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/lib/apt/lists/"*
  ctr=$(buildah from scratch)
  buildah copy --quiet "$ctr" "$rootfs" / >/dev/null
  buildah config --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd python3 "$ctr"
  buildah commit --quiet --rm "$ctr" "$BASE" >/dev/null
fi

echo "== bentoml containerize $BENTO (buildah) =="
args=(containerize --backend buildah "$BENTO")
if [ -n "$IMAGE" ]; then args+=(-t "$IMAGE"); fi
"$BIN/bentoml" "${args[@]}"
