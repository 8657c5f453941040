#!/bin/sh
# Build the fedct images without a registry: a Debian bookworm root filesystem made with debootstrap
# (its python3 is 3.11) is imported into podman as the base image, then both images are built on it.
#
#   sudo docker/build-local.sh                 # from the repository root; needs debootstrap and podman (apt)
#   BASE_TAG=localhost/fedct-base:bookworm MIRROR=http://deb.debian.org/debian docker/build-local.sh
#
# Environment: MIRROR (Debian mirror), BASE_TAG (tag of the imported base), WORK (scratch folder for the rootfs),
# ISOLATION (podman build isolation; chroot works where podman cannot create namespaces), SKIP_BASE=1 (reuse an
# imported base), PIP_EXTRA_ARGS (passed to pip in the images), LOCAL_PIP_DIRS (local wheel folders / simple
# indexes mounted into the build), TORCH_INDEX (extra index for torch; empty when a local wheel folder is used), HOST_CA_BUNDLE (CA bundle copied into the base;
# default the host's /etc/ssl/certs/ca-certificates.crt), IMAGES (default "server site").
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
BASE_TAG=${BASE_TAG:-localhost/fedct-base:bookworm}
WORK=${WORK:-/var/tmp/fedct-rootfs}
ISOLATION=${ISOLATION:-chroot}
PIP_EXTRA_ARGS=${PIP_EXTRA_ARGS:-}
TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}
# Local package folders (wheel folders or PEP 503 "simple" indexes) are mounted read-only into the build and
# offered to pip, so an offline host builds from what it has; the CPU torch wheel is then expected there.
MOUNTS=""
for d in ${LOCAL_PIP_DIRS:-/opt/wheels /opt/pypi /opt/pypi-more}; do
  [ -d "$d" ] || continue
  MOUNTS="$MOUNTS -v $d:$d:ro"
  if [ -d "$d/simple" ]; then PIP_EXTRA_ARGS="$PIP_EXTRA_ARGS --extra-index-url file://$d/simple"
  else PIP_EXTRA_ARGS="$PIP_EXTRA_ARGS --find-links $d"; TORCH_INDEX=${TORCH_INDEX_LOCAL-}; fi
done

for tool in podman debootstrap; do
  command -v "$tool" >/dev/null || { echo "build-local.sh: $tool is missing (apt-get install $tool)" >&2; exit 2; }
done

if [ "${SKIP_BASE:-0}" != 1 ]; then
  echo "== debootstrap bookworm into $WORK (python3 3.11, venv, pip) $(date -u +%T)"
  rm -rf "$WORK"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$WORK" "$MIRROR"
  chroot "$WORK" apt-get clean
  # Trust the same CAs as the build host (a site's TLS-inspecting proxy, a local package index).
  if [ -f "${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}" ]; then
    cp "${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}" "$WORK/etc/ssl/certs/ca-certificates.crt"
  fi
  rm -rf "$WORK"/var/lib/apt/lists/* "$WORK"/var/cache/apt/*.bin
  echo "== import as $BASE_TAG $(date -u +%T)"
  tar -C "$WORK" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE_TAG"
fi

for image in ${IMAGES:-server site}; do
  echo "== build fedct-$image on $BASE_TAG $(date -u +%T)"
  # shellcheck disable=SC2086 # MOUNTS is a list of -v options
  podman build --isolation="$ISOLATION" $MOUNTS --build-arg BASE="$BASE_TAG" --build-arg TORCH_INDEX="$TORCH_INDEX" \
    --build-arg PIP_EXTRA_ARGS="$PIP_EXTRA_ARGS" \
    -f "$ROOT/docker/Dockerfile.$image" -t "localhost/fedct-$image:latest" "$ROOT"
done
podman images | grep -E 'fedct|REPOSITORY'
echo "== done $(date -u +%T)"
