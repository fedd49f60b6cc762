#!/bin/bash
# Builds the root filesystems of the project's Debian test image with Debian's debootstrap, and
# caches them outside the repository under a hash of what goes into them:
#   minbase  Debian bookworm, `debootstrap --variant=minbase` (the image's first layer)
#   rootfs   minbase plus python3-minimal and nginx-light, and the few files the end-to-end tests
#            look for (the image's second layer is the difference)
# OUTDIR/minbase and OUTDIR/rootfs become links to the cached directories; their paths go to
# stdout, minbase first; progress goes to stderr.
#
#   images/build-debian-rootfs.sh OUTDIR
#
# Needs root (debootstrap, chroot). COCOON_DEBIAN_MIRROR overrides the mirror.
set -euo pipefail
outdir=${1:?usage: $0 OUTDIR}
suite=bookworm
mirror=${COCOON_DEBIAN_MIRROR:-http://deb.debian.org/debian}
packages=(python3-minimal nginx-light)
cache_root=${COCOON_CACHE:-/var/cache/cocoon}
script=$(readlink -f "${BASH_SOURCE[0]}")

command -v debootstrap >/dev/null || {
    echo "images: debootstrap is missing (apt-get install debootstrap)" >&2
    exit 1
}
# The mirror's contents are not in the key: a cached build stays in use across point releases
# until the script, the package list or debootstrap changes.
key=$( {
    echo "$suite $mirror"
    printf '%s\n' "${packages[@]}"
    echo "debootstrap $(dpkg-query -W -f '${Version}' debootstrap)"
    cat "$script"
} | sha256sum | cut -c1-16)
out="$cache_root/debian/$key"

if [ ! -d "$out/rootfs" ]; then
    mkdir -p "$cache_root/debian"
    work=$(mktemp -d "$cache_root/debian/.build-$key.XXXXXX")
    # --one-file-system: should a mount ever be left inside the tree, it survives, not the host.
    trap 'rm -rf --one-file-system "$work"' EXIT
    echo "images: building Debian $suite ($key) in $work" >&2
    chroot_env=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C DEBIAN_FRONTEND=noninteractive)

    # In a private mount namespace, like the chroot below: what debootstrap mounts in the
    # target goes away with it, even if it is killed.
    unshare --mount --propagation private -- \
        debootstrap --variant=minbase --arch=amd64 "$suite" "$work/minbase" "$mirror" >&2
    # debootstrap copies the host's resolver configuration and hostname; engines provide both.
    rm -f "$work/minbase/etc/resolv.conf" "$work/minbase/etc/hostname"
    # debootstrap leaves the packages it installed in apt's cache: 31 MB the image does not need.
    rm -rf "$work/minbase/var/lib/apt/lists/"* "$work/minbase/var/cache/apt/"*.bin \
        "$work/minbase/var/cache/apt/archives/"*.deb

    cp -a "$work/minbase" "$work/rootfs"
    root="$work/rootfs"
    # Package scripts must not start services in the build chroot.
    printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
    chmod 755 "$root/usr/sbin/policy-rc.d"
    cp -L /etc/resolv.conf "$root/etc/resolv.conf"
    # The chroot's /proc lives in a private mount namespace, gone when it ends.
    unshare --mount --propagation private -- "${chroot_env[@]}" sh -ec '
        root=$1; shift
        mount -t proc proc "$root/proc"
        chroot "$root" apt-get update -qq
        chroot "$root" apt-get install -y -qq --no-install-recommends "$@" >/dev/null
        chroot "$root" apt-get clean
    ' sh "$root" "${packages[@]}" >&2
    rm -f "$root/usr/sbin/policy-rc.d" "$root/etc/resolv.conf"
    rm -rf "$root/var/lib/apt/lists/"* "$root/var/cache/apt/"*.bin "$root/var/cache/debconf/"*-old \
        "$root/var/log/apt/"*

    # What the tests compare between host and guest, beyond what the packages bring: an extended
    # attribute, a file owned by a user the image does not name, and a hard-linked pair unless
    # the packages already ship one.
    mkdir -p "$root/srv/cocoon-test"
    echo "an extended attribute rides along" > "$root/srv/cocoon-test/xattr"
    python3 -c 'import os, sys; os.setxattr(sys.argv[1], "user.cocoon", b"kept")' \
        "$root/srv/cocoon-test/xattr"
    echo "owned by 1000:2000" > "$root/srv/cocoon-test/owned"
    chown 1000:2000 "$root/srv/cocoon-test/owned"
    chmod 0640 "$root/srv/cocoon-test/owned"
    if [ -z "$(find "$root" -xdev -type f -links +1 -print -quit)" ]; then
        echo "one inode, two names" > "$root/srv/cocoon-test/linked-a"
        ln "$root/srv/cocoon-test/linked-a" "$root/srv/cocoon-test/linked-b"
    fi

    rm -rf --one-file-system "$out"
    mv "$work" "$out"
    trap - EXIT
    echo "images: built $out" >&2
fi

mkdir -p "$outdir"
ln -sfn "$out/minbase" "$outdir/minbase"
ln -sfn "$out/rootfs" "$outdir/rootfs"
echo "$out/minbase"
echo "$out/rootfs"
