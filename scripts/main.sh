#!/usr/bin/env bash
# The main job: recipes/image/circles.toml end to end on this machine: stage MSE, then stage SP
# from the frozen MSE copy; sample grids of both from the same noise; a short summary.
# `bash scripts/main.sh --quick` is the 3-minute smoke version. Other flags go to `train`
# (e.g. --out DIR, --set mse.steps=500, --resume latest).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
args=("$@")
out="runs/circles"
for ((i = 0; i < ${#args[@]}; i++)); do
  [ "${args[$i]}" = "--quick" ] && out="runs/circles-quick"
  [ "${args[$i]}" = "--resume" ] && resume=1
  [ "${args[$i]}" = "--out" ] && out="${args[$((i + 1))]}"
done
if [ -z "${resume:-}" ] && [ -d "$out/checkpoints" ]; then
  echo "$out holds an earlier run: moving it to $out.previous" >&2
  rm -rf "$out.previous" && mv "$out" "$out.previous"
fi
exec perceptual-diffusion train recipes/image/circles.toml --out "$out" "${args[@]}"
