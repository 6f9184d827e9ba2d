"""The porting corpus on the real SmolLM2-135M: the same experiment functions as
test_porting.py, test_porting_verbs.py, test_porting_attention.py and
test_porting_residual.py (written the way
nnsight 0.8 users write them), unchanged, each against plain PyTorch hooks and after a JSON
round trip. One LanguageModel pair (weights loaded once) for the module.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lm_fixtures as lmf
import pytest
import test_porting as porting
import test_porting_attention as attention
import test_porting_residual as residual
import test_porting_verbs as verbs

from nnglass import LanguageModel


@dataclass
class Smol:
    """What the corpus reads of its model (as conftest's `Tiny`): a Llama-architecture LM."""

    arch: str
    hf: Any
    tokenizer: Any


@pytest.fixture(scope="module")
def smol_pair(nnglass_cache: Any) -> Iterator[lmf.Pair]:
    """The pair, and (once for the module: fingerprinting 135M weights takes a while) the
    check that the model was left as it was."""
    local = lmf.make_lm(lambda: LanguageModel("smollm2-135m"), roundtrip=False)
    hf = local.module
    roundtrip = lmf.make_lm(
        lambda: LanguageModel(hf, tokenizer=local.tokenizer, name="smollm2-135m"), roundtrip=True
    )
    before = lmf.fingerprint(hf)
    yield lmf.Pair(local, roundtrip)
    assert lmf.fingerprint(hf) == before, "the model was not left as it was"


@pytest.fixture
def smol(smol_pair: lmf.Pair) -> Iterator[Smol]:
    yield Smol("llama", smol_pair.local.module, smol_pair.local.tokenizer)
    assert not lmf.hooks_left(smol_pair.local.module)
    smol_pair.local.clear_edits()
    smol_pair.roundtrip.clear_edits()


EXPERIMENTS = [
    porting.test_steering_in_place_after_untupling,
    porting.test_steering_by_replacement_with_mixed_arithmetic,
    porting.test_mlp_ablation_with_a_tensor_of_the_outputs_shape,
    porting.test_attention_ablation_by_unpacking_its_output,
    porting.test_logit_lens_over_every_layer,
    porting.test_batched_prompts_rows_and_positions_by_shape,
    porting.test_activation_patching_between_prompts,
    porting.test_attribution_patching_over_every_layer,
    porting.test_gradient_of_a_site_whose_loss_is_computed_in_its_own_hook,
    porting.test_steered_generation_with_shapes_per_step,
    porting.test_tracer_iter_range_loops_over_steps,
    porting.test_tracer_stop_after_an_early_layer,
    porting.test_metadata_inside_a_session,
    verbs.test_gradients_read_inside_a_backward_block,
    verbs.test_a_gradient_edited_inside_a_backward_block,
    verbs.test_an_inplace_edit_applies_to_every_later_trace_until_cleared,
    verbs.test_edit_returns_an_edited_handle_and_leaves_the_model_alone,
    verbs.test_an_edit_applies_at_every_generation_step,
    verbs.test_skip_a_layer_passing_its_input_through,
    *attention.EXPERIMENTS,
    *residual.EXPERIMENTS,
]


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda f: f.__name__.removeprefix("test_"))
def test_on_smollm2(experiment: Any, smol: Smol, smol_pair: lmf.Pair, both: Any) -> None:
    experiment(smol, smol_pair, both)
