#!/bin/bash
# Builds the project's test root filesystem: Debian's static busybox with a link per applet,
# a root and a nobody user, and the directories an OCI runtime mounts over. Output: a plain
# directory (DIR) and, when IMAGE is given, that directory as an uncompressed EROFS image.
#
#   images/build-busybox-rootfs.sh DIR [IMAGE]
#
# Rebuilt only when /bin/busybox or this script is newer than the image.
set -euo pipefail
dir=${1:?usage: $0 DIR [IMAGE]}
image=${2:-}
busybox=/bin/busybox
[ -x "$busybox" ] || { echo "images: $busybox is missing (apt-get install busybox-static)" >&2; exit 1; }
if [ -n "$image" ] && [ -f "$image" ] && [ "$image" -nt "$busybox" ] && [ "$image" -nt "$0" ]; then
    exit 0
fi

mkdir -p "$(dirname "$dir")"
tmp=$(mktemp -d "${dir%/}.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,root,home,var,run}
chmod 755 "$tmp"
chmod 1777 "$tmp/tmp"
cp "$busybox" "$tmp/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$tmp/bin/$applet"
done
cat > "$tmp/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat > "$tmp/etc/group" <<'GROUP'
root:x:0:
nogroup:x:65534:
GROUP
echo "cocoon" > "$tmp/etc/hostname"

rm -rf "$dir"
mv "$tmp" "$dir"
trap - EXIT
if [ -n "$image" ]; then
    command -v mkfs.erofs >/dev/null || { echo "images: mkfs.erofs is missing (apt-get install erofs-utils)" >&2; exit 1; }
    # Fixed timestamps and UUID: the same inputs give the same image. Written aside and
    # renamed, since running VMs may map the old one.
    mkfs.erofs --quiet --all-root -T0 -U 6f636f6f-6e2d-7465-7374-2d696d616765 "$image.tmp" "$dir" >/dev/null
    mv "$image.tmp" "$image"
fi
