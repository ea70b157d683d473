#!/usr/bin/env bash
# The benchmark suite on one CUDA GPU: the torch and JAX parts (TensorFlow here is the CPU build).
# Every workload (the MLPs, the CNN, the MNIST convnets and the BatchNorm ResNet) at full size;
# sized to finish in under 8 minutes on one large GPU; writes benchmarks/results/gpu/bench.{json,md,png}.
# Fails with exit status 3 and a message when CUDA is absent (torch sees no device, or jax has
# no GPU backend: install jax[cuda12]). Extra arguments go to run.py (e.g. --frameworks torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu.sh: no CUDA GPU here (nvidia-smi finds none); nothing was run" >&2
  exit 3
fi
exec "$PYTHON" benchmarks/run.py --device cuda --frameworks torch,jax --rounds 5 --threads 1 \
  --out benchmarks/results/gpu "$@"
