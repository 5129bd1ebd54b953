#!/usr/bin/env bash
# Every GPU check and benchmark in one call (about 3-5 minutes on one H200, well under 8):
#   1. sp_step: the SD2.1-base UNet layout (random weights), batch 16 at 64x64 latents, bf16
#      autocast, bf16 frozen copy: MSE, the library's SP and Algorithm 1 as printed (step time,
#      peak memory; targets SP <= 1.30x the MSE step and <= 1.20x its memory);
#   2. attention: SDPA against xformers in every backbone (agreement in bf16, speed);
#   3. resume: the tiny circles recipe in bf16 through both stages, SIGTERM in stage sp, resumed,
#      compared tensor by tensor with an uninterrupted run;
#   4. the tests that need CUDA (tests/test_cuda.py).
# Logs go to benchmarks/logs/gpu_check/ (and, on the lent device machine, $OUT/gpu_check_logs.tar.gz).
#
#   bash benchmarks/gpu_check.sh              # on a CUDA machine (python3 with a CUDA torch, or $PYTHON)
#   bash benchmarks/gpu_check.sh --cpu-smoke  # the same four steps, tiny, on this CPU, in the project's
#                                             # venv: proves the script runs end to end (xformers is
#                                             # checked to be refused there, CUDA tests skip)
# The lent device machine has torch, torchvision and accelerate but not diffusers or xformers: run
# `bash benchmarks/gpu_wheels.sh` here first (wheels into .whl/, ~10 MB) and call the device with
# carry [".whl"]; this script installs them into /tmp/site when .whl/ exists.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mode=gpu
[ "${1:-}" = "--cpu-smoke" ] && mode=cpu-smoke
if [ "$mode" = cpu-smoke ]; then
  source scripts/env.sh
  set +e
  PY=python
  LOG=benchmarks/logs/gpu_check_cpu_smoke
else
  PY="${PYTHON:-python3}"
  LOG=benchmarks/logs/gpu_check
  if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "installing .whl/ failed" >&2; exit 1; }
    export PYTHONPATH="/tmp/site"
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_check: no CUDA device here; use --cpu-smoke" >&2; exit 2; }
fi
export PYTHONUNBUFFERED=1
rm -rf "$LOG" && mkdir -p "$LOG"
summary=()
failed=0

step() {  # step NAME TIMEOUT_S CMD...: run, log to $LOG/NAME.txt, show its tail, record ok / FAILED
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  local start=$SECONDS rc=0
  timeout "$limit" "$@" >"$LOG/$name.txt" 2>&1 || rc=$?
  tail -n 25 "$LOG/$name.txt"
  if [ "$rc" = 0 ]; then summary+=("$name: ok ($((SECONDS - start)) s)")
  else summary+=("$name: FAILED, exit $rc ($((SECONDS - start)) s)"); failed=1; fi
}

"$PY" - >"$LOG/env.txt" 2>&1 <<'PY'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu")
for name in ("torchvision", "torchaudio", "xformers", "diffusers", "accelerate"):
    try:
        print(name, __import__(name).__version__)
    except Exception as e:  # what is missing is part of the record
        print(name, "not importable:", type(e).__name__, e)
PY
cat "$LOG/env.txt"

if [ "$mode" = gpu ]; then
  step sp_step 300 "$PY" benchmarks/sp_step.py --backbone diffusers_unet --preset sd21-base --device cuda \
    --autocast bf16 --frozen-dtype bf16 --batch 16 --size 64 --channels 4 --warmup 3 --repeats 10 \
    --json "$LOG/sp_step.json"
  step attention 300 "$PY" benchmarks/attention_backends.py --device cuda --json "$LOG/attention.json"
  step resume 300 "$PY" benchmarks/resume_check.py --mixed-precision bf16 --workdir /tmp/resume_check \
    --json "$LOG/resume.json"
  step cuda_tests 300 "$PY" -m pytest -q -p no:cacheprovider -m "cuda" tests/test_cuda.py
else
  step sp_step 300 "$PY" benchmarks/sp_step.py --backbone diffusers_unet --preset tiny --batch 2 --size 16 \
    --channels 4 --warmup 1 --repeats 2 --json "$LOG/sp_step.json"
  step attention 300 "$PY" benchmarks/attention_backends.py --device cpu --smoke --batch 2 --warmup 1 \
    --repeats 2 --json "$LOG/attention.json"
  step resume 300 "$PY" benchmarks/resume_check.py --mixed-precision bf16 --smoke \
    --workdir "${TMPDIR:-/tmp}/resume_check_smoke" --json "$LOG/resume.json"
  step cuda_tests 300 "$PY" -m pytest -q -p no:cacheprovider -m "cuda" tests/test_cuda.py
fi

printf '%s\n' "${summary[@]}" | tee "$LOG/summary.txt"
if [ -n "${OUT:-}" ]; then tar -czf "$OUT/gpu_check_logs.tar.gz" "$LOG"; fi
exit "$failed"
