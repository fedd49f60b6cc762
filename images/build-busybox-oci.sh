#!/bin/bash
# Builds the project's test container image without a registry: the busybox root filesystem
# (build-busybox-rootfs.sh) as a one-layer OCI image, archived for `podman load` and
# `ctr image import`. Its default command is `sh`.
#
#   images/build-busybox-oci.sh ROOTFS_DIR OUT.tar
#
# Rebuilt only when the rootfs directory or this script is newer than the archive.
set -euo pipefail
rootfs=${1:?usage: $0 ROOTFS_DIR OUT.tar}
out=${2:?usage: $0 ROOTFS_DIR OUT.tar}
command -v umoci >/dev/null || { echo "images: umoci is missing (apt-get install umoci)" >&2; exit 1; }
if [ -f "$out" ] && [ "$out" -nt "$rootfs" ] && [ "$out" -nt "$0" ]; then
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umoci init --layout "$work/layout"
umoci new --image "$work/layout:cocoon-busybox"
umoci unpack --image "$work/layout:cocoon-busybox" "$work/bundle" >/dev/null
cp -a "$rootfs/." "$work/bundle/rootfs/"
umoci repack --image "$work/layout:cocoon-busybox" "$work/bundle"
umoci config --image "$work/layout:cocoon-busybox" --config.cmd=sh \
    --config.env=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
umoci gc --layout "$work/layout"
tar -C "$work/layout" -cf "$out.tmp" .
mv "$out.tmp" "$out"
