#!/usr/bin/env bash
# Builds the cocoon guest kernel (an uncompressed vmlinux) from Debian's linux-source-6.1 package,
# offline, and caches it outside the repository under a hash of every input.
# Prints the path of the cached vmlinux on stdout; everything else goes to stderr.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache_root=${COCOON_CACHE:-/var/cache/cocoon}
tarball=/usr/src/linux-source-6.1.tar.xz

if [ ! -f "$tarball" ]; then
    echo "guest-kernel: $tarball is missing (apt-get install linux-source-6.1)" >&2
    exit 1
fi

# Every input that changes the result goes into the key: the source package version, the config
# fragment, the patches, this script and the compiler.
src_version=$(dpkg-query -W -f '${Version}' linux-source-6.1)
key=$( {
    echo "linux-source-6.1 $src_version"
    gcc --version | head -n1
    cat "$here/cocoon.config" "$here/build.sh"
    for p in "$here"/patches/*.patch; do basename "$p"; cat "$p"; done
} | sha256sum | cut -c1-16)

out="$cache_root/kernel/$key"
if [ -f "$out/vmlinux" ]; then
    echo "$out/vmlinux"
    exit 0
fi

mkdir -p "$cache_root/kernel"
work=$(mktemp -d "$cache_root/kernel/.build-$key.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "guest-kernel: building $key (linux-source-6.1 $src_version) in $work" >&2
tar -C "$work" -xf "$tarball"
src="$work/linux-source-6.1"
for p in "$here"/patches/*.patch; do
    echo "guest-kernel: applying $(basename "$p")" >&2
    patch -d "$src" -p1 --quiet --forward < "$p"
done

cd "$src"
make -s tinyconfig >&2
scripts/kconfig/merge_config.sh -m .config "$here/cocoon.config" >/dev/null
make -s olddefconfig >&2

# A fragment option Kconfig silently dropped (missing dependency) is a bug in the fragment.
missing=0
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*) want="$line" ;;
        "# CONFIG_"*" is not set") want="$line" ;;
        *) continue ;;
    esac
    opt=${want#\# }; opt=${opt%%[= ]*}
    if [[ "$want" == \#* ]]; then
        if grep -q "^$opt=[ym]" .config; then echo "guest-kernel: $opt is still set" >&2; missing=1; fi
    elif ! grep -qx "$want" .config; then
        echo "guest-kernel: wanted $want, got: $(grep "^$opt=\|# $opt is" .config || echo unset)" >&2
        missing=1
    fi
done < "$here/cocoon.config"
[ "$missing" = 0 ] || { echo "guest-kernel: config fragment not applied cleanly" >&2; exit 1; }

make -s -j"$(nproc)" vmlinux >&2
mkdir -p "$work/out"
cp vmlinux .config "$work/out/"
rm -rf "$out"
mv "$work/out" "$out"
echo "guest-kernel: built $out/vmlinux" >&2
echo "$out/vmlinux"
