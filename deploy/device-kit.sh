#!/usr/bin/env bash
# Pack what deploy/device-check.sh needs on a lent accelerator machine into one folder of the
# checkout that git ignores, so one `run` of the device tool carries it (its limit: 64 MiB).
#
#   deploy/device-kit.sh [KIT]        (default KIT: .device-kit)
#
# Built here, where cargo is (the device machine starts bare and its minutes are few): release
# binaries with the CUDA backend (loaded at run time, so no CUDA toolkit is needed to build them),
# stripped: `lockstep`, the `gpu_check` example and the kernels' `native` test binary (its AMX
# halves run where the CPU has AMX, and print SKIPPED elsewhere); plus stories260K from ../shared,
# which does not travel with the checkout; and this CPU's portable `generate` outputs
# (`device-check.sh --record`). Then, on the device tool:
#   run(command="deploy/device-check.sh .device-kit", carry=[".device-kit"], timeout_s=540)
# The target directory is CARGO_TARGET_DIR, else target/ (a `--features cuda` build beside the
# default one rebuilds only the lockstep crates and cudarc).
set -euo pipefail
cd "$(dirname "$0")/.."

kit="${1:-.device-kit}"
target="${CARGO_TARGET_DIR:-target}"
stories="../shared/models/stories260K/hf"
if [ ! -f "$stories/config.json" ]; then
    echo "device-kit: no stories260K at $stories (see ../shared/models/stories260K/README)" >&2
    exit 2
fi

cargo build --release -p lockstep-coordinator --features cuda
cargo build --release -p lockstep-kernels --features cuda --example gpu_check
native_test=$(cargo test --release -p lockstep-kernels --test native --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "native" and m.get("executable"):
        print(m["executable"])')
if [ -z "$native_test" ]; then
    echo "device-kit: cargo named no executable for kernels' native test" >&2
    exit 1
fi

rm -rf "$kit"
mkdir -p "$kit/stories260K"
strip -o "$kit/lockstep" "$target/release/lockstep"
strip -o "$kit/gpu_check" "$target/release/examples/gpu_check"
strip -o "$kit/native-test" "$native_test"
cp "$stories"/*.json "$stories"/*.safetensors "$kit/stories260K/"
git rev-parse HEAD >"$kit/COMMIT"
# This machine's CPU outputs, which the device machine's CPU and GPU must equal byte for byte.
deploy/device-check.sh --record "$kit"

# The kit is the session's own: keep it out of commits without touching .gitignore.
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qxF "/$kit/" "$exclude" 2>/dev/null || echo "/$kit/" >>"$exclude"

du -sh "$kit"
echo "device-kit: $kit ready (commit $(cat "$kit/COMMIT")); carry it and run deploy/device-check.sh $kit"
