"""Benchmark of the Flax Stable Diffusion UNet against diffusers' PyTorch `UNet2DConditionModel`.

Both run the same weights: a random diffusers UNet of a small SD 2.x-style config (linear
projections, per-block head counts, CrossAttnDownBlock2D x3 + DownBlock2D, UpBlock2D +
CrossAttnUpBlock2D x3; diffusers' zero-initialised layers perturbed so the output is not
trivially zero) is saved with `save_pretrained` and loaded through
`mmi_jax.convert.diffusers.load_unet`. Reported, in the same run on the same machine, float32:

  * one UNet evaluation: `batch` latents `[batch, 4, latent, latent]` (channels-last in JAX),
    conditioning `[batch, 77, cross_dim]`; jitted in JAX, `torch.no_grad()` in torch;
  * a `steps`-step classifier-free-guided sampling loop (guidance 7.5, so the UNet runs on
    `2 * batch` latents each step) with the DDPM scheduler of Stable Diffusion 2.1-base's
    scheduler config: in torch the diffusers loop (`DDPMScheduler.set_timesteps` + `step`
    with a generator), in JAX `mmi_jax.diffusion.samplers.sample(..., sampler="ddpm")`, one
    `lax.scan` inside one `jax.jit`. Per loop and per step.
  * JAX's compile times (lower + compile, not included in the medians);
  * checks that both sides compute the same function: the maximum relative difference of the
    two UNets' outputs on the benchmark inputs, and of the final latents of the sampling loop
    when the JAX loop is fed torch's per-step noise draws (`step_noise`; one more compile and
    loop, skip with `--no-loop-check`).

Times are medians of `--repeats` runs after a warm-up run. Everything runs on the CPU; torch
uses its default thread count unless `--torch-threads` is given. On a shared machine torch's
OpenMP threads degrade badly when another process takes a core (a 30-step loop went from 10 s
to 130 s on 2 cores), so the script prints the load average before and after.

  python experiments/bench_unet.py            # CPU-sized defaults (~2.5 minutes on 2 cores)
  python experiments/bench_unet.py --channels=320,640,1280,1280 --heads=5,10,20,20 \
      --cross-dim=1024 --latent=64            # SD 2.1-base sizes (slow on a CPU)
  python experiments/bench_unet.py --channels=32,32,64,64 --heads=2,2,4,4 --cross-dim=32 \
      --latent=8 --steps=3 --repeats=1        # smoke test
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mmi_jax.convert.diffusers import load_unet  # noqa: E402
from mmi_jax.diffusion.noise_schedule import NoiseSchedule  # noqa: E402
from mmi_jax.diffusion.samplers import sample  # noqa: E402
from timing import median_seconds  # noqa: E402

# Stable Diffusion 2.1-base's scheduler/scheduler_config.json.
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None}
GUIDANCE_SCALE = 7.5
TEXT_LENGTH = 77
LATENT_CHANNELS = 4


def _ints(text):
  return tuple(int(v) for v in text.split(","))


def _torch_unet(args, directory):
  """A random SD 2.x-style diffusers UNet, saved to `directory`."""
  import torch  # noqa: PLC0415
  from diffusers import UNet2DConditionModel  # noqa: PLC0415

  levels = len(args.channels)
  torch.manual_seed(0)
  model = UNet2DConditionModel(
      sample_size=args.latent, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
      layers_per_block=args.layers_per_block, block_out_channels=args.channels,
      attention_head_dim=args.heads, cross_attention_dim=args.cross_dim,
      norm_num_groups=args.groups, use_linear_projection=True,
      down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1))
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():  # diffusers zero-initialises conv_out and the attention proj_outs
    for param in model.parameters():
      param.add_(0.02 * torch.randn(param.shape, generator=generator))
  model.eval()
  model.save_pretrained(directory)
  return model


def _bench_torch(model, latents, cond, neg, steps, repeats):
  """Returns (s per UNet call, s per sampling loop, output of one call NCHW, loop output NCHW,
  the loop's step noise [S, B, C, H, W] as the generator draws it)."""
  import torch  # noqa: PLC0415
  from diffusers import DDPMScheduler  # noqa: PLC0415

  latents, cond, neg = (torch.from_numpy(a) for a in (latents, cond, neg))
  timestep = torch.tensor(500)
  outputs = {}  # the last output of each (all runs give the same)

  def call():
    with torch.no_grad():
      outputs["call"] = model(latents, timestep, encoder_hidden_states=cond).sample

  scheduler = DDPMScheduler.from_config(SCHEDULER_CONFIG)
  conditioning = torch.cat([neg, cond])

  def loop():
    generator = torch.Generator().manual_seed(0)
    scheduler.set_timesteps(steps)
    x = latents.clone()
    with torch.no_grad():
      for t in scheduler.timesteps:
        noise_pred = model(torch.cat([x] * 2), t, encoder_hidden_states=conditioning).sample
        uncond, text = noise_pred.chunk(2)
        noise_pred = uncond + GUIDANCE_SCALE * (text - uncond)
        x = scheduler.step(noise_pred, t, x, generator=generator).prev_sample
    outputs["loop"] = x

  # What `scheduler.step` draws (`randn_tensor`, at every timestep > 0), for the loop check.
  generator = torch.Generator().manual_seed(0)
  scheduler.set_timesteps(steps)
  step_noise = np.stack([torch.randn(latents.shape, generator=generator).numpy() if t > 0
                         else np.zeros(latents.shape, np.float32) for t in scheduler.timesteps])
  call_s, loop_s = median_seconds(call, repeats), median_seconds(loop, repeats)
  return call_s, loop_s, outputs["call"].numpy(), outputs["loop"].numpy(), step_noise


def _compiled(fn, *args):
  """`jax.jit(fn)` lowered and compiled for `args`, and the seconds that took."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


def _bench_jax(module, params, latents, cond, neg, steps, repeats, step_noise=None):
  """Returns (s per UNet call, s per loop, compile s of each, output of one call NHWC, and the
  loop's output NHWC with `step_noise` [S, B, C, H, W] (torch's draws) if given, else None)."""
  schedule = NoiseSchedule.from_diffusers(SCHEDULER_CONFIG)
  latents = jnp.asarray(latents.transpose(0, 2, 3, 1))
  cond, neg = jnp.asarray(cond), jnp.asarray(neg)
  batch = latents.shape[0]

  def call(params, latents, cond):
    timesteps = jnp.full((batch,), 500, jnp.int32)
    return module.apply({"params": params}, latents, timesteps, cond)

  def loop(params, latents, cond, neg, rng=None, step_noise=None):
    conditioning = jnp.concatenate([neg, cond])

    def denoise(x, t):
      x2 = jnp.concatenate([x, x])
      output = module.apply({"params": params}, x2, jnp.full((2 * batch,), t), conditioning)
      uncond, text = jnp.split(output, 2)
      return uncond + GUIDANCE_SCALE * (text - uncond)

    return sample(denoise, latents, schedule=schedule, sampler="ddpm", num_steps=steps, rng=rng,
                  step_noise=step_noise)

  rng = jax.random.key(0)
  call_compiled, call_compile_s = _compiled(call, params, latents, cond)
  loop_compiled, loop_compile_s = _compiled(loop, params, latents, cond, neg, rng)
  outputs = {}

  def run_call():
    outputs["call"] = jax.block_until_ready(call_compiled(params, latents, cond))

  call_s = median_seconds(run_call, repeats)
  loop_s = median_seconds(
      lambda: jax.block_until_ready(loop_compiled(params, latents, cond, neg, rng)), repeats)
  loop_output = None
  if step_noise is not None:  # the same loop driven by torch's noise draws: one more compile
    step_noise = jnp.asarray(step_noise.transpose(0, 1, 3, 4, 2))
    loop_output = np.asarray(jax.jit(loop)(params, latents, cond, neg, step_noise=step_noise))
  return call_s, loop_s, call_compile_s, loop_compile_s, np.asarray(outputs["call"]), loop_output


def _relative_difference(ours_nhwc, reference_nchw):
  reference = reference_nchw.transpose(0, 2, 3, 1)
  return float(np.max(np.abs(ours_nhwc - reference)) / np.max(np.abs(reference)))


def _cpu_name():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _git_commit():
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--channels", type=_ints, default=(64, 128, 256, 256),
                      help="block_out_channels")
  parser.add_argument("--heads", type=_ints, default=(2, 4, 8, 8),
                      help="attention heads per block (diffusers' attention_head_dim)")
  parser.add_argument("--cross-dim", dest="cross_dim", type=int, default=256)
  parser.add_argument("--layers-per-block", dest="layers_per_block", type=int, default=2)
  parser.add_argument("--groups", type=int, default=32, help="norm_num_groups")
  parser.add_argument("--latent", type=int, default=32, help="latent side")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--torch-threads", dest="torch_threads", type=int, default=0,
                      help="0: torch's default")
  parser.add_argument("--no-loop-check", dest="loop_check", action="store_false",
                      help="skip re-running the JAX loop with torch's noise (one more compile)")
  args = parser.parse_args()
  if len(args.heads) != len(args.channels):
    parser.error("--heads needs one entry per --channels entry")

  import diffusers  # noqa: PLC0415
  import torch  # noqa: PLC0415
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)

  rng = np.random.default_rng(0)
  latents = rng.standard_normal((args.batch, LATENT_CHANNELS, args.latent, args.latent),
                                np.float32)
  cond = rng.standard_normal((args.batch, TEXT_LENGTH, args.cross_dim), np.float32)
  neg = rng.standard_normal((args.batch, TEXT_LENGTH, args.cross_dim), np.float32)

  with tempfile.TemporaryDirectory() as directory:
    model = _torch_unet(args, directory)
    module, params = load_unet(directory)
  parameters = sum(p.numel() for p in model.parameters())

  start, load_before = time.perf_counter(), os.getloadavg()
  torch_call, torch_loop, torch_output, torch_loop_output, step_noise = _bench_torch(
      model, latents, cond, neg, args.steps, args.repeats)
  jax_call, jax_loop, call_compile, loop_compile, jax_output, jax_loop_output = _bench_jax(
      module, params, latents, cond, neg, args.steps, args.repeats,
      step_noise if args.loop_check else None)
  elapsed, load_after = time.perf_counter() - start, os.getloadavg()

  print(f"Machine: {platform.platform()}, {_cpu_name()}, "
        f"{os.cpu_count()} CPUs; jax {jax.__version__} on {jax.devices()[0].device_kind}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), diffusers "
        f"{diffusers.__version__}; commit {_git_commit()}")
  print(f"Command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`")
  print(f"Config: block_out_channels {args.channels}, heads {args.heads}, cross_attention_dim "
        f"{args.cross_dim}, layers_per_block {args.layers_per_block}, norm_num_groups "
        f"{args.groups}, {parameters / 1e6:.1f}M parameters; latents {args.batch} x "
        f"{LATENT_CHANNELS} x {args.latent} x {args.latent}, text {TEXT_LENGTH} x "
        f"{args.cross_dim}; float32; medians of {args.repeats} after a warm-up")
  print(f"Benchmark wall time {elapsed:.0f} s (without building the model); "
        f"1-minute load average before / after: {load_before[0]:.2f} / {load_after[0]:.2f}")
  print(f"Check, max |jax - torch| / max |torch|: one UNet call "
        f"{_relative_difference(jax_output, torch_output):.2e}", end="")
  if jax_loop_output is not None:
    print(f"; final latents of the {args.steps}-step loop (JAX fed torch's noise draws) "
          f"{_relative_difference(jax_loop_output, torch_loop_output):.2e}", end="")
  print()
  print()
  print("| | jax | torch | jax/torch |")
  print("|---|---|---|---|")
  rows = [(f"one UNet call, batch {args.batch} (ms)", 1e3 * jax_call, 1e3 * torch_call),
          (f"{args.steps}-step CFG DDPM loop, batch {args.batch} (s)", jax_loop, torch_loop),
          (f"per step, UNet on batch {2 * args.batch} (ms)", 1e3 * jax_loop / args.steps,
           1e3 * torch_loop / args.steps)]
  for name, jax_value, torch_value in rows:
    print(f"| {name} | {jax_value:.4g} | {torch_value:.4g} | {jax_value / torch_value:.2f} |")
  print(f"| compile: UNet call / sampling loop (s) | {call_compile:.1f} / {loop_compile:.1f} "
        f"| - | - |")


if __name__ == "__main__":
  main()
