"""Activation patching: where does SmolLM2 keep "the Eiffel Tower is in Paris"?

Run "The Colosseum is in the city of" (the model answers " Rome"), but replace one layer's
output at one position with its value from "The Eiffel Tower is in the city of" (which
answers " Paris"), for every layer and every position. The metric is the share of the
logit difference logit(" Paris") - logit(" Rome") that the patch restores: 0 is the
Colosseum run, 1 the Eiffel run. The whole sweep is one batched forward pass: one invoke
per (layer, position), plus the two unpatched prompts.

    python examples/activation_patching.py [--remote] [--out DIR]

The figure goes to DIR/activation_patching.png (default: figures/).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from nnglass import LanguageModel
from nnglass.viz import patching_heatmap

CLEAN = "The Eiffel Tower is in the city of"
CORRUPT = "The Colosseum is in the city of"  # as many tokens as CLEAN


def main(remote: bool, out: Path) -> None:
    torch.set_num_threads(2)
    lm = LanguageModel("smollm2-135m")
    print(f"running {'remotely' if remote else 'locally'} on {lm.name}")
    answers = [lm.tokenizer(t)["input_ids"][0] for t in (" Paris", " Rome")]
    n_layers = lm.config.num_hidden_layers
    n_positions = len(lm.tokenizer(CLEAN)["input_ids"])

    with lm.trace(remote=remote) as tracer:
        with tracer.invoke(CLEAN):
            clean_h = [lm.model.layers[i].output for i in range(n_layers)]  # used below, not saved
            clean = lm.output.logits[:, -1, answers].save()
        with tracer.invoke(CORRUPT):
            corrupt = lm.output.logits[:, -1, answers].save()
        patched = {}
        for layer in range(n_layers):
            for pos in range(n_positions):
                with tracer.invoke(CORRUPT):
                    lm.model.layers[layer].output[:, pos] = clean_h[layer][:, pos]
                    patched[layer, pos] = lm.output.logits[:, -1, answers].save()

    def logit_diff(logits: torch.Tensor) -> float:  # logit(" Paris") - logit(" Rome")
        return float(logits[0, 0] - logits[0, 1])

    low, high = logit_diff(corrupt), logit_diff(clean)
    effect = torch.tensor([[(logit_diff(patched[layer, pos]) - low) / (high - low)
                            for pos in range(n_positions)] for layer in range(n_layers)])
    print(f"logit(' Paris') - logit(' Rome'): Eiffel {high:.3f}, Colosseum {low:.3f}")
    tokens = [lm.tokenizer.decode(t) for t in lm.tokenizer(CORRUPT)["input_ids"]]
    print("share restored by patching one position of one layer (every 5th layer and the last; positions:",
          " | ".join(repr(t) for t in tokens) + ")")
    for layer in [*range(0, n_layers - 1, 5), n_layers - 1]:
        print(f"layer {layer:>2}: " + " ".join(f"{v:6.3f}" for v in effect[layer].tolist()))
    best = divmod(int(effect[:, :-1].argmax()), n_positions - 1)
    print(f"strongest before the last position: layer {best[0]}, position {best[1]} ({tokens[best[1]]!r})")

    # x labels: the Eiffel token over the Colosseum token where they differ
    eiffel = [lm.tokenizer.decode(t) for t in lm.tokenizer(CLEAN)["input_ids"]]
    labels = [a if a == b else f"{a.strip()} / {b.strip()}" for a, b in zip(eiffel, tokens)]
    fig = patching_heatmap(effect, tokens=labels, title="patching Eiffel Tower into Colosseum runs",
                           metric="share of logit(Paris) - logit(Rome) restored")
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "activation_patching.png", dpi=80)
    print(f"wrote {out / 'activation_patching.png'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--remote", action="store_true", help="run on the server at NNGLASS_HOST")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="folder for the figure")
    args = parser.parse_args()
    main(args.remote, args.out)
