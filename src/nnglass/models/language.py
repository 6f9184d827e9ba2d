"""LanguageModel: Hugging Face causal LMs, with prompts, batching and generation.

Invariants:
- The client tokenizes; a graph carries token ids, never text. Each invoke's ids are
  left-padded to the batch's longest prompt, with an attention mask and position ids
  that follow the mask, so padding never changes a prompt's numbers.
- Weights load lazily: the module tree is browsable (on the meta device) before the
  first run; `lm.module` is the transformers model as loaded.
- Generation: step k is the k-th forward pass of the root module (step 0: the prompt).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..errors import TraceError
from ..graph.ir import (
    FORWARD_KWARGS,
    GENERATE,
    GENERATE_KWARGS,
    GET,
    SCAN,
    SEED,
    SESSION,
    VALIDATE,
    Graph,
    Invoke,
)
from ..graph.merge import group_rows, widths_differ
from ..runtime.backend import Backend
from ..runtime.interpreter import Interpreter
from ..runtime.limits import NO_LIMITS, RunConfig, RunLimits
from ..runtime.run import execute, run_session
from ..runtime.steps import StepListener, StepStreamer
from ..runtime.values import resolve
from ..runtime.window import model_sizes, safe_width
from ..tracing.proxy import Proxy
from ..tracing.tracer import Tracer, user_where
from . import fake, metaforward
from .nnmodel import NNModel
from .prompts import batch_prompts, batch_prompts_width, check_generate_kwargs
from .stop_strings import stop_rule

log = logging.getLogger(__name__)

_SAMPLING = threading.Lock()  # seeded sampling forks the process RNG: one at a time


class LanguageModel(NNModel):
    """A causal LM by hub id, local directory, built-in name ("smollm2-135m") or object."""

    def __init__(self, model: Any, *, tokenizer: Any = None, dtype: torch.dtype | None = None,
                 name: str | None = None, backend: Backend | None = None,
                 rename: dict[str, str] | None = None, remote: bool = False, shards: int = 1,
                 **load_kwargs: Any) -> None:
        """remote=True: the model lives on a server (`backend`, else NNGLASS_HOST); a name
        that is no local folder is looked up there (its config and tokenizer, never its
        weights; models/remote_source.py), and traces run there unless asked otherwise.
        shards=N: the model runs tensor-parallel in N rank processes (shards/local.py);
        every site still shows whole tensors."""
        if shards > 1 and (isinstance(model, torch.nn.Module) or remote):
            raise TraceError("shards= needs a model name or folder that each rank loads its own shard of")
        remote_only = False
        if isinstance(model, torch.nn.Module):
            source, loaded, config = None, model, model.config
            meta = model
            label = name or getattr(model.config, "name_or_path", "") or type(model).__name__
        else:
            from . import loading

            if remote:
                from .remote_source import remote_source

                source, remote_only, backend = remote_source(str(model), backend)
            else:
                source = loading.resolve_model_source(model)
            config, tok = loading.load_config_and_tokenizer(source)
            tokenizer = tokenizer or tok
            loaded, meta, label = None, loading.meta_model(config), name or str(model)
            if remote_only:
                from ..remote.meta import check_tree

                check_tree(source, meta, str(model))
        if tokenizer is None:
            raise TraceError("LanguageModel needs a tokenizer when given a model object")
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        attention = load_kwargs.get("attn_implementation")
        if attention and meta is not loaded:  # the module tree computes as the weights will load
            meta.set_attn_implementation(attention)
        super().__init__(meta, name=label, backend=backend, rename=rename)
        object.__setattr__(self, "tokenizer", tokenizer)
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "_source", source)
        object.__setattr__(self, "_loaded", loaded)
        object.__setattr__(self, "_dtype", dtype or torch.float32)
        object.__setattr__(self, "_load_kwargs", load_kwargs)
        object.__setattr__(self, "_load_lock", threading.Lock())
        object.__setattr__(self, "_fake", None)  # (FakeTensorMode, model), built by the first scan
        object.__setattr__(self, "_meta", None)  # metadata's meta-device copy (False: none can be made)
        object.__setattr__(self, "_remote_only", remote_only)  # from a server: no weights
        object.__setattr__(self, "_sizes", None)  # the model's own sizes (runtime.window.model_sizes)
        object.__setattr__(self, "_sites", None)  # a tensor-parallel rank's shard layouts (shards/)
        object.__setattr__(self, "_shards", int(shards))
        object.__setattr__(self, "_group", None)  # shards > 1: the rank group, started on first run

    @property
    def module(self) -> torch.nn.Module:
        """The transformers model, loading its weights on first use."""
        if self._shards > 1:
            raise TraceError(f"model {self.name!r} runs in {self._shards} rank processes (shards=): its "
                             "weights are not in this process; read them in a trace", user_where())
        if self._loaded is None and self._remote_only:
            raise TraceError(f"model {self.name!r} lives on the server: its weights are not here; run traces "
                             "there (the default for LanguageModel(name, remote=True))", user_where())
        if self._loaded is None:
            with self._load_lock:
                if self._loaded is None:
                    from . import loading

                    model = loading.load_model(self._source, dtype=self._dtype, **self._load_kwargs)
                    object.__setattr__(self, "_loaded", model.eval())
        return self._loaded

    # --- entry points ------------------------------------------------------------------
    def trace(self, *inputs: Any, remote: bool = False, blocking: bool = True, validate: bool = False,
              **kwargs: Any) -> Tracer:
        """One forward pass over the prompts; extra kwargs go to the model's forward.

        remote: run on the server (NNGLASS_HOST); blocking=False returns at once with
        `tracer.job`. validate: scan on fake tensors first (shape errors before a real run).
        """
        return self._tracer(inputs, "trace", {"forward": kwargs, "validate": validate}, remote, blocking)

    def generate(self, *inputs: Any, max_new_tokens: int = 1, remote: bool = False, blocking: bool = True,
                 seed: int | None = None, **generate_kwargs: Any) -> Tracer:
        """Generation: step 0 is the prompt's forward pass, step k the k-th new token's."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise TraceError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}", user_where())
        check_generate_kwargs(generate_kwargs, user_where())
        options = {"generate": {"max_new_tokens": max_new_tokens, **generate_kwargs}, "seed": seed}
        return self._tracer(inputs, "generate", options, remote, blocking)

    def scan(self, *inputs: Any, **kwargs: Any) -> Tracer:
        """Run the block on fake tensors: shapes and shape/index errors, no computation.

        Works before the weights are loaded. Saved values are fake tensors (`.shape` works).
        """
        return self._tracer(inputs, "scan", {"forward": kwargs}, remote=False)

    def _tracer(self, inputs: tuple, mode: str, options: dict, remote: bool, blocking: bool = True) -> Tracer:
        backend = self._backend(remote or (self._remote_only and mode != SCAN))
        return LMTracer(self, inputs, {}, backend, mode=mode, options=options, blocking=blocking)

    # --- what Tracer needs -------------------------------------------------------------
    def _prepare_invoke(self, tracer: Tracer, args: tuple, kwargs: dict) -> Invoke:
        ids, mask = self.encode_prompts(args[0] if len(args) == 1 else list(args), **kwargs)
        return Invoke((), {"input_ids": tracer.encode(ids), "attention_mask": tracer.encode(mask)})

    def encode_prompts(self, prompt: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Text, texts, token ids or a tokenizer's output → (ids, mask), left-padded."""
        if isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt)):
            enc = self.tokenizer(prompt, return_tensors="pt", padding=True, **kwargs)
            return enc["input_ids"], enc["attention_mask"]
        if hasattr(prompt, "keys") and "input_ids" in prompt:
            ids = torch.as_tensor(prompt["input_ids"])
            mask = prompt.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
            return _2d(ids), _2d(mask)
        if isinstance(prompt, torch.Tensor) or (isinstance(prompt, list) and prompt):
            ids = _2d(torch.as_tensor(prompt))
            if ids.dtype not in (torch.int64, torch.int32):
                raise TraceError(f"token ids must be integers, got {ids.dtype}", user_where())
            return ids.long(), torch.ones_like(ids)
        raise TraceError(f"cannot use {type(prompt).__name__} as a prompt: pass a string, a "
                         "list of strings, token ids or a tokenizer's output", user_where())

    def _fake_world(self, graph: Graph) -> fake.FakeWorld:
        """Site values of a fake forward on the recorded prompts (record-time metadata).

        The model's own forward on a private meta-device copy (models/metaforward.py: the
        loaded model's, else the config's, so a remote model needs no weights); where that
        cannot run, the loaded model under a FakeTensorMode, else the fake model from the
        config. Later generation steps see one new token."""
        ids, mask, rows = batch_prompts(graph, self.tokenizer.pad_token_id)
        mode = self._meta_mode()
        loaded = self._loaded
        device = next((p.device for p in loaded.parameters()), torch.device("cpu")) if loaded else None
        device = device or torch.device("cpu")
        forward = dict(resolve(graph.options.get(FORWARD_KWARGS, {}), [], graph.tensors))
        forward["use_cache"] = False
        meta = self._meta_copy() if graph.mode != SCAN else None

        def fallback() -> tuple[torch.nn.Module, Any]:
            if loaded is not None and self._fake is None and graph.mode != SCAN:
                return loaded, mode
            return fake._fake_model(self)[1], mode

        def capture(key: Any, run: Callable[[torch.nn.Module, Callable[[Any], Any]], Any],
                    ops: bool) -> fake.SiteValues:
            def make() -> fake.SiteValues:
                if meta is not None:
                    try:
                        return meta.capture(run, ops)
                    except Exception as e:  # a model the meta run cannot do: FakeTensorMode can
                        log.info("metadata by FakeTensorMode for %s (meta forward: %s)", self.name, e)
                        object.__setattr__(self, "_meta", False)
                model, fmode = fallback()
                return fake.capture(fmode, model, lambda: run(model, lambda t: t.to(device)), ops)

            # (the attention implementation too: a copy made again may reuse an old one's id)
            return self._fake_sites.get((id(meta), meta and _attention(meta.model), key, ops), make)

        main_key = fake.signature((ids, forward))  # once per world, not per site read

        def sites(later: bool, ops: bool) -> fake.SiteValues:
            if later:  # a generation step after the prompt: one new token (KV cache shapes aside)
                one = ids[:, -1:]
                return capture(("later", ids.shape[0]), lambda m, x: m(
                    input_ids=x(one), attention_mask=x(torch.ones_like(one)), use_cache=False), ops)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            return capture(main_key, lambda m, x: m(
                input_ids=x(ids), attention_mask=x(mask), position_ids=x(positions), **forward), ops)

        result = None
        if graph.mode == GENERATE:
            with mode:
                new = int(graph.options.get(GENERATE_KWARGS, {}).get("max_new_tokens", 1))
                result = torch.zeros(ids.shape[0], ids.shape[1] + new, dtype=ids.dtype, device=device)
        convert = metaforward.to_fake(mode, device)
        return fake.FakeWorld(mode, self._module, sites, rows, ids.shape[0], result, convert=convert,
                              runner=lambda: fallback()[0])

    def _source_listing(self, path: str) -> list[str] | None:
        """`.source` operations outside a trace: from one meta forward over a short prompt
        (once per model; no weights needed)."""
        meta = self._meta_copy()
        if meta is None:
            return None
        vocab = max(int(getattr(self.config, "vocab_size", 0) or 0), 5)
        ids = torch.arange(1, 5).remainder(vocab)[None]

        def run(m: torch.nn.Module, x: Callable[[Any], Any]) -> Any:
            return m(input_ids=x(ids), attention_mask=x(torch.ones_like(ids)), use_cache=False)

        key = (id(meta), _attention(meta.model), "listing")
        sites = self._fake_sites.get(key, lambda: meta.capture(run, ops=True))
        return fake.operations(sites, path)

    def _meta_copy(self) -> metaforward.MetaCopy | None:
        """The private meta-device copy metadata runs on (built once, and again when the model's
        attention implementation changed since: `.source` operations follow it; None: cannot be)."""
        source = self._loaded if self._loaded is not None else self._module
        if self._meta and _attention(self._meta.model) != _attention(source):
            object.__setattr__(self, "_meta", None)
        if self._meta is None:
            made = metaforward.MetaCopy.of(source)
            object.__setattr__(self, "_meta", made or False)
        return self._meta or None

    # --- running (also what a server calls) ---------------------------------------------
    def _backend(self, remote: bool = False) -> Backend:
        """Where this model's graphs run: in this process, or (remote) on the server given
        at construction, else the configured one (NNGLASS_HOST, NNGLASS_API_KEY)."""
        if remote and self._remote is None:
            from ..remote.client import shared_backend

            return shared_backend()
        return super()._backend(remote)

    def run_graph(self, graph: Graph, imports: dict | None = None,
                  limits: RunLimits = NO_LIMITS, on_step: StepListener | None = None) -> dict[int, Any]:
        """The graph's saved values; `on_step`: a generate graph's per-step hook (runtime/steps.py;
        a sharded model's rank group reports no steps: its streams read the result)."""
        if self._shards > 1 and graph.mode != SCAN:
            return self._rank_group().run_graph(graph, limits)
        if graph.mode == SESSION:
            return run_session(self, graph, limits)
        ids, mask, rows = batch_prompts(graph, self.tokenizer.pad_token_id, self._batch_width(graph))
        rows = group_rows(graph, rows, ids.shape[1])  # co-tenancy: each merged user's window
        if graph.mode == SCAN or graph.options.get(VALIDATE):
            saved = fake.scan(self, graph, ids, mask, rows, imports, limits)
            if graph.mode == SCAN:
                return saved
        model = self.module
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        if graph.mode == GENERATE:
            return self._run_generate(graph, model, ids, mask, rows, imports, limits, on_step)
        forward_kwargs = resolve(graph.options.get(FORWARD_KWARGS, {}), [], graph.tensors)
        forward_kwargs.setdefault("use_cache", False)

        def forward(interp: Interpreter) -> Any:
            return model(input_ids=ids, attention_mask=mask, position_ids=position_ids, **forward_kwargs)

        return execute(graph, model, forward, rows, ids.shape[0], RunConfig(limits, sites=self._sites),
                       imports=imports, order=self._order)

    def _rank_group(self) -> Any:
        with self._load_lock:
            if self._group is None:
                from ..shards.local import RankGroup

                threads = max(1, torch.get_num_threads() // self._shards)
                object.__setattr__(self, "_group", RankGroup(self.name, self._source, self._dtype,
                                                             self._shards, threads))
        return self._group

    def _batch_width(self, graph: Graph) -> int | None:
        """Co-tenants of different widths: a batch width that is none of the model's own
        sizes, so each one's window finds the position axes (runtime/window.py)."""
        if not widths_differ(graph):
            return None
        if self._sizes is None:
            object.__setattr__(self, "_sizes", model_sizes(self.module))
        return safe_width(batch_prompts_width(graph), self._sizes)

    def _run_generate(self, graph: Graph, model: torch.nn.Module, ids: torch.Tensor,
                      mask: torch.Tensor, rows: list[tuple[int, int]], imports: dict | None,
                      limits: RunLimits, on_step: StepListener | None = None) -> dict[int, Any]:
        kwargs = dict(resolve(graph.options.get(GENERATE_KWARGS, {}), [], graph.tensors))
        check_generate_kwargs({k: v for k, v in kwargs.items() if k != "max_new_tokens"}, "")
        seed = graph.options.get(SEED)
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        kwargs, stops = stop_rule(kwargs, self.tokenizer)  # (the batch's decode_rules get the same)

        def forward(interp: Interpreter) -> Any:
            first = [True]

            def count_step(module: Any, args: Any, kw: Any) -> None:
                if first[0]:
                    first[0] = False
                else:
                    interp.next_step()

            handle = model.register_forward_pre_hook(count_step, with_kwargs=True, prepend=True)
            streamer = {} if on_step is None else {"streamer": StepStreamer(interp, on_step)}
            try:
                with _private_rng(seed):
                    out = model.generate(input_ids=ids, attention_mask=mask, **kwargs, **streamer, **stops)
            finally:
                handle.remove()
            interp.fire_result(out)
            return out

        config = RunConfig(limits, can_stop=False, sites=self._sites)
        return execute(graph, model, forward, rows, ids.shape[0], config, imports=imports, order=self._order)


class LMTracer(Tracer):
    """A Tracer with the generation extras: `tracer.result`."""

    @property
    def result(self) -> Proxy:
        """The generated ids for this invoke's rows: left-padded prompt + new tokens."""
        if self.graph.mode != GENERATE:
            raise TraceError("`tracer.result` exists only in lm.generate(...)", user_where())
        with self._step_scope(0):
            return self.record_site(GET, "", "result", 0)


@contextmanager
def _private_rng(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    with _SAMPLING, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _2d(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0) if t.dim() == 1 else t


def _attention(model: torch.nn.Module) -> Any:
    return getattr(getattr(model, "config", None), "_attn_implementation", None)
