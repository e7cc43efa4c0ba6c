#!/usr/bin/env python3
"""Run llama.cpp's own convert_hf_to_gguf.py on a model directory, `lockstep model synth`'s included.

Usage: convert_synth.py LLAMA_CPP_DIR MODEL_DIR [converter arguments...]

The converter recognises a byte-level BPE pre-tokenizer by hashing the token ids it gets for a
fixed test string. Those ids depend on the vocabulary, and a synthetic model's vocabulary is its
own, so no hash in the converter's list matches it and the converter stops with "BPE pre-tokenizer
was not recognized". Only then does this wrapper look at the tokenizer.json: when its
pre-tokenizer is Qwen2's split regex (what `model synth` writes for Qwen2 and Qwen3), it answers
`qwen2`, the name llama.cpp gives that regex; anything else still fails as before. Everything else
is the converter's (it imports torch and transformers, so both must be installed).
"""

import json
import runpy
import sys
from pathlib import Path

# llama.cpp's `qwen2` pre-tokenizer (the same string as lockstep's QWEN2_SPLIT_REGEX).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def split_regexes(tokenizer_json: Path) -> list:
    pre = json.loads(tokenizer_json.read_text()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    return [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__)
        return 2
    llama_dir = Path(sys.argv[1]).resolve()
    model_dir = Path(sys.argv[2]).resolve()
    sys.path.insert(0, str(llama_dir))
    sys.path.insert(1, str(llama_dir / "gguf-py"))
    from conversion import base

    owner = next(c for c in vars(base).values() if isinstance(c, type) and "get_vocab_base_pre" in vars(c))
    recognise = owner.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        try:
            return recognise(self, tokenizer)
        except NotImplementedError:
            if QWEN2_SPLIT_REGEX in split_regexes(Path(self.dir_model) / "tokenizer.json"):
                print("convert_synth: unknown vocabulary hash, Qwen2 split regex: tokenizer.ggml.pre = qwen2")
                return "qwen2"
            raise

    owner.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(llama_dir / "convert_hf_to_gguf.py"), str(model_dir), *sys.argv[3:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
