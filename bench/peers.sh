#!/usr/bin/env bash
# bench/peers.sh — lockstep side by side with llama.cpp (and transformers when it is installed) on
# this machine, in one run: the same models, the same thread count, the same prompt shapes, and
# the machine's read bandwidth measured in the same run (issue #11 item 5, issue #12).
#
# llama.cpp is built from the `llama-cpp-python==0.3.36` sdist on PyPI (its vendor/llama.cpp),
# `-DGGML_NATIVE=ON`, targets llama-bench and llama-batched-bench, into the cache directory
# (${LOCKSTEP_PEERS_CACHE:-~/.cache/lockstep/peers}); nothing lands in the repository. Python
# packages (cmake, and the converter's numpy, sentencepiece, safetensors, transformers and torch —
# convert_hf_to_gguf.py imports torch and transformers at its top) go into a venv in the cache.
#
# Models: the synthetic Qwen2.5-0.5B of `lockstep model synth` in bf16 and f32 (converted to GGUF
# with llama.cpp's own convert_hf_to_gguf.py through bench/peers/convert_synth.py), the same model
# quantized to Q8_0 by that converter (a quantized model whose batch-1 step is all weights: the
# same GGUF file for both engines), and the real SmolLM2-135M-Instruct Q4_1 GGUF (the same file
# for both engines). Numbers are tokens/s; every
# engine gets the same token ids. A negative control shows whether each engine's logits depend on
# the batch around a sequence (bench/peers/batch_invariance.cpp for llama.cpp, `lockstep
# generate --json` for lockstep).
#
# This is a benchmark, never a test: it prints numbers and asserts nothing about speed.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bench/peers.sh [--threads N] [--models LIST] [--quick] [--no-control]

  --threads N     threads for every engine (default 2)
  --models LIST   comma-separated: synth-bf16, synth-f32, synth-q8_0, smollm2 (default: all four)
  --quick         pp128 and decode at batch 1 and 8 only, 16 new tokens, no transformers f32
  --no-control    skip the batch-invariance negative control

Environment: LOCKSTEP_PEERS_CACHE (cache directory), LOCKSTEP_BIN (a lockstep binary; default:
cargo build --release), LOCKSTEP_SMOLLM2_GGUF (the SmolLM2 file; default: where .ci/run puts it).
EOF
}

THREADS=2
MODELS=synth-bf16,synth-f32,synth-q8_0,smollm2
QUICK=0
CONTROL=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --threads) THREADS=$2; shift 2 ;;
        --models) MODELS=$2; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --no-control) CONTROL=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "peers.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE=$REPO/bench/peers
CACHE=${LOCKSTEP_PEERS_CACHE:-${HOME}/.cache/lockstep/peers}
LLAMA_CPP_PYTHON=0.3.36
SRC=$CACHE/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp
BUILD=$CACHE/build
VENV=$CACHE/venv
PY=$VENV/bin/python
RUN=$(mktemp -d "${TMPDIR:-/tmp}/lockstep-peers.XXXXXX")
RESULTS=$RUN/results.jsonl
WEIGHTS=$RUN/weights.json
mkdir -p "$CACHE/models"
: >"$RESULTS"
echo '{}' >"$WEIGHTS"

if [[ $QUICK == 1 ]]; then
    BATCHES=1,8
    NEW_TOKENS=16
    PROMPTS=128
else
    BATCHES=1,8,32
    NEW_TOKENS=32
    PROMPTS=128,512
fi
MAX_BATCH=${BATCHES##*,}

section() { printf '\n## %s\n\n' "$*"; }
note() { printf '%s\n' "$*"; }
has_model() { [[ ",$MODELS," == *",$1,"* ]]; }
collect() { "$PY" "$HERE/collect.py" "$@"; }
record_weights() { # label bytes
    "$PY" - "$WEIGHTS" "$1" "$2" <<'EOF'
import json, sys
path, label, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
w = json.load(open(path)); w[label] = size; json.dump(w, open(path, "w"))
EOF
}

# --- tools -------------------------------------------------------------------------------------

ensure_venv() {
    if [[ ! -x $PY ]]; then
        python3 -m venv "$VENV"
    fi
    if [[ ! -x $VENV/bin/cmake ]] ||
        ! "$PY" -c 'import numpy, sentencepiece, safetensors, transformers, torch, scikit_build_core' 2>/dev/null; then
        note "installing the converter's Python packages into $VENV (torch and transformers: convert_hf_to_gguf.py imports both)"
        "$VENV/bin/pip" install --quiet --disable-pip-version-check cmake scikit-build-core numpy sentencepiece safetensors transformers torch
    fi
}

ensure_llama_cpp() {
    if [[ -x $BUILD/bin/llama-bench && -x $BUILD/bin/llama-batched-bench ]]; then
        return
    fi
    if [[ ! -f $SRC/CMakeLists.txt ]]; then
        note "fetching llama-cpp-python==$LLAMA_CPP_PYTHON (sdist) for its vendor/llama.cpp"
        mkdir -p "$CACHE/dl"
        # --no-build-isolation: pip prepares the sdist's metadata with the venv's scikit-build-core
        # instead of building its build backend from source.
        "$VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
            --no-build-isolation -d "$CACHE/dl" "llama-cpp-python==$LLAMA_CPP_PYTHON"
        tar -xzf "$CACHE/dl/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$CACHE"
    fi
    local cmake=cmake
    command -v cmake >/dev/null || cmake=$VENV/bin/cmake
    note "building llama.cpp (llama-bench, llama-batched-bench) into $BUILD"
    "$cmake" -S "$SRC" -B "$BUILD" -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF >"$CACHE/cmake.log"
    "$cmake" --build "$BUILD" --target llama-bench llama-batched-bench -j "$(nproc)" >"$CACHE/build.log"
}

ensure_lockstep() {
    if [[ -n ${LOCKSTEP_BIN:-} ]]; then
        LS=$LOCKSTEP_BIN
    else
        (cd "$REPO" && cargo build --quiet --release -p lockstep-coordinator --bin lockstep)
        LS=$REPO/target/release/lockstep
    fi
}

# --- models ------------------------------------------------------------------------------------

# A synthetic Qwen2.5-0.5B directory (with the Qwen2 pre-tokenizer) and its GGUF twin, in the
# directory's dtype or in the converter's `--outtype` (q8_0: quantized by the converter itself).
synth_model() { # dtype [outtype] -> sets HF_DIR, GGUF
    local dtype=$1 outtype=${2:-$1}
    HF_DIR=$CACHE/models/qwen2.5-0.5b-$dtype
    GGUF=$CACHE/models/qwen2.5-0.5b-$outtype.gguf
    if ! grep -q '"Split"' "$HF_DIR/tokenizer.json" 2>/dev/null; then
        rm -rf "$HF_DIR" "$GGUF"
        "$LS" model synth --preset qwen2.5-0.5b --dtype "$dtype" --seed 0 --out "$HF_DIR"
    fi
    if [[ ! -f $GGUF ]]; then
        note "converting $HF_DIR to GGUF ($outtype) with llama.cpp's convert_hf_to_gguf.py"
        "$PY" "$HERE/convert_synth.py" "$SRC" "$HF_DIR" --outtype "$outtype" --outfile "$GGUF.part" >"$RUN/convert-$outtype.log" 2>&1 ||
            { tail -20 "$RUN/convert-$outtype.log"; return 1; }
        mv "$GGUF.part" "$GGUF"
    fi
}

smollm2_file() {
    SMOLLM2=${LOCKSTEP_SMOLLM2_GGUF:-$(bash "$REPO/deploy/fetch-smollm2.sh")}
}

# --- engines -----------------------------------------------------------------------------------

run_lockstep() { # label model-path engine mode [extra lockstep bench flags...]
    local label=$1 model=$2 engine=$3 mode=$4
    shift 4
    local flags=(--model "$model" --modes "$mode" --threads "$THREADS" --warmup "$@")
    note "lockstep ($engine): decode at batch $BATCHES, pp128"
    "$LS" bench "${flags[@]}" --batch "$BATCHES" --prompt-tokens 128 --new-tokens "$NEW_TOKENS" 2>>"$RUN/lockstep.log" |
        tee -a "$RUN/lockstep.out" | collect lockstep "$label" "$engine" >>"$RESULTS" ||
        { note "lockstep bench failed (see $RUN/lockstep.log)"; return 1; }
    if [[ $QUICK == 0 ]]; then
        note "lockstep ($engine): pp512"
        "$LS" bench "${flags[@]}" --batch 1 --prompt-tokens 512 --new-tokens 2 2>>"$RUN/lockstep.log" |
            tee -a "$RUN/lockstep.out" | collect lockstep "$label" "$engine" --prefill-only >>"$RESULTS" ||
            { note "lockstep bench failed (see $RUN/lockstep.log)"; return 1; }
    fi
}

# llama.cpp's weight repacking into its extra buffer types is on by default; on an AMX CPU that
# sends Q4_0/Q4_1/Q8_0 matmuls to ggml's AMX kernels, which die with SIGILL on the 2-vCPU Xeon VMs
# this project runs on (`tilezero` on a worker thread whose tiles were never configured; seen
# with llama.cpp 0c1e570). A short run of each GGUF tells; where it dies that way, that model's
# llama.cpp rows run with repacking off (`--repack 0` / `--no-repack`: the plain CPU kernels),
# and the script says so.
llama_repack_flags() { # gguf -> sets BENCH_REPACK, BATCHED_REPACK
    BENCH_REPACK=()
    BATCHED_REPACK=()
    local rc=0
    "$BUILD/bin/llama-bench" -m "$1" -p 16 -n 0 -r 1 -t "$THREADS" >>"$RUN/llama.log" 2>&1 || rc=$?
    if [[ $rc == 132 ]]; then
        note "llama.cpp died with SIGILL (exit 132) with weight repacking on (its AMX path on this CPU): its rows for this model run with --repack 0 / --no-repack"
        BENCH_REPACK=(--repack 0)
        BATCHED_REPACK=(--no-repack)
    fi
}

run_llama_cpp() { # label gguf
    local label=$1 gguf=$2
    llama_repack_flags "$gguf"
    note "llama.cpp: llama-bench pp$PROMPTS"
    "$BUILD/bin/llama-bench" -m "$gguf" -p "$PROMPTS" -n 0 -r 3 -t "$THREADS" "${BENCH_REPACK[@]}" -o json 2>>"$RUN/llama.log" |
        tee -a "$RUN/llama.out" | collect llama-bench "$label" llama.cpp >>"$RESULTS" ||
        note "llama-bench failed (see $RUN/llama.log)"
    note "llama.cpp: llama-batched-bench decode at batch $BATCHES"
    "$BUILD/bin/llama-batched-bench" -m "$gguf" -c $((MAX_BATCH * (128 + NEW_TOKENS) + 256)) -b 2048 -ub 512 \
        -npp 128 -ntg "$NEW_TOKENS" -npl "$BATCHES" -t "$THREADS" -tb "$THREADS" "${BATCHED_REPACK[@]}" --output-format jsonl \
        2>>"$RUN/llama.log" | tee -a "$RUN/llama.out" | collect batched "$label" llama.cpp >>"$RESULTS" ||
        note "llama-batched-bench failed (see $RUN/llama.log)"
}

TRANSFORMERS_WHY=""
transformers_ready() {
    if [[ -z $TRANSFORMERS_WHY ]]; then
        if "$PY" -c 'import transformers, torch' 2>"$RUN/transformers-import.log"; then
            TRANSFORMERS_WHY=ok
        else
            TRANSFORMERS_WHY="python -c 'import transformers, torch' failed: $(tail -1 "$RUN/transformers-import.log")"
        fi
    fi
    [[ $TRANSFORMERS_WHY == ok ]]
}

run_transformers() { # label hf-dir dtype
    local label=$1 dir=$2 dtype=$3
    if ! transformers_ready; then
        note "transformers column skipped: $TRANSFORMERS_WHY"
        return
    fi
    note "transformers: pp$PROMPTS, decode at batch $BATCHES"
    "$PY" "$HERE/transformers_bench.py" "$dir" "$dtype" "$THREADS" "$PROMPTS" "$BATCHES" "$NEW_TOKENS" \
        2>>"$RUN/transformers.log" | tee -a "$RUN/transformers.out" | collect transformers "$label" transformers >>"$RESULTS" ||
        note "transformers failed (see $RUN/transformers.log)"
}

NATIVE_WHY=""
native_flags() {
    # The CPU native classes (DESIGN §2.2): AMX tiles, else AVX512-BF16 dot products.
    if ! grep -qwE 'amx_tile|avx512_bf16' /proc/cpuinfo; then
        NATIVE_WHY="this CPU has neither AMX nor AVX512-BF16"
        return 1
    fi
    return 0
}

# Block weights in native mode run the integer rule (DESIGN §2.2, `qdot-1`) on AVX512-VNNI;
# without it the rule's scalar model runs (the same bits, far slower): no row then.
run_lockstep_gguf() { # label gguf
    run_lockstep "$1" "$2" "lockstep invariant" invariant || true
    if native_flags && grep -qw avx512_vnni /proc/cpuinfo; then
        run_lockstep "$1" "$2" "lockstep native" native || true
    else
        note "lockstep native column skipped: ${NATIVE_WHY:-this CPU has no AVX512-VNNI}"
    fi
}

# --- run ---------------------------------------------------------------------------------------

printf '# lockstep vs peers (bench/peers.sh)\n'
section "Machine"
note "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
note "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) CPUs"
note "flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|f16c|avx512[a-z_0-9]*|amx[a-z_0-9]*|avx_vnni)$' | tr '\n' ' ')"
note "load before the run: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine makes every number noisier)"
note "threads per engine: $THREADS"

ensure_venv
ensure_llama_cpp
ensure_lockstep
note "llama.cpp: $(cd "$SRC" && git log -1 --format='%h %cs' 2>/dev/null || echo "vendored in llama-cpp-python $LLAMA_CPP_PYTHON"), $BUILD"
note "lockstep: $("$LS" --version)"

# The machine's read bandwidth (GB/s on $BW_THREADS threads), measured by the kernel bench's
# probe. A VM's bandwidth moves during a run, within minutes (on a 2-vCPU VM the second vCPU's
# share doubles and halves with the host's placement, BENCHMARKS §19.4), so it is measured before
# the engines, before each model's engines and after them all, and the shares use the highest
# reading: a phase the engines enjoyed is then less likely to have been missed by every probe.
BW_THREADS=$((THREADS >= 2 ? 2 : 1))
BW_READINGS=()
measure_bandwidth() {
    local line
    line=$(cd "$REPO" && LOCKSTEP_BENCH_FILTER=peak cargo bench --quiet -p lockstep-kernels --bench linear 2>/dev/null | grep '^threads')
    note "$line"
    BW_MEASURED=$(sed -n "s/^threads $BW_THREADS: .*memory read \([0-9.]*\) GB\/s.*/\1/p" <<<"$line")
    [[ -n $BW_MEASURED ]] && BW_READINGS+=("$BW_MEASURED")
}
# Before each model's engines: one line under its section.
probe_for_model() {
    note "read bandwidth before this model's engines:"
    measure_bandwidth
}
section "Read bandwidth, before the engines"
measure_bandwidth

if has_model synth-bf16 || has_model synth-f32; then
    for dtype in bf16 f32; do
        has_model "synth-$dtype" || continue
        label="qwen2.5-0.5b $dtype"
        section "Synthetic Qwen2.5-0.5B, $dtype"
        probe_for_model
        synth_model "$dtype" || { note "conversion failed: llama.cpp skipped for $label"; GGUF=""; }
        record_weights "$label" "$(cat "$HF_DIR"/*.safetensors | wc -c)"
        run_lockstep "$label" "$HF_DIR" "lockstep invariant" invariant || true
        if native_flags; then
            run_lockstep "$label" "$HF_DIR" "lockstep native" native || true
        else
            note "lockstep native column skipped: $NATIVE_WHY"
        fi
        [[ -n $GGUF ]] && run_llama_cpp "$label" "$GGUF"
        if [[ $QUICK == 1 && $dtype == f32 ]]; then
            note "transformers f32 skipped (--quick)"
        else
            run_transformers "$label" "$HF_DIR" "$dtype"
        fi
    done
fi

if has_model synth-q8_0; then
    label="qwen2.5-0.5b Q8_0 (same GGUF)"
    section "Synthetic Qwen2.5-0.5B quantized to Q8_0 by the converter, the same GGUF file in both engines"
    probe_for_model
    if synth_model bf16 q8_0; then
        record_weights "$label" "$(wc -c <"$GGUF")"
        run_lockstep_gguf "$label" "$GGUF"
        run_llama_cpp "$label" "$GGUF"
        note "transformers column skipped for a GGUF file (transformers runs Hugging Face directories here)"
    else
        note "conversion failed: $label skipped"
    fi
fi

if has_model smollm2; then
    label="SmolLM2-135M Q4_1 (same GGUF)"
    section "SmolLM2-135M-Instruct Q4_1, the same GGUF file in both engines"
    probe_for_model
    smollm2_file
    note "file: $SMOLLM2"
    record_weights "$label" "$(wc -c <"$SMOLLM2")"
    run_lockstep_gguf "$label" "$SMOLLM2"
    run_llama_cpp "$label" "$SMOLLM2"
    note "transformers column skipped for a GGUF file (transformers runs Hugging Face directories here)"
fi

section "Read bandwidth, after the engines"
measure_bandwidth
# The highest reading rates the shares; the lowest is shown beside it.
read -r BANDWIDTH OTHER_PROBE < <(printf '%s\n' "${BW_READINGS[@]:-0}" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { print hi, lo }')
note "the decode-bandwidth ratio below uses ${BANDWIDTH} GB/s, the highest of the run's ${#BW_READINGS[@]} readings (${BW_READINGS[*]:-none}), ${BW_THREADS} threads (kernels/benches/linear.rs)"

section "Results (tokens/s) and the issue's ratios"
collect table "$RESULTS" "${BANDWIDTH:-0}" "$WEIGHTS" "${OTHER_PROBE:-0}"

if [[ $CONTROL == 1 ]]; then
    section "Negative control: the same sequence alone and among others, bit for bit"
    "$HERE/control.sh" "$LS" "$SRC" "$BUILD" "$THREADS" "$RUN" \
        "$(has_model synth-bf16 && echo "$CACHE/models/qwen2.5-0.5b-bf16")" \
        "$(has_model smollm2 && echo "$SMOLLM2")"
fi
note ""
note "raw outputs: $RUN"
