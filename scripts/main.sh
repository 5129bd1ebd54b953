#!/usr/bin/env bash
# The main job: train the tiny image UNet with MSE, then with the self-perceptual objective,
# print both losses and write runs/demo/samples.png. Extra flags go to `perceptual-diffusion demo`.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec perceptual-diffusion demo "$@"
