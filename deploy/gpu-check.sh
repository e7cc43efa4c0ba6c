#!/usr/bin/env bash
# Run the CUDA backend's checks on this machine's GPU (NVIDIA driver 580 or newer).
#
#   deploy/gpu-check.sh [--quick] [path/to/gpu_check]
#
# `gpu_check` is kernels/examples/gpu_check.rs, built anywhere (no GPU or CUDA toolkit needed) with
#   cargo build --release -p lockstep-kernels --features cuda --example gpu_check
# Without a path the script takes $GPU_CHECK_BIN, else target/release/examples/gpu_check, building
# it when cargo is at hand. It prints PASS / FAIL / SKIP lines: portable kernels == the CPU
# reference bit for bit on the contract tests' shapes, native (tensor-core) M-invariance over
# batches 1..256, TP-split invariance, native within 1e-2 of the reference; then timings: native
# linear GFLOP/s against cuBLAS bf16 at M = 1, 8, 64, 512, 4096 on Qwen2.5-0.5B and Llama-3.2-1B
# shapes, and portable decode (M = 1) bandwidth as a fraction of the card's. It ends with
# "N passed, N failed" and exits non-zero on any FAIL.
#
# The kernels are compiled at start-up by NVRTC (libnvrtc, CUDA 13.x). Where the loader cannot
# find it, point LOCKSTEP_NVRTC_LIB_DIR at a directory holding libnvrtc.so.13 (the PyPI wheel
# `nvidia-cuda-nvrtc==13.0.88` puts it in site-packages/nvidia/cu13/lib; this script looks there),
# or fill a PTX cache on any machine that has NVRTC — no GPU needed — and bring it along:
#   LOCKSTEP_CACHE_DIR=/some/dir target/release/examples/gpu_check --emit-ptx 80 90
#   LOCKSTEP_CACHE_DIR=/some/dir deploy/gpu-check.sh
# NCCL and cuBLAS are optional: without them their lines say SKIP.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=()
bin="${GPU_CHECK_BIN:-}"
for arg in "$@"; do
    case "$arg" in
        --quick) quick=(--quick) ;;
        *) bin="$arg" ;;
    esac
done
if [ -z "$bin" ]; then
    bin=target/release/examples/gpu_check
fi
if [ ! -x "$bin" ]; then
    if command -v cargo >/dev/null 2>&1; then
        cargo build --release -p lockstep-kernels --features cuda --example gpu_check
        bin=target/release/examples/gpu_check
    else
        echo "gpu-check: no binary at $bin and no cargo to build one" >&2
        exit 2
    fi
fi

# A pip-installed NVRTC wheel, when the loader has no libnvrtc of its own.
source deploy/nvrtc-env.sh

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
echo "gpu-check: $bin ${quick[*]:-} (LOCKSTEP_NVRTC_LIB_DIR=${LOCKSTEP_NVRTC_LIB_DIR:-unset}, LOCKSTEP_CACHE_DIR=${LOCKSTEP_CACHE_DIR:-unset})"
exec "$bin" "${quick[@]}"
