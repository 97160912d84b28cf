"""Does the demo's UNet follow its caption? A probe on a training workdir's latest checkpoint.

`python experiments/conditioning_probe.py WORKDIR` (a `configs/demo.py` run) prints, for the
held-out generation captions: how much the image decoder's conditioning changes when the
caption names another colour (and against the unconditional embedding), and at several noise
levels the UNet's noise-prediction error next to how much its prediction moves with the
caption, its mean squared error with the right caption, one naming another colour and none
(a UNet that uses its caption errs least with the right one), and how often the picture it
predicts in one step (x0 from the noisy latents and its prediction, decoded) has the
requested colour, with the caption and without. Recorded in experiments/PERFORMANCE.md
(issue 7).
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import demo  # noqa: E402
from mmi_jax import sharding  # noqa: E402
from mmi_jax.data import pipeline, shapes  # noqa: E402
from mmi_jax.models.image_decoder import ImageDecoder  # noqa: E402
from mmi_jax.models.mm_interleaved import MMInterleaved  # noqa: E402
from mmi_jax.demo.shapes_evaluation import Evaluator  # noqa: E402
from mmi_jax.train.batches import global_batch  # noqa: E402
from mmi_jax.train.checkpoints import Checkpoints  # noqa: E402
from mmi_jax.train.train_state import TrainSetup  # noqa: E402


def main(workdir: str) -> None:
  config = demo.get_config()
  mesh = sharding.make_mesh(config.mesh)
  data = pipeline.make_dataset(config, "train")
  setup = TrainSetup.create(config, mesh, global_batch([data[0][0]], mesh),
                            image_slots=pipeline.image_slots_per_row(config.data))
  params = Checkpoints(workdir, config).restore(setup, iter(data)).state.all_params()
  model, decoder = setup.model, setup.model.image_decoder
  variables = {"params": params["image_decoder"]}
  evaluator = Evaluator(config, model, mesh)
  scenes = evaluator.generation_scenes
  colours = list(shapes.COLOURS)
  recoloured = [dataclasses.replace(s, colour=colours[(colours.index(s.colour) + 2) % 6])
                for s in scenes]

  def conditioning(captioned_scenes):
    evaluator.generation_scenes = captioned_scenes
    inputs = model.apply({"params": params}, evaluator.generation_batch(),
                         method=MMInterleaved.image_decoder_inputs)
    return (decoder.apply(variables, inputs["context"], inputs["context_mask"],
                          method=ImageDecoder.condition),
            decoder.apply(variables, inputs["mmfs_features"],
                          method=ImageDecoder.project_mmfs_features),
            inputs["mmfs_mask"])

  right, mmfs_values, mmfs_mask = conditioning(scenes)
  other, _, _ = conditioning(recoloured)
  unconditional = decoder.apply(variables, len(scenes), method=ImageDecoder.negative_conditioning)
  norm = lambda x: float(jnp.linalg.norm(x))  # noqa: E731
  print(f"conditioning: |right - other colour| / |right| = {norm(right - other) / norm(right):.3f},"
        f" |right - unconditional| / |right| = {norm(right - unconditional) / norm(right):.3f}")

  pictures = np.stack([shapes.render(s, config.model.image_decoder.image_size)
                       for s in scenes]).astype(np.float32) / 255
  latents = decoder.apply(variables, pictures, method=ImageDecoder.encode_latents)
  schedule = decoder.config.noise_schedule
  for timestep in (100, 300, 500, 700, 900):
    noise = jax.random.normal(jax.random.key(timestep), latents.shape)
    timesteps = jnp.full((len(scenes),), timestep)
    noisy = schedule.add_noise(latents, noise, timesteps)
    # x_t = signal * x0 + sigma * noise, so x0 = (x_t - sigma * eps) / signal.
    signal = schedule.add_noise(jnp.ones_like(latents), jnp.zeros_like(latents), timesteps)
    sigma = schedule.add_noise(jnp.zeros_like(latents), jnp.ones_like(latents), timesteps)

    def colour_accuracy(eps):
      x0 = (noisy - sigma * eps) / signal
      images = np.asarray(decoder.apply(variables, x0, method=ImageDecoder.decode_latents))
      images = (images * 255).round().astype(np.uint8)
      return np.mean([shapes.classify_colour(image, scene.background) == scene.colour
                      for image, scene in zip(images, scenes)])

    predict = lambda c: decoder.apply(variables, noisy, timesteps, c, mmfs_values,  # noqa: E731
                                      mmfs_mask, method=ImageDecoder.denoise)
    with_right, with_other, without = predict(right), predict(other), predict(unconditional)
    mse = lambda eps: float(jnp.mean(jnp.square(eps - noise)))  # noqa: E731
    print(f"t={timestep}: |eps - noise| {norm(with_right - noise):.2f}, "
          f"|eps(right) - eps(other colour)| {norm(with_right - with_other):.3f}, "
          f"|eps(right) - eps(unconditional)| {norm(with_right - without):.3f}; "
          f"MSE right {mse(with_right):.4f} other colour {mse(with_other):.4f} "
          f"unconditional {mse(without):.4f}; one-step picture of the requested colour: "
          f"right {colour_accuracy(with_right):.2f} unconditional {colour_accuracy(without):.2f}")


if __name__ == "__main__":
  main(sys.argv[1])
