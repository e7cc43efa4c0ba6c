#!/usr/bin/env bash
# bench/peers/control.sh — bench/peers.sh's negative control: does a sequence's output depend on
# the batch around it?
#
# llama.cpp: bench/peers/batch_invariance.cpp, built against the libllama that peers.sh built,
# evaluates one sequence (a 64-token prompt and 8 teacher-forced decode steps) alone, again, among
# 7 other sequences, on one thread and with the prompt split into ubatches of 16, and compares
# every vocabulary logit bit for bit with the first run.
# lockstep: `lockstep generate --json` of one prompt (greedy, 16 tokens) alone, again, among 7
# other prompts, on one thread and with --prefill-chunk 16; it compares the token ids and the
# logprob of every generated token (a logprob is the logit minus the log-sum-exp over the whole
# vocabulary, so equal logprob bits at every step leave no room for a logit that differs).
#
# usage: control.sh LOCKSTEP_BIN LLAMA_CPP_SRC LLAMA_CPP_BUILD THREADS WORKDIR [SYNTH_DIR] [SMOLLM2_GGUF]
# (SYNTH_DIR: a `model synth` directory whose GGUF twin is SYNTH_DIR.gguf; either may be empty.)
set -euo pipefail

LS=$1 SRC=$2 BUILD=$3 THREADS=$4 WORK=$5 SYNTH=${6:-} SMOLLM2=${7:-}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROBE=$BUILD/batch_invariance

if [[ ! -x $PROBE || $HERE/batch_invariance.cpp -nt $PROBE ]]; then
    # libllama and libggml come with llama-bench's build (shared libraries in bin/).
    lib=$(dirname "$(find "$BUILD" -name 'libllama.so' -print -quit)")
    c++ -O2 -std=c++17 "$HERE/batch_invariance.cpp" -I"$SRC/include" -I"$SRC/ggml/include" \
        -L"$lib" -lllama -lggml -lggml-base -Wl,-rpath,"$lib" -o "$PROBE"
fi

PROMPT="Once upon a time, in a small town near the river, there lived a baker who"
printf '%s\n' "$PROMPT" \
    "The children would stop at the window on their way to school" \
    "A scientist tests an idea many times before she believes it." \
    "Water boils at 100 degrees and freezes at 0 degrees." \
    "Small acts of kindness can change the life of another person" \
    "They learned how to make bread, how to mix the flour and the water" \
    "The same request should always give the same answer, and a good system" \
    "Years later, when the baker was old, Tom and his sister took over" >"$WORK/crowd.txt"

lockstep_control() { # model
    local model=$1 out=$WORK/control-$RANDOM
    mkdir -p "$out"
    local common=(--model "$model" --max-tokens 16 --ignore-eos --json --temperature 0)
    "$LS" generate "${common[@]}" --threads "$THREADS" --prompt "$PROMPT" >"$out/alone.jsonl" 2>>"$WORK/control.log"
    "$LS" generate "${common[@]}" --threads "$THREADS" --prompt "$PROMPT" >"$out/again.jsonl" 2>>"$WORK/control.log"
    "$LS" generate "${common[@]}" --threads "$THREADS" --prompts "$WORK/crowd.txt" >"$out/crowd.jsonl" 2>>"$WORK/control.log"
    "$LS" generate "${common[@]}" --threads 1 --prompt "$PROMPT" >"$out/one-thread.jsonl" 2>>"$WORK/control.log"
    "$LS" generate "${common[@]}" --threads "$THREADS" --prefill-chunk 16 --prompt "$PROMPT" \
        >"$out/chunked.jsonl" 2>>"$WORK/control.log"
    python3 "$HERE/collect.py" control "$out/alone.jsonl" \
        "alone, run again" "$out/again.jsonl" \
        "in a batch with 7 other sequences" "$out/crowd.jsonl" \
        "alone, 1 thread" "$out/one-thread.jsonl" \
        "alone, prefill chunk 16" "$out/chunked.jsonl"
}

if [[ -n $SYNTH ]]; then
    printf '### Synthetic Qwen2.5-0.5B bf16\n\n'
    if [[ -f $SYNTH.gguf ]]; then
        "$PROBE" "$SYNTH.gguf" 64 8 "$THREADS" 7
    else
        printf 'llama.cpp: no GGUF at %s.gguf (conversion failed?)\n' "$SYNTH"
    fi
    printf '\n'
    lockstep_control "$SYNTH"
    printf '\n'
fi
if [[ -n $SMOLLM2 ]]; then
    printf '### SmolLM2-135M-Instruct Q4_1 (the same GGUF file)\n\n'
    "$PROBE" "$SMOLLM2" 64 8 "$THREADS" 7
    printf '\n'
    lockstep_control "$SMOLLM2"
    printf '\n'
fi
