# Sourced by deploy/gpu-check.sh and deploy/device-check.sh: where the loader finds no libnvrtc,
# point LOCKSTEP_NVRTC_LIB_DIR at a pip-installed NVRTC wheel (`nvidia-cuda-nvrtc`, CUDA 13:
# site-packages/nvidia/cu13/lib), looked for in lockstep's cache and in Python's site-packages.
if [ -z "${LOCKSTEP_NVRTC_LIB_DIR:-}" ] && ! ldconfig -p 2>/dev/null | grep -q 'libnvrtc\.so'; then
    candidates=("${XDG_CACHE_HOME:-$HOME/.cache}"/lockstep/nvidia-cuda-nvrtc-*)
    if command -v python3 >/dev/null 2>&1; then
        read -r -a site <<<"$(python3 -c 'import site; print(" ".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null || true)"
        candidates+=("${site[@]}")
    fi
    for dir in "${candidates[@]}"; do
        if [ -e "$dir/nvidia/cu13/lib/libnvrtc.so.13" ]; then
            export LOCKSTEP_NVRTC_LIB_DIR="$dir/nvidia/cu13/lib"
            break
        fi
    done
fi
