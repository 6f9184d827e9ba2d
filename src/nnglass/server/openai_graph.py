"""An OpenAI-style request as an ordinary nnglass generate graph, and its saved values as
the answer's tokens, log-probabilities and activations.

Invariants:
- The graph is recorded with the same tracing API a user would write (`lm.generate`,
  `tracer.all()`, `tracer.step(k)`, `site.output[...] += v`), on a LanguageModel that
  holds the config and tokenizer only (no weights; its backend only captures the graph).
  It then goes through `Service.submit` like any client's graph: the wire codec, the
  model's policy and limits, the quota, the scheduler, co-batching, the dashboard.
- Each node's `where` names the request field it came from (`nnglass.steer[1]`), so a
  policy refusal or a run error points at the field, as a graph error points at a line.
- Steering adds `scale * vector` to a site's output (its first element when the output
  is a tuple): "all" at every step, "prompt" at step 0 (the prompt's positions),
  "generated" at steps 1.., a list of ints at those token positions (0 is the prompt's
  first token; position P+k-1 is fed at step k). Reads save a site's output at the last
  position of each step: row k is the activation that produced generated token k.
"""

from __future__ import annotations

import base64
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import MalformedError, NotFoundError
from ..graph import wire
from ..graph.check import Limits
from ..graph.ir import Graph, Node, renumber
from ..runtime.backend import DoneJob
from .openai_request import CompletionRequest, Steer
from .policy import match


class _CapturedJob(DoneJob):
    def __init__(self, graph: Graph) -> None:
        super().__init__({})
        self.graph = graph


class _Capture:
    """A backend that keeps the graph and runs nothing (the service runs it)."""

    def submit(self, graph: Graph) -> _CapturedJob:
        return _CapturedJob(graph)


@dataclass
class Plan:
    """Where the answer's parts are among the graph's saved nodes."""

    prompt_len: int
    result: int = -1
    logprobs: int | None = None
    reads: dict[str, int] = field(default_factory=dict)
    saved: dict[int, int] = field(default_factory=dict)  # the user's graph's node id -> ours


class Frontend:
    """One served model's side of the OpenAI endpoints: its tokenizer and module tree."""

    def __init__(self, name: str, source: str, attention: str = "") -> None:
        from ..models import loading
        from ..models.language import LanguageModel

        self.name = name
        self.attention = attention  # the attention implementation the workers load (config: `attention`)
        load = {"attn_implementation": attention} if attention else {}
        self.lm = LanguageModel(loading.resolve_model_source(source), name=name, backend=_Capture(), **load)
        self.tokenizer = self.lm.tokenizer
        self.source = self.lm._source  # a local folder: what `GET /v1/models/{name}/meta` hands out
        eos = [
            self.tokenizer.eos_token_id,
            getattr(self.lm.config, "eos_token_id", None),
            _generation_eos(self.source),
        ]
        self.eos = {int(e) for x in eos for e in (x if isinstance(x, list) else [x]) if e is not None}
        self._sites: dict[str, tuple[int | None, int]] | None = None
        self._lock = threading.Lock()

    def prompt_ids(self, req: CompletionRequest) -> list[int]:
        tok = self.tokenizer
        if req.chat:
            if not getattr(tok, "chat_template", None):
                raise MalformedError(f"messages: model {self.name!r} has no chat template; use "
                                     "POST /v1/completions with a prompt instead")
            ids = tok.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):  # newer tokenizers return a BatchEncoding
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        if isinstance(req.prompt, str):
            return [int(i) for i in tok(req.prompt)["input_ids"]]
        vocab = len(tok)
        if any(i >= vocab for i in req.prompt or []):
            raise MalformedError(f"prompt: token ids must be below the vocabulary size {vocab}")
        return list(req.prompt or [])

    def sites(self) -> dict[str, tuple[int | None, int]]:
        """path -> (index of the tensor in its output: None for a tensor, 0 for the first of
        a tuple; its last dim), from one fake forward (no weights), made once."""
        with self._lock:
            if self._sites is None:
                modules = [p for p, m in self.lm._module.named_modules()
                           if p and not isinstance(m, (nn.ModuleList, nn.ModuleDict))]
                with self.lm.scan("ab") as tracer:
                    cache = tracer.cache(modules)
                table: dict[str, tuple[int | None, int]] = {}
                for path, entry in cache.items():
                    out = entry.output.value
                    index = None if isinstance(out, torch.Tensor) else 0
                    first = (
                        out if index is None else (out[0] if isinstance(out, (tuple, list)) and out else None)
                    )
                    if isinstance(first, torch.Tensor) and first.dim() == 3:  # [batch, position, features]
                        table[path] = (index, int(first.shape[-1]))
                self._sites = table
            return self._sites

    def build(
        self, req: CompletionRequest, ids: list[int], max_tokens: int
    ) -> tuple[bytes, bytes | None, Plan]:
        """The request's graph as wire bytes, and where its answer will be."""
        sampling: dict[str, Any] = {"do_sample": req.temperature > 0}
        if req.temperature > 0:
            sampling.update(temperature=req.temperature, top_p=req.top_p, top_k=0)
        if req.stop:  # the job stops generating there too (models/stop_strings.py), not only the text
            sampling["stop_strings"] = list(req.stop)
        plan = Plan(prompt_len=len(ids))
        reads = self._read_paths(req.read) if req.read else []  # (the site table's scan: before the block)
        if req.steer:
            self.sites()
        wheres: list[tuple[int, str]] = []  # (first node id, request field) in recording order
        lm = self.lm
        with lm.generate(torch.tensor([ids]), max_new_tokens=max_tokens, remote=True, seed=req.seed,
                         **sampling) as tracer:
            graph = tracer.graph
            if req.graph is not None:
                wheres.append((len(graph.nodes), "nnglass.graph"))
                plan.saved = _replay(tracer, _user_graph(req), self.name)
            for i, steer in enumerate(req.steer):
                wheres.append((len(graph.nodes), f"nnglass.steer[{i}]"))
                self._steer(tracer, steer, f"nnglass.steer[{i}]", len(ids), max_tokens)
            with tracer.all():
                for path in reads:
                    wheres.append((len(graph.nodes), f"nnglass.read ({path})"))
                    plan.reads[path] = self._output(path)[:, -1].save()._id
                if req.top_logprobs is not None:
                    wheres.append((len(graph.nodes), "logprobs (reads the logits, the root module's output)"))
                    plan.logprobs = lm.output.logits[:, -1].float().log_softmax(-1).save()._id
            wheres.append((len(graph.nodes), "the generated tokens"))
            plan.result = tracer.result.save()._id
        _name_fields(tracer.job.graph, wheres)  # type: ignore[union-attr]
        json_bytes, tensors = wire.encode(tracer.job.graph)  # type: ignore[union-attr]
        return json_bytes, tensors, plan

    def _output(self, path: str) -> Any:
        index, _ = self.sites()[path]
        out = self.lm._envoy.at(path).output
        return out if index is None else out[index]

    def _steer(self, tracer: Any, steer: Steer, where: str, prompt_len: int, steps: int) -> None:
        sites = self.sites()
        if steer.site not in sites:
            raise MalformedError(f"{where}.site: {steer.site!r} is not a module of {self.name!r} whose "
                                 "output is a [batch, position, features] tensor")
        width = sites[steer.site][1]
        if len(steer.vector) != width:
            raise MalformedError(f"{where}.vector: {steer.site}'s output has {width} features, the vector "
                                 f"{len(steer.vector)}")
        vector = torch.tensor(steer.vector, dtype=torch.float32) * steer.scale

        def add(columns: Any) -> None:
            out = self._output(steer.site)
            out[:, columns] += vector

        if steer.positions == "all":
            with tracer.all():
                add(slice(None))
            return
        if steer.positions == "prompt":
            with tracer.step(0):
                add(slice(-prompt_len, None))
            return
        if steer.positions == "generated":
            for k in range(1, steps):
                with tracer.step(k):
                    add(slice(None))
            return
        positions = steer.positions
        in_prompt = [p - prompt_len for p in positions if p < prompt_len]  # from the end: padding-proof
        if in_prompt:
            with tracer.step(0):
                add(in_prompt)
        for p in positions:
            k = p - prompt_len + 1  # the step that feeds position p
            if 1 <= k < steps:
                with tracer.step(k):
                    add(slice(None))

    def _read_paths(self, patterns: tuple[str, ...]) -> list[str]:
        sites = self.sites()
        out: list[str] = []
        for i, pattern in enumerate(patterns):
            found = [p for p in sites if match(pattern, p) and p not in out]
            if not found and not any(match(pattern, p) for p in sites):
                raise MalformedError(f"nnglass.read[{i}]: {pattern!r} names no module of {self.name!r} whose "
                                     "output is a [batch, position, features] tensor")
            out += found
        return out


def _generation_eos(source: Any) -> Any:
    """The generation config's end-of-sequence ids (what `generate` stops at), if it has one."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(source).eos_token_id
    except (OSError, ValueError):
        return None


def _user_graph(req: CompletionRequest) -> Graph:
    import json

    try:
        data = json.dumps(req.graph).encode()
    except (TypeError, ValueError) as e:
        raise MalformedError(f"nnglass.graph: not JSON-able: {e}") from None
    try:
        return wire.decode(data, req.graph_tensors, limits=Limits(max_json_bytes=len(data) + 1))
    except MalformedError as e:
        raise MalformedError(f"nnglass.graph: {e.message}") from None
    except Exception as e:  # GraphError, VersionError: the field is malformed
        raise MalformedError(f"nnglass.graph: {getattr(e, 'message', e)}") from None


def _replay(tracer: Any, user: Graph, model: str) -> dict[int, int]:
    """The user's graph's nodes into ours, steps kept, ids and tensors renumbered; its
    saved nodes stay saved. Its invokes are not used: the request's prompt is the input."""
    from ..tracing.tracer import _shape

    if user.model != model:
        raise MalformedError(
            f"nnglass.graph: the graph is for model {user.model!r}, the request for {model!r}"
        )
    if user.mode not in ("generate", "trace") or user.children:
        raise MalformedError(f"nnglass.graph: a trace or generate graph, not a {user.mode!r} one")
    graph = tracer.graph
    offset = len(graph.nodes)
    tensors = {key: graph.attach(t) for key, t in user.tensors.items()}

    def remap(x: Any) -> Any:
        return renumber(x, offset, lambda ref: tensors[ref.key])

    saved = {}
    for n in user.nodes:
        node = Node(
            n.id + offset, n.op, remap(n.args), remap(n.kwargs), n.site, None, n.step, n.save, n.where
        )
        graph.nodes.append(node)
        tracer._shape.append(_shape(node))
        if n.save:
            saved[n.id] = node.id
    return saved


def _name_fields(graph: Graph, wheres: list[tuple[int, str]]) -> None:
    """Each node's `where`: the request field that made it (a replayed graph keeps its own)."""
    bounds = [*wheres, (len(graph.nodes), "")]
    for (start, name), (stop, _) in itertools.pairwise(bounds):
        for node in graph.nodes[start:stop]:
            if name != "nnglass.graph" or not node.where:
                node.where = f"request field {name}"


class Frontends:
    """Each served model's Frontend, made on first use (its tokenizer and config load then)."""

    def __init__(self, sources: dict[str, str], attention: dict[str, str] | None = None) -> None:
        self.sources = sources  # name -> source, as the server config says
        self.attention = attention or {}  # name -> its `attention` setting, where one is set
        self._made: dict[str, Frontend] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Frontend:
        if name not in self.sources:
            raise NotFoundError(f"model: no model {name!r} on this server; it serves "
                                f"{', '.join(sorted(self.sources)) or 'none'}")
        with self._lock:
            if name not in self._made:
                self._made[name] = Frontend(name, self.sources[name], self.attention.get(name, ""))
            return self._made[name]


def encode_array(t: torch.Tensor) -> dict[str, Any]:
    """A tensor as JSON: base64 of its raw little-endian bytes, its shape and dtype."""
    t = t.detach().to("cpu").contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return {"data": base64.b64encode(raw).decode("ascii"), "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch.")}
