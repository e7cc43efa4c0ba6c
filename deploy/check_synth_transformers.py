#!/usr/bin/env python3
"""Check that a synthetic lockstep model directory loads in Hugging Face transformers.

lockstep's synthetic models (node/src/synth/) are meant to be ordinary HF directories that any
tool reads. This script loads one with `AutoConfig`, `AutoTokenizer` and `AutoModelForCausalLM`,
checks the tokenizer round-trips text and the chat template renders, runs a forward pass and a
few greedy steps, and checks the safetensors files with the `safetensors` library itself.

Make a model, then run the check (needs `pip install transformers safetensors torch`):

    LOCKSTEP_SYNTH_OUT=/tmp/synth-tiny LOCKSTEP_SYNTH_PRESET=tiny \
        cargo test -p lockstep-node --lib synth::tests::write_for_external_checks -- --ignored
    python3 deploy/check_synth_transformers.py /tmp/synth-tiny

Exit status 0 when every check passes.
"""

import glob
import json
import math
import os
import sys


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    model_dir = sys.argv[1]

    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    print(f"config: {config.architectures[0]} hidden={config.hidden_size} layers={config.num_hidden_layers} vocab={config.vocab_size}")

    # Every tensor readable by the reference implementation of the format.
    n_tensors = 0
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            assert f.metadata().get("format") == "pt", path
            for name in f.keys():
                t = f.get_tensor(name)
                assert torch.isfinite(t.float()).all(), name
                n_tensors += 1
    print(f"safetensors: {n_tensors} tensors read")

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert len(tok) <= config.vocab_size, (len(tok), config.vocab_size)
    for text in ["Once upon a time, there was a little girl.", "naïve café, 日本語 🎉\n\ttabs  and   spaces", ""]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text, (text, ids)
    text = "The same request should always give the same answer."
    n = len(tok.encode(text, add_special_tokens=False))
    assert n * 2 < len(text.encode()), f"{n} tokens for {len(text)} bytes: merges not applied?"
    assert tok.eos_token is not None and tok.convert_tokens_to_ids(tok.eos_token) in (
        config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    ), (tok.eos_token, config.eos_token_id)
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Hello!"}], add_generation_prompt=True, tokenize=False
    )
    print(f"tokenizer: {len(tok)} tokens; chat prompt {chat!r}")

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.eval()
    enc = tok(chat, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model(**enc).logits[0, -1]
        assert torch.isfinite(logits).all()
        std = logits.std().item()
        assert 0.1 < std < 10.0, f"logit std {std}: weights badly scaled"
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    print(f"model: last-position logit std {std:.3f}, greedy ids {new}, text {tok.decode(new)!r}")
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
