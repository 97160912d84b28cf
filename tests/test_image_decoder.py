"""The image decoder (SPEC 7): MMFS net, diffusion loss and guided generation against
references built from diffusers, transformers and SPEC-based torch code; release shapes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from flax import traverse_util

from configs import mmi_13b, tiny
from mmi_jax import sharding
from mmi_jax.convert.hf import qformer_params
from mmi_jax.convert.torch_names import params_from_state_dict, to_torch_layout
from mmi_jax.generate.image_generation import decode_images, generate_latents
from mmi_jax.models.image_decoder import FROZEN_PATTERNS, ImageDecoder, ImageDecoderConfig
from mmi_jax.models.mmfs_net import MMFSBlock, MMFSNet
from mmi_jax.param_names import diffusers_key, torch_name
from mmi_jax.trainable import count_params, unfrozen_mask
from release_shapes import (SHAPES_13B, release_name_and_shape, release_shapes_of,
                            release_state_dict)
from torch_model_references import image_decoder_loss_reference, image_decoder_modules
from torch_references import mmfs_block_reference, perturb, sincos_2d_table

BATCH, CONTEXT = 3, 6


def _config():
  return ImageDecoderConfig.from_config(tiny.get_config().model)


def _inputs(config, seed=0):
  """Three images: a normal context; only [<s>, soi] (no loss); a third with another context.

  Image 1 has no previous image (MMFS slot masked).
  """
  rng = np.random.default_rng(seed)
  side, latent = config.image_size, config.latent_size
  channels = config.vae.latent_channels
  context_width = tiny.get_config().model.llm.hidden_size
  mask = np.ones((BATCH, CONTEXT), np.int32)
  mask[0, 5:] = 0
  mask[1, 2:] = 0
  return dict(
      images=rng.uniform(0, 1, (BATCH, side, side, 3)).astype(np.float32),
      context=rng.standard_normal((BATCH, CONTEXT, context_width)).astype(np.float32),
      context_mask=mask,
      mmfs_features=rng.standard_normal(
          (BATCH, 1, config.mmfs.feature_positions, config.mmfs.feature_dim)).astype(np.float32),
      mmfs_mask=np.array([[1], [0], [1]], np.int32),
      latent_noise=rng.standard_normal((BATCH, latent, latent, channels)).astype(np.float32),
      noise=rng.standard_normal((BATCH, latent, latent, channels)).astype(np.float32),
      timesteps=np.array([10, 500, 999], np.int32),
      uncond_mask=np.array([False, False, True]),
      image_loss_mask=np.ones(BATCH, np.int32),
      image_valid=np.ones(BATCH, np.int32),
  )


def _torch_modules(config):
  torch.manual_seed(0)
  generator = torch.Generator().manual_seed(1)
  modules = image_decoder_modules(config, tiny.get_config().model.llm.hidden_size)
  return tuple(perturb(module, generator) for module in modules)


def _numpy_state(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _torch_params(tree, prefix=""):
  """A Flax subtree as a PyTorch-layout state dict of tensors."""
  state = {}
  for path, value in traverse_util.flatten_dict(tree).items():
    key = torch_name(path, prefix) + (".weight" if path[-1] == "query_relpos" else "")
    state[key] = torch.from_numpy(np.array(to_torch_layout(path, np.asarray(value))))
  return state


def _skip_shapes(config):
  """The UNet's skip-connection shapes for the tiny latents, and the mid-block output's."""
  side, shapes = config.latent_size, []
  channels = config.unet.block_out_channels
  shapes.append((BATCH, side, side, channels[0]))
  for index, width in enumerate(channels):
    shapes += [(BATCH, side, side, width)] * config.unet.layers_per_block
    if index < len(channels) - 1:
      side //= 2
      shapes.append((BATCH, side, side, width))
  return shapes, (BATCH, side, side, channels[-1])


@pytest.fixture(scope="module")
def decoder_setup():
  """The tiny decoder with the torch modules' weights; its MMFS net as initialised
  (`initial`) and with every param randomised, the zero convs included (`params`).

  Only the MMFS net is initialised for real (a whole-decoder init compiles the UNet and VAE
  once more, for nothing: their weights come from the torch modules)."""
  config = _config()
  decoder = ImageDecoder(config)
  inputs = _inputs(config)
  structs = [jax.ShapeDtypeStruct(inputs[k].shape, inputs[k].dtype)
             for k in ("images", "context", "context_mask", "mmfs_features", "mmfs_mask")]
  abstract = nn.meta.unbox(sharding.abstract_params(decoder, *structs, rng=jax.random.key(0)))
  net = MMFSNet(config.mmfs, config.unet.block_out_channels, config.unet.layers_per_block)
  skip_shapes, mid_shape = _skip_shapes(config)
  initial_mmfs = nn.meta.unbox(jax.jit(net.init)(
      jax.random.key(1), jnp.zeros(mid_shape), [jnp.zeros(shape) for shape in skip_shapes],
      inputs["mmfs_features"], inputs["mmfs_mask"])["params"])

  unet, vae, qformer = _torch_modules(config)
  params = {"decoder": {}}
  params["decoder"]["unet"] = params_from_state_dict(abstract["decoder"]["unet"],
                                                     _numpy_state(unet), rename=diffusers_key)
  params["decoder"]["vae"] = params_from_state_dict(abstract["decoder"]["vae"],
                                                    _numpy_state(vae))
  rng = np.random.default_rng(2)
  resampler = abstract["perceiver_resampler"]
  params["perceiver_resampler"] = {
      "blip2qformer": qformer_params(resampler["blip2qformer"], _numpy_state(qformer)),
      "queries": rng.standard_normal(resampler["queries"].shape).astype(np.float32)}
  params["neg_prompt_embeds"] = rng.standard_normal(
      abstract["neg_prompt_embeds"].shape).astype(np.float32)
  mmfs = traverse_util.flatten_dict(jax.tree.map(np.asarray, initial_mmfs))
  for path, value in mmfs.items():
    if path[-1] not in ("pos_embed", "ignore_token") and "norm" not in path[-2]:
      mmfs[path] = (0.2 * rng.standard_normal(value.shape)).astype(np.float32)
  params["decoder"]["mmfs_module"] = traverse_util.unflatten_dict(mmfs)
  assert jax.tree.structure(params) == jax.tree.structure(abstract)
  initial = dict(params, decoder=dict(params["decoder"], mmfs_module=initial_mmfs))

  loss_fn = jax.jit(lambda p, **kw: decoder.apply({"params": p}, **kw))
  denoise_fn = jax.jit(lambda p, *args: decoder.apply({"params": p}, *args,
                                                      method=ImageDecoder.denoise))
  return dict(config=config, decoder=decoder, initial=initial, params=params, inputs=inputs,
              torch=(unet, vae, qformer), loss_fn=loss_fn, denoise_fn=denoise_fn)


def _reference_loss(setup, inputs, image_valid):
  """SPEC 7's loss from `image_decoder_loss_reference` (diffusers' UNet, VAE and DDPM
  scheduler, transformers' Q-Former and `mmfs_block_reference`)."""
  config, params = setup["config"], setup["params"]
  unet, vae, qformer = setup["torch"]
  t = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
  mmfs = params["decoder"]["mmfs_module"]
  per_image = image_decoder_loss_reference(
      config, unet, vae, qformer, torch.from_numpy(params["perceiver_resampler"]["queries"]),
      torch.from_numpy(params["neg_prompt_embeds"]),
      [_torch_params(mmfs[f"mmfs_down_blocks_{i}"])
       for i in range(len(config.mmfs.base_spatial_shapes))],
      _torch_params(mmfs["mmfs_mid_block"]), t)
  weight = (t["context_mask"].sum(1) > 2).float() * t["image_loss_mask"] * image_valid
  return float((per_image * weight).sum() / image_valid.sum()), per_image.numpy()


def test_loss_equals_the_reference_and_padding_changes_nothing(decoder_setup):
  setup = decoder_setup
  inputs = setup["inputs"]
  out = setup["loss_fn"](setup["params"], **inputs)
  reference, reference_per_image = _reference_loss(setup, inputs, torch.ones(BATCH))
  np.testing.assert_allclose(out["per_image_loss"], reference_per_image, rtol=1e-4)
  np.testing.assert_allclose(out["loss"], reference, rtol=1e-4)
  np.testing.assert_array_equal(out["loss_weight"], [1, 0, 1])  # image 1: only [<s>, soi]

  # The third image as a padding slot: left out of the mean; the others unchanged.
  padded = setup["loss_fn"](setup["params"], **dict(inputs, image_valid=np.array([1, 1, 0])))
  reference, _ = _reference_loss(setup, inputs, torch.tensor([1.0, 1.0, 0.0]))
  np.testing.assert_allclose(padded["loss"], reference, rtol=1e-4)
  np.testing.assert_allclose(padded["loss"], out["per_image_loss"][0] / 2, rtol=1e-6)

  # image_loss_mask drops an image; the MMFS net matters (features change the loss).
  masked = setup["loss_fn"](setup["params"], **dict(inputs, image_loss_mask=np.array([0, 1, 1])))
  np.testing.assert_allclose(masked["loss"], out["per_image_loss"][2] / 3, rtol=1e-6)
  moved = setup["loss_fn"](setup["params"], **dict(inputs, mmfs_features=-inputs["mmfs_features"]))
  assert abs(float(moved["per_image_loss"][0]) - float(out["per_image_loss"][0])) > 1e-4
  # ... except where the previous image is masked out.
  np.testing.assert_allclose(moved["per_image_loss"][1], out["per_image_loss"][1], rtol=1e-6)


def test_unconditional_images_ignore_their_context(decoder_setup):
  setup = decoder_setup
  inputs = setup["inputs"]
  out = setup["loss_fn"](setup["params"], **inputs)
  other = setup["loss_fn"](setup["params"], **dict(inputs, context=inputs["context"] + 1.0))
  np.testing.assert_allclose(other["per_image_loss"][2], out["per_image_loss"][2], rtol=1e-6)
  assert abs(float(other["per_image_loss"][0]) - float(out["per_image_loss"][0])) > 1e-6


def test_random_draws_come_from_the_explicit_rng(decoder_setup):
  setup = decoder_setup
  explicit = ("latent_noise", "noise", "timesteps", "uncond_mask")
  inputs = {k: v for k, v in setup["inputs"].items() if k not in explicit}
  first = setup["loss_fn"](setup["params"], **inputs, rng=jax.random.key(5))
  again = setup["loss_fn"](setup["params"], **inputs, rng=jax.random.key(5))
  other = setup["loss_fn"](setup["params"], **inputs, rng=jax.random.key(6))
  np.testing.assert_array_equal(first["loss"], again["loss"])
  assert float(first["loss"]) != float(other["loss"])
  with pytest.raises(ValueError, match="pass rng, or latent_noise"):
    setup["decoder"].apply({"params": setup["params"]}, **inputs)


def test_mmfs_net_changes_nothing_at_initialisation(decoder_setup):
  setup = decoder_setup
  decoder, initial, inputs = setup["decoder"], setup["initial"], setup["inputs"]
  for path, value in traverse_util.flatten_dict(initial["decoder"]["mmfs_module"]).items():
    if path[-2] == "conv":
      assert not np.any(np.asarray(value)), path
  variables = {"params": initial}
  conditioning = decoder.apply(variables, inputs["context"], inputs["context_mask"],
                               method=ImageDecoder.condition)
  values = decoder.apply(variables, inputs["mmfs_features"],
                         method=ImageDecoder.project_mmfs_features)
  denoise = setup["denoise_fn"]
  args = (inputs["noise"], inputs["timesteps"], conditioning)
  with_mmfs = denoise(initial, *args, values, inputs["mmfs_mask"])
  without = denoise(initial, *args, None, None)
  np.testing.assert_array_equal(with_mmfs, without)
  # The frozen position table is the 2-D sin-cos table of SPEC 7.
  table = initial["decoder"]["mmfs_module"]["mmfs_down_blocks_0"]["pos_embed"]
  np.testing.assert_allclose(table, sincos_2d_table(table.shape[1], 8).numpy(), atol=2e-6)


@pytest.mark.parametrize("block", ["mmfs_down_blocks_0", "mmfs_down_blocks_4"])
def test_one_mmfs_block_equals_the_spec_reference(decoder_setup, block):
  """A block on an 8x8 map (the table's own grid) and on a 4x4 map (bicubic-resized table)."""
  setup = decoder_setup
  config, params = setup["config"], setup["params"]
  index = int(block.rsplit("_", 1)[1])
  base = config.mmfs.base_spatial_shapes[index]
  channels = params["decoder"]["mmfs_module"][block]["conv"]["bias"].shape[0]
  side = 8 if index == 0 else 4
  module = MMFSBlock(config.mmfs, channels, base)
  block_params = params["decoder"]["mmfs_module"][block]
  rng = np.random.default_rng(3)
  sample = rng.standard_normal((2, side, side, channels)).astype(np.float32)
  features = rng.standard_normal((2, 2, config.mmfs.feature_positions,
                                  config.mmfs.feature_dim)).astype(np.float32)
  mask = np.array([[1, 0], [1, 1]], np.int32)

  def run(sample, features, mask):
    values = module.apply({"params": block_params}, features, method=MMFSBlock.project_values)
    return module.apply({"params": block_params}, sample, values, mask)

  ours = jax.jit(run)(sample, features, mask)
  reference = mmfs_block_reference(
      _torch_params(block_params), torch.from_numpy(sample).permute(0, 3, 1, 2),
      torch.from_numpy(features), torch.from_numpy(mask), eps=config.mmfs.layer_norm_eps,
      num_heads=config.mmfs.num_heads, num_points=config.mmfs.num_points,
      scale_sizes=config.mmfs.scale_sizes, offset_scale_sizes=config.mmfs.offset_scale_sizes,
      base_spatial_shape=base).permute(0, 2, 3, 1).numpy()
  assert np.max(np.abs(np.asarray(ours) - reference)) / np.max(np.abs(reference)) < 1e-5


def test_guided_generation_equals_a_diffusers_driven_loop(decoder_setup):
  """`generate_latents` (one jit, lax.scan) against diffusers' DDPMScheduler stepping the same
  decoder with the pipeline's guidance (negative half first, shared MMFS features)."""
  setup = decoder_setup
  config, decoder, params, inputs = (setup["config"], setup["decoder"], setup["params"],
                                     setup["inputs"])
  steps, guidance = 4, 7.5
  latent_shape = (BATCH, config.latent_size, config.latent_size, config.vae.latent_channels)
  nchw_shape = (BATCH, latent_shape[3]) + latent_shape[1:3]
  initial = torch.randn(nchw_shape, generator=torch.Generator().manual_seed(4))
  # diffusers' DDPM draws randn(latents.shape) from the generator at every step with t > 0
  # (all four here: 751, 501, 251, 1); the same draws, replayed, are our step noise.
  replay = torch.Generator().manual_seed(5)
  step_noise = np.stack([torch.randn(nchw_shape, generator=replay).numpy().transpose(0, 2, 3, 1)
                         for _ in range(steps)])
  initial = initial.numpy().transpose(0, 2, 3, 1)
  ours = generate_latents(decoder, params, inputs["context"], inputs["context_mask"],
                          inputs["mmfs_features"], inputs["mmfs_mask"], num_steps=steps,
                          guidance_scale=guidance, initial_latents=initial,
                          step_noise=step_noise)

  variables = {"params": params}
  conditioning = decoder.apply(variables, inputs["context"], inputs["context_mask"],
                               method=ImageDecoder.condition)
  negative = np.broadcast_to(params["neg_prompt_embeds"], conditioning.shape)
  values = decoder.apply(variables, inputs["mmfs_features"],
                         method=ImageDecoder.project_mmfs_features)
  denoise = lambda x, t, c: setup["denoise_fn"](params, x, t, c, values,  # noqa: E731
                                                inputs["mmfs_mask"])
  scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                            beta_start=0.00085, beta_end=0.012, clip_sample=False,
                            steps_offset=1)
  scheduler.set_timesteps(steps)
  assert list(scheduler.timesteps) == [751, 501, 251, 1]
  generator = torch.Generator().manual_seed(5)
  latents = torch.from_numpy(initial).permute(0, 3, 1, 2)
  for t in scheduler.timesteps:
    x = latents.permute(0, 2, 3, 1).numpy()
    timesteps = np.full((BATCH,), int(t), np.int32)
    uncond = np.asarray(denoise(x, timesteps, negative))
    cond = np.asarray(denoise(x, timesteps, conditioning))
    guided = torch.from_numpy(uncond + guidance * (cond - uncond)).permute(0, 3, 1, 2)
    latents = scheduler.step(guided, t, latents, generator=generator).prev_sample
  reference = latents.permute(0, 2, 3, 1).numpy()
  assert np.max(np.abs(np.asarray(ours) - reference)) / np.max(np.abs(reference)) < 1e-4

  images = decode_images(decoder, params, ours)
  assert images.shape == (BATCH, config.image_size, config.image_size, 3)
  assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0


@pytest.mark.skipif(not SHAPES_13B.exists(), reason="shared/shapes_13b.json is not present")
def test_13b_image_decoder_has_exactly_the_release_names_shapes_and_trainable_params():
  config = ImageDecoderConfig.from_config(mmi_13b.get_config().model)
  positions, width = config.mmfs.feature_positions, config.mmfs.feature_dim
  abstract = sharding.abstract_params(
      ImageDecoder(config), jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.float32),
      jax.ShapeDtypeStruct((1, 4, 5120), jnp.float32), jax.ShapeDtypeStruct((1, 4), jnp.int32),
      jax.ShapeDtypeStruct((1, 1, positions, width), jnp.float32),
      jax.ShapeDtypeStruct((1, 1), jnp.int32), rng=jax.random.key(0))
  release = release_state_dict(("image_decoder",))
  assert release_shapes_of(abstract, "image_decoder.") == {
      key: tuple(entry["shape"]) for key, entry in release.items()}
  mask = unfrozen_mask(abstract, FROZEN_PATTERNS)
  trainable = traverse_util.flatten_dict(mask)
  ours = {release_name_and_shape(path, tuple(leaf.shape), "image_decoder.")[0]: trainable[path]
          for path, leaf in traverse_util.flatten_dict(nn.meta.unbox(abstract)).items()}
  assert ours == {key: entry["requires_grad"] for key, entry in release.items()}
  # SPEC 12: image_decoder 1,074,365,547 parameters, 946,133,892 trainable.
  assert count_params(abstract) == 1_074_365_547
  assert count_params(abstract, mask) == 946_133_892


def test_bad_configs_and_inputs_fail_clearly(decoder_setup):
  model_config = tiny.get_config().model
  model_config.image_decoder.unet.cross_attention_dim = 16
  with pytest.raises(ValueError, match="Q-Former's width 32 is not the UNet's "
                                       "cross_attention_dim 16"):
    ImageDecoderConfig.from_config(model_config)
  setup = decoder_setup
  inputs = dict(setup["inputs"])
  with pytest.raises(ValueError, match=r"images must be \(3, 64, 64, 3\)"):
    setup["decoder"].apply({"params": setup["params"]},
                           **dict(inputs, images=inputs["images"][:, :32]))
  with pytest.raises(ValueError, match="features must be"):
    setup["decoder"].apply({"params": setup["params"]}, inputs["mmfs_features"][:, :, 1:],
                           method=ImageDecoder.project_mmfs_features)


def test_sharded_loss_equals_the_unsharded_one(decoder_setup):
  """Params placed by the logical rules on a (data 2, fsdp 2, tensor 2) mesh of 8 devices."""
  setup = decoder_setup
  decoder, params, inputs = setup["decoder"], setup["params"], setup["inputs"]
  expected = setup["loss_fn"](params, **inputs)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  structs = [jax.ShapeDtypeStruct(inputs[k].shape, inputs[k].dtype)
             for k in ("images", "context", "context_mask", "mmfs_features", "mmfs_mask")]
  boxed = sharding.abstract_params(decoder, *structs, rng=jax.random.key(0))
  shardings = sharding.param_shardings(boxed, mesh)
  placed = jax.device_put(params, shardings)
  unet_shards = sharding.shard_shapes(placed)["decoder"]["unet"]
  assert unet_shards["down_blocks_2"]["attentions_0"]["transformer_blocks_0"]["ff"]["net_0"][
      "proj"]["kernel"] == (64 // 2, 512 // 2)
  with sharding.use_mesh(mesh):
    loss = jax.jit(lambda p, **kw: decoder.apply({"params": p}, **kw)["loss"],
                   in_shardings=None)(placed, **inputs)
  np.testing.assert_allclose(loss, expected["loss"], rtol=1e-5)
