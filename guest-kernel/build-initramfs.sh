#!/usr/bin/env bash
# Builds the guest's initramfs: an uncompressed newc cpio whose /init is the static agent.
# Uncompressed because decompressing in the guest costs emulated kernel instructions.
# Usage: build-initramfs.sh AGENT_BINARY OUTPUT.cpio
set -euo pipefail

agent=${1:?usage: build-initramfs.sh AGENT_BINARY OUTPUT.cpio}
out=${2:?usage: build-initramfs.sh AGENT_BINARY OUTPUT.cpio}

if ! file -L "$agent" | grep -q 'statically linked\|static-pie linked'; then
    echo "build-initramfs: $agent is not a static binary" >&2
    exit 1
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{dev,proc,sys,mnt,run,tmp}
install -m 0755 "$agent" "$stage/init"
# The kernel opens /dev/console for init's stdio before devtmpfs exists. Without a console (the
# VMM's --console off) init starts with no stdio at all, and Rust's runtime then opens /dev/null
# for fds 0-2, aborting if it cannot: both nodes must exist before devtmpfs is mounted.
mknod -m 0600 "$stage/dev/console" c 5 1
mknod -m 0666 "$stage/dev/null" c 1 3

tmp="$out.tmp.$$"
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc --owner 0:0 --reproducible) > "$tmp"
mv "$tmp" "$out"
echo "$out"
