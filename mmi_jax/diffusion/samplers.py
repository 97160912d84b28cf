"""Diffusion samplers: diffusers' DDPM, DDIM and DPM-Solver++ as one `lax.scan` each.

Reproduces the `set_timesteps` + `for t in timesteps: x = step(denoise(x, t), t, x)` loop of
  * "ddpm":        `DDPMScheduler` (what MM-Interleaved samples with), variance types
                   "fixed_small" (its default), "fixed_small_log" and "fixed_large";
  * "ddim":        `DDIMScheduler`, any `eta >= 0`;
  * "dpmsolver++": `DPMSolverMultistepScheduler` with its default settings (solver_order 2,
                   algorithm_type "dpmsolver++", solver_type "midpoint", lower_order_final,
                   final_sigmas_type "zero", no Karras / exponential / beta / Lu sigmas);
each built from the same scheduler config (`NoiseSchedule`), for epsilon, v and sample
prediction. The trajectories agree with diffusers' to float32 rounding (tests/test_samplers.py).

Everything that depends only on the schedule and the number of steps (the timesteps, and every
per-step scalar, computed in float32 with diffusers' operation order) is computed on the host
in NumPy by `make_plan`; `run_plan` then runs one `jax.lax.scan` over the steps, so `denoise` is
traced once whatever the number of steps. `sample` (= `make_plan` + `run_plan`) is traceable:
call it inside `jax.jit`, with `denoise` closing over the (traced) model parameters.

What diffusers does, and this reproduces:
  * Timesteps (`inference_timesteps`): "leading" (DDPM and DDIM's default; adds
    `steps_offset`), "trailing" and "linspace" (DPM-Solver's default; it ignores
    `steps_offset`), each with the scheduler's own formula (DPM-Solver's "leading" and
    "linspace" place `num_steps + 1` points and drop the last).
  * DDPM steps to the next timestep in the list (-1, i.e. `alphas_cumprod = 1`, after the
    last) and adds noise at every timestep > 0, the last one included ("leading" with
    `steps_offset` 1 ends at t = 1, where the posterior variance is 0, clamped to 1e-20).
  * DDIM steps to `t - N // num_steps` whatever the spacing; below 0 it uses
    `alphas_cumprod = 1` (`set_alpha_to_one`) or `alphas_cumprod[0]`. With `eta > 0` it adds
    noise at every step.
  * DPM-Solver++ takes a first-order (DDIM-like) step first and last (`final_sigmas_type`
    "zero" forces it; lower_order_final's "< 15 steps" rule only matters for third order) and
    second-order midpoint steps in between; the last step returns the predicted x0.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mmi_jax.diffusion.noise_schedule import TIMESTEP_SPACINGS, NoiseSchedule

SAMPLERS = ("ddpm", "ddim", "dpmsolver++")
DEFAULT_TIMESTEP_SPACING = {"ddpm": "leading", "ddim": "leading", "dpmsolver++": "linspace"}

# `denoise(latents [B, ...], timestep int32 []) -> model output [B, ...]`.
Denoiser = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
  """Everything about a sampling run that is fixed by (schedule, sampler, steps, eta, spacing).

  Attributes:
    sampler: one of `SAMPLERS`.
    prediction_type: the schedule's; what `denoise` returns.
    clip_range: x0 is clipped to `[-clip_range, clip_range]`, or not if None.
    timesteps: int32 `[S]`, the timesteps `denoise` is called at, in order.
    coefficients: name -> float32 `[S]`, the per-step scalars of the sampler's update.
    draws_noise: bool `[S]`, the steps that add fresh Gaussian noise.
  """

  sampler: str
  prediction_type: str
  clip_range: float | None
  timesteps: np.ndarray
  coefficients: Mapping[str, np.ndarray]
  draws_noise: np.ndarray

  @property
  def num_steps(self) -> int:
    return len(self.timesteps)

  @property
  def stochastic(self) -> bool:
    return bool(self.draws_noise.any())


def _check_num_steps(schedule: NoiseSchedule, num_steps: int):
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
  if num_steps > schedule.num_train_timesteps:
    raise ValueError(f"num_steps {num_steps} > num_train_timesteps "
                     f"{schedule.num_train_timesteps}: there are not that many timesteps")


def _check_sampler(sampler: str):
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")


def _resolve_spacing(schedule: NoiseSchedule, sampler: str, timestep_spacing: str | None) -> str:
  """The argument, else the schedule's, else the sampler's diffusers default."""
  spacing = timestep_spacing or schedule.timestep_spacing or DEFAULT_TIMESTEP_SPACING[sampler]
  if spacing not in TIMESTEP_SPACINGS:
    raise ValueError(f"unknown timestep_spacing {spacing!r}; expected one of {TIMESTEP_SPACINGS}")
  return spacing


def inference_timesteps(schedule: NoiseSchedule, sampler: str, num_steps: int,
                        timestep_spacing: str | None = None) -> np.ndarray:
  """The timesteps diffusers' `set_timesteps(num_steps)` gives the sampler: int64 `[S]`.

  `S == num_steps`, except that "trailing" spacing gives one more, ending at t = -1, when the
  float `arange(N, 0, -N / num_steps)` overshoots (e.g. 61 of 1000 steps). diffusers then takes
  all S steps, calling the model at t = -1, and so does `make_plan` (reproducing how each
  scheduler looks t = -1 up: DDPM and DDIM wrap to the last table entry, DPM-Solver clamps to
  the first). `timestep_spacing` None: the schedule's, else the sampler's default.
  """
  _check_sampler(sampler)
  _check_num_steps(schedule, num_steps)
  spacing = _resolve_spacing(schedule, sampler, timestep_spacing)
  n_train = schedule.num_train_timesteps
  if sampler in ("ddpm", "ddim"):
    if spacing == "linspace":
      timesteps = np.linspace(0, n_train - 1, num_steps).round()[::-1].copy().astype(np.int64)
    elif spacing == "leading":
      step_ratio = n_train // num_steps
      timesteps = (np.arange(0, num_steps) * step_ratio).round()[::-1].copy().astype(np.int64)
      timesteps += schedule.steps_offset
    else:
      step_ratio = n_train / num_steps
      timesteps = np.round(np.arange(n_train, 0, -step_ratio)).astype(np.int64) - 1
    return timesteps
  # DPM-Solver: `last_timestep` is N (its `lambda_min_clipped` is -inf by default).
  if spacing == "linspace":
    timesteps = np.linspace(0, n_train - 1, num_steps + 1).round()[::-1][:-1].copy()
    timesteps = timesteps.astype(np.int64)
  elif spacing == "leading":
    step_ratio = n_train // (num_steps + 1)
    timesteps = (np.arange(0, num_steps + 1) * step_ratio).round()[::-1][:-1].copy()
    timesteps = timesteps.astype(np.int64) + schedule.steps_offset
  else:
    step_ratio = n_train / num_steps
    timesteps = np.arange(n_train, 0, -step_ratio).round().copy().astype(np.int64) - 1
  return timesteps


def _f32(values) -> np.ndarray:
  return np.asarray(values, np.float32)


def _ddpm_coefficients(schedule: NoiseSchedule, timesteps: np.ndarray
                       ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """`DDPMScheduler.step`'s scalars for each step, and which steps draw noise."""
  alphas_cumprod = schedule.alphas_cumprod
  # `previous_timestep`: the entry after the first occurrence of t in the list, or -1.
  first_index = np.array([np.flatnonzero(timesteps == t)[0] for t in timesteps])
  prev_index = first_index + 1
  prev = np.where(prev_index < len(timesteps),
                  timesteps[np.minimum(prev_index, len(timesteps) - 1)], -1)
  alpha_prod = alphas_cumprod[timesteps]
  alpha_prod_prev = np.where(prev >= 0, alphas_cumprod[np.maximum(prev, 0)], _f32(1.0))
  beta_prod = 1 - alpha_prod
  beta_prod_prev = 1 - alpha_prod_prev
  current_alpha = alpha_prod / alpha_prod_prev
  current_beta = 1 - current_alpha
  variance = np.maximum((1 - alpha_prod_prev) / (1 - alpha_prod) * current_beta, _f32(1e-20))
  if schedule.variance_type == "fixed_small":
    noise_scale = np.sqrt(variance)
  elif schedule.variance_type == "fixed_small_log":
    noise_scale = np.exp(_f32(0.5) * np.log(variance))
  else:  # fixed_large
    noise_scale = np.sqrt(current_beta)
  draws_noise = timesteps > 0
  coefficients = {
      "signal": np.sqrt(alpha_prod),
      "noise": np.sqrt(beta_prod),
      "x0": (np.sqrt(alpha_prod_prev) * current_beta) / beta_prod,
      "xt": np.sqrt(current_alpha) * beta_prod_prev / beta_prod,
      "noise_scale": np.where(draws_noise, noise_scale, _f32(0.0)),
  }
  return {k: _f32(v) for k, v in coefficients.items()}, draws_noise


def _ddim_coefficients(schedule: NoiseSchedule, timesteps: np.ndarray, num_steps: int,
                       eta: float) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """`DDIMScheduler.step`'s scalars for each step, and which steps draw noise."""
  alphas_cumprod = schedule.alphas_cumprod
  final_alpha_cumprod = _f32(1.0) if schedule.set_alpha_to_one else alphas_cumprod[0]
  prev = timesteps - schedule.num_train_timesteps // num_steps
  alpha_prod = alphas_cumprod[timesteps]
  alpha_prod_prev = np.where(prev >= 0, alphas_cumprod[np.maximum(prev, 0)], final_alpha_cumprod)
  beta_prod = 1 - alpha_prod
  beta_prod_prev = 1 - alpha_prod_prev
  variance = (beta_prod_prev / beta_prod) * (1 - alpha_prod / alpha_prod_prev)
  std_dev = _f32(eta) * np.sqrt(variance)
  coefficients = {
      "signal": np.sqrt(alpha_prod),
      "noise": np.sqrt(beta_prod),
      "x0": np.sqrt(alpha_prod_prev),
      "direction": np.sqrt(1 - alpha_prod_prev - std_dev * std_dev),
      "noise_scale": std_dev,
  }
  draws_noise = np.full(timesteps.shape, eta > 0)
  return {k: _f32(v) for k, v in coefficients.items()}, draws_noise


def _dpm_solver_coefficients(schedule: NoiseSchedule, timesteps: np.ndarray
                             ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """`DPMSolverMultistepScheduler.step`'s scalars for each step (it draws no noise).

  Step i goes from `sigmas[i]` to `sigmas[i + 1]` (`sigmas[S] = 0`):
    x0 = (x - noise * out) / signal                (epsilon; v and sample likewise)
    x' = ratio * x - step * x0 - half_step * inv_r0 * (x0 - previous x0)
  `half_step` and `inv_r0` are 0 on first-order steps, which leaves exactly the first-order
  update `ratio * x - step * x0`.
  """
  alphas_cumprod = schedule.alphas_cumprod
  table_sigmas = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
  # np.interp at the (integer) timesteps, as diffusers: the table's values, except that it clamps
  # the -1 that "trailing" spacing can produce where indexing would wrap around.
  step_sigmas = np.interp(timesteps, np.arange(len(table_sigmas)), table_sigmas)
  sigmas = np.concatenate([step_sigmas, [0.0]]).astype(np.float32)  # final_sigmas_type "zero"
  alpha = 1 / np.sqrt(sigmas * sigmas + 1)  # `_sigma_to_alpha_sigma_t`
  sigma = sigmas * alpha
  with np.errstate(divide="ignore"):  # log(sigma = 0) = -inf at the end, as in torch
    log_snr = np.log(alpha) - np.log(sigma)  # lambda
  num_steps = len(timesteps)
  current, following = np.arange(num_steps), np.arange(num_steps) + 1
  h = log_snr[following] - log_snr[current]
  step = alpha[following] * (np.exp(-h) - 1)
  second_order = (current > 0) & (current < num_steps - 1)
  # h_0 / h uses the previous step's lambda; only defined (and used) on second-order steps.
  previous = np.maximum(current - 1, 0)
  with np.errstate(divide="ignore", invalid="ignore"):
    inv_r0 = 1.0 / ((log_snr[current] - log_snr[previous]) / h)
  coefficients = {
      "signal": alpha[current],
      "noise": sigma[current],
      "ratio": sigma[following] / sigma[current],
      "step": step,
      "half_step": np.where(second_order, _f32(0.5) * step, _f32(0.0)),
      "inv_r0": np.where(second_order, inv_r0, _f32(0.0)),
  }
  return {k: _f32(v) for k, v in coefficients.items()}, np.zeros(num_steps, bool)


def make_plan(schedule: NoiseSchedule, sampler: str, num_steps: int, *, eta: float = 0.0,
              timestep_spacing: str | None = None) -> SamplingPlan:
  """The timesteps and per-step scalars of a run (host side, NumPy).

  Args:
    schedule: the noise schedule (and scheduler options) the model was trained with.
    sampler: "ddpm", "ddim" or "dpmsolver++".
    num_steps: inference steps, 1 .. N.
    eta: DDIM's noise weight (0: deterministic DDIM, 1: DDPM-like); only for "ddim".
    timestep_spacing: overrides the schedule's / the sampler's default spacing.
  """
  _check_sampler(sampler)
  if eta < 0:
    raise ValueError(f"eta must be >= 0, got {eta}")
  if eta != 0 and sampler != "ddim":
    raise ValueError(f"eta={eta} applies to the ddim sampler only, not {sampler!r}")
  timesteps = inference_timesteps(schedule, sampler, num_steps, timestep_spacing)
  if sampler == "ddpm":
    coefficients, draws_noise = _ddpm_coefficients(schedule, timesteps)
  elif sampler == "ddim":
    coefficients, draws_noise = _ddim_coefficients(schedule, timesteps, num_steps, eta)
  else:
    coefficients, draws_noise = _dpm_solver_coefficients(schedule, timesteps)
  clip_range = None
  if schedule.clip_sample and sampler != "dpmsolver++":  # diffusers' DPM-Solver never clips
    clip_range = schedule.clip_sample_range
  return SamplingPlan(sampler=sampler, prediction_type=schedule.prediction_type,
                      clip_range=clip_range, timesteps=timesteps.astype(np.int32),
                      coefficients=coefficients, draws_noise=draws_noise)


def _predicted_x0(prediction_type: str, latents: jax.Array, model_output: jax.Array,
                  signal: jax.Array, noise: jax.Array) -> jax.Array:
  """x0 from the model output at `x_t = signal * x0 + noise * epsilon`."""
  if prediction_type == "epsilon":
    return (latents - noise * model_output) / signal
  if prediction_type == "v_prediction":
    return signal * latents - noise * model_output
  return model_output


def _ddpm_step(plan: SamplingPlan, c: Mapping[str, jax.Array], latents: jax.Array,
               model_output: jax.Array, previous_x0: jax.Array, noise: jax.Array | None
               ) -> tuple[jax.Array, jax.Array]:
  del previous_x0
  x0 = _predicted_x0(plan.prediction_type, latents, model_output, c["signal"], c["noise"])
  if plan.clip_range is not None:
    x0 = jnp.clip(x0, -plan.clip_range, plan.clip_range)
  latents = c["x0"] * x0 + c["xt"] * latents
  if noise is not None:
    latents = latents + c["noise_scale"] * noise
  return latents, x0


def _ddim_step(plan: SamplingPlan, c: Mapping[str, jax.Array], latents: jax.Array,
               model_output: jax.Array, previous_x0: jax.Array, noise: jax.Array | None
               ) -> tuple[jax.Array, jax.Array]:
  del previous_x0
  signal, noise_level = c["signal"], c["noise"]
  if plan.prediction_type == "epsilon":
    x0 = (latents - noise_level * model_output) / signal
    epsilon = model_output
  elif plan.prediction_type == "v_prediction":
    x0 = signal * latents - noise_level * model_output
    epsilon = signal * model_output + noise_level * latents
  else:
    x0 = model_output
    epsilon = (latents - signal * x0) / noise_level
  if plan.clip_range is not None:
    x0 = jnp.clip(x0, -plan.clip_range, plan.clip_range)
  latents = c["x0"] * x0 + c["direction"] * epsilon
  if noise is not None:
    latents = latents + c["noise_scale"] * noise
  return latents, x0


def _dpm_solver_step(plan: SamplingPlan, c: Mapping[str, jax.Array], latents: jax.Array,
                     model_output: jax.Array, previous_x0: jax.Array, noise: jax.Array | None
                     ) -> tuple[jax.Array, jax.Array]:
  del noise
  x0 = _predicted_x0(plan.prediction_type, latents, model_output, c["signal"], c["noise"])
  difference = c["inv_r0"] * (x0 - previous_x0)
  latents = c["ratio"] * latents - c["step"] * x0 - c["half_step"] * difference
  return latents, x0


_STEPS = {"ddpm": _ddpm_step, "ddim": _ddim_step, "dpmsolver++": _dpm_solver_step}


def run_plan(plan: SamplingPlan, denoise: Denoiser, initial_latents: jax.Array, *,
             rng: jax.Array | None = None, step_noise: jax.Array | None = None) -> jax.Array:
  """Runs the plan's steps from `initial_latents` in one `lax.scan`; traceable.

  Args:
    plan: from `make_plan`.
    denoise: `(latents [B, ...], timestep int32 []) -> model output [B, ...]` in the
      schedule's prediction type; traced once.
    initial_latents: `[B, ...]` (e.g. `[B, H, W, C]`), standard normal (diffusers'
      `init_noise_sigma` is 1 for all three samplers); the arithmetic runs in its dtype.
    rng: a PRNG key for the noise of stochastic plans; step i uses `fold_in(rng, i)`.
    step_noise: `[S, B, ...]`, explicit noise instead of `rng` (e.g. the draws of a torch run);
      `step_noise[i]` is used where `plan.draws_noise[i]`, ignored elsewhere.
    Deterministic plans use neither `rng` nor `step_noise`.
  Returns:
    The final latents `[B, ...]`.
  """
  latents = jnp.asarray(initial_latents)
  if latents.ndim < 1 or not jnp.issubdtype(latents.dtype, jnp.floating):
    raise ValueError(f"initial_latents must be a float array [B, ...], got {latents.dtype} "
                     f"{latents.shape}")
  num_steps = plan.num_steps
  if plan.stochastic:
    if rng is None and step_noise is None:
      raise ValueError(f"the {plan.sampler} sampler adds noise: pass rng (a PRNG key) or "
                       f"step_noise [{num_steps}, *latents.shape]")
    if rng is not None and step_noise is not None:
      raise ValueError("pass rng or step_noise, not both")
    if step_noise is not None:
      step_noise = jnp.asarray(step_noise, latents.dtype)
      expected = (num_steps,) + latents.shape
      if step_noise.shape != expected:
        raise ValueError(f"step_noise has shape {step_noise.shape}; expected {expected} "
                         f"([num_steps, *latents.shape])")
  else:
    rng = step_noise = None

  step_fn = _STEPS[plan.sampler]
  coefficients = {k: jnp.asarray(v) for k, v in plan.coefficients.items()}
  xs = (jnp.arange(num_steps, dtype=jnp.int32), jnp.asarray(plan.timesteps),
        jnp.asarray(plan.draws_noise), coefficients, step_noise)

  def body(carry, step_inputs):
    latents, previous_x0 = carry
    index, timestep, draws_noise, c, noise = step_inputs
    model_output = denoise(latents, timestep)
    if model_output.shape != latents.shape:
      raise ValueError(f"denoise returned shape {model_output.shape}; expected the latents' "
                       f"{latents.shape}")
    model_output = model_output.astype(latents.dtype)
    if rng is not None:
      noise = jax.random.normal(jax.random.fold_in(rng, index), latents.shape, latents.dtype)
    if noise is not None:
      noise = jnp.where(draws_noise, noise, jnp.zeros_like(noise))
    latents, x0 = step_fn(plan, c, latents, model_output, previous_x0, noise)
    return (latents.astype(previous_x0.dtype), x0.astype(previous_x0.dtype)), None

  (latents, _), _ = jax.lax.scan(body, (latents, jnp.zeros_like(latents)), xs)
  return latents


def sample(denoise: Denoiser, initial_latents: jax.Array, *, schedule: NoiseSchedule,
           sampler: str, num_steps: int, rng: jax.Array | None = None,
           step_noise: jax.Array | None = None, eta: float = 0.0,
           timestep_spacing: str | None = None) -> jax.Array:
  """Samples as diffusers' `sampler` would in `num_steps` steps: final latents `[B, ...]`.

  `make_plan(schedule, sampler, num_steps, eta=eta, timestep_spacing=timestep_spacing)` then
  `run_plan(plan, denoise, initial_latents, rng=rng, step_noise=step_noise)`; see those.
  Traceable (everything static is Python / NumPy), e.g.

    @jax.jit
    def generate(params, latents, rng):
      denoise = lambda x, t: unet.apply(params, x, jnp.full(x.shape[:1], t))
      return sample(denoise, latents, schedule=schedule, sampler="ddpm", num_steps=30, rng=rng)
  """
  plan = make_plan(schedule, sampler, num_steps, eta=eta, timestep_spacing=timestep_spacing)
  return run_plan(plan, denoise, initial_latents, rng=rng, step_noise=step_noise)
