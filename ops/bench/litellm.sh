#!/usr/bin/env bash
# .venv-litellm: LiteLLM's proxy, for ops/bench/serving.py to measure beside the gateway. A venv of its
# own: the proxy pins its own fastapi, starlette and pydantic, and alignloop must not run on those.
# LiteLLM's `[proxy]` extra names litellm-proxy, litellm-proxy-extras and litellm-enterprise, which
# the package mirror here does not have; the proxy's code ships in the litellm wheel itself, so the
# extra's other requirements are installed one by one instead (skipping any the index lacks).
set -euo pipefail
cd "$(dirname "$0")/../.."
version=$(grep -o 'litellm==[0-9.]*' pyproject.toml | head -1)  # the same LiteLLM the client tests use
[ -x .venv-litellm/bin/python ] || "${PYTHON:-python3}" -m venv .venv-litellm
pip=(.venv-litellm/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install "$version"
meta=$(ls -d .venv-litellm/lib/python3*/site-packages/litellm-*.dist-info)/METADATA
grep "extra == 'proxy'" "$meta" | sed "s/^Requires-Dist: //; s/ *;.*//" | sort -u | while read -r req; do
  case "$req" in litellm-*) continue ;; esac
  "${pip[@]}" install "$req" || echo "skipped $req (not in the index)"
done
LITELLM_LOCAL_MODEL_COST_MAP=True .venv-litellm/bin/litellm --help >/dev/null
echo "LiteLLM's proxy is in .venv-litellm"
