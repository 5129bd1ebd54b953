"""Run under `accelerate launch` by tests/test_distributed.py: one run straight through into
OUT/a, and the same run stopped twice (global steps 2 and 5) and resumed into OUT/b.

    python dist_driver.py RECIPE OUT [a.b=value ...]
"""

import importlib
import os
import sys
from pathlib import Path

if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
    # DeepSpeed compiles a shared-memory all-reduce op for inference at start-up (1-2 minutes on
    # a fresh machine); training never uses it, so the tests skip the build
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

from perceptual_diffusion.config import load_recipe
from perceptual_diffusion.trainer import Trainer

recipe_path, out, *overrides = sys.argv[1:]
recipe = load_recipe(recipe_path, overrides)
out = Path(out)
Trainer(recipe, out / "a", progress=False).run()
assert Trainer(recipe, out / "b", progress=False).run(stop_after=2).stopped_at == 2
assert Trainer(recipe, out / "b", resume="latest", progress=False).run(stop_after=5).stopped_at == 5
Trainer(recipe, out / "b", resume="latest", progress=False).run()
