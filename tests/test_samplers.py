"""The noise schedule and samplers against diffusers' DDPM, DDIM and DPM-Solver++ schedulers.

Both sides run the same deterministic "denoiser" (written once in torch, once in jnp), so the
trajectories must agree to float32 rounding; DDPM's and DDIM's noise is drawn from a seeded
torch generator in diffusers' order and handed to `sample` as `step_noise`.
"""

import json

import diffusers
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from mmi_jax.diffusion import NoiseSchedule, inference_timesteps, make_plan, sample

# Stable Diffusion 2.1-base's scheduler/scheduler_config.json (what MM-Interleaved loads).
SD21_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
SCHEDULER_CLASSES = {
    "ddpm": diffusers.DDPMScheduler,
    "ddim": diffusers.DDIMScheduler,
    "dpmsolver++": diffusers.DPMSolverMultistepScheduler,
}
LATENT_SHAPE_NCHW = (2, 4, 8, 8)
CHANNEL_SHIFT = (1.0, -0.5, 0.25, 2.0)  # the per-channel constant c of the test denoiser


def _torch_denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
  """`tanh(0.5 x + 0.001 t c) * 0.9`, NCHW."""
  shift = torch.tensor(CHANNEL_SHIFT, dtype=torch.float32).reshape(1, -1, 1, 1)
  return torch.tanh(0.5 * x + (0.001 * t.to(torch.float32)) * shift) * 0.9


def _jax_denoise(x: jax.Array, t: jax.Array) -> jax.Array:
  """`tanh(0.5 x + 0.001 t c) * 0.9`, NHWC."""
  shift = jnp.asarray(CHANNEL_SHIFT, jnp.float32)
  return jnp.tanh(0.5 * x + (0.001 * t.astype(jnp.float32)) * shift) * 0.9


def _nhwc(x: torch.Tensor) -> np.ndarray:
  return np.moveaxis(x.numpy(), 1, -1)


def _nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))


def _relative_difference(ours: np.ndarray, reference: np.ndarray) -> float:
  return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def _diffusers_run(scheduler, num_steps: int, latents: torch.Tensor, seed: int, eta: float = 0.0
                   ) -> tuple[torch.Tensor, np.ndarray]:
  """The usual diffusers loop; returns the final latents and the noise it drew, `[S, ...]`.

  The noise is re-drawn from an identically seeded generator exactly as the schedulers draw it
  (one `randn(latents.shape)` per noisy step: DDPM at t > 0, DDIM with eta > 0 at every step).
  """
  scheduler.set_timesteps(num_steps)
  generator = torch.Generator().manual_seed(seed)
  for t in scheduler.timesteps:
    kwargs = {"eta": eta} if isinstance(scheduler, diffusers.DDIMScheduler) else {}
    latents = scheduler.step(_torch_denoise(latents, t), t, latents, generator=generator,
                             **kwargs).prev_sample
  replay = torch.Generator().manual_seed(seed)
  noise = []
  for t in scheduler.timesteps:
    noisy = (t > 0) if isinstance(scheduler, diffusers.DDPMScheduler) else eta > 0
    noise.append(torch.randn(latents.shape, generator=replay, dtype=torch.float32) if noisy
                 else torch.zeros(latents.shape))
  return latents, np.stack([_nhwc(n) for n in noise])


def _compare_trajectory(sampler, config, num_steps, eta=0.0, seed=0):
  """Relative difference of the final latents of diffusers' and our run of `sampler`."""
  scheduler = SCHEDULER_CLASSES[sampler].from_config(config)
  initial = torch.randn(LATENT_SHAPE_NCHW, generator=torch.Generator().manual_seed(seed + 100))
  reference, noise = _diffusers_run(scheduler, num_steps, initial.clone(), seed, eta)
  schedule = NoiseSchedule.from_diffusers(config)
  stochastic = make_plan(schedule, sampler, num_steps, eta=eta).stochastic
  ours = sample(_jax_denoise, _nhwc(initial), schedule=schedule, sampler=sampler,
                num_steps=num_steps, eta=eta, step_noise=noise if stochastic else None)
  assert np.all(np.isfinite(np.asarray(ours)))
  return _relative_difference(np.asarray(ours), _nhwc(reference))


# ---------------------------------------------------------------------------- noise schedule


@pytest.mark.parametrize("config", [
    SD21_SCHEDULER_CONFIG,
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
     "num_train_timesteps": 999},
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
     "num_train_timesteps": 4000},
], ids=["sd21", "linear", "squaredcos_cap_v2", "scaled_linear_999", "linear_4000"])
def test_tables_equal_diffusers_bit_for_bit(config):
  reference = diffusers.DDPMScheduler.from_config(config)
  schedule = NoiseSchedule.from_diffusers(config)
  assert schedule.betas.dtype == schedule.alphas_cumprod.dtype == np.float32
  np.testing.assert_array_equal(schedule.betas, reference.betas.numpy())
  np.testing.assert_array_equal(schedule.alphas_cumprod, reference.alphas_cumprod.numpy())


def test_trained_betas_are_used():
  betas = np.linspace(1e-4, 0.03, 50).tolist()
  config = {"num_train_timesteps": 50, "trained_betas": betas, "beta_schedule": "whatever"}
  reference = diffusers.DDPMScheduler(**config)
  schedule = NoiseSchedule.from_diffusers(config)
  np.testing.assert_array_equal(schedule.alphas_cumprod, reference.alphas_cumprod.numpy())
  hash(schedule)  # stays usable as a static argument


def test_from_diffusers_reads_a_directory_a_file_and_a_dict(tmp_path):
  scheduler_dir = tmp_path / "scheduler"
  scheduler_dir.mkdir()
  (scheduler_dir / "scheduler_config.json").write_text(json.dumps(SD21_SCHEDULER_CONFIG))
  from_model_dir = NoiseSchedule.from_diffusers(tmp_path)
  from_dir = NoiseSchedule.from_diffusers(scheduler_dir)
  from_file = NoiseSchedule.from_diffusers(str(scheduler_dir / "scheduler_config.json"))
  from_dict = NoiseSchedule.from_diffusers(SD21_SCHEDULER_CONFIG)
  assert from_model_dir == from_dir == from_file == from_dict
  assert from_dict == NoiseSchedule(
      num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
      beta_end=0.012, prediction_type="epsilon", steps_offset=1, set_alpha_to_one=False,
      clip_sample=False)
  # Missing keys take the DDPM/DDIM defaults, clip_sample=True included.
  assert NoiseSchedule.from_diffusers({}).clip_sample


def test_from_diffusers_refuses_what_it_does_not_implement():
  for key in ("rescale_betas_zero_snr", "thresholding"):
    with pytest.raises(NotImplementedError, match=key):
      NoiseSchedule.from_diffusers({**SD21_SCHEDULER_CONFIG, key: True})
  with pytest.raises(NotImplementedError, match="learned_range"):
    NoiseSchedule.from_diffusers({**SD21_SCHEDULER_CONFIG, "variance_type": "learned_range"})


def test_from_config_takes_a_config_dict_and_checks_its_keys():
  section = ml_collections.ConfigDict(dict(
      num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
      beta_end=0.012, prediction_type="epsilon"))
  schedule = NoiseSchedule.from_mapping(section)
  assert schedule.steps_offset == 0 and schedule.set_alpha_to_one and not schedule.clip_sample
  assert NoiseSchedule.from_mapping({**section.to_dict(), "steps_offset": 1}).steps_offset == 1
  with pytest.raises(ValueError, match="lacks \\['beta_end'\\]"):
    NoiseSchedule.from_mapping({k: v for k, v in section.items() if k != "beta_end"})
  with pytest.raises(ValueError, match="unknown keys \\['beta_strat'\\]"):
    NoiseSchedule.from_mapping({**section.to_dict(), "beta_strat": 0.1})
  with pytest.raises(ValueError, match="'sigmoid'"):
    NoiseSchedule.from_mapping({**section.to_dict(), "beta_schedule": "sigmoid"})
  with pytest.raises(ValueError, match="'x0'"):
    NoiseSchedule.from_mapping({**section.to_dict(), "prediction_type": "x0"})


def test_add_noise_velocity_and_training_target_equal_diffusers():
  reference = diffusers.DDPMScheduler.from_config(SD21_SCHEDULER_CONFIG)
  generator = torch.Generator().manual_seed(0)
  x0 = torch.randn(LATENT_SHAPE_NCHW, generator=generator)
  noise = torch.randn(LATENT_SHAPE_NCHW, generator=generator)
  timesteps = torch.tensor([0, 999])
  schedule = NoiseSchedule.from_diffusers(SD21_SCHEDULER_CONFIG)
  args = (jnp.asarray(_nhwc(x0)), jnp.asarray(_nhwc(noise)), jnp.asarray(timesteps.numpy()))
  noisy = jax.jit(schedule.add_noise)(*args)
  velocity = jax.jit(schedule.velocity)(*args)
  expected_noisy = _nhwc(reference.add_noise(x0, noise, timesteps))
  expected_velocity = _nhwc(reference.get_velocity(x0, noise, timesteps))
  assert np.max(np.abs(np.asarray(noisy) - expected_noisy)) <= 1e-6
  assert np.max(np.abs(np.asarray(velocity) - expected_velocity)) <= 1e-6
  np.testing.assert_array_equal(schedule.training_target(*args), args[1])
  v_schedule = NoiseSchedule.from_diffusers({**SD21_SCHEDULER_CONFIG,
                                             "prediction_type": "v_prediction"})
  np.testing.assert_array_equal(v_schedule.training_target(*args), v_schedule.velocity(*args))
  x0_schedule = NoiseSchedule.from_diffusers({**SD21_SCHEDULER_CONFIG, "prediction_type": "sample"})
  np.testing.assert_array_equal(x0_schedule.training_target(*args), args[0])


# ------------------------------------------------------------------------------- timesteps


@pytest.mark.parametrize("sampler", list(SCHEDULER_CLASSES))
@pytest.mark.parametrize("spacing", [None, "leading", "trailing", "linspace"])
@pytest.mark.parametrize("config", [SD21_SCHEDULER_CONFIG, {"num_train_timesteps": 1000}],
                         ids=["sd21", "defaults"])
def test_timesteps_equal_diffusers(sampler, spacing, config):
  spaced_config = config if spacing is None else {**config, "timestep_spacing": spacing}
  scheduler = SCHEDULER_CLASSES[sampler].from_config(spaced_config)
  schedule = NoiseSchedule.from_diffusers(spaced_config)
  unspaced_schedule = NoiseSchedule.from_diffusers(config)
  for num_steps in (1, 2, 7, 30, 50, 61, 333, 1000):  # trailing 61: 62 steps, the last t = -1
    scheduler.set_timesteps(num_steps)
    expected = scheduler.timesteps.numpy()
    message = f"{sampler} {spacing} {num_steps} steps"
    np.testing.assert_array_equal(inference_timesteps(schedule, sampler, num_steps), expected,
                                  err_msg=message)
    # The argument stands in for the config's spacing.
    np.testing.assert_array_equal(
        inference_timesteps(unspaced_schedule, sampler, num_steps, spacing), expected,
        err_msg=message)


def test_default_spacings_are_those_of_diffusers_from_config():
  for sampler, cls in SCHEDULER_CLASSES.items():
    spacing = cls.from_config(SD21_SCHEDULER_CONFIG).config.timestep_spacing
    assert spacing == {"ddpm": "leading", "ddim": "leading", "dpmsolver++": "linspace"}[sampler]


# ---------------------------------------------------------------------------- trajectories


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5),
                                         ("dpmsolver++", 0.0)])
def test_30_step_trajectory_equals_diffusers(sampler, eta, prediction_type):
  config = {**SD21_SCHEDULER_CONFIG, "prediction_type": prediction_type}
  assert _compare_trajectory(sampler, config, 30, eta=eta) <= 1e-5


@pytest.mark.parametrize("sampler,num_steps,overrides", [
    ("ddpm", 7, {"timestep_spacing": "trailing"}),
    ("ddpm", 7, {"timestep_spacing": "linspace"}),  # ends at t = 0, which draws no noise
    ("ddpm", 30, {"variance_type": "fixed_small_log"}),
    ("ddpm", 30, {"variance_type": "fixed_large"}),
    ("ddpm", 30, {"clip_sample": True}),
    ("ddim", 30, {"clip_sample": True, "clip_sample_range": 1.5}),
    ("ddim", 7, {"timestep_spacing": "trailing", "set_alpha_to_one": True}),
    ("ddim", 7, {"timestep_spacing": "linspace", "prediction_type": "v_prediction"}),
    ("dpmsolver++", 1, {}),
    ("dpmsolver++", 2, {}),
    ("dpmsolver++", 7, {"prediction_type": "v_prediction"}),
    ("dpmsolver++", 20, {"timestep_spacing": "leading"}),
    ("dpmsolver++", 20, {"timestep_spacing": "trailing", "clip_sample": True}),  # never clips
    ("dpmsolver++", 61, {"timestep_spacing": "trailing"}),  # 62 steps, the last at t = -1
])
def test_other_settings_equal_diffusers(sampler, num_steps, overrides):
  config = {**SD21_SCHEDULER_CONFIG, **overrides}
  assert _compare_trajectory(sampler, config, num_steps, eta=0.7 if sampler == "ddim" else 0.0
                             ) <= 1e-5


# ------------------------------------------------------------------------------- contracts


def test_sample_under_jit_traces_denoise_once_and_is_reproducible():
  schedule = NoiseSchedule.from_diffusers(SD21_SCHEDULER_CONFIG)
  traces = []

  def denoise(x, t):
    traces.append(t)
    return _jax_denoise(x, t)

  @jax.jit
  def generate(latents, rng):
    return sample(denoise, latents, schedule=schedule, sampler="ddpm", num_steps=30, rng=rng)

  latents = jnp.zeros((2, 8, 8, 4), jnp.float32)
  # "rbg" keys only because threefry's normal takes ~1.5 s to compile on the CPU.
  first = generate(latents, jax.random.key(0, impl="rbg"))
  again = generate(latents, jax.random.key(0, impl="rbg"))
  other = generate(latents, jax.random.key(1, impl="rbg"))
  assert len(traces) == 1
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first, other)
  assert np.all(np.isfinite(np.asarray(first)))


def test_bad_inputs_raise_value_errors_that_say_what_is_wrong():
  schedule = NoiseSchedule.from_diffusers(SD21_SCHEDULER_CONFIG)
  latents = jnp.zeros((2, 8, 8, 4), jnp.float32)
  run = lambda **kw: sample(_jax_denoise, latents, schedule=schedule,
                            **{"sampler": "ddpm", "num_steps": 30, **kw})
  with pytest.raises(ValueError, match="unknown sampler 'euler'"):
    run(sampler="euler", rng=jax.random.key(0))
  with pytest.raises(ValueError, match="num_steps 1001 > num_train_timesteps 1000"):
    run(num_steps=1001, rng=jax.random.key(0))
  with pytest.raises(ValueError, match="num_steps must be a positive int"):
    run(num_steps=0, rng=jax.random.key(0))
  with pytest.raises(ValueError, match="ddpm sampler adds noise: pass rng"):
    run()
  with pytest.raises(ValueError, match=r"step_noise has shape \(29, 2, 8, 8, 4\); expected "
                                       r"\(30, 2, 8, 8, 4\)"):
    run(step_noise=jnp.zeros((29, 2, 8, 8, 4)))
  with pytest.raises(ValueError, match="not both"):
    run(step_noise=jnp.zeros((30, 2, 8, 8, 4)), rng=jax.random.key(0))
  with pytest.raises(ValueError, match="eta=0.5 applies to the ddim sampler only"):
    run(eta=0.5, rng=jax.random.key(0))
  with pytest.raises(ValueError, match="unknown timestep_spacing 'uniform'"):
    run(timestep_spacing="uniform", rng=jax.random.key(0))
  with pytest.raises(ValueError, match=r"denoise returned shape \(2, 8, 8, 8\)"):
    sample(lambda x, t: jnp.concatenate([x, x], -1), latents, schedule=schedule,
           sampler="ddim", num_steps=3)
