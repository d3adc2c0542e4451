#!/usr/bin/env bash
# Makes the Debian base image of the cpu target on a machine that reaches no image registry:
# debootstrap (minbase) from this machine's own apt mirror, then `podman import` (or docker import).
#
#   bash deploy/make-base-image.sh TAG          e.g. localhost/debian:bookworm
#
# Environment: SUITE (default: this machine's Debian codename, else bookworm); MIRROR (default: the
# URIs of the apt source that serves SUITE, from /etc/apt/sources.list.d/*.sources or
# /etc/apt/sources.list); RUNTIME (podman or docker; default: podman if present); FORCE=1 remakes an
# image that exists (otherwise it is reused). Needs root (debootstrap) and the debootstrap package.
set -euo pipefail

TAG=${1:?usage: bash deploy/make-base-image.sh TAG}
RUNTIME=${RUNTIME:-$(command -v podman >/dev/null && echo podman || echo docker)}

if [ "${FORCE:-0}" != 1 ] && "$RUNTIME" image inspect "$TAG" >/dev/null 2>&1; then
  echo "$TAG exists; reusing it (FORCE=1 remakes it)"
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "make-base-image.sh: debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || {
  echo "make-base-image.sh: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }

# shellcheck source=/dev/null
SUITE=${SUITE:-$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")}
SUITE=${SUITE:-bookworm}

# The URIs of the first deb822 stanza (or one-line entry) whose suites include $1.
mirror_for() {
  local suite=$1 found=""
  shopt -s nullglob
  for f in /etc/apt/sources.list.d/*.sources; do
    found=$(awk -v s="$suite" '
      /^[[:space:]]*$/ { if (u != "" && hit) { print u; exit } u = ""; hit = 0; next }
      tolower($1) == "uris:"   { u = $2 }
      tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == s) hit = 1 }
      END { if (u != "" && hit) print u }' "$f" | head -n 1)
    [ -n "$found" ] && break
  done
  if [ -z "$found" ] && [ -f /etc/apt/sources.list ]; then
    found=$(awk -v s="$suite" '$1 == "deb" && $3 == s { print $2; exit }' /etc/apt/sources.list)
  fi
  echo "$found"
}

MIRROR=${MIRROR:-$(mirror_for "$SUITE")}
[ -n "$MIRROR" ] || { echo "make-base-image.sh: no apt source serves '$SUITE'; set MIRROR" >&2; exit 1; }
SECURITY=$(mirror_for "$SUITE-security")

ROOTFS=$(mktemp -d)
trap 'rm -rf "$ROOTFS"' EXIT
echo "debootstrap --variant=minbase $SUITE from $MIRROR ..."
start=$(date +%s)
debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 || {
  tail -n 20 "$ROOTFS.log" >&2; echo "make-base-image.sh: debootstrap failed (log: $ROOTFS.log)" >&2
  exit 1; }
rm -f "$ROOTFS.log"

# Apt sources of the image: the suite, its updates and (when this machine has one) its security
# suite, from the same mirrors; nothing else of this machine goes in.
{
  echo "deb $MIRROR $SUITE main"
  echo "deb $MIRROR $SUITE-updates main"
  [ -n "$SECURITY" ] && echo "deb $SECURITY $SUITE-security main"
} >"$ROOTFS/etc/apt/sources.list"
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb

tar -C "$ROOTFS" -c . | "$RUNTIME" import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' - "$TAG" >/dev/null
echo "$TAG made in $(( $(date +%s) - start )) s"
