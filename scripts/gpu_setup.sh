#!/usr/bin/env bash
# Install the offline GPU wheels in .whl/ (fla-core, mamba-ssm built without CUDA extensions)
# into /tmp/site and put that on PYTHONPATH. Meant to be sourced on the GPU machine:
#
#     source scripts/gpu_setup.sh
#     python3 -m pytest -s -m gpu tests/ops/test_ssd_gpu.py
#
# --no-deps: their dependencies (torch, triton, einops, packaging) are already on that machine;
# mamba-ssm's tilelang / quack-kernels / causal-conv1d / selective_scan_cuda are not needed by
# linmu_cli.ops.ssd (it imports only mamba_ssm.ops.triton.ssd_combined, see _import_mamba).
# Can also be run as a script; then it prints the export line to use.

_linmu_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_linmu_site="${LINMU_SITE:-/tmp/site}"

if ! ls "$_linmu_root"/.whl/*.whl >/dev/null 2>&1; then
    echo "gpu_setup: no wheels in $_linmu_root/.whl" >&2
else
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$_linmu_site" "$_linmu_root"/.whl/*.whl \
        && echo "gpu_setup: installed $(cd "$_linmu_root/.whl" && ls *.whl | tr '\n' ' ')into $_linmu_site"
fi

case ":${PYTHONPATH:-}:" in
    *":$_linmu_site:"*) ;;
    *) export PYTHONPATH="$_linmu_site${PYTHONPATH:+:$PYTHONPATH}" ;;
esac
# linmu's own dependencies that the GPU image may lack: say which, and what stops working without each
python3 - <<'PY'
import importlib.util
needs = {"yaml": "recipes", "typer": "the linmu CLI", "rich": "the linmu CLI", "peft": "stage 3 LoRA",
         "safetensors": "checkpoints", "fla": "the fla scans / conv", "mamba_ssm": "the mamba-ssm scans / norm"}
missing = [f"{name} ({why})" for name, why in needs.items() if importlib.util.find_spec(name) is None]
if missing:
    print("gpu_setup: missing on this machine: " + "; ".join(missing) + ". Bring their wheels in .whl/ (Python "
          "3.12, manylinux x86_64) to use those parts here.")
PY
echo "gpu_setup: usage: export PYTHONPATH=$_linmu_site  (already exported if this file was sourced)"
unset _linmu_root _linmu_site
