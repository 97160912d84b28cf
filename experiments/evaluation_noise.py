"""How much the demo's picture-colour figure moves with the sampler's noise alone.

`python experiments/evaluation_noise.py WORKDIR [STEP] [--keys=N]` restores a `configs/demo.py`
run's checkpoint (the latest, or STEP) and draws the held-out evaluation's pictures
(`mmi_jax.demo.shapes_evaluation.Evaluator.pictures`) with the training loop's evaluation key
of that step and N other keys, printing each key's fraction of pictures in the requested
colour, and their mean and deviation. Recorded in experiments/PERFORMANCE.md (issue 25).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import demo  # noqa: E402
from mmi_jax import sharding  # noqa: E402
from mmi_jax.data import pipeline  # noqa: E402
from mmi_jax.demo.shapes_evaluation import Evaluator, ShapesEvaluation  # noqa: E402
from mmi_jax.train.batches import global_batch  # noqa: E402
from mmi_jax.train.checkpoints import Checkpoints  # noqa: E402
from mmi_jax.train.rng_streams import CORE_STREAMS, RngStreams  # noqa: E402
from mmi_jax.train.train_state import TrainSetup  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("step", nargs="?", type=int, default=None)
  parser.add_argument("--keys", type=int, default=8, help="other keys drawn")
  args = parser.parse_args()
  config = demo.get_config()
  mesh = sharding.make_mesh(config.mesh)
  data = pipeline.make_dataset(config, "train")
  setup = TrainSetup.create(config, mesh, global_batch([data[0][0]], mesh),
                            image_slots=pipeline.image_slots_per_row(config.data))
  checkpoints = Checkpoints(args.workdir, config)
  state = checkpoints.restore(setup, iter(data), args.step).state
  step = int(state.step)
  evaluator = Evaluator(config, setup.model, mesh)
  streams = RngStreams(config.seed, ("core", CORE_STREAMS),
                       ("evaluation", ShapesEvaluation.rng_streams))
  keys = {f"the loop's evaluation key at step {step}": streams.key("shapes_evaluation", step)}
  keys.update({f"other key {index}": jax.random.fold_in(jax.random.key(1000), index)
               for index in range(args.keys)})
  fractions = []
  for name, key in keys.items():
    results, _ = evaluator.pictures(state.all_params(), key)
    fractions.append(results["picture_colour_accuracy"])
    print(f"{name}: pictures in their colour {fractions[-1]:.3f}", flush=True)
  print(f"mean {np.mean(fractions):.3f}, deviation {np.std(fractions):.3f}, "
        f"range {min(fractions):.3f}-{max(fractions):.3f}")


if __name__ == "__main__":
  main()
