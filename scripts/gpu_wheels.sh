#!/usr/bin/env bash
# Download, into .whl/, the wheels of vkd's dependencies that a bare GPU machine's Python lacks (the versions
# installed in this checkout's .venv), for scripts/gpu_check.sh there. Run here, where PyPI is reachable:
#
#   bash scripts/gpu_wheels.sh            # then carry .whl to the GPU machine and run scripts/gpu_check.sh there
#
# The list is what the workplace's GPU image (PyTorch, Triton, accelerate, peft, timm, ... preinstalled) does not
# have; imageio-ffmpeg (~30 MB) is left out: the check renders no video.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || grep -qx "/.whl/" .gitignore || echo "/.whl/" >> .git/info/exclude
mkdir -p .whl
py=.venv/bin/python
for name in gsplat diffusers open-clip-torch ftfy wcwidth kornia kornia-rs torch-fidelity importlib-metadata; do
    version=$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$name==$version"
done
ls -la .whl
du -sh .whl
