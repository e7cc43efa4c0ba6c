#!/usr/bin/env python3
"""The official `openai` Python package chatting with `lockstep serve --model <file>.gguf`.

Run by coordinator/tests/api_openai.rs against a server on 127.0.0.1 serving SmolLM2-135M-Instruct
(Q4_1 GGUF). Every check is an assert; the script exits non-zero on the first failure and prints
the number of checks that passed otherwise.

    python3 tests/python/openai_chat_gguf.py --base-url http://127.0.0.1:PORT/v1 --api-key KEY --model NAME
"""

import openai

# The checks and their count are openai_client.py's (this script's directory is on sys.path).
import openai_client
from openai_client import check


def main():
    client, m = openai_client.connect(60.0)

    ids = [x.id for x in client.models.list().data]
    check(m in ids, f"{m} in /v1/models: {ids}")

    # Greedy chat: the instruct model knows the answer and stops at <|im_end|>.
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=m, messages=msgs, max_tokens=16, temperature=0)
    answer = r.choices[0].message.content
    check(r.choices[0].message.role == "assistant", r)
    check("Paris" in answer, f"answer {answer!r}")
    check("<|im_end|>" not in answer, f"special tokens are not shown: {answer!r}")
    check(r.system_fingerprint.startswith("fp_"), r.system_fingerprint)

    # Seeded chat replays bit for bit, and its stream spells the same text.
    kw = dict(model=m, messages=msgs, max_tokens=12, temperature=0.8, seed=7)
    x = client.chat.completions.create(logprobs=True, **kw)
    y = client.chat.completions.create(logprobs=True, **kw)
    check(x.choices[0].message.content == y.choices[0].message.content, "seeded chat replay")
    check(
        [t.logprob for t in x.choices[0].logprobs.content] == [t.logprob for t in y.choices[0].logprobs.content],
        "seeded chat logprobs replay",
    )
    streamed = "".join((d.choices[0].delta.content or "") for d in client.chat.completions.create(stream=True, **kw) if d.choices)
    check(streamed == x.choices[0].message.content, f"chat stream {streamed!r}")

    print(f"openai {openai.__version__}: {openai_client.checks} checks passed")


if __name__ == "__main__":
    main()
