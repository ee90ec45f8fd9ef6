"""Worker: run every configuration given (a JSON file {name: [flags]}) in this one torchrun launch,
each rank writing its results to OUT/{name}.rank{r}.pt (stdout interleaves)."""
import json
import os
import sys

import torch

from megaflow.parallel import state
from tests.distributed.runs import run

out_dir, configs = sys.argv[1], json.load(open(sys.argv[2]))
for name, args in configs.items():
    result = run(args)
    torch.save(result, os.path.join(out_dir, f"{name}.rank{result['rank']}.pt"))
state.destroy()
