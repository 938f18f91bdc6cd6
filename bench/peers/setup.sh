#!/usr/bin/env bash
# Create bench/peers/.venv holding the peer tools (llm-compressor, auto-round) with the CPU torch 2.13.0.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${PEERS_VENV:-$here/.venv}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
if [[ ! -f "$venv/.installed" ]]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "$torch_spec" -r "$here/requirements.txt"
    "$venv/bin/python" -c "import torch, llmcompressor, auto_round, compressed_tensors; print('peers venv ok: torch', torch.__version__)"
    touch "$venv/.installed"
fi
echo "$venv"
