#!/usr/bin/env bash
# The GPU check in one call of the device machine (see README, "GPU check"):
#
#   run(command="bash benchmarks/device_run.sh", carry=["carry/wheels"], timeout_s=600)
#
# The machine has torch and triton but no diffusers and no network, so the diffusers wheel
# travels in carry/wheels (git-ignored; fill it here, once, with
#   python -m pip download --no-deps -d carry/wheels diffusers==0.42.1 importlib_metadata
# ). The script makes a venv that sees the machine's own packages (torch, triton, pytest,
# matplotlib) through a .pth file, installs the wheels and vdopt (editable: gpu-check runs
# the benchmarks of this checkout) into it, runs `vdopt gpu-check`, and leaves in $OUT what
# comes back from there: gpu_check.{json,png,txt}, the whole log, and the stages' own
# outputs as one tarball (only 8 files come back, and artifacts are too big to).
#
# Options are passed to gpu-check; `OUT=/tmp/o PYTHON=/work/venv/bin/python bash
# benchmarks/device_run.sh --tiny` rehearses the script on a CPU machine.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to}"
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-carry/wheels}
VENV=${VENV:-/tmp/vdopt-gpu-check-venv}
RESULTS=${RESULTS:-/tmp/gpu-check}

if ! ls "$WHEELS"/diffusers-*.whl >/dev/null 2>&1 && ! "$PYTHON" -c "import diffusers" 2>/dev/null; then
    echo "device_run.sh: no diffusers here and no wheel in $WHEELS: carry it (see the top of this file)" >&2
    exit 2
fi

# A venv whose site-packages also holds the machine's (a nested venv's --system-site-packages
# would see the base interpreter's packages, not those of the venv torch lives in).
"$PYTHON" -m venv --without-pip "$VENV" || exit
parent_site=$("$PYTHON" -c "import site; print('\n'.join(site.getsitepackages()))")
venv_site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$parent_site" > "$venv_site/machine-packages.pth"
PY="$VENV/bin/python"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$WHEELS"/*.whl || exit
fi
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit
"$PY" -c "import torch, triton, diffusers, vdopt; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.cuda.is_available())"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv 2>/dev/null || true

export PYTHONUNBUFFERED=1
rm -rf "$RESULTS"
"$VENV/bin/vdopt" gpu-check --out "$RESULTS" "$@" 2>&1 | tee "$RESULTS.log"
status=${PIPESTATUS[0]}

mkdir -p "$OUT"
cp "$RESULTS"/gpu_check.json "$RESULTS"/gpu_check.txt "$OUT"/ 2>/dev/null
cp "$RESULTS"/gpu_check.png "$OUT"/ 2>/dev/null
cp "$RESULTS.log" "$OUT"/gpu_check.log
tar czf "$OUT"/gpu_check_stages.tar.gz --exclude='artifact*' --exclude='vdopt-cache' \
    -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")/stages" 2>/dev/null
exit "$status"
