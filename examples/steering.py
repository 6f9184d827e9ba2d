"""Steering: push a generation along a difference-of-means direction in the residual stream.

The direction is the mean output of layer 16 at the last token of six "The food was
<good word>" prompts minus the same for six "The food was <bad word>" prompts. Adding a
multiple of it to that layer's output at every step turns SmolLM2's review of a dinner
from glowing to scathing (negative multiples) or even warmer (positive ones). Both parts
run as one session: the direction never leaves the process (or the server) that computed
it. The figure shows the token chosen at each step (greedy) and its probability, one row
per multiple.

    python examples/steering.py [--remote] [--out DIR]

The figure goes to DIR/steering.png (default: figures/).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from nnglass import LanguageModel
from nnglass.viz import logit_lens

GOOD = ["wonderful", "delicious", "amazing", "fantastic", "lovely", "excellent"]
BAD = ["terrible", "disgusting", "awful", "horrible", "dreadful", "bad"]
PROMPT = "Yesterday we had dinner at the new restaurant, and it was"
LAYER = 16
SCALES = [-0.6, -0.3, 0.0, 0.3, 0.6]
NEW_TOKENS = 10


def main(remote: bool, out: Path) -> None:
    torch.set_num_threads(2)
    lm = LanguageModel("smollm2-135m")
    print(f"running {'remotely' if remote else 'locally'} on {lm.name}")
    with lm.session(remote=remote):
        with lm.trace() as tracer:
            with tracer.invoke([f"The food was {w}" for w in GOOD]):
                good = lm.model.layers[LAYER].output[:, -1].mean(0)
            with tracer.invoke([f"The food was {w}" for w in BAD]):
                bad = lm.model.layers[LAYER].output[:, -1].mean(0)
            steer = good - bad  # used by the next trace directly: no .save() needed
            norm = steer.norm().save()
        with lm.generate(max_new_tokens=NEW_TOKENS) as tracer:
            runs = []
            for scale in SCALES:
                with tracer.invoke(PROMPT):
                    with tracer.all():  # every generation step (step 0: the prompt)
                        lm.model.layers[LAYER].output[:] += scale * steer
                        logits = lm.lm_head.output[:, -1].save()  # .value: one tensor per step
                    runs.append((logits, tracer.result.save()))

    print(f"steering vector: layer {LAYER}, norm {float(norm):.2f}")
    print(f"prompt: {PROMPT!r}")
    for scale, (_, tokens) in zip(SCALES, runs):
        new = tokens[0, -NEW_TOKENS:]
        print(f"{scale:+.1f} x steer: {lm.tokenizer.decode(new)!r}")

    per_step = [torch.cat(logits.value) for logits, _ in runs]  # [steps, vocab] per scale
    fig = logit_lens(per_step, lm.tokenizer, tokens=[str(k) for k in range(NEW_TOKENS)],
                     layers=[f"{s:+.1f}" for s in SCALES],
                     title=f"steering layer {LAYER}: {PROMPT!r} ...")
    ax = fig.axes[0]
    ax.set_xlabel("generation step (the token chosen, greedy)")
    ax.set_ylabel("multiple of the steering vector")
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "steering.png", dpi=80)
    print(f"wrote {out / 'steering.png'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--remote", action="store_true", help="run on the server at NNGLASS_HOST")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="folder for the figure")
    args = parser.parse_args()
    main(args.remote, args.out)
