"""The Flax UNet and VAE against diffusers' PyTorch models, loaded from diffusers directories."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers import DDPMScheduler
from diffusers import UNet2DConditionModel as TorchUNet

from mmi_jax.convert import diffusers as convert_diffusers
from mmi_jax.convert.torch_names import ConversionError
from torch_references import perturb

# SD 2.x style (linear projections, per-block heads) and SD 1.x style (conv projections, one
# head count for all blocks), both tiny.
SD2_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(32, 32, 64, 64), attention_head_dim=(2, 2, 4, 4),
                cross_attention_dim=24, norm_num_groups=8, use_linear_projection=True,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD1_UNET = dict(SD2_UNET, block_out_channels=(16, 32, 32), attention_head_dim=4,
                use_linear_projection=False, layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
REMAT_UNET = dict(SD1_UNET, block_out_channels=(8, 16), attention_head_dim=2, norm_num_groups=4,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
           layers_per_block=2, norm_num_groups=8, sample_size=32,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def _perturbed(model, seed):
  """Random weights everywhere (diffusers zero-initialises some convs)."""
  return perturb(model, torch.Generator().manual_seed(seed))


def _relative_error(ours, reference):
  return float(np.max(np.abs(np.asarray(ours) - reference)) / np.max(np.abs(reference)))


def _nhwc(tensor):
  return tensor.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def sd2_pipeline_dir(tmp_path_factory):
  """A diffusers pipeline directory with a tiny SD-2.x UNet (safetensors) and VAE."""
  root = tmp_path_factory.mktemp("sd2")
  torch.manual_seed(0)
  unet = _perturbed(TorchUNet(**SD2_UNET), 1)
  unet.save_pretrained(root / "unet")
  vae = _perturbed(TorchAutoencoderKL(**VAE), 2)
  vae.save_pretrained(root / "vae")
  return root, unet, vae


@pytest.mark.parametrize("side", [8, 12])
def test_sd2_unet_equals_diffusers(sd2_pipeline_dir, side):
  root, torch_unet, _ = sd2_pipeline_dir
  module, params = convert_diffusers.load_unet(root)  # the pipeline directory
  generator = torch.Generator().manual_seed(side)
  sample = torch.randn(2, 4, side, side, generator=generator)
  timesteps = torch.tensor([3, 917])
  context = torch.randn(2, 7, 24, generator=generator)
  with torch.no_grad():
    reference = _nhwc(torch_unet(sample, timesteps, context).sample)
  ours = jax.jit(module.apply)({"params": params}, jnp.asarray(_nhwc(sample)),
                               jnp.asarray(timesteps), jnp.asarray(context.numpy()))
  assert ours.shape == reference.shape
  # side 12 is not a multiple of the UNet's downsampling 8: the skips' sizes are forwarded.
  assert _relative_error(ours, reference) < 1e-4


def test_sd1_unet_from_sharded_bin_equals_diffusers(tmp_path):
  torch.manual_seed(0)
  torch_unet = _perturbed(TorchUNet(**SD1_UNET), 3)
  torch_unet.save_pretrained(tmp_path, safe_serialization=False, max_shard_size="200KB")
  assert (tmp_path / "diffusion_pytorch_model.bin.index.json").exists()
  module, params = convert_diffusers.load_unet(tmp_path)  # the UNet directory itself
  sample = torch.randn(2, 4, 8, 8)
  timesteps = torch.tensor([500, 1])
  context = torch.randn(2, 5, 24)
  with torch.no_grad():
    reference = _nhwc(torch_unet(sample, timesteps, context).sample)
  ours = jax.jit(module.apply)({"params": params}, jnp.asarray(_nhwc(sample)),
                               jnp.asarray(timesteps), jnp.asarray(context.numpy()))
  assert _relative_error(ours, reference) < 1e-4



def test_remat_gives_the_same_values_and_gradients(tmp_path):
  _perturbed(TorchUNet(**REMAT_UNET), 4).save_pretrained(tmp_path)
  module, params = convert_diffusers.load_unet(tmp_path)
  remat_module, _ = convert_diffusers.load_unet(tmp_path, remat_policy="nothing_saveable")
  rng = np.random.default_rng(0)
  inputs = (jnp.asarray(rng.standard_normal((1, 4, 4, 4)), jnp.float32), jnp.asarray([7]),
            jnp.asarray(rng.standard_normal((1, 3, 24)), jnp.float32))

  def loss(module, params):
    return jnp.sum(jnp.square(module.apply({"params": params}, *inputs)))

  plain = jax.jit(jax.value_and_grad(lambda p: loss(module, p)))(params)
  remat = jax.jit(jax.value_and_grad(lambda p: loss(remat_module, p)))(params)
  np.testing.assert_allclose(remat[0], plain[0], rtol=1e-6)
  # Remat recomputes the forward pass in other XLA fusions, so float32 sums associate
  # differently through the UNet's stack: a CI machine measured 1.6e-5 on one bias. A wrong
  # saved or recomputed value would be off by far more than the deep-stack tolerance.
  for ours_grad, plain_grad in zip(jax.tree.leaves(remat[1]), jax.tree.leaves(plain[1])):
    assert _relative_error(ours_grad, np.asarray(plain_grad)) < 1e-4


def test_vae_latent_mean_and_decode_equal_diffusers(sd2_pipeline_dir):
  root, _, torch_vae = sd2_pipeline_dir
  module, params = convert_diffusers.load_vae(root)
  generator = torch.Generator().manual_seed(0)
  images = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
  latents = torch.randn(2, 4, 4, 4, generator=generator)
  with torch.no_grad():
    distribution = torch_vae.encode(images).latent_dist
    decoded = torch_vae.decode(latents).sample
  variables = {"params": params}
  apply = jax.jit(module.apply, static_argnames="method")
  mean, logvar = apply(variables, jnp.asarray(_nhwc(images)),
                              method="encode_distribution")
  assert _relative_error(mean, _nhwc(distribution.mean)) < 1e-4
  assert _relative_error(logvar, _nhwc(distribution.logvar)) < 1e-4
  assert _relative_error(apply(variables, jnp.asarray(_nhwc(images)), method="encode"),
                         _nhwc(distribution.mean)) < 1e-4
  ours = apply(variables, jnp.asarray(_nhwc(latents)), method="decode")
  assert _relative_error(ours, _nhwc(decoded)) < 1e-4
  noise = torch.randn(distribution.mean.shape, generator=generator)
  sampled = distribution.mean + distribution.std * noise  # latent_dist.sample() with this draw
  ours = apply(variables, jnp.asarray(_nhwc(images)), jnp.asarray(_nhwc(noise)),
               method="encode_sample")
  assert _relative_error(ours, _nhwc(sampled)) < 1e-4
  assert module.config.scaling_factor == pytest.approx(torch_vae.config.scaling_factor)


def test_other_unet_families_and_broken_checkpoints_fail_clearly(sd2_pipeline_dir, tmp_path):
  root, _, _ = sd2_pipeline_dir
  config = json.loads((root / "unet" / "config.json").read_text())
  (tmp_path / "unet").mkdir()
  (tmp_path / "unet" / "config.json").write_text(json.dumps(dict(
      config, class_embed_type="timestep", addition_embed_type="text")))
  with pytest.raises(NotImplementedError, match="addition_embed_type.*class_embed_type"):
    convert_diffusers.unet_config(tmp_path)
  (tmp_path / "unet" / "config.json").write_text(json.dumps(dict(config, mystery_setting=1)))
  with pytest.raises(ValueError, match="mystery_setting"):
    convert_diffusers.unet_config(tmp_path)
  with pytest.raises(FileNotFoundError, match="unet"):
    convert_diffusers.load_unet(tmp_path / "nowhere")

  # Weights of a different width: every mismatch named.
  other = TorchUNet(**dict(SD2_UNET, cross_attention_dim=16))
  other.save_pretrained(tmp_path / "other")
  (tmp_path / "other" / "config.json").write_text(json.dumps(config))
  with pytest.raises(ConversionError, match=r"shape mismatch:[\s\S]*attn2\.to_k\.weight"):
    convert_diffusers.load_unet(tmp_path / "other")


def test_empty_prompt_embedding_is_the_text_encoder_output_of_the_padded_empty_prompt(tmp_path):
  """`neg_prompt_embeds` starts as SD's embedding of "" (bos, eos, then padding to 77)."""
  import transformers

  (tmp_path / "tokenizer").mkdir()
  vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, "a</w>": 3, "a": 4}
  (tmp_path / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
  (tmp_path / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
  transformers.CLIPTokenizer(str(tmp_path / "tokenizer" / "vocab.json"),
                             str(tmp_path / "tokenizer" / "merges.txt"), model_max_length=77,
                             pad_token="!").save_pretrained(tmp_path / "tokenizer")
  torch.manual_seed(0)
  encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=5, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
      num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
      pad_token_id=2)).eval()
  encoder.save_pretrained(tmp_path / "text_encoder")
  tokens = torch.tensor([[0, 1] + [2] * 75])
  with torch.no_grad():
    expected = encoder(tokens).last_hidden_state.numpy()
  embedding = convert_diffusers.empty_prompt_embedding(tmp_path)
  assert embedding.shape == (1, 77, 16) and embedding.dtype == np.float32
  np.testing.assert_allclose(embedding, expected, rtol=1e-6, atol=1e-6)
  with pytest.raises(FileNotFoundError, match="tokenizer"):
    convert_diffusers.empty_prompt_embedding(tmp_path / "text_encoder")


def test_noise_schedule_loads_from_the_pipeline_directory(sd2_pipeline_dir):
  root, _, _ = sd2_pipeline_dir
  (root / "scheduler").mkdir(exist_ok=True)
  sd21 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
          "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
          "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True,
          "steps_offset": 1, "trained_betas": None}
  (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(sd21))
  schedule = convert_diffusers.load_noise_schedule(root)
  assert (schedule.steps_offset, schedule.set_alpha_to_one, schedule.clip_sample) == (1, False,
                                                                                       False)
  np.testing.assert_array_equal(
      schedule.alphas_cumprod, DDPMScheduler.from_config(sd21).alphas_cumprod.numpy())
