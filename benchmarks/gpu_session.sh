#!/usr/bin/env bash
# Chapter 10's GPU session in one command: our training throughput against torchvision's
# maskrcnn_resnet50_fpn, then the gpu preset shortened to fit, writing data/results/gpu_throughput.json
# and data/results/gpu_run.json (the steps: benchmarks/gpu_session.py's docstring).
#
#   benchmarks/gpu_session.sh                    # one GPU; on an H200 (16 cores) under 9 minutes
#   benchmarks/gpu_session.sh --results DIR      # write the two json files into DIR instead
#   benchmarks/gpu_session.sh --cpu-smoke        # every step on the CPU at toy size, into a temp folder
#
# Python: $PYTHON, else .venv/bin/python when it exists, else python3 (a bare GPU machine's, with torch).
# course_lib runs from this checkout (PYTHONPATH), uninstalled. A bare machine that cannot reach a
# package registry lacks pycocotools: the script installs every wheel in .whl/ (git-ignored) when an
# import is missing. Fetch them once, on a machine with internet, from the repository root:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl pycocotools==2.0.11
#
# (pycocotools needs numpy and matplotlib, which such a machine has.) Then take .whl/ along to the GPU
# machine with the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
NEEDED="import torch, torchvision, numpy, PIL, tqdm, matplotlib, pycocotools"
if ! "$PY" -c "$NEEDED" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "gpu_session: installing the wheels in .whl/ into /tmp/gpu_session_site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/gpu_session_site .whl/*.whl
        export PYTHONPATH="$PYTHONPATH:/tmp/gpu_session_site"
    fi
    "$PY" -c "$NEEDED" || { echo "gpu_session: a package is missing (above); put its wheel in .whl/ (see this script's header)" >&2; exit 1; }
fi
exec "$PY" benchmarks/gpu_session.py "$@"
