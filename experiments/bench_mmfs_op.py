"""Benchmark of `mmi_jax.ops.deformable_sample` for the LLM's MMFS, against PyTorch.

The LLM case of MM-Interleaved: 2048 queries, 16 heads of 64 dims, 8 points, 3 scales
(32, 16, 8) per image, 4 / 15 / 30 images (12 / 45 / 90 levels). Each row reports the
forward and forward+backward times of the jitted op, its achieved bandwidth against the
bytes the op must at least move (`minimum_bytes_moved`), and the same two times for the
PyTorch reference (`F.grid_sample` per level, the original's `ms_deform_attn_core_pytorch`)
measured in the same run on the same inputs.

  python experiments/bench_mmfs_op.py                      # full LLM sizes
  python experiments/bench_mmfs_op.py --queries=256        # CPU-sized
  python experiments/bench_mmfs_op.py --dtype=bfloat16 --torch_device=cuda
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
from mmi_jax.ops import deformable_sample  # noqa: E402
from timing import median_seconds  # noqa: E402
from mmi_jax.ops.deformable_sampling import (DEFAULT_GATHER_BUDGET,  # noqa: E402
                                             minimum_bytes_moved)

SCALES = ((32, 32), (16, 16), (8, 8))


def _inputs(batch, queries, heads, head_dim, points, images, seed=0):
  """LLM-like inputs: points around the image centre, offsets as MMFS initialises them."""
  rng = np.random.default_rng(seed)
  spatial_shapes = SCALES * images
  levels = len(spatial_shapes)
  length = sum(h * w for h, w in spatial_shapes)
  value = rng.standard_normal((batch, length, heads, head_dim), np.float32)
  locations = 0.5 + rng.uniform(-3, 3, (batch, queries, heads, levels, points, 2)) / 16
  weights = rng.dirichlet(np.ones(levels * points), (batch, queries, heads))
  weights = weights.reshape(batch, queries, heads, levels, points)
  output_grad = rng.standard_normal((batch, queries, heads * head_dim), np.float32)
  return spatial_shapes, value, locations.astype(np.float32), weights.astype(np.float32), (
      output_grad)


def _time(fn, repeats):
  return 1e3 * median_seconds(fn, repeats)


def bench_jax(spatial_shapes, value, locations, weights, output_grad, dtype, repeats, budget):
  value, output_grad = (jnp.asarray(a, dtype) for a in (value, output_grad))
  locations, weights = jnp.asarray(locations), jnp.asarray(weights)
  forward = jax.jit(lambda v, l, w: deformable_sample(v, spatial_shapes, l, w,
                                                      gather_budget=budget))

  def loss(v, l, w):
    out = deformable_sample(v, spatial_shapes, l, w, gather_budget=budget)
    return jnp.sum(out.astype(jnp.float32) * output_grad.astype(jnp.float32))

  backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  start = time.perf_counter()
  forward.lower(value, locations, weights).compile()
  backward.lower(value, locations, weights).compile()
  compile_s = time.perf_counter() - start
  fwd_ms = _time(lambda: jax.block_until_ready(forward(value, locations, weights)), repeats)
  bwd_ms = _time(lambda: jax.block_until_ready(backward(value, locations, weights)), repeats)
  return fwd_ms, bwd_ms, compile_s


def bench_torch(spatial_shapes, value, locations, weights, output_grad, dtype, repeats, device):
  import torch  # noqa: PLC0415
  from torch_references import multi_scale_grid_sample  # noqa: PLC0415

  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  tensors = [torch.tensor(a, device=device).to(torch_dtype) for a in (value, locations, weights)]
  grad = torch.tensor(output_grad, device=device).to(torch_dtype)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def forward():
    with torch.no_grad():
      multi_scale_grid_sample(tensors[0], spatial_shapes, tensors[1], tensors[2])
    sync()

  def forward_backward():
    leaves = [t.detach().requires_grad_(True) for t in tensors]
    out = multi_scale_grid_sample(leaves[0], spatial_shapes, leaves[1], leaves[2])
    out.backward(grad)
    sync()

  return _time(forward, repeats), _time(forward_backward, repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--queries", type=int, default=2048)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--points", type=int, default=8)
  parser.add_argument("--images", default="4,15,30")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--gather_budget", type=int, default=DEFAULT_GATHER_BUDGET)
  parser.add_argument("--torch_device", default="cpu", help="cpu, cuda, or none to skip")
  args = parser.parse_args()

  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}); "
        f"batch {args.batch}, queries {args.queries}, heads {args.heads}x{args.head_dim}, "
        f"points {args.points}, scales {[h for h, _ in SCALES]}, {args.dtype}, "
        f"gather_budget {args.gather_budget}")
  print("| images | levels | jax fwd ms | fwd GB/s | jax fwd+bwd ms | fwd+bwd GB/s | "
        "compile s | torch fwd ms | torch fwd+bwd ms | speed-up fwd | speed-up fwd+bwd |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for images in (int(n) for n in args.images.split(",")):
    spatial_shapes, *arrays = _inputs(args.batch, args.queries, args.heads, args.head_dim,
                                      args.points, images)
    itemsize = jnp.dtype(args.dtype).itemsize
    value_shape, locations_shape = arrays[0].shape, arrays[1].shape
    fwd_bytes = minimum_bytes_moved(value_shape, locations_shape, itemsize)
    all_bytes = fwd_bytes + minimum_bytes_moved(value_shape, locations_shape, itemsize,
                                                backward=True)
    fwd_ms, bwd_ms, compile_s = bench_jax(spatial_shapes, *arrays, args.dtype, args.repeats,
                                          args.gather_budget)
    row = [images, len(spatial_shapes), f"{fwd_ms:.2f}", f"{fwd_bytes / fwd_ms / 1e6:.1f}",
           f"{bwd_ms:.2f}", f"{all_bytes / bwd_ms / 1e6:.1f}", f"{compile_s:.2f}"]
    if args.torch_device != "none":
      torch_fwd, torch_bwd = bench_torch(spatial_shapes, *arrays, args.dtype, args.repeats,
                                         args.torch_device)
      row += [f"{torch_fwd:.2f}", f"{torch_bwd:.2f}", f"{torch_fwd / fwd_ms:.2f}x",
              f"{torch_bwd / bwd_ms:.2f}x"]
    else:
      row += ["-"] * 4
    print("| " + " | ".join(str(x) for x in row) + " |", flush=True)


if __name__ == "__main__":
  main()
