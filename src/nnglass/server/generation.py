"""The worker's side of a continuous generation session: generate jobs join and leave one
running batch (runtime/decode_batch.py) at step boundaries, and other jobs run between
two steps, so a small trace waits at most one step for a worker busy generating. The
joiners' prompts take at most the model's `join_tokens` padded tokens a step (the worker's
start config; the rest at the next steps), so a step that admits them stays short.

Protocol (JSON lines, in lockstep, so neither side ever guesses what the other knows):
  parent → child: {"stream": [request, ...]}
  child → parent, after every step: {"session": true, "answers": [answer, ...], "running": n,
                                     "steps": [[rows, seconds, kind], ...]}
                  answers: the jobs that ended in it (or ran between steps); running: the
                  jobs still generating; steps: the batch's forwards since the last message
                  (kind: "prefill", the joiners' prompts, or "decode")
  parent → child, the reply: {"more": [request, ...], "drop": [job, ...]}
                  more: jobs to admit now; drop: cancelled jobs to remove (never answered)
  The session ends when a step message says running 0 and its reply admits nothing.
  When jobs ran between two steps, their answers go at once, in a message without a step
  (its reply may admit more); then the batch steps again before the next such message,
  so jobs between steps never starve the generation.
  Between them, a job that asks for its steps sends its step lines ({"job", "step": k, ...},
  server/steps.py), as it would alone.

Invariants:
- Each job runs under its own limits, fails alone (ERROR), and one only the shared forward
  failed for (`disrupted`) runs again alone; a dropped job leaves the batch and no other.
- A job that cannot join the batch (a trace, a session, a backward) runs alone or in a
  merged pass between two steps, exactly as it would outside a session, and is answered
  before the next step: a small trace waits for at most the step that runs when it comes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..models.batched_generate import decode_batch, generate_job, generation_key

if TYPE_CHECKING:
    from .worker import LoadedModel

log = logging.getLogger(__name__)

Converse = Callable[[dict[str, Any]], dict[str, Any]]  # a message to the parent -> its reply


def run_session(replica: LoadedModel, requests: list[dict[str, Any]], converse: Converse,
                send: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Admit `requests`, then step the batch and talk to the parent until the session ends.
    `send`: where a job that asks for its steps sends its step lines (server/steps.py)."""
    from .fault_hooks import crash_or_hang
    from .steps import step_sender
    from .worker import _error, _limits

    steps: list[list[Any]] = []  # [rows, seconds, kind] of each forward since the last message
    batch = decode_batch(replica.lm, prefill_tokens=replica.join_tokens,
                         observe=lambda kind, rows, jobs, s: steps.append([rows, round(s, 6), kind]))
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
        if others:  # between two steps: alone, or in one merged pass
            answers.extend(replica.batch(others)["batch"])

    admit(requests)
    hurry = False  # answers of jobs that ran between two steps go out before the next step
    while True:
        if len(batch) and not hurry:
            for f in batch.step():
                request, graph = jobs.pop(f.key)
                if f.disrupted:
                    answers.append(replica.job(request))
                elif f.error is not None:
                    log.info("job %s failed in the generation batch: %s", f.key, f.error)
                    answers.append(_error(f.key, f.error))
                else:
                    try:
                        answers.append({"job": f.key, "status": "COMPLETED", "shared": 1,
                                        "bytes": replica._store(request, graph, f.saved or {})})
                    except Exception as e:
                        answers.append(_error(f.key, e))
        running = len(batch)
        reply = converse({"session": True, "answers": answers, "running": running, "steps": steps,
                          **replica.debug_info()})
        answers, steps = [], []
        for job in reply.get("drop") or ():
            if batch.drop(job):
                jobs.pop(job, None)
        more = reply.get("more") or []
        if not running and not more:
            return
        admit([r for r in more if type(r) is dict])
        hurry = bool(answers) and not hurry  # once: then a step, whatever else arrives


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
