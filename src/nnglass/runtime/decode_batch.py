"""A continuous generation batch: generate jobs of different users share every forward
pass, over one left-padded KV cache; each joins at a step boundary and leaves at its
own end (its `max_new_tokens`, or EOS on all of its rows).

One `step()`: the jobs that joined run their prompt (step 0) in one forward, left-padded
to one width (at most `prefill_tokens` padded tokens of them while other rows run: the
others, in order, at the next steps; all of them when none runs), and their rows of the
KV cache join the batch's; then every running job runs its next step in one decode
forward (one new token a row, the attention mask and position ids per row), unless more
rows still wait to join than run: then the next joiners' prompt goes first (a step is one
bounded forward, and the rows end together).
Finished jobs leave by index-select of the cache; columns no row needs any more are
dropped from its left (runtime/kv_rows.py).

Invariants:
- A job's numbers are the ones it gets alone. Each row keeps its own position ids and
  sees only its own tokens (the mask); the job picks its tokens from its own rows with
  its own rules (models/decode_rules.py) over its own ids, as alone (its own left-padded
  width), and samples with its own `torch.Generator` seeded with its seed, so its
  tokens, `tracer.result` and saves equal a lone run's (float tolerance). Jobs whose
  rules say they act alike this step (`rules.group`) make that pick in one call over
  their rows, each row getting what its own job's pick gives it; a group's call that
  fails is made again job by job, so only the job whose own pick fails ends with it.
- Each job has its own interpreter, at its own step: its step-k (and every-step) nodes
  run at its own k-th forward whatever the others' steps are (runtime/multiplex.py).
  Its graph is merged alone (graph/merge.py), so every node addresses a window: its
  rows, and on each position axis its own width (runtime/window.py): the prompt width in
  step 0, its own KV length (`width + k`) in step k. The batch's width is never one of
  the model's own sizes when some job's window hides positions (padding column added).
- A job that fails (its graph raises, a limit, a setter that does not fit) leaves the
  batch at once and ends with its error; the others go on. When the model itself fails
  in a shared forward, the jobs that set something in it end with that error and the
  others end `disrupted` (the caller runs them again alone): no job's failure is
  another's.
- `drop(key)` (a cancel) removes only that job, at the next step boundary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..graph.ir import Graph
from ..graph.ops import REGISTRY
from .finish import check_finished, culprit
from .hooks import install, uninstall
from .interpreter import Interpreter
from .kv_rows import KVRows, check_cache
from .limited import LimitedInterpreter
from .limits import RunConfig
from .multiplex import Multiplex, member_kind
from .plan import cached_plan
from .steps import StepListener, StepStreamer
from .window import Window, safe_width


@dataclass
class GenerateJob:
    """What the batch needs of one generate job (models/batched_generate.py makes it)."""

    key: Any
    graph: Graph  # merged alone: every node addresses a window
    ids: torch.Tensor  # [rows, width]: its prompts, left-padded as when it runs alone
    mask: torch.Tensor
    invokes: list[tuple[int, int]]  # each invoke's rows within the job
    rules: Any  # .choose(ids, logits, unfinished, generator) -> (ids, unfinished); .group(ids) ->
    # a key (jobs with equal keys pick in one .choose_many([(ids, unfinished, generator)], logits))
    seed: int | None
    config: RunConfig
    on_step: StepListener | None = None  # told each step's tokens and saves (runtime/steps.py)


@dataclass
class Finished:
    key: Any
    saved: dict[int, Any] | None  # the job's saved values (None: it failed)
    error: BaseException | None = None
    disrupted: bool = False  # failed only because the shared forward did: run it alone


class _Running:
    def __init__(self, job: GenerateJob, interp: Interpreter) -> None:
        self.job, self.interp = job, interp
        self.ids = job.ids
        self.rows, self.width = job.ids.shape
        self.unfinished = torch.ones(self.rows, dtype=torch.long, device=job.ids.device)
        self.generator = torch.Generator(device=job.ids.device)
        if job.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(job.seed)
        self.forwards = 0  # forward passes run (its next one is step `forwards`)
        self.streamer = None if job.on_step is None else StepStreamer(interp, job.on_step)
        if self.streamer is not None:
            self.streamer.put(job.ids)  # the prompt (as transformers' generate puts it first)

    def windows(self, offset: int, full: int, own: int) -> list[Window]:
        """Each invoke's window, then the whole job's, at row `offset` of a batch `full` wide."""
        cut = full - own if full > own else 0
        inv = [Window(offset + s, offset + e, cut, full) for s, e in self.job.invokes]
        return [*inv, Window(offset, offset + self.rows, cut, full)]


StepObserver = Callable[[str, int, int, float], None]  # (prefill|decode, rows, jobs, seconds)


class DecodeBatch:
    """The running batch of one model. Not thread-safe: one driver calls add/drop/step."""

    def __init__(self, model: torch.nn.Module, pad_id: int, sizes: frozenset[int],
                 observe: StepObserver | None = None, prefill_tokens: int | None = None) -> None:
        self.model, self.pad_id, self.sizes, self.observe = model, pad_id, sizes, observe
        self.prefill_tokens = prefill_tokens  # most padded prompt tokens joining in one step
        self.waiting: list[GenerateJob] = []
        self.running: list[_Running] = []  # in row order
        self.kv = KVRows()  # the running rows' cache, mask and positions
        self._dropped: set[Any] = set()

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, job: GenerateJob) -> None:
        """Join at the next step boundary."""
        self.waiting.append(job)

    def drop(self, key: Any) -> bool:
        """Remove a job (a cancel) at the next step boundary; whether it was here."""
        here = any(j.key == key for j in self.waiting) or any(r.job.key == key for r in self.running)
        if here:
            self._dropped.add(key)
        return here

    def step(self) -> list[Finished]:
        """Prefill the joiners (within `prefill_tokens`), then one decode step of every running
        job unless more rows still wait to join than run; the jobs that ended."""
        done: list[Finished] = []
        if self._dropped:
            self.waiting = [j for j in self.waiting if j.key not in self._dropped]
            for r in self.running:
                if r.job.key in self._dropped:
                    r.interp.close()  # its hooks and values go now, as a finished job's do
            self._keep([r for r in self.running if r.job.key not in self._dropped])
            self._dropped.clear()
        if self.waiting:  # with no row running, no step waits on the prefill: all at once
            n = _within(self.waiting, self.prefill_tokens if self.running else None)
            joining, self.waiting = self.waiting[:n], self.waiting[n:]
            done += self._prefill(joining)
        # More rows still to join than run: their prompts go first, so that all end together
        # (no tail of few-row steps). The decode waits at most one step per waiting job.
        if self.running and sum(j.ids.shape[0] for j in self.waiting) <= sum(r.rows for r in self.running):
            done += self._decode()
        return done

    # --- the two kinds of forward -----------------------------------------------------------
    def _prefill(self, jobs: list[GenerateJob]) -> list[Finished]:
        done: list[Finished] = []
        started: list[_Running] = []
        for job in jobs:
            try:
                r = _Running(job, _interpreter(job, self.model))
                r.interp.start()
                started.append(r)
            except Exception as e:
                done.append(_failed(job.key, e))
        if not started:
            return done
        widths = {r.width for r in started}
        full = max(widths) if len(widths) == 1 else safe_width(max(widths), self.sizes)
        pad = torch.nn.functional.pad
        ids = torch.cat([pad(r.ids, (full - r.width, 0), value=self.pad_id) for r in started])
        mask = torch.cat([pad(r.job.mask, (full - r.width, 0), value=0) for r in started])
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        offset = 0
        for r in started:
            r.interp.rows, r.interp.batch_size = r.windows(offset, full, r.width), ids.shape[0]
            offset += r.rows
        out, ok = self._forward("prefill", started, done, dict(
            input_ids=ids, attention_mask=mask, position_ids=positions))
        if out is None:
            return done
        keep = self._choose(started, ok, out.logits[:, -1], done)
        if not keep:
            return done
        cache = out["cache"]
        try:
            check_cache(cache)
        except NotImplementedError as e:
            for r in keep:
                done.append(Finished(r.job.key, None, e, disrupted=True))
                r.interp.close()
            return done
        if len(keep) == len(started):  # every row stays: no copy of the cache
            self._join(keep, cache, mask, positions[:, -1])
            return done
        rows = torch.tensor([i for r in keep for i in _rows_of(started, r)], dtype=torch.long)
        cache.batch_select_indices(rows.to(ids.device))
        self._join(keep, cache, mask[rows], positions[rows, -1])
        return done

    def _decode(self) -> list[Finished]:
        done: list[Finished] = []
        going = []
        for r in self.running:
            try:
                r.interp.next_step()
                going.append(r)
            except Exception as e:
                done.append(_failed(r.job.key, e, r.interp))
                r.interp.close()
        self._keep(going)
        if not going:
            return done
        kv = self.kv
        assert kv.mask is not None and kv.positions is not None
        full = kv.mask.shape[1] + 1
        owns = [r.width + r.forwards for r in going]
        while full in self.sizes and min(owns) < full:  # a hidden position axis must be findable
            kv.pad_left(1)
            full += 1
        ids = torch.cat([r.ids[:, -1:] for r in going])
        mask = torch.cat([kv.mask, kv.mask.new_ones(kv.mask.shape[0], 1)], dim=1)
        positions = (kv.positions + 1)[:, None]
        offset = 0
        for r, own in zip(going, owns):
            r.interp.rows, r.interp.batch_size = r.windows(offset, full, own), ids.shape[0]
            offset += r.rows
        out, ok = self._forward("decode", going, done, dict(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=kv.cache))
        if out is None:
            self._keep([])
            return done
        kv.mask, kv.positions = mask, positions[:, 0]
        self._keep(self._choose(going, ok, out.logits[:, -1], done))
        return done

    def _forward(self, kind: str, members: list[_Running], done: list[Finished],
                 inputs: dict[str, Any]) -> tuple[Any, list[_Running]]:
        """One shared forward; (its output, the members that did not fail). A failed member
        is in `done`; when the model fails, every member is (output None)."""
        plex = Multiplex([r.interp for r in members])
        began = time.perf_counter()
        try:
            installed = install(self.model, plex)  # type: ignore[arg-type]
            try:
                with torch.no_grad():
                    out = self.model(**inputs, use_cache=True, logits_to_keep=1, return_dict=True)
            finally:
                uninstall(plex, installed)  # type: ignore[arg-type]
        except Exception as e:
            suspects = set(plex.editors())
            for r in members:
                if r.interp in plex.failed:
                    done.append(_failed(r.job.key, plex.failed[r.interp]))
                elif r.interp in suspects or len(members) == 1:
                    plex.fail(r.interp, e)
                    done.append(_failed(r.job.key, plex.failed[r.interp]))
                else:
                    done.append(Finished(r.job.key, None, e, disrupted=True))
                r.interp.close()
            return None, []
        if self.observe is not None:
            self.observe(kind, int(inputs["input_ids"].shape[0]), len(members), time.perf_counter() - began)
        ok = []
        for r in members:
            if r.interp in plex.failed:
                done.append(_failed(r.job.key, plex.failed[r.interp]))
                r.interp.close()
            else:
                ok.append(r)
        return out, ok

    def _choose(self, members: list[_Running], ok: list[_Running], logits: torch.Tensor,
                done: list[Finished]) -> list[_Running]:
        """Each job's next tokens; the jobs that go on (the others are in `done`). Jobs whose
        rules act alike this step pick in one call (`rules.group`), the others alone."""
        groups: dict[Any, list[tuple[_Running, int]]] = {}
        offset, alive = 0, set(map(id, ok))
        for r in members:
            if id(r) in alive:
                r.forwards += 1
                try:
                    key = r.job.rules.group(r.ids)
                except Exception:  # its own `choose` says what is wrong, alone
                    key = None
                groups.setdefault(("alone", id(r)) if key is None else key, []).append((r, offset))
            offset += r.rows
        picked_all: list[_Running] = []
        for group in groups.values():
            picked = self._pick_together(group, logits) if len(group) > 1 else None
            for n, (r, at) in enumerate(group):
                try:
                    if picked is None:
                        r.ids, r.unfinished = r.job.rules.choose(r.ids, logits[at:at + r.rows], r.unfinished,
                                                                 r.generator)
                    else:
                        r.ids, r.unfinished = picked[n]
                    if r.streamer is not None:
                        r.streamer.put(r.ids[:, -1:])
                except Exception as e:
                    done.append(_failed(r.job.key, e))
                    r.interp.close()
                    continue
                picked_all.append(r)
        if not picked_all:
            return []
        # Which rows go on, read once for every job (not one `.any()` and sync a job).
        flags = torch.cat([r.unfinished for r in picked_all]).tolist()
        going: list[_Running] = []
        at = 0
        for r in picked_all:
            if any(flags[at:at + r.rows]):
                going.append(r)
            else:
                done.append(_finish(r))
            at += r.rows
        order = {id(r): i for i, r in enumerate(members)}
        return sorted(going, key=lambda r: order[id(r)])  # the rows stay in cache order

    @staticmethod
    def _pick_together(group: list[tuple[_Running, int]], logits: torch.Tensor) -> list[Any] | None:
        """One `choose_many` over the group's rows; None when it fails (each then picks alone,
        so only a job whose own pick fails ends with an error)."""
        start, stop = group[0][1], group[-1][1] + group[-1][0].rows
        if stop - start == sum(r.rows for r, _ in group):  # their rows are one run: a view
            rows = logits[start:stop]
        else:
            index = torch.cat([torch.arange(at, at + r.rows) for r, at in group]).to(logits.device)
            rows = logits.index_select(0, index)
        try:
            members = [(r.ids, r.unfinished, r.generator) for r, _ in group]
            return group[0][0].job.rules.choose_many(members, rows)
        except Exception:
            return None

    # --- the cache rows ------------------------------------------------------------------
    def _join(self, new: list[_Running], cache: Any, mask: torch.Tensor, positions: torch.Tensor) -> None:
        if not self.running:
            self.kv.clear()
        self.kv.join(cache, mask, positions)
        self.running = [*self.running, *new]

    def _keep(self, keep: list[_Running]) -> None:
        """Only these running jobs stay (in order); their rows of the cache, the rest gone."""
        if [id(r) for r in keep] == [id(r) for r in self.running]:
            return
        if not keep:
            self.running = []
            self.kv.clear()
            return
        rows = torch.tensor([i for r in keep for i in _rows_of(self.running, r)], dtype=torch.long)
        self.kv.keep(rows, [r.width + r.forwards - 1 for r in keep])  # never into a job's own width
        self.running = keep


def _interpreter(job: GenerateJob, model: torch.nn.Module) -> Interpreter:
    plan = cached_plan(job.graph, REGISTRY)
    kind = LimitedInterpreter if job.config.limits.bounds_run() else Interpreter
    rows = [*job.invokes, (0, job.ids.shape[0])]  # its rows alone, until its first forward sets them
    return member_kind(kind)(plan, job.graph, model, rows, job.ids.shape[0], job.config)


def _within(jobs: list[GenerateJob], tokens: int | None) -> int:
    """How many of the first jobs join now: their rows x widest prompt within `tokens`
    (the first always; None: all)."""
    rows = width = 0
    for n, job in enumerate(jobs):
        rows, width = rows + job.ids.shape[0], max(width, job.ids.shape[1])
        if n and tokens is not None and rows * width > tokens:
            return n
    return len(jobs)


def _rows_of(order: list[_Running], r: _Running) -> range:
    offset = 0
    for other in order:
        if other is r:
            return range(offset, offset + r.rows)
        offset += other.rows
    raise KeyError(r.job.key)


def _failed(key: Any, e: BaseException, interp: Interpreter | None = None) -> Finished:
    if interp is not None and getattr(e, "node_id", None) is None:
        e.node_id = culprit(interp, e)  # type: ignore[attr-defined]
    return Finished(key, None, e)


def _finish(r: _Running) -> Finished:
    """The job ended: `tracer.result` sees its ids; every node must have run (as alone)."""
    interp = r.interp
    interp.rows, interp.batch_size = r.windows(0, 0, 0), r.rows  # the ids are the job's own rows
    try:
        interp.fire_result(r.ids)
        check_finished(interp, missing_steps_ok=True)
        return Finished(r.job.key, interp.saved)
    except Exception as e:
        return _failed(r.job.key, e, interp)
    finally:
        interp.close()
