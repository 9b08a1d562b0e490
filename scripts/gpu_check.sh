#!/usr/bin/env bash
# The prepared GPU check (see scripts/gpu_check.py): gsplat kernel build, `gpu` tests, gsplat-vs-torch parity on the
# render benchmark's scenes, and a few fp32 + bf16 training steps of every task on CUDA; one JSON of timings and
# errors. Not needed for `make test`.
#
#   bash scripts/gpu_check.sh [--out FILE] [--skip STEP ...]
#
# Python: .venv/bin/python when the checkout has one, else python3 (a GPU machine's own torch). Packages that
# python lacks can come as wheels in .whl/ (installed into /tmp/site, put first on PYTHONPATH). The whole check
# is stopped after GPU_CHECK_TIMEOUT seconds (default 480); the JSON keeps every step finished by then.
set -uo pipefail
cd "$(dirname "$0")/.."
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
timeout "${GPU_CHECK_TIMEOUT:-480}" "$py" scripts/gpu_check.py "$@"
