#!/usr/bin/env python3
"""bench/peers.sh's bookkeeping: turn each engine's output into result lines, and print the table.

    collect.py lockstep MODEL ENGINE [--prefill-only] < `lockstep bench` output
    collect.py llama-bench MODEL ENGINE < `llama-bench -o json` output
    collect.py batched MODEL ENGINE < `llama-batched-bench --output-format jsonl` output
    collect.py transformers MODEL ENGINE < transformers_bench.py output
    collect.py table RESULTS.jsonl BANDWIDTH_GBS WEIGHTS.json [LOWEST_PROBE_GBS]
    collect.py control BASE.jsonl NAME OTHER.jsonl [NAME OTHER.jsonl ...]

Result lines are JSON: {"model", "engine", "metric", "tok_s"}; metrics are `pp<N>` (prefill of
one N-token prompt, tokens/s) and `b<B>` (decode tokens/s summed over B sequences). WEIGHTS.json
maps a model label to the bytes a batch-1 decode step streams (its weight files).
"""

import json
import sys

METRICS = ["pp128", "pp512", "b1", "b8", "b32"]
HEADERS = {"pp128": "pp128", "pp512": "pp512", "b1": "decode b1", "b8": "b8", "b32": "b32"}


def emit(model: str, engine: str, metric: str, tok_s: float) -> None:
    print(json.dumps({"model": model, "engine": engine, "metric": metric, "tok_s": round(tok_s, 2)}))


def lockstep(model: str, engine: str, prefill_only: bool) -> None:
    # | mode | TP | batch | prompt tok | new tok | prefill tok/s | decode tok/s | incl | backend |
    for line in sys.stdin:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 9 or not cells[2].isdigit():
            continue
        batch, prompt, prefill, decode = int(cells[2]), int(cells[3]), float(cells[5]), float(cells[6])
        if batch == 1:
            emit(model, engine, f"pp{prompt}", prefill)
        if not prefill_only:
            emit(model, engine, f"b{batch}", decode)


def llama_bench(model: str, engine: str) -> None:
    for row in json.load(sys.stdin):
        if row["n_gen"] == 0:
            emit(model, engine, f"pp{row['n_prompt']}", row["avg_ts"])


def batched(model: str, engine: str) -> None:
    for line in sys.stdin:
        line = line.strip()
        if line.startswith("{"):
            row = json.loads(line)
            emit(model, engine, f"b{row['pl']}", row["speed_tg"])


def transformers(model: str, engine: str) -> None:
    for line in sys.stdin:
        if line.startswith("{"):
            row = json.loads(line)
            emit(model, engine, row["metric"], row["tok_s"])


def fmt(x) -> str:
    return "–" if x is None else f"{x:.1f}"


def ratio(a, b) -> str:
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}×"


def table(results_path: str, bandwidth_gbs: float, weights_path: str, other_gbs: float = 0.0) -> None:
    """`bandwidth_gbs` (the run's highest probe reading) rates the batch-1 shares; `other_gbs`,
    its lowest, is shown beside it where it is lower (on a VM the 2-thread reading can double for a while,
    where the host lets the two vCPUs' memory traffic add up, and the probe can catch such a
    period while an engine runs outside it, or the other way round: docs/BENCHMARKS.md §19.4)."""
    rows = [json.loads(l) for l in open(results_path) if l.strip()]
    weights = json.load(open(weights_path))
    models = list(dict.fromkeys(r["model"] for r in rows))
    value = {(r["model"], r["engine"], r["metric"]): r["tok_s"] for r in rows}

    print("| model | engine | " + " | ".join(HEADERS[m] for m in METRICS) + " |")
    print("| --- | --- |" + " --- |" * len(METRICS))
    for model in models:
        for engine in dict.fromkeys(r["engine"] for r in rows if r["model"] == model):
            cells = [fmt(value.get((model, engine, m))) for m in METRICS]
            print(f"| {model} | {engine} | " + " | ".join(cells) + " |")
    print()

    # The targets, as ratios measured in this run.
    print("| model | target | measured | goal | met |")
    print("| --- | --- | --- | --- | --- |")

    def stream(gbs):
        text = f"{gbs:.1f} GB/s = {100 * gbs / bandwidth_gbs:.0f} % of {bandwidth_gbs:.1f}"
        if 0 < other_gbs < bandwidth_gbs:
            text += f" ({100 * gbs / other_gbs:.0f} % of the lowest probe's {other_gbs:.1f})"
        if gbs > bandwidth_gbs:
            # More than any probe read: the bandwidth rose while this engine ran, between probes.
            text += "; above every probe reading, so the bandwidth rose between them and the share overstates"
        return text

    def line(model, target, got, goal, ok):
        print(f"| {model} | {target} | {got} | {goal} | {'–' if ok is None else ('yes' if ok else 'no')} |")

    for model in models:
        # The peers' batch-1 stream, for scale: where a peer already streams most of the bandwidth,
        # "1.3× that peer" asks for more than the machine reads.
        for peer in ["llama.cpp", "transformers"]:
            b1 = value.get((model, peer, "b1"))
            if b1 is not None and model in weights and bandwidth_gbs > 0:
                gbs = weights[model] * b1 / 1e9
                line(f"{model}, {peer}", "decode b1 weight stream ÷ read bandwidth", stream(gbs), "(the peer's, for scale)", None)
        engines = [e for e in dict.fromkeys(r["engine"] for r in rows if r["model"] == model) if e.startswith("lockstep")]
        for ours in engines:
            name = f"{model}, {ours}"
            get = lambda e, m: value.get((model, e, m))  # noqa: E731
            mine = {m: get(ours, m) for m in METRICS}
            llama = {m: get("llama.cpp", m) for m in METRICS}
            hf = {m: get("transformers", m) for m in METRICS}
            b1, l1 = mine["b1"], llama["b1"]
            if b1 is not None and l1 is not None:
                line(name, "decode b1 ÷ llama.cpp", ratio(b1, l1), "≥ 1.3×", b1 / l1 >= 1.3)
            if b1 is not None and model in weights and bandwidth_gbs > 0:
                gbs = weights[model] * b1 / 1e9
                share = gbs / bandwidth_gbs
                line(name, "decode b1 weight stream ÷ read bandwidth", stream(gbs), "≥ 75 %", share >= 0.75)
            for m in ["b8", "b32"]:
                peers = [p for p in (llama[m], hf[m]) if p is not None]
                if mine[m] is not None and peers:
                    best = max(peers)
                    who = "llama.cpp" if best == llama[m] else "transformers"
                    line(name, f"decode {m} ÷ better peer ({who})", ratio(mine[m], best), "≥ 1.2×", mine[m] / best >= 1.2)
            for m in ["pp128", "pp512"]:
                if mine[m] is not None and llama[m] is not None:
                    line(name, f"{m} ÷ llama.cpp", ratio(mine[m], llama[m]), "≥ 1.0×", mine[m] / llama[m] >= 1.0)
                if mine[m] is not None and hf[m] is not None:
                    goal = "≥ 1.0× (native mode)" if "native" in ours else "(native mode's target)"
                    ok = mine[m] / hf[m] >= 1.0 if "native" in ours else None
                    line(name, f"{m} ÷ transformers", ratio(mine[m], hf[m]), goal, ok)
            if mine["pp128"] is not None and mine["pp512"] is not None:
                falls = mine["pp512"] < mine["pp128"]
                line(name, "prefill pp128 → pp512", f"{fmt(mine['pp128'])} → {fmt(mine['pp512'])} ({'falls' if falls else 'holds'})", "must not fall", not falls)


def control(base_path: str, pairs: list) -> None:
    """Compare the first line of `lockstep generate --json` runs: token ids and logprob bits."""

    def first(path):
        with open(path) as f:
            return json.loads(f.readline())

    base = first(base_path)
    print("| lockstep: the sequence vs alone | tokens compared | differing token ids | differing logprobs | max abs diff |")
    print("| --- | --- | --- | --- | --- |")
    varying = 0
    for name, path in zip(pairs[::2], pairs[1::2]):
        got = first(path)
        n = min(len(base["token_ids"]), len(got["token_ids"]))
        ids = sum(a != b for a, b in zip(base["token_ids"], got["token_ids"])) + abs(len(base["token_ids"]) - len(got["token_ids"]))
        # JSON carries each f32 in its shortest round-trip form: equal values are equal bits.
        diffs = [abs(a - b) for a, b in zip(base["logprobs"], got["logprobs"]) if a != b]
        varying += bool(ids or diffs)
        print(f"| {name} | {n} | {ids} | {len(diffs)} | {max(diffs, default=0.0):.3g} |")
    print(f"\nconfigurations whose output differs from the alone run: {varying} of {len(pairs) // 2}")


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "lockstep":
        lockstep(args[0], args[1], "--prefill-only" in args[2:])
    elif cmd == "llama-bench":
        llama_bench(args[0], args[1])
    elif cmd == "batched":
        batched(args[0], args[1])
    elif cmd == "transformers":
        transformers(args[0], args[1])
    elif cmd == "control":
        control(args[0], args[1:])
    elif cmd == "table":
        table(args[0], float(args[1]), args[2], float(args[3]) if len(args) > 3 else 0.0)
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
