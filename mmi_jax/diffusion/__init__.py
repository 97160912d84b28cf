"""Diffusion for the image decoder: the noise schedule (training) and samplers (inference).

`NoiseSchedule` holds diffusers' beta / alpha tables and the forward process; `sample` runs
diffusers' DDPM, DDIM or DPM-Solver++ loop as one `lax.scan`.
"""

from mmi_jax.diffusion.noise_schedule import NoiseSchedule
from mmi_jax.diffusion.samplers import (SAMPLERS, SamplingPlan, inference_timesteps, make_plan,
                                        run_plan, sample)

__all__ = ["NoiseSchedule", "SAMPLERS", "SamplingPlan", "inference_timesteps", "make_plan",
           "run_plan", "sample"]
