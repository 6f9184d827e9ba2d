"""Logit lens: read every layer's residual stream through the final norm and the unembedding.

On "The Eiffel Tower is in the city of", SmolLM2-135M's last position predicts " Paris"
only in its last layers; the figure shows each layer's top token at each position.

    python examples/logit_lens.py [--remote] [--out DIR]

`--remote` sends the trace to the server at NNGLASS_HOST with NNGLASS_API_KEY (start one
with `nnglass serve --model smollm2-135m`). The figure goes to DIR/logit_lens.png
(default: figures/).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from nnglass import LanguageModel
from nnglass.viz import logit_lens, top_tokens

PROMPT = "The Eiffel Tower is in the city of"


def main(remote: bool, out: Path) -> None:
    torch.set_num_threads(2)
    lm = LanguageModel("smollm2-135m")
    n_layers = lm.config.num_hidden_layers
    print(f"running {'remotely' if remote else 'locally'} on {lm.name}: {PROMPT!r}")
    with lm.trace(PROMPT, remote=remote):
        # Each layer's output, as if it were the last: final norm, then the unembedding.
        lens = [lm.lm_head(lm.model.norm(lm.model.layers[i].output)).save() for i in range(n_layers)]

    paris = lm.tokenizer(" Paris")["input_ids"][0]
    probs, ids = top_tokens(lens)  # [layers, positions, 1]: the top token and its probability
    print("layer  top token at the last position    p(top)  p(' Paris')")
    for i in range(n_layers):
        p_paris = lens[i][0, -1].softmax(-1)[paris]
        token = lm.tokenizer.decode(ids[i, -1, 0])
        print(f"{i:>5}  {token!r:<32} {probs[i, -1, 0]:.3f}  {p_paris:.3f}")

    fig = logit_lens(lens, lm.tokenizer, tokens=PROMPT, title=f"logit lens of {lm.name}: {PROMPT!r}")
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "logit_lens.png", dpi=80)
    print(f"wrote {out / 'logit_lens.png'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--remote", action="store_true", help="run on the server at NNGLASS_HOST")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="folder for the figure")
    args = parser.parse_args()
    main(args.remote, args.out)
