"""Where a model's pieces go. A server config's `shards` reaches the worker the subprocess
engine starts (the same worker.py rank 0 as the local groups of test_tiny.py and
test_smollm2.py; test_ray_shards.py serves one through a whole server). Pipeline placement
(`device_map`): the model's layers split across two GPUs, every site read and set as on
one device; it needs two CUDA devices, and on a machine without them the test says so
when it skips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nnglass import LanguageModel
from nnglass.errors import ConfigError
from nnglass.server.config import ModelConfig, ServerConfig, load_config
from nnglass.server.engines import subprocess_worker


def test_the_subprocess_engine_passes_shards_to_the_worker() -> None:
    worker = subprocess_worker(ModelConfig(name="m", source="s", shards=3), ServerConfig())
    assert worker.config["shards"] == 3 and worker.config["device_map"] == ""


def test_a_config_gives_device_map_or_shards_not_both(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('[[models]]\nname = "m"\nsource = "s"\ndevice_map = "auto"\n')
    assert load_config(toml).models[0].device_map == "auto"
    toml.write_text('[[models]]\nname = "m"\nsource = "s"\ndevice_map = "auto"\nshards = 2\n')
    with pytest.raises(ConfigError, match="device_map and shards"):
        load_config(toml)


GPUS = torch.cuda.device_count()


@pytest.mark.skipif(GPUS < 2, reason=f"pipeline placement needs 2 CUDA devices; this machine has {GPUS}")
def test_layers_on_two_gpus_read_and_set_as_on_one_device(tiny_dir: Path) -> None:
    placement = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
                 "model.norm": 1, "lm_head": 1}
    split = LanguageModel(str(tiny_dir), device_map=placement)
    alone = LanguageModel(str(tiny_dir))
    assert {p.device.index for p in split.module.parameters()} == {0, 1}

    def run(lm: LanguageModel) -> list[torch.Tensor]:
        with lm.trace("Hello world"):
            lm.model.layers[0].mlp.output[:, -1] = 1.0
            saved = [lm.model.layers[0].output.save(), lm.model.layers[1].self_attn.q_proj.output.save(),
                     lm.output.logits.save()]
        return [s.value.cpu() for s in saved]

    for a, b in zip(run(split), run(alone), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_a_model_that_cannot_be_sharded_is_refused_before_any_rank_starts() -> None:
    import transformers

    from nnglass.errors import NNglassError
    from nnglass.shards.rank import check_shardable

    llama = transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=2)
    check_shardable(llama, 2)
    with pytest.raises(NNglassError, match="num_attention_heads = 4, which does not divide by shards = 3"):
        check_shardable(llama, 3)
    with pytest.raises(NNglassError, match="no tensor-parallel plan"):
        check_shardable(transformers.GPT2Config(), 2)
