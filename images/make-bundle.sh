#!/bin/bash
# Makes an OCI bundle: DIR/config.json from `cocoon spec` (no terminal, running ARGS) and
# DIR/rootfs, a copy of ROOTFS.
#
#   images/make-bundle.sh COCOON DIR ROOTFS ARGS...
set -euo pipefail
cocoon=${1:?usage: $0 COCOON DIR ROOTFS ARGS...}
dir=${2:?}
rootfs=${3:?}
shift 3
[ $# -gt 0 ] || { echo "make-bundle: no command given" >&2; exit 2; }
rm -rf "$dir"
mkdir -p "$dir"
cp -a "$rootfs" "$dir/rootfs"
(cd "$dir" && "$cocoon" spec)
python3 - "$dir/config.json" "$@" <<'PY'
import json, sys
path, args = sys.argv[1], sys.argv[2:]
with open(path) as f:
    spec = json.load(f)
spec["process"]["terminal"] = False
spec["process"]["args"] = args
spec["root"]["readonly"] = False
with open(path, "w") as f:
    json.dump(spec, f, indent=2)
PY
