"""The three experiments in examples/, run as a user runs them: `python examples/X.py
--remote --out DIR` against one embedded server for SmolLM2 (and, where that is cheap,
again locally, which must print the same results). Each must exit 0, write its figure,
and find what the experiment is about."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from smol_server import REPO, Running


def run_example(name: str, server: Running, out: Path, remote: bool) -> list[str]:
    """The script's output lines after its first ("running locally/remotely ..."), less the
    last ("wrote ..."), after checking it exited 0 and wrote `out/<name>.png`."""
    args = [sys.executable, str(REPO / "examples" / f"{name}.py"), "--out", str(out)]
    done = subprocess.run([*args, "--remote"] if remote else args, cwd=REPO, env=server.env(),
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stdout}\n{done.stderr[-4000:]}"
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("running " + ("remotely" if remote else "locally")), lines[0]
    figure = out / f"{name}.png"
    assert lines[-1] == f"wrote {figure}"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "the figure is not a PNG"
    return lines[1:-1]


def test_logit_lens(server: Running, tmp_path: Path) -> None:
    remote = run_example("logit_lens", server, tmp_path / "remote", remote=True)
    layers = {int(line.split()[0]): line for line in remote[1:]}  # after the header line
    assert sorted(layers) == list(range(30))
    assert "' Paris'" in layers[29], "the last layer predicts ' Paris'"
    assert all("Paris" not in layers[i] for i in range(20)), "' Paris' on top in an early layer"
    assert run_example("logit_lens", server, tmp_path / "local", remote=False) == remote


def test_activation_patching(server: Running, tmp_path: Path) -> None:
    lines = run_example("activation_patching", server, tmp_path, remote=True)
    rows = {int(line.split(":")[0].split()[1]): [float(v) for v in line.split(":")[1].split()]
            for line in lines if line.startswith("layer ")}
    assert sorted(rows) == [0, 5, 10, 15, 20, 25, 29]
    assert rows[0][0] == 0.0, "the first token is the same in both prompts: patching it changes nothing"
    assert rows[29][-1] == 1.0, "the last layer's last position is the whole answer"
    assert rows[29][:-1] == [0.0] * 8, "after the last layer, only the last position counts"
    assert max(rows[5][1:4]) > 0.5, "early on, the subject's tokens carry the answer"
    assert lines[-1].startswith("strongest before the last position: layer"), lines[-1]


def test_steering(server: Running, tmp_path: Path) -> None:
    remote = run_example("steering", server, tmp_path / "remote", remote=True)
    texts = dict(line.split(" x steer: ") for line in remote if " x steer: " in line)
    assert len(texts) == 5
    assert len(set(texts.values())) >= 3, f"steering changed too little: {texts}"
    assert run_example("steering", server, tmp_path / "local", remote=False) == remote
