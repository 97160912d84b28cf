"""The diffusion noise schedule: beta / alpha tables and the forward (noising) process.

Mirrors the table set-up shared by diffusers' `DDPMScheduler`, `DDIMScheduler` and
`DPMSolverMultistepScheduler` (their `__init__`), and `DDPMScheduler.add_noise` /
`get_velocity`, which MM-Interleaved trains its image decoder with (SD-2.1-base's scheduler).
The samplers that run the reverse process live in `mmi_jax/diffusion/samplers.py`.

The tables are NumPy float32 and equal diffusers' bit for bit (tests/test_samplers.py):
  * `torch.linspace(a, b, n, dtype=float32)` on the CPU rounds `a`, `b` and the step to float32
    and evaluates `a + step * i` (first half) or `b - step * (n - 1 - i)` (second half) with a
    single rounding; `_torch_linspace_float32` does the same in float64 and rounds once.
  * `scaled_linear` squares that float32 linspace of square roots in float32.
  * `squaredcos_cap_v2` is computed in Python floats and rounded to float32, as diffusers does.
  * `torch.cumprod` of a float32 CPU tensor accumulates in float64 and rounds every partial
    product to float32; `alphas_cumprod` does the same.

Arrays are channels-last (`[B, H, W, C]`), but any `[B, ...]` works: per-example scalars are
broadcast over the trailing axes.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# DDPM's `variance_type`s that are implemented; "learned" and "learned_range" need a model that
# predicts its variance, and diffusers' "fixed_large_log" takes the square root of a negative log.
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")
UNSUPPORTED_VARIANCE_TYPES = ("fixed_large_log", "learned", "learned_range")

# What diffusers' DDPMScheduler / DDIMScheduler fill in for keys a scheduler config leaves out
# (the keys the two share have the same defaults; `set_alpha_to_one` is DDIM's).
# `timestep_spacing` None means each sampler's own default.
DIFFUSERS_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "steps_offset": 0,
    "set_alpha_to_one": True,
    "timestep_spacing": None,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "variance_type": "fixed_small",
    "trained_betas": None,
}

_REQUIRED_CONFIG_FIELDS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end",
                           "prediction_type")
_DIFFUSERS_CONFIG_NAME = "scheduler_config.json"


def _torch_linspace_float32(start: float, end: float, count: int) -> np.ndarray:
  """`torch.linspace(start, end, count, dtype=torch.float32)` on the CPU, bit for bit.

  Returns float32 `[count]`. See the module docstring for how torch evaluates it.
  """
  start32, end32 = np.float32(start), np.float32(end)
  if count == 1:
    return np.array([start32], np.float32)
  step32 = (end32 - start32) / np.float32(count - 1)
  index = np.arange(count, dtype=np.float64)
  step, first, last = np.float64(step32), np.float64(start32), np.float64(end32)
  values = np.where(index < count // 2, first + step * index, last - step * (count - 1 - index))
  return values.astype(np.float32)


def _squaredcos_cap_v2_betas(count: int, max_beta: float = 0.999) -> np.ndarray:
  """diffusers' `betas_for_alpha_bar(count)` (the GLIDE cosine schedule): float32 `[count]`."""

  def alpha_bar(t):
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

  betas = [min(1 - alpha_bar((i + 1) / count) / alpha_bar(i / count), max_beta)
           for i in range(count)]
  return np.array(betas, np.float32)


def _per_example(values: jax.Array, like: jax.Array) -> jax.Array:
  """`[B]` -> `[B, 1, ..., 1]`, broadcastable against `like [B, ...]`."""
  return values.reshape(values.shape + (1,) * (like.ndim - 1))


def _mapping(section: Any) -> dict[str, Any]:
  """A dict, an ml_collections (Frozen)ConfigDict or any mapping -> a plain dict."""
  if isinstance(section, collections.abc.Mapping):
    return dict(section)
  if hasattr(section, "items"):
    return dict(section.items())
  raise TypeError(f"expected a mapping or a ConfigDict, got {type(section).__name__}")


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  """A discrete DDPM noise schedule, as configured in a diffusers scheduler config.

  Attributes:
    num_train_timesteps: N, the number of training timesteps (timesteps are 0 .. N - 1).
    beta_schedule: "linear", "scaled_linear" (Stable Diffusion) or "squaredcos_cap_v2".
    beta_start, beta_end: the first and last beta (unused by "squaredcos_cap_v2").
    prediction_type: what the model predicts: "epsilon" (the noise), "v_prediction" (the
      velocity `sqrt(a) * noise - sqrt(1 - a) * x0`) or "sample" (x0).
    steps_offset: added to the "leading" inference timesteps (1 for Stable Diffusion).
    set_alpha_to_one: DDIM's last step goes to `alphas_cumprod = 1` if True, else to
      `alphas_cumprod[0]` (False for Stable Diffusion).
    timestep_spacing: "leading", "trailing" or "linspace"; None = each sampler's diffusers
      default ("leading" for DDPM and DDIM, "linspace" for DPM-Solver++).
    clip_sample: DDPM and DDIM clip the predicted x0 to `[-clip_sample_range,
      clip_sample_range]` (diffusers' DPM-Solver has no such option and ignores it).
    clip_sample_range: see `clip_sample`.
    variance_type: the variance of DDPM's sampling noise: "fixed_small" (the posterior
      variance), "fixed_small_log" (the same, through diffusers' log-space round trip) or
      "fixed_large" (beta).
    trained_betas: explicit betas `[N]`, used instead of `beta_schedule` when given.
  """

  num_train_timesteps: int
  beta_schedule: str
  beta_start: float
  beta_end: float
  prediction_type: str
  steps_offset: int = 0
  set_alpha_to_one: bool = True
  timestep_spacing: str | None = None
  clip_sample: bool = False
  clip_sample_range: float = 1.0
  variance_type: str = "fixed_small"
  trained_betas: tuple[float, ...] | None = None

  def __post_init__(self):
    if self.num_train_timesteps < 1:
      raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
    if self.trained_betas is None and self.beta_schedule not in BETA_SCHEDULES:
      raise ValueError(f"unknown beta_schedule {self.beta_schedule!r}; expected one of "
                       f"{BETA_SCHEDULES} (or trained_betas)")
    if self.prediction_type not in PREDICTION_TYPES:
      raise ValueError(f"unknown prediction_type {self.prediction_type!r}; expected one of "
                       f"{PREDICTION_TYPES}")
    if self.timestep_spacing is not None and self.timestep_spacing not in TIMESTEP_SPACINGS:
      raise ValueError(f"unknown timestep_spacing {self.timestep_spacing!r}; expected None or "
                       f"one of {TIMESTEP_SPACINGS}")
    if self.variance_type in UNSUPPORTED_VARIANCE_TYPES:
      raise NotImplementedError(f"variance_type {self.variance_type!r} is not implemented; "
                                f"use one of {VARIANCE_TYPES}")
    if self.variance_type not in VARIANCE_TYPES:
      raise ValueError(f"unknown variance_type {self.variance_type!r}; expected one of "
                       f"{VARIANCE_TYPES}")
    if self.trained_betas is not None:
      # Stored as a tuple so that the schedule stays hashable (usable as a static argument).
      object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
      if len(self.trained_betas) != self.num_train_timesteps:
        raise ValueError(f"trained_betas has {len(self.trained_betas)} entries, "
                         f"num_train_timesteps is {self.num_train_timesteps}")

  @classmethod
  def from_mapping(cls, section: Any) -> NoiseSchedule:
    """From a config section (a dict or ConfigDict) with this class's field names.

    `num_train_timesteps, beta_schedule, beta_start, beta_end, prediction_type` are required,
    the other fields optional (dataclass defaults); an unknown key is an error.
    """
    values = _mapping(section)
    missing = [name for name in _REQUIRED_CONFIG_FIELDS if name not in values]
    if missing:
      raise ValueError(f"noise schedule config lacks {missing}")
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"noise schedule config has unknown keys {unknown}; known: {sorted(known)}")
    return cls(**values)

  @classmethod
  def from_diffusers(cls, path_or_config: str | os.PathLike | collections.abc.Mapping
                     ) -> NoiseSchedule:
    """From a diffusers scheduler config, as `DDPMScheduler.from_config(config)` reads it.

    Args:
      path_or_config: a loaded config dict, a `scheduler_config.json`, a directory holding one,
        or a model directory holding `scheduler/scheduler_config.json`.
    Keys this schedule does not use (`_class_name`, `skip_prk_steps`, DPM-Solver settings, ...)
    are ignored; missing keys take diffusers' DDPM/DDIM defaults (so `clip_sample` defaults to
    True here, unlike the dataclass). `rescale_betas_zero_snr` or `thresholding` set true raise
    NotImplementedError.
    """
    if isinstance(path_or_config, collections.abc.Mapping):
      config = dict(path_or_config)
    else:
      path = os.fspath(path_or_config)
      if os.path.isdir(path):
        candidates = [os.path.join(path, _DIFFUSERS_CONFIG_NAME),
                      os.path.join(path, "scheduler", _DIFFUSERS_CONFIG_NAME)]
        found = [c for c in candidates if os.path.isfile(c)]
        if not found:
          raise FileNotFoundError(f"no {_DIFFUSERS_CONFIG_NAME} in {path} or {path}/scheduler")
        path = found[0]
      with open(path) as f:
        config = json.load(f)
    if config.get("rescale_betas_zero_snr", False):
      raise NotImplementedError("rescale_betas_zero_snr=True is not implemented (it changes the "
                                "tables, and DPM-Solver's handling of the zero terminal SNR)")
    if config.get("thresholding", False):
      raise NotImplementedError("thresholding=True (dynamic thresholding of x0) is not "
                                "implemented; it is meant for pixel-space models, not latents")
    values = {name: config.get(name, default) for name, default in DIFFUSERS_DEFAULTS.items()}
    if values["variance_type"] is None:  # DPM-Solver configs; DDPM then uses "fixed_small".
      values["variance_type"] = "fixed_small"
    return cls(**values)

  @property
  def betas(self) -> np.ndarray:
    """float32 `[N]`: the per-timestep betas, as diffusers computes them."""
    n = self.num_train_timesteps
    if self.trained_betas is not None:
      return np.array(self.trained_betas, np.float32)
    if self.beta_schedule == "linear":
      return _torch_linspace_float32(self.beta_start, self.beta_end, n)
    if self.beta_schedule == "scaled_linear":
      roots = _torch_linspace_float32(self.beta_start**0.5, self.beta_end**0.5, n)
      return roots * roots
    return _squaredcos_cap_v2_betas(n)

  @property
  def alphas_cumprod(self) -> np.ndarray:
    """float32 `[N]`: `prod_{s <= t} (1 - beta_s)`, accumulated in float64 as torch's cumprod."""
    alphas = np.float32(1.0) - self.betas
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)

  def _signal_and_noise_scales(self, timesteps: jax.Array, like: jax.Array
                               ) -> tuple[jax.Array, jax.Array]:
    """`(sqrt(a_t), sqrt(1 - a_t))`, each `[B, 1, ..., 1]` in `like`'s dtype."""
    alphas_cumprod = jnp.asarray(self.alphas_cumprod, like.dtype)[timesteps]
    signal = jnp.sqrt(alphas_cumprod)
    noise = jnp.sqrt(1 - alphas_cumprod)
    return _per_example(signal, like), _per_example(noise, like)

  def add_noise(self, x0: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """`x_t = sqrt(a_t) * x0 + sqrt(1 - a_t) * noise` (`DDPMScheduler.add_noise`).

    Args:
      x0, noise: `[B, ...]` (e.g. latents `[B, H, W, C]`).
      timesteps: int `[B]`, in `[0, N)`.
    Returns:
      `[B, ...]`.
    """
    signal, noise_scale = self._signal_and_noise_scales(timesteps, x0)
    return signal * x0 + noise_scale * noise

  def velocity(self, x0: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """`v = sqrt(a_t) * noise - sqrt(1 - a_t) * x0` (`DDPMScheduler.get_velocity`): `[B, ...]`."""
    signal, noise_scale = self._signal_and_noise_scales(timesteps, x0)
    return signal * noise - noise_scale * x0

  def training_target(self, x0: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """What the model is trained to predict at `add_noise(x0, noise, timesteps)`: `[B, ...]`.

    The noise for "epsilon", the velocity for "v_prediction", x0 for "sample".
    """
    if self.prediction_type == "epsilon":
      return noise
    if self.prediction_type == "v_prediction":
      return self.velocity(x0, noise, timesteps)
    return x0
