#!/usr/bin/env bash
# Install vLLM 0.33's KV-offloading modules into the ACTIVE Python environment on a CPU-only machine.
#
# The vLLM wheel on PyPI is built for CUDA and its requirements pull a CUDA torch, so it is installed with --no-deps
# and only the pure-Python dependencies that `vllm.v1.kv_offload` needs at import time are added. pip reports the
# wheel's unmet or mismatched requirements (its pinned torch, CUDA kernels, ...) as "dependency conflicts": expected,
# and harmless for the offloading modules. The script fails if torch changed (a CUDA torch must never be pulled in)
# or if vllm.v1.kv_offload does not import afterwards.
#
# Usage (inside the venv that has tiered_kv and torch): bash tools/install_vllm.sh
set -euo pipefail

VLLM_VERSION="${VLLM_VERSION:-0.33.0}"
PY="${PYTHON:-python}"

torch_before="$("$PY" -c 'import torch; print(torch.__version__)')"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

"$PY" -m pip download --no-deps "vllm==${VLLM_VERSION}" -d "$tmp"
"$PY" -m pip install --no-deps "$tmp"/vllm-*.whl
# Import-time dependencies of vllm.v1.kv_offload (and of the vllm modules it imports). torch is not among them.
"$PY" -m pip install packaging numpy msgspec psutil pyzmq urllib3 regex transformers cbor2 aiohttp requests \
  openai_harmony openai pillow pybase64 cachetools cloudpickle uvloop py-cpuinfo prometheus_client xgrammar fastapi \
  partial_json_parser llguidance

torch_after="$("$PY" -c 'import torch; print(torch.__version__)')"
if [[ "$torch_before" != "$torch_after" ]]; then
  echo "install_vllm.sh: torch changed from $torch_before to $torch_after; refusing (a CUDA torch must not be pulled)" >&2
  exit 1
fi

"$PY" -c 'import vllm.v1.kv_offload.tiering.base as b; print("vLLM", __import__("vllm").__version__, "offloading tiers OK:", b.__name__)'
