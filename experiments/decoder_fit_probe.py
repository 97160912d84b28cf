"""How well the image decoder alone draws captions after `stand_ins.decoder_fit` (issue 7).

The demo (`configs/demo.py`) replaces SD's pretrained UNet by a fit of the image decoder's
Q-Former and UNet on the training pictures, with learned stand-ins for the LLM's states
(`mmi_jax.demo.decoder_fit`, context "stand_in"). This probe runs that fit alone (the VAE
fitted first, as the training command does, but from the decoder's own init) and then draws
the first picture of held-out documents from its caption's stand-in context, at several
guidance scales, reporting how many have the caption's colour (`shapes.classify_colour`, the
training command's measure). It separates the decoder's
own ability from the bridge the training learns afterwards (`context_feat_proj` writing the
LLM's states where the fitted Q-Former reads them).

  python experiments/decoder_fit_probe.py --config=configs/demo.py \
      --config.stand_ins.decoder_fit.steps=1000 --pictures=64

Results: experiments/PERFORMANCE.md.
"""

import os
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mmi_jax.data import shapes  # noqa: E402
from mmi_jax.demo import decoder_fit, shapes_evaluation, vae_fit  # noqa: E402
from mmi_jax.generate import image_generation  # noqa: E402
from mmi_jax.models.image_decoder import ImageDecoder  # noqa: E402
from mmi_jax.models.sincos import sincos_1d  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "the run's config")
_PICTURES = flags.DEFINE_integer("pictures", 64, "held-out captions drawn")
_GUIDANCE = flags.DEFINE_list("guidance", ["1.0", "3.0", "7.5"], "guidance scales tried")


def main(argv):
  del argv
  config = _CONFIG.value
  decoder = ImageDecoder.from_config(config.model)
  length = int(config.model.image_decoder.max_context_length)
  width = int(config.model.llm.hidden_size)
  size = int(config.model.image_decoder.image_size)
  init_key, vae_key, fit_key, sample_key = jax.random.split(jax.random.key(config.seed), 4)
  params = jax.device_get(decoder.init(
      init_key, jnp.zeros((1, size, size, 3)), jnp.zeros((1, length, width)),
      jnp.ones((1, length), jnp.int32), None, None, rng=init_key)["params"])
  params["decoder"]["vae"], stats = vae_fit.fit_vae(config, params["decoder"]["vae"], vae_key,
                                                    log=lambda line: None)
  print(f"vae fitted: {stats}", flush=True)
  start = time.perf_counter()
  settings = config.stand_ins.decoder_fit
  settings.context = "stand_in"
  fitted, error = decoder_fit.fit_image_decoder(config, {"image_decoder": params}, fit_key,
                                                settings, "stand_ins.decoder_fit")
  print(f"decoder fit: {settings.steps} steps in "
        f"{time.perf_counter() - start:.0f} s, last error {error:.4f}", flush=True)

  scenes = shapes_evaluation.held_out_scenes(config, _PICTURES.value)
  ids, mask = decoder_fit.caption_contexts(config, scenes)
  context = fitted["context_vectors"][ids] + jnp.asarray(sincos_1d(width, np.arange(length)))
  for guidance in map(float, _GUIDANCE.value):
    draw = jax.jit(lambda params, context, mask, key: image_generation.generate_images(
        decoder, params, context, mask, None, None, key,
        num_steps=int(config.shapes_eval.generation_steps), guidance_scale=guidance))
    pictures = np.asarray(draw(fitted["image_decoder"], context, jnp.asarray(mask), sample_key))
    hits = [shapes.classify_colour(picture, scene.background) == scene.colour
            for picture, scene in zip(pictures, scenes)]
    print(f"guidance {guidance}: picture colour {np.mean(hits):.3f} "
          f"({sum(hits)}/{len(hits)})", flush=True)


if __name__ == "__main__":
  app.run(main)
