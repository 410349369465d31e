#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with iqa-verify (editable) and its test tools.
# torch: on a machine without an NVIDIA driver the CPU build (torch==2.13.0, which pip takes from local disk
# on the project's machines) is installed first, so the permissive range in pyproject.toml never pulls a
# multi-GB CUDA build; with a driver present, pip picks the default (CUDA) build. Override with IQA_TORCH=...
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${IQA_TORCH:-}" ]; then
    pip install "$IQA_TORCH"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    pip install "torch>=2.1"
  else
    pip install "torch==2.13.0"
  fi
fi
pip install -e ".[dev,triton]"
# Adapters' third-party packages, --no-deps: their declared torch requirements would pull another torch build.
pip install --no-deps "fla-core==0.6.0" "torchdeq==0.1.0" einops
# Headless Chromium checks the HTML report in a real browser (tests/test_html_report.py). Debian's package,
# installed when missing and this user may (root with apt-get); set IQA_NO_BROWSER=1 to skip.
if [ -z "${IQA_NO_BROWSER:-}" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ]; then
  echo "installing chromium (Debian package) for the browser check of the HTML report"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
.venv/bin/python -c "import torch, iqa_verify; print(f'iqa-verify ready: torch {torch.__version__}, cuda={torch.cuda.is_available()}')"
