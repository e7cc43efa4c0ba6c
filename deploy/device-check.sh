#!/usr/bin/env bash
# Every check that needs a lent accelerator machine, as one prepared run (its minutes are few:
# one start, one command). Made with deploy/device-kit.sh here, then on the device tool:
#
#   run(command="deploy/device-check.sh .device-kit", carry=[".device-kit"], timeout_s=540)
#
# `deploy/device-check.sh --record KIT` (device-kit.sh runs it) writes step 2's CPU outputs of the
# machine that made the kit into KIT/expected/, and step 2 then also compares with those: the
# same bytes on another machine's CPU as well.
#
# 1. deploy/gpu-check.sh with the kit's gpu_check: portable kernels == the CPU reference bit for
#    bit, native M- and TP-invariance, timings against cuBLAS.
# 2. `lockstep generate --json` on stories260K, CPU vs `--device cuda:0 --numerics portable`,
#    greedy and sampled, one prompt and a batch of three: identical bytes expected (the
#    determinism contract: portable bits are the same on every device).
# 3. `--device cuda:0 --numerics native`, twice, and batched vs alone: identical to itself
#    (invariant within the tensor-core class; not expected to equal portable).
# 4. Where the host CPU has AMX: the kernels' native tests (their AMX halves run on silicon), and
#    `lockstep generate --numerics native` on the CPU at 1 and all threads, then a short
#    `lockstep bench` of invariant vs native on a synthetic Qwen2.5-0.5B.
# Every result is a PASS / FAIL / SKIP line in $OUT/summary.txt (the logs beside it, the
# `generate` outputs in generate.tgz); exits
# non-zero on any FAIL. Each step has its own time limit so one hang cannot eat the lease.
set -uo pipefail
cd "$(dirname "$0")/.."

record=0
if [ "${1:-}" = --record ]; then
    record=1
    shift
fi
kit="${1:-.device-kit}"
out="${OUT:-/tmp/device-check}"
gens="$out/generate" # the jsonl outputs, packed into one file at the end (the device tool returns 8 files)
[ "$record" = 1 ] && out="$kit/expected" && gens="$out"
mkdir -p "$out" "$gens"
lockstep="$kit/lockstep"
stories="$kit/stories260K"
summary="$out/summary.txt"
fails=0
say() { echo "$*" | tee -a "$summary"; }
result() { # result NAME OK(0/1) [detail]
    if [ "$2" = 0 ]; then say "PASS $1${3:+: $3}"; else say "FAIL $1${3:+: $3}"; fails=$((fails + 1)); fi
}

if [ ! -x "$lockstep" ]; then
    echo "device-check: no kit at $kit (make one with deploy/device-kit.sh and carry it)" >&2
    exit 2
fi
# `generate --json` runs of steps 2-4, the same on the machine that made the kit (--record).
declare -A gen_rc
gen() { # gen FILE ARGS...: one `generate --json` run, its stdout kept, its exit code remembered
    local file="$1"
    shift
    timeout 120 "$lockstep" generate --model "$stories" --max-tokens 48 --json "$@" >"$gens/$file" 2>>"$out/generate.log"
    gen_rc[$gens/$file]=$?
    return "${gen_rc[$gens/$file]}"
}
same() { # same NAME A B: a result line for file A's bytes == file B's; `FILE:N` means line N
    local name="$1" codes="" bad=0 f rc
    for f in "${2%%:*}" "${3%%:*}"; do
        rc="${gen_rc[$f]:-0}"
        codes+="$rc "
        [ "$rc" = 0 ] || bad=1
    done
    if [ "$bad" = 1 ]; then
        result "$name" 1 "generate exit codes ${codes% } (see generate.log)"
    else
        cmp -s <(lines "$2") <(lines "$3")
        result "$name" $?
    fi
}
lines() { # the bytes of FILE, or of its line N for FILE:N
    case "$1" in
        *:*) sed -n "${1##*:}p" "${1%%:*}" ;;
        *) cat "$1" ;;
    esac
}
prompts=(--prompt "Once upon a time" --prompt "The little dog" --prompt "Lily and Ben went to the park")
cases=("greedy:--temperature 0 --seed 1" "sampled:--temperature 0.9 --top-p 0.95 --seed 7")
if [ "$record" = 1 ]; then
    for mode in "${cases[@]}"; do
        read -r -a samp <<<"${mode#*:}"
        gen "cpu-${mode%%:*}.jsonl" --device cpu --numerics portable "${prompts[@]}" "${samp[@]}" || exit 1
    done
    echo "device-check: recorded this CPU's portable outputs in $out"
    exit 0
fi

: >"$summary"
say "device-check: kit commit $(cat "$kit/COMMIT" 2>/dev/null || echo unknown), $(date -u +%FT%TZ)"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
    lscpu 2>&1 || true
} >"$out/machine.txt"
say "gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
say "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) threads"

source deploy/nvrtc-env.sh

# 1. The kernels' GPU checks.
timeout 240 deploy/gpu-check.sh "$kit/gpu_check" >"$out/gpu-check.log" 2>&1
rc=$?
result "gpu-check ($(grep -E '^[0-9]+ passed' "$out/gpu-check.log" | tail -1))" "$rc" "$([ "$rc" = 124 ] && echo "timed out after 240 s")"

# 2 and 3. The engine end to end on the GPU.
for mode in "${cases[@]}"; do
    name="${mode%%:*}"
    read -r -a samp <<<"${mode#*:}"
    gen "cpu-$name.jsonl" --device cpu --numerics portable "${prompts[@]}" "${samp[@]}"
    gen "cuda-$name.jsonl" --device cuda:0 --numerics portable "${prompts[@]}" "${samp[@]}"
    same "generate portable $name: cuda:0 == cpu, 3 prompts batched" "$gens/cpu-$name.jsonl" "$gens/cuda-$name.jsonl"
    if [ -f "$kit/expected/cpu-$name.jsonl" ]; then
        same "generate portable $name: this CPU == the kit machine's CPU" "$kit/expected/cpu-$name.jsonl" "$gens/cpu-$name.jsonl"
    fi
done
native=(--numerics native --temperature 0 --seed 1)
gen cuda-native-a.jsonl --device cuda:0 "${native[@]}" "${prompts[@]}"
gen cuda-native-b.jsonl --device cuda:0 "${native[@]}" "${prompts[@]}"
gen cuda-native-alone.jsonl --device cuda:0 "${native[@]}" --prompt "${prompts[3]}"
same "generate native on cuda:0: the same bytes twice" "$gens/cuda-native-a.jsonl" "$gens/cuda-native-b.jsonl"
same "generate native on cuda:0: a prompt alone == inside the batch of three" \
    "$gens/cuda-native-a.jsonl:2" "$gens/cuda-native-alone.jsonl"

# 4. AMX on the host CPU, where it has it.
if grep -qw amx_bf16 /proc/cpuinfo && grep -qw amx_tile /proc/cpuinfo; then
    timeout 180 "$kit/native-test" --test-threads 4 >"$out/native-test.log" 2>&1
    rc=$?
    result "kernels native tests on AMX silicon ($(grep -E '^test result' "$out/native-test.log" | tail -1))" "$rc"
    if grep -q '^SKIPPED amx' "$out/native-test.log"; then
        result "AMX halves ran (no SKIPPED amx line)" 1 "$(grep '^SKIPPED amx' "$out/native-test.log" | head -1)"
    fi
    gen cpu-native-t1.jsonl --device cpu "${native[@]}" --threads 1 "${prompts[@]}"
    gen cpu-native-tn.jsonl --device cpu "${native[@]}" --threads "$(nproc)" "${prompts[@]}"
    same "generate native (AMX) on the CPU: 1 thread == $(nproc) threads" \
        "$gens/cpu-native-t1.jsonl" "$gens/cpu-native-tn.jsonl"
    synth="$out/synth-q05"
    if timeout 120 "$lockstep" model synth --preset qwen2.5-0.5b --out "$synth" >>"$out/bench.log" 2>&1; then
        timeout 200 "$lockstep" bench --model "$synth" --batch 1,8 --prompt-tokens 128 --new-tokens 16 \
            --modes invariant,native --threads 2 --warmup >>"$out/bench.log" 2>&1
        result "bench invariant vs native (AMX), 2 threads (table in bench.log)" $?
        rm -rf "$synth"
    else
        result "model synth qwen2.5-0.5b for the AMX bench" 1 "see bench.log"
    fi
else
    say "SKIP AMX: this CPU has no amx_bf16/amx_tile"
fi

tar -czf "$out/generate.tgz" -C "$out" generate && rm -rf "$gens"
say "device-check: $fails failed"
[ "$fails" = 0 ]
