"""Rendering of ``service.py``'s results: markdown tables, and its section of ``docs/benchmarks.md``.

``write_docs`` rewrites only the part between the ``service`` markers (appending the section when
the markers are missing), so the overhead section and hand-written text around it survive.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
START, END = "<!-- service:start -->", "<!-- service:end -->"
TARGET_MS, TARGET_RATIO, TARGET_RSS_MB = 20.0, 0.8, 32.0
PHASES = ("submit", "queue", "run", "notify", "download", "total")
# Writes on a job's critical path, read from server/service.py, jobs.py, results.py, worker.py:
# SQLite commits on create (already QUEUED), RUNNING and the final status (WAL with
# synchronous=NORMAL: no fdatasync per commit), and no fsync of the graph or result files.
# Durable across a process crash, not an OS crash.
FLUSHES = {"sqlite_commit": 3, "fsync": 0}


def _met(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def _route(name: str, r: dict[str, Any], target: str) -> str:
    spread = f"{min(r['mb_s_all']):.0f}-{max(r['mb_s_all']):.0f}"
    cells = [f"{r['mb_s']:.0f}", spread, f"{r['cpu_ms']:.0f}", f"{r['rss_growth_mb']:.1f}", target]
    return f"| {name} | " + " | ".join(cells) + " |"


def render(res: dict[str, Any]) -> str:
    lat, dl = res["latency"], res["download"]
    gap = lat["disk"]["remote_minus_local_ms"]
    lines = [
        "| warm server, tiny model, one prompt, one save (ms) | "
        + " | ".join(f"home on {h}: p50 | p95" for h in lat)
        + " |",
        "|---|" + "---:|---:|" * len(lat),
    ]

    def row(name: str, cell: Any) -> None:
        lines.append(f"| {name} | " + " | ".join(cell(h) for h in lat.values()) + " |")

    def pair(get: Any) -> Any:
        return lambda h: f"{get(h)['p50']:.2f} | {get(h)['p95']:.2f}"

    row("local trace", pair(lambda h: h["local_ms"]))
    row("`lm.trace(..., remote=True)` (real client)", pair(lambda h: h["remote_ms"]))
    row("**remote - local** (per round)", pair(lambda h: h["remote_minus_local_ms"]))
    for name in PHASES:
        row(f"raw job: {name}", pair(lambda h, name=name: h["phases"][name]))
    row(f"event stream stalls > {lat['disk']['stall_s']:g} s (real client / raw)",
        lambda h: f"{h['stalled']} / {h['raw_stalled']} of {gap['n']} | ")
    for probe in FLUSHES:
        name = f"one {probe.replace('_', ' ')} alone in the home"
        row(name, pair(lambda h, p=probe: h["durability_ms"][p]))
    rss_ok = dl["result"]["rss_growth_mb"] <= TARGET_RSS_MB
    lines += [
        "",
        f"Target remote - local p50 ≤ {TARGET_MS:g} ms (home on disk, as served): {gap['p50']:.1f} ms, "
        f"{_met(gap['p50'] <= TARGET_MS)}. Remote values vs local: "
        + ", ".join(f"{h['check']} ({name})" for name, h in lat.items())
        + ".",
        "",
        f"Download of one {dl['bytes'] / 1e6:.0f} MB result (MB/s: median of the rounds; ratios: median of "
        "the per-round ratios; CPU: the server process's, median; RSS: its largest VmRSS growth during a "
        "download):",
        "",
        "| route | MB/s | MB/s range | server CPU ms | server RSS growth MB | target |",
        "|---|---:|---|---:|---:|---|",
        _route("`GET /v1/jobs/{id}/result`", dl["result"], f"≤ {TARGET_RSS_MB:g} MB: {_met(rss_ok)}"),
        _route("`GET /static/{id}` (bare FileResponse, same file)", dl["static"], ""),
        _route("`GET /static-mw/{id}` (the same, behind a no-op BaseHTTPMiddleware)", dl["static_mw"], ""),
        f"| result ÷ static (paired) | {dl['ratio']:.2f} | | | "
        f"| ≥ {TARGET_RATIO:g}: {_met(dl['ratio'] >= TARGET_RATIO)} |",
        f"| static-mw ÷ static (paired) | {dl['mw_ratio']:.2f} | | | | |",
        f"| result ÷ static, MB per server CPU second (paired) | {dl['cpu_ratio']:.2f} | | | | |",
        f"| real client `job.result()` (download + decode) | {dl['client_mb_s']:.0f} | | | | {dl['check']} |",
        "",
        *[f"- {b}" for b in diagnosis(res)],
    ]
    return "\n".join(lines)


def diagnosis(res: dict[str, Any]) -> list[str]:
    """Where the time goes, in numbers from this run (a cause is named only when its numbers show it)."""
    lat, dl = res["latency"], res["download"]
    disk = lat["disk"]
    raw, probes = disk["phases"]["total"]["p50"], disk["durability_ms"]
    out = [
        f"remote - local p50 {disk['remote_minus_local_ms']['p50']:.1f} ms; the same job through raw httpx "
        f"takes {raw:.1f} ms (p50); real client p50 - raw p50 = {disk['remote_ms']['p50'] - raw:.1f} ms. "
        "A process's first remote "
        f"trace per host and key also builds a `RemoteBackend` ({disk['backend_ms']['p50']:.1f} ms: its "
        "`httpx.Client` loads a CA bundle into an SSL context, even for `http://`).",
        f"Writes: a job makes {FLUSHES['sqlite_commit']} SQLite commits (create as QUEUED, RUNNING, "
        "final status; WAL, synchronous=NORMAL) and no fsync (jobs survive a process crash, not an "
        "OS crash); for scale, timed alone between the rounds, an fsync-ed commit cost "
        f"{probes['sqlite_commit']['p50']:.1f} ms and a file write + fsync {probes['fsync']['p50']:.1f} ms "
        "(p50) in this home.",
    ]
    if "tmpfs" in lat:
        t = lat["tmpfs"]
        moved = ", ".join(f"{k} {disk['phases'][k]['p50']:.1f} → {t['phases'][k]['p50']:.1f}"
                          for k in ("submit", "queue", "run"))
        out.append(
            f"With the home on tmpfs (flushes free): remote - local p50 "
            f"{disk['remote_minus_local_ms']['p50']:.1f} → {t['remote_minus_local_ms']['p50']:.1f} ms; raw "
            f"job {raw:.1f} → {t['phases']['total']['p50']:.1f} ms ({moved} ms)."
        )
    stalls = ", ".join(f"{h['stalled']} real-client and {h['raw_stalled']} raw of {h['remote_ms']['n']} "
                       f"({name})" for name, h in lat.items())
    if any(h["stalled"] or h["raw_stalled"] for h in lat.values()):
        out.append(
            f"Event stream stalls (a finished job's COMPLETED event not sent within {disk['stall_s']:g} s): "
            f"{stalls}. Cause, in server/app.py as written: the `/events` handler reads the status, yields "
            "it, and only then registers with `EventHub.wait`; a publish in between is lost and the stream "
            "sleeps until the hub's 15 s timeout (the real client waits it out). The shorter the job, the "
            "likelier."
        )
    if dl["cpu_ratio"] < 0.9:  # the route costs the server measurably more than the bare file
        out.append(
            f"Download: server CPU per download: bare FileResponse {dl['static']['cpu_ms']:.0f} ms, behind a "
            f"no-op `BaseHTTPMiddleware` {dl['static_mw']['cpu_ms']:.0f} ms, nnglass's route "
            f"{dl['result']['cpu_ms']:.0f} ms (medians). `BaseHTTPMiddleware` is what nnglass's key check "
            "(an `@app.middleware`) installs: it runs the app in another task and relays each 64 KiB "
            "chunk through an unbuffered anyio memory stream (a rendezvous per chunk). Wall-clock ratios "
            "swing with other load on the machine (see the ranges); the CPU ratio hardly does."
        )
    return out


def write_docs(md: str, env: dict[str, Any], res: dict[str, Any], path: Path = DOCS) -> None:
    section = "\n".join([
        START,
        f"Measured {env['date']} on {env['cores']} cores (load average {env['load']} at the start: other "
        f"work shares the machine), torch {env['torch']}, nnglass {env['nnglass']}; `{env['command']}`.",
        "",
        "- A real server on loopback (`benchmarks/_service_server.py`: `nnglass serve --config`'s app plus "
        "two bare static-file routes), its own temp `NNGLASS_HOME`, a random 2-layer Llama (hidden 32), "
        "warm. Client, server and worker share the machine's cores.",
        "- Rounds, the order rotating, of the same trace run locally, through the real client, and as "
        "raw httpx calls mirroring the client. Raw phases: submit = POST until 202 (client clock); queue "
        "= queued_at → started_at, run = started_at → finished_at (the job's server timestamps); notify "
        "= finished_at → the client reads COMPLETED on the SSE stream; download = GET result + decode. "
        "`disk`: the home in the system temp dir, as served; `tmpfs`: all again on a second server whose "
        "home is on `/dev/shm`, to price the durable writes.",
        "- Download: the result route, a bare Starlette `FileResponse` of the same file and the same "
        "behind a no-op `BaseHTTPMiddleware`, all from the same process and event loop, streamed with "
        "httpx and discarded, in rotating order.",
        "",
        md,
        END,
    ])
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if START in text and END in text:
        text = text[: text.index(START)] + section + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n## Service\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
