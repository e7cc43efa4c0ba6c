#!/usr/bin/env python3
"""The official `openai` Python package as a real client of a running `lockstep serve`.

Run by coordinator/tests/api_openai.rs against a server on 127.0.0.1 (stories260K). Every check
is an assert; the script exits non-zero on the first failure and prints the number of checks
that passed otherwise.

    python3 tests/python/openai_client.py --base-url http://127.0.0.1:PORT/v1 --api-key KEY --model NAME
"""

import argparse
import struct
import sys

import openai

checks = 0


def check(cond, what):
    global checks
    if not cond:
        raise AssertionError(what)
    checks += 1


def f32_bits(xs):
    """The f32 bit patterns of logprobs (the server writes each f32 exactly as a double)."""
    return [struct.unpack("<I", struct.pack("<f", x))[0] for x in xs]


def connect(timeout):
    """The client and model of the command line (`--base-url`, `--api-key`, `--model`); loopback only."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--model", required=True)
    a = ap.parse_args()
    if not a.base_url.startswith("http://127.0.0.1:"):
        sys.exit("refusing to send traffic anywhere but 127.0.0.1")
    return openai.OpenAI(base_url=a.base_url, api_key=a.api_key, max_retries=0, timeout=timeout), a.model


def main():
    client, m = connect(30.0)

    # Models.
    ids = [x.id for x in client.models.list().data]
    check(m in ids, f"{m} in /v1/models: {ids}")

    # A plain greedy completion: stories260K's known continuation.
    r = client.completions.create(model=m, prompt="Once upon a time", max_tokens=16, temperature=0)
    check(r.choices[0].text.startswith(", there was a little girl named Lily"), r.choices[0].text)
    check(r.system_fingerprint.startswith("fp_"), r.system_fingerprint)
    check(r.usage.completion_tokens == 16 and r.usage.prompt_tokens > 0, r.usage)
    check(r.choices[0].finish_reason == "length", r.choices[0].finish_reason)

    # Seeded sampling with logprobs: two identical requests, identical bits.
    kw = dict(model=m, prompt="Once upon a time", max_tokens=24, temperature=0.9, seed=1234, logprobs=1)
    x, y = client.completions.create(**kw), client.completions.create(**kw)
    check([c.model_dump() for c in x.choices] == [c.model_dump() for c in y.choices], "seeded replay")
    check(x.system_fingerprint == y.system_fingerprint, "same fingerprint")
    lp = x.choices[0].logprobs
    check(len(lp.token_logprobs) == 24 and len(lp.tokens) == 24, lp)
    check(f32_bits(lp.token_logprobs) == f32_bits(y.choices[0].logprobs.token_logprobs), "logprob bits")
    check(all(v <= 0.0 for v in lp.token_logprobs), "logprobs are log-probabilities")
    check("".join(lp.tokens) == x.choices[0].text, "the tokens spell the text")

    # No seed: the drawn one is reported (extension field) and replays the answer.
    drawn = client.completions.create(model=m, prompt="The little dog", max_tokens=20, temperature=1.0)
    seed = (drawn.model_extra or {}).get("seed")
    check(isinstance(seed, int), f"drawn seed reported: {drawn}")
    again = client.completions.create(model=m, prompt="The little dog", max_tokens=20, temperature=1.0, seed=seed)
    check(again.choices[0].text == drawn.choices[0].text, "replay with the reported seed")

    # n = 2: distinct choices, each replayable.
    two = client.completions.create(model=m, prompt="Once upon a time", max_tokens=24, temperature=1.0, n=2, seed=7)
    check(len(two.choices) == 2 and sorted(c.index for c in two.choices) == [0, 1], two.choices)
    check(two.choices[0].text != two.choices[1].text, "n=2 choices differ")
    two_again = client.completions.create(
        model=m, prompt="Once upon a time", max_tokens=24, temperature=1.0, n=2, seed=7
    )
    check([c.text for c in two.choices] == [c.text for c in two_again.choices], "n=2 replay")

    # Streaming completions with usage: the same text as the non-streamed answer.
    skw = dict(model=m, prompt="Once upon a time", max_tokens=24, temperature=0.9, seed=1234)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **skw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    check(text == x.choices[0].text, f"stream {text!r} == non-stream {x.choices[0].text!r}")
    check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24, chunks[-1])
    check(all(c.system_fingerprint == x.system_fingerprint for c in chunks), "fingerprint on every chunk")

    # Chat, seeded, with logprobs; then streamed.
    msgs = [{"role": "user", "content": "Tell me a story about a cat."}]
    ckw = dict(model=m, messages=msgs, max_tokens=16, temperature=0.7, seed=3)
    c1 = client.chat.completions.create(logprobs=True, **ckw)
    c2 = client.chat.completions.create(logprobs=True, **ckw)
    check(c1.choices[0].message.role == "assistant", c1)
    check(c1.choices[0].message.content == c2.choices[0].message.content, "chat replay")
    check(
        [t.logprob for t in c1.choices[0].logprobs.content] == [t.logprob for t in c2.choices[0].logprobs.content],
        "chat logprobs replay",
    )
    check(len(c1.choices[0].logprobs.content) == 16, c1.choices[0].logprobs)
    check(c1.system_fingerprint == c2.system_fingerprint, "chat fingerprint")
    deltas = list(client.chat.completions.create(stream=True, **ckw))
    streamed = "".join((d.choices[0].delta.content or "") for d in deltas if d.choices)
    check(streamed == c1.choices[0].message.content, f"chat stream {streamed!r}")
    check(deltas[-1].choices[0].finish_reason in ("length", "stop"), deltas[-1])
    # max_completion_tokens and an extension parameter through extra_body.
    c3 = client.chat.completions.create(
        model=m, messages=msgs, max_completion_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    check(c3.usage.completion_tokens == 5, c3.usage)

    # Errors arrive as the SDK's typed exceptions with OpenAI error bodies.
    try:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
        check(False, "unknown model accepted")
    except openai.NotFoundError as e:
        check(e.status_code == 404 and e.code == "model_not_found", e)
    try:
        client.chat.completions.create(model=m, messages=msgs, logprobs=True, top_logprobs=3)
        check(False, "top_logprobs accepted")
    except openai.BadRequestError as e:
        check(e.code == "unsupported_parameter" and e.param == "top_logprobs", e)
    try:
        client.completions.create(model=m, prompt="x", max_tokens=-1)
        check(False, "negative max_tokens accepted")
    except openai.BadRequestError as e:
        check(e.code == "invalid_value" and e.param == "max_tokens", e)
    bad = client.with_options(api_key="sk-wrong")
    try:
        bad.completions.create(model=m, prompt="x", max_tokens=1)
        check(False, "wrong key accepted")
    except openai.AuthenticationError as e:
        check(e.status_code == 401 and e.code == "invalid_api_key", e)

    print(f"openai {openai.__version__}: {checks} checks passed")


if __name__ == "__main__":
    main()
