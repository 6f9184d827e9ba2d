"""The worker's side of a continuous generation session: generate jobs join and leave one
running batch (runtime/decode_batch.py) at step boundaries, and other jobs run beside it
(server/beside.py) from the moment they arrive, so a small trace never waits for the step
that runs when it comes. While rows run, the joiners' prompts take at most the model's
`join_tokens` padded tokens a step (the worker's start config; the rest at the next
steps), so a step that admits them stays short; a session's first step takes them all.

Protocol (JSON lines; the steps in lockstep, so neither side ever guesses what the other knows):
  parent → child: {"stream": [request, ...]}
  child → parent, after every step: {"session": true, "answers": [answer, ...], "running": n,
                                     "steps": [[rows, seconds, kind], ...]}
                  answers: the jobs that ended in it (a dropped one: CANCELLED); running: the
                  jobs still generating; steps: the batch's forwards since the last message
                  (kind: "prefill", the joiners' prompts, or "decode"); with a lane,
                  "lane": the jobs beside the batch (each now has its own time to answer)
  parent → child, the reply: {"more": [request, ...], "drop": [job, ...]}
                  more: jobs to admit now; drop: cancelled jobs to remove
  parent → child, at any moment while the session runs: {"beside": [request, ...]}: jobs that
                  run beside the batch at once (a child whose ready message says "beside")
  child → parent, when such jobs end: {"beside": true, "answers": [answer, ...]}
  Every job the parent sends gets exactly one answer, in a step message or a beside one.
  The session ends when a step message says running 0 and its reply admits nothing; the
  parent then waits for the answers of the jobs still beside the batch.
  A job of `more` that cannot join the batch runs beside it too. A host without a lane (a
  rank group, a host that answers whole requests) runs it between two steps instead, and
  answers it at once, in a message without a step (its reply may admit more); then the
  batch steps again before the next such message, so those jobs never starve it.
  Between them, a job that asks for its steps sends its step lines ({"job", "step": k, ...},
  server/steps.py), as it would alone.

Invariants:
- Each job runs under its own limits, fails alone (ERROR), and one only the shared forward
  failed for (`disrupted`) runs again alone; a dropped job leaves the batch and no other.
- A job that cannot join the batch (a trace, a session, a backward) runs alone or in a
  merged pass, exactly as it would outside a session: beside the batch, which yields to it
  at its next layer (server/beside.py), or, without a lane, between two steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..models.batched_generate import decode_batch, generate_job, generation_key
from .beside import Lane, yielding

if TYPE_CHECKING:
    from .worker import LoadedModel

log = logging.getLogger(__name__)

Converse = Callable[[dict[str, Any]], dict[str, Any]]  # a message to the parent -> its reply


def run_session(replica: LoadedModel, requests: list[dict[str, Any]], converse: Converse,
                send: Callable[[dict[str, Any]], None] | None = None, lane: Lane | None = None) -> None:
    """Admit `requests`, then step the batch and talk to the parent until the session ends.
    `send`: where a job that asks for its steps sends its step lines (server/steps.py).
    `lane`: where jobs that cannot join run, beside the batch (else between two steps)."""
    from .fault_hooks import crash_or_hang
    from .steps import step_sender
    from .worker import _error, _limits

    steps: list[list[Any]] = []  # [rows, seconds, kind] of each forward since the last message
    last = [0.0]  # seconds the batch's last forward took: the most it waits for the lane

    def observe(kind: str, rows: int, n: int, seconds: float) -> None:
        steps.append([rows, round(seconds, 6), kind])
        last[0] = seconds

    batch = decode_batch(replica.lm, prefill_tokens=replica.join_tokens, observe=observe)
    jobs: dict[Any, tuple[dict[str, Any], Any]] = {}  # job -> (request, graph), while in the batch
    answers: list[dict[str, Any]] = []

    def admit(new: list[dict[str, Any]]) -> None:
        crash_or_hang(new)  # tests only: a job named to crash or hang the worker does so here too
        others = []
        for request in new:
            job = request.get("job")
            try:
                graph = replica._load(request)
                if generation_key(graph) is None:
                    others.append(request)
                    continue
                budget = int(request.get("limits", {}).get("result_bytes") or 2**62)
                wants = send is not None and request.get("steps")
                listener = step_sender(job, send, budget) if wants else None
                batch.add(generate_job(replica.lm, graph, job, _limits(request), listener))
                jobs[job] = (request, graph)
            except Exception as e:
                answers.append(_error(job, e))
        if others and lane is not None:  # beside the batch: answered when they end
            lane.put(others)
        elif others:  # between two steps: alone, or in one merged pass
            answers.extend(replica.batch(others)["batch"])

    def ended(f: Any) -> dict[str, Any]:
        request, graph = jobs.pop(f.key)
        if f.disrupted:
            return replica.job(request)
        if f.error is not None:
            log.info("job %s failed in the generation batch: %s", f.key, f.error)
            return _error(f.key, f.error)
        try:
            return {"job": f.key, "status": "COMPLETED", "shared": 1,
                    "bytes": replica._store(request, graph, f.saved or {})}
        except Exception as e:
            return _error(f.key, e)

    admit(requests)
    hurry = False  # answers of jobs that ran between two steps go out before the next step
    with yielding(lane, replica.module if lane is not None else None, lambda: last[0]) as new_step:
        while True:
            if len(batch) and not hurry:
                new_step()
                answers.extend(ended(f) for f in batch.step())
            running = len(batch)
            lanes = {"lane": lane.jobs()} if lane is not None else {}
            reply = converse({"session": True, "answers": answers, "running": running, "steps": steps,
                              **lanes, **replica.debug_info()})
            answers, steps = [], []
            for job in reply.get("drop") or ():
                if batch.drop(job):  # answered, so the parent knows it is gone
                    jobs.pop(job, None)
                    answers.append({"job": job, "status": "CANCELLED"})
            more = reply.get("more") or []
            if not running and not more:
                return
            dropped = len(answers)
            admit([r for r in more if type(r) is dict])
            hurry = len(answers) > dropped and not hurry  # once: then a step, whatever else arrives


def stream_by_batches(worker: Any, requests: list[dict[str, Any]],
                      on_step: Callable[[dict[str, Any]], dict[str, Any]],
                      timeout: float | None,
                      on_line: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
    """A session for a worker that can only answer whole requests (a Ray actor): each
    admitted group runs as one {"batch"} (generate jobs still share one continuous batch,
    but none joins it mid-flight); `on_line`: its jobs' step lines, meanwhile. None when the
    session ended; else the lost answer."""
    while requests:
        request = requests[0] if len(requests) == 1 else {"batch": requests}
        reply = worker.run(request, timeout=timeout, on_step=on_line)
        answers = [reply] if len(requests) == 1 else reply.get("batch")
        if type(answers) is not list or len(answers) != len(requests):
            return reply  # the worker died in the pass: which job did it is unknown
        steps = answers[0].pop("steps", []) if type(answers[0]) is dict else []
        back = on_step({"session": True, "answers": answers, "running": 0, "steps": steps})
        requests = [r for r in back.get("more") or [] if r.get("job") not in set(back.get("drop") or ())]
    return None
