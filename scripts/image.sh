#!/usr/bin/env bash
# Builds the casd container image (deploy/container/Containerfile) without a
# container registry: the offline path. See docs/deploy.md.
#
#   scripts/image.sh [--prebuilt DIR] [--tag NAME]
#
# 1. The Debian base the Containerfile names (CASD_IMAGE_DEBIAN below) is
#    made with debootstrap from the Debian mirror apt already uses (the first
#    deb.debian.org-style URI in /etc/apt/sources.list*), cached as a tarball
#    under $CASD_IMAGE_CACHE (default /var/cache/casd/image, outside the
#    clone) keyed on suite, mirror, variant, package list and this recipe, and
#    `podman import`ed under that exact name when podman does not have it.
# 2. casd and casd-probe are built on the host by cargo (release; or taken
#    from --prebuilt DIR, e.g. target/debug for the tests) and staged in
#    target/image/, the only part of target/ the build context sends.
# 3. `podman build --pull=never --build-arg BINARIES=prebuilt` (Docker image
#    format: the OCI one has no SHELL, and the Containerfile's pipefail needs it).
#
# Podman 4.3 on this kind of machine runs containers only with runc and with
# explicit nofile/nproc ulimits: deploy/container/containers.conf says so and
# is used here (CONTAINERS_CONF) unless the caller set one.
set -euo pipefail
CASD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$CASD_ROOT"
die() { echo "image.sh: $*" >&2; exit 1; }

TAG=localhost/casd:dev
PREBUILT=
while [ $# -gt 0 ]; do
  case "$1" in
    --prebuilt) PREBUILT=$2; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    *) die "unknown argument $1 (use --prebuilt DIR, --tag NAME)" ;;
  esac
done

export CONTAINERS_CONF="${CONTAINERS_CONF:-$CASD_ROOT/deploy/container/containers.conf}"
# The base's name, exactly as the Containerfile's DEBIAN argument says.
CASD_IMAGE_DEBIAN=$(sed -n 's/^ARG DEBIAN=//p' deploy/container/Containerfile)
[ -n "$CASD_IMAGE_DEBIAN" ] || die "no 'ARG DEBIAN=' in deploy/container/Containerfile"
SUITE=bookworm
VARIANT=minbase
INCLUDE=ca-certificates
CACHE=${CASD_IMAGE_CACHE:-/var/cache/casd/image}

command -v podman >/dev/null || die "podman is not installed (apt-get install podman runc)"
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"

mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
         | sed -n 's/^URIs: *//p; s/^deb \(\[[^]]*\] \)\{0,1\}\(http[^ ]*\) .*/\2/p' \
         | grep -v -e security -e updates | head -1 || true)
[ -n "$mirror" ] || die "no Debian mirror found in /etc/apt/sources.list*"
recipe="$SUITE $VARIANT $INCLUDE $mirror v1"
key=$(printf '%s' "$recipe" | sha256sum | cut -c1-16)
tarball="$CACHE/debian-$SUITE-$key.tar"

if [ ! -s "$tarball" ]; then
  echo "image.sh: debootstrap $SUITE ($VARIANT, +$INCLUDE) from $mirror into $tarball" >&2
  mkdir -p "$CACHE"
  root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant="$VARIANT" --include="$INCLUDE" "$SUITE" "$root" "$mirror" \
    >"$CACHE/debootstrap.log" 2>&1 || { tail -20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed"; }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" --numeric-owner -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
  rm -rf "$root"; trap - EXIT
fi
if [ "$(podman image inspect --format '{{index .Labels "org.casd.base.key"}}' "$CASD_IMAGE_DEBIAN" 2>/dev/null)" != "$key" ]; then
  echo "image.sh: importing $tarball as $CASD_IMAGE_DEBIAN" >&2
  podman import --change "LABEL org.casd.base.key=$key" --change 'CMD ["bash"]' \
    "$tarball" "$CASD_IMAGE_DEBIAN" >/dev/null || die "podman import failed"
fi

if [ -z "$PREBUILT" ]; then
  cargo build --release --locked -p casd -p casd-tools --bin casd --bin casd-probe
  PREBUILT=target/release
fi
for b in casd casd-probe; do
  [ -x "$PREBUILT/$b" ] || die "$PREBUILT/$b is missing (cargo build --bin $b)"
done
mkdir -p target/image
cp "$PREBUILT/casd" "$PREBUILT/casd-probe" target/image/

podman build --pull=never --format docker --build-arg BINARIES=prebuilt \
  --build-arg VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)" \
  --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  -f deploy/container/Containerfile -t "$TAG" . >&2 || die "podman build failed"
# The build stages' untagged images (a few hundred MB a build) would pile up.
podman image prune -f >/dev/null
echo "$TAG"
