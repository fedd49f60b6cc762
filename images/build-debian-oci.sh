#!/bin/bash
# Builds the project's Debian test image from the two root filesystems of
# build-debian-rootfs.sh: layer 1 is MINBASE, layer 2 what ROOTFS adds to or changes in it.
# Writes an OCI image archive (OUT.tar: `podman load -i`, `ctr image import`, tag cocoon-debian)
# and, when DOCKER_OUT.tar is given, the same image in Docker's archive format (`docker load`,
# as cocoon-debian:latest), converted by skopeo. Its default command is `bash`.
#
#   images/build-debian-oci.sh MINBASE_DIR ROOTFS_DIR OUT.tar [DOCKER_OUT.tar]
#
# Rebuilt only when an input directory resolves elsewhere (a new cache key) or this script
# changed since the archives were made.
set -euo pipefail
usage="usage: $0 MINBASE_DIR ROOTFS_DIR OUT.tar [DOCKER_OUT.tar]"
minbase=${1:?$usage}
rootfs=${2:?$usage}
out=${3:?$usage}
docker_out=${4:-}
tag=cocoon-debian
for tool in umoci rsync ${docker_out:+skopeo}; do
    command -v "$tool" >/dev/null || { echo "images: $tool is missing (apt-get install $tool)" >&2; exit 1; }
done
for dir in "$minbase" "$rootfs"; do
    [ -d "$dir" ] || { echo "images: $dir is not a directory" >&2; exit 1; }
done

# The input directories live under a key of their contents, so their resolved paths and this
# script identify what an archive holds; timestamps would not (a cached rootfs keeps its own).
inputs=$(printf '%s\n%s\n%s\n' "$(readlink -f "$minbase")" "$(readlink -f "$rootfs")" \
    "$(sha256sum < "${BASH_SOURCE[0]}")")
stamp="$out.inputs"
if [ -f "$out" ] && { [ -z "$docker_out" ] || [ -f "$docker_out" ]; } \
    && [ "$(cat "$stamp" 2>/dev/null)" = "$inputs" ]; then
    exit 0
fi

mkdir -p "$(dirname "$out")"
work=$(mktemp -d "$(dirname "$out")/.debian-oci.XXXXXX")
trap 'rm -rf --one-file-system "$work"' EXIT
layout="$work/layout"
bundle="$work/bundle"
umoci init --layout "$layout"
umoci new --image "$layout:$tag"
umoci unpack --image "$layout:$tag" "$bundle" >/dev/null
# -HAX and --numeric-ids: hard links, ACLs, extended attributes and owners as they are, whatever
# names the host gives the ids.
sync_into_bundle() { rsync -aHAX --numeric-ids --delete "$1/" "$bundle/rootfs/"; }
sync_into_bundle "$minbase"
# --refresh-bundle: the next repack diffs against this layer, not against the empty image.
umoci repack --refresh-bundle --image "$layout:$tag" \
    --history.created_by "debootstrap --variant=minbase bookworm" "$bundle"
sync_into_bundle "$rootfs"
umoci repack --image "$layout:$tag" \
    --history.created_by "apt-get install python3-minimal nginx-light; test files in /srv/cocoon-test" \
    "$bundle"
umoci config --image "$layout:$tag" --config.cmd=bash --config.workingdir=/ \
    --config.env=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --history.created_by "umoci config: cmd bash"
umoci gc --layout "$layout"
tar -C "$layout" -cf "$work/oci.tar" .
if [ -n "$docker_out" ]; then
    # A local conversion: no registry, so no signature policy to consult.
    skopeo --insecure-policy copy --quiet "oci:$layout:$tag" "docker-archive:$work/docker.tar:$tag:latest"
    mv "$work/docker.tar" "$docker_out"
fi
mv "$work/oci.tar" "$out"
echo "$inputs" > "$stamp"
