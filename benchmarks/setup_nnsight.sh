#!/usr/bin/env bash
# Builds the separate virtual environment that the overhead benchmark uses for nnsight.
#
#   bash benchmarks/setup_nnsight.sh        # run from anywhere; needs no Makefile
#
# Creates /work/main/.bench/nnsight-venv (gitignored: .bench/) from nothing, with
# torch==2.13.0 (CPU), nnsight==0.8.1 and transformers installed in ONE pip command:
# torch must be pinned in the same command as nnsight, else pip resolves nnsight's bare
# `torch` requirement to a multi-GB CUDA build. Idempotent: a stamp file records a finished
# install; delete .bench/ (or `make clean`) to rebuild.
#
# nnsight lives in its own venv (and the benchmark runs it in its own subprocess) because
# importing it patches library objects globally, which breaks anyio-based code such as
# nnglass's server stack, and because its dependency pins should not leak into .venv.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NNSIGHT_VENV:-$ROOT/.bench/nnsight-venv}"
PY="${PY:-python3}"
STAMP="$VENV/.installed-nnsight-0.8.1"

if [[ -f "$STAMP" ]] && "$VENV/bin/python" -c "import nnsight" 2>/dev/null; then
    echo "nnsight venv ready: $VENV"
    exit 0
fi

mkdir -p "$(dirname "$VENV")"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "torch==2.13.0" "nnsight==0.8.1" transformers
"$VENV/bin/python" -c "import nnsight, torch; print('nnsight', nnsight.__version__, 'torch', torch.__version__)"
touch "$STAMP"
echo "nnsight venv ready: $VENV"
