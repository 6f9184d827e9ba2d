"""Co-batched throughput of steered chat completions through the OpenAI-compatible API
(issue 15's second target, "as in the co-batching issue"): 32 concurrent clients, each a
chat completion with its own steering vector, against plain padded `generate`.

    NNGLASS_CACHE=.nnglass-cache python benchmarks/openai_cobatch.py   # full size (~4 min)
    python benchmarks/openai_cobatch.py --clients 8 --tokens 8 --alone 2 --rounds 1 --no-write

Side by side in one run, on SmolLM2-135M (float32, `--threads` torch threads):
- plain padded `generate` of the 32 chat-templated prompts in this process, greedy, exactly
  `--tokens` new tokens a row (no interventions): the batched limit, the median of `--rounds`;
- the server (`nnglass serve`, the model's default co-batching): `--clients` official
  `openai` clients send at once a greedy chat completion of `max_tokens` `--tokens`, each
  with `extra_body={"nnglass": {"steer": [...]}}` (a seeded random vector of norm 4 added
  to `--site`'s output at every position): new tokens (the answers' `usage`) / wall time
  from the first request to the last answer, the median of `--rounds`;
- the same requests one at a time through the same server (`--alone` of them): tokens/s.
Each concurrent answer is checked against the same request sent alone (identical text: the
batch is exact). Writes benchmarks/results/openai_cobatch.json unless --no-write.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import torch

from nnglass.server.auth import KeyStore
from openai_api import HERE, start

TOPICS = ["the sea", "a cat", "volcanoes", "the history of the printing press and its effect on Europe",
          "bread", "why the sky is blue", "a lighthouse keeper who finds a message in a bottle", "tea",
          "the moon", "prime numbers and why mathematicians care about them so much", "rain", "chess",
          "the first bicycle", "bees", "a city at night seen from a hill far away", "maps", "snow",
          "the oldest tree in the forest and the storms it has seen", "clocks", "trains", "music",
          "a robot learning to paint", "deserts", "the number zero", "kites", "owls", "glass",
          "a long journey on foot across the mountains in winter", "salt", "bridges", "ink", "stars"]


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."}]


def steer(site: str, hidden: int, i: int) -> dict[str, Any]:
    v = torch.randn(hidden, generator=torch.Generator().manual_seed(i))
    return {"site": site, "vector": (v / v.norm()).tolist(), "scale": 4.0, "positions": "all"}


def plain_generate(model: str, prompts: list[list[int]], tokens: int, rounds: int) -> float:
    """Tokens/s of one padded `generate` of all prompts (greedy, exactly `tokens` each)."""
    from nnglass import LanguageModel

    lm = LanguageModel(model)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    seconds = []
    for _ in range(rounds):
        t = time.perf_counter()
        with torch.no_grad():
            lm.module.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens,
                               min_new_tokens=tokens, do_sample=False, pad_token_id=pad)
        seconds.append(time.perf_counter() - t)
    return len(prompts) * tokens / float(np.median(seconds))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--alone", type=int, default=8, help="requests run one at a time")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--site", default="model.layers.12")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from nnglass.models import loading

    config, tokenizer = loading.load_config_and_tokenizer(loading.resolve_model_source(args.model))
    prompts = [[int(t) for t in tokenizer.apply_chat_template(messages(i), add_generation_prompt=True,
                                                                tokenize=True, return_dict=True)["input_ids"]]
               for i in range(args.clients)]
    steers = [steer(args.site, config.hidden_size, i) for i in range(args.clients)]
    limit = plain_generate(args.model, prompts, args.tokens, args.rounds)

    home = Path(tempfile.mkdtemp(prefix="nnglass-openai-cobatch-"))
    proc, url, key = start(home, args.model, args.threads)
    try:
        with KeyStore(home / "nnglass.db") as keys:  # one user a client, as in cobatch.py
            clients = [openai.OpenAI(base_url=f"{url}/v1", api_key=keys.create(f"client{i}")[1],
                                     max_retries=0, timeout=900) for i in range(args.clients)]

        def ask(i: int) -> tuple[str, int]:
            r = clients[i].chat.completions.create(  # type: ignore[call-overload]
                model="bench", messages=messages(i), max_tokens=args.tokens, temperature=0,
                extra_body={"nnglass": {"steer": [steers[i]]}})
            return r.choices[0].message.content, r.usage.completion_tokens

        ask(0)  # warm
        t = time.perf_counter()
        alone = [ask(i) for i in range(args.alone)]
        alone_rate = sum(n for _, n in alone) / (time.perf_counter() - t)
        rates, answers = [], [("", 0)] * args.clients
        for _ in range(args.rounds):
            go = threading.Barrier(args.clients + 1)

            def client_thread(i: int, go: threading.Barrier = go) -> None:
                go.wait()
                answers[i] = ask(i)

            threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(args.clients)]
            for th in threads:
                th.start()
            go.wait()
            t = time.perf_counter()
            for th in threads:
                th.join()
            rates.append(sum(n for _, n in answers) / (time.perf_counter() - t))
            wrong = [i for i in range(args.alone) if answers[i] != alone[i]]
            if wrong:
                sys.exit(f"co-batched answers differ from the lone ones for requests {wrong}")
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    served = float(np.median(rates))
    result = {"model": args.model, "clients": args.clients, "tokens": args.tokens, "site": args.site,
              "threads": args.threads, "load_average": os.getloadavg()[0],
              "tokens_per_s": {"plain padded generate (no interventions)": limit,
                               f"server, {args.clients} concurrent steered chat completions": served,
                               "same requests one at a time through the server": alone_rate},
              "rounds": rates, "vs_plain": served / limit, "vs_alone": served / alone_rate,
              "completion_tokens": sum(n for _, n in answers), "batching": models[0]["batching"],
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print("| measured | tokens/s | x plain generate |\n|---|---:|---:|")
    for name, rate in result["tokens_per_s"].items():
        print(f"| {name} | {rate:.1f} | {rate / limit:.2f} |")
    print(f"\nserver vs one at a time: {served / alone_rate:.2f}x; rounds {[round(r, 1) for r in rates]}")
    print("batching: " + json.dumps(result["batching"]))
    if not args.no_write:
        out = HERE / "results" / "openai_cobatch.json"
        out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
