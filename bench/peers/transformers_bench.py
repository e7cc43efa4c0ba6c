#!/usr/bin/env python3
"""transformers' column of bench/peers.sh: prefill and decode tokens/s of a Hugging Face directory.

Usage: transformers_bench.py MODEL_DIR DTYPE THREADS PROMPT_LENGTHS BATCHES NEW_TOKENS

Prints one JSON line per measurement: {"metric": "pp128", "tok_s": ...} for each prompt length
(one sequence, one forward pass: prompt tokens / wall time) and {"metric": "b8", ...} for each
batch size: B distinct prompts of 128 tokens, greedy `generate`; decode tokens/s is
B × (NEW_TOKENS - 1) divided by the time that generating NEW_TOKENS takes beyond generating one
(the prefill). Same token-id formula as `lockstep bench` and the llama.cpp runs.
"""

import json
import sys
import time


def main() -> int:
    if len(sys.argv) != 7:
        print(__doc__)
        return 2
    model_dir, dtype_name, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    prompt_lengths = [int(x) for x in sys.argv[4].split(",") if x]
    batches = [int(x) for x in sys.argv[5].split(",") if x]
    new_tokens = int(sys.argv[6])

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[dtype_name]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    vocab = model.config.vocab_size

    def prompt(i: int, n: int) -> list:
        return [3 + (t * 7919 + i * 104729) % (vocab - 3) for t in range(n)]

    def timed(f) -> float:
        start = time.perf_counter()
        f()
        return time.perf_counter() - start

    with torch.inference_mode():
        model(torch.tensor([prompt(0, 16)]))  # warm-up: first-call allocations, lazy init
        for n in prompt_lengths:
            ids = torch.tensor([prompt(0, n)])
            secs = timed(lambda: model(ids))
            print(json.dumps({"metric": f"pp{n}", "tok_s": n / secs}), flush=True)
        for b in batches:
            ids = torch.tensor([prompt(i, 128) for i in range(b)])
            mask = torch.ones_like(ids)

            def gen(n: int):
                return lambda: model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
                )

            first = timed(gen(1))
            full = timed(gen(new_tokens))
            tok_s = b * (new_tokens - 1) / max(full - first, 1e-9)
            print(json.dumps({"metric": f"b{b}", "tok_s": tok_s}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
