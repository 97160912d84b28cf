"""Independent PyTorch references, written from SPEC.md and torch's own ops, for the tests.

Nothing here imports mmi_jax: these are what the JAX code is checked against.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def multi_scale_grid_sample(value, spatial_shapes, sampling_locations, attention_weights):
  """Deformable sampling through `torch.nn.functional.grid_sample`, one level at a time.

  value `[B, S, H, D]`, sampling_locations `[B, Q, H, L, P, 2]` in [0, 1] (x, y),
  attention_weights `[B, Q, H, L, P]` -> `[B, Q, H * D]`.
  """
  batch, _, heads, head_dim = value.shape
  _, queries, _, levels, points, _ = sampling_locations.shape
  per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
  grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1] coordinates
  samples = []
  for level, (height, width) in enumerate(spatial_shapes):
    # [B, H*W, heads, D] -> [B * heads, D, H, W]
    level_value = per_level[level].permute(0, 2, 3, 1).reshape(batch * heads, head_dim, height,
                                                               width)
    # [B, Q, heads, P, 2] -> [B * heads, Q, P, 2]
    level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
    samples.append(F.grid_sample(level_value, level_grid, mode="bilinear",
                                 padding_mode="zeros", align_corners=False))  # [B*h, D, Q, P]
  stacked = torch.stack(samples, dim=-2).flatten(-2)  # [B * heads, D, Q, L * P]
  weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
  output = (stacked * weights).sum(-1).view(batch, heads * head_dim, queries)
  return output.transpose(1, 2)


def mmfs_reference(params, query, reference_points, values, image_mask, *, num_heads,
                   num_points, scale_sizes, base_spatial_shape, offset_scale_sizes=None):
  """SPEC section 6, step by step, the naive way (q' is built for every image).

  params: torch tensors in PyTorch layout (Linear weight `[out, in]`): value_proj,
  dynamic_offset_mask, sampling_offsets, attention_weights, output_proj (each `.weight` and
  `.bias`), `query_relpos.weight [max_images, Dq]`, `ignore_token [attention_dim]`.
  query `[B, Lq, Dq]`, reference_points `[B|1, Lq, 2]`, values `[B, N, S, Dv]`, image_mask
  `[B, N]` or `[B, Lq, N]` (1 = visible). Returns `[B, Lq, d_out]`. Offsets on scale k are
  multiplied by `offset_scale_sizes[k] / base_spatial_shape` (the sizes the original module is
  built with; default `scale_sizes`).
  """
  linear = lambda x, name: F.linear(x, params[name + ".weight"], params[name + ".bias"])  # noqa
  batch, queries, _ = query.shape
  num_images = values.shape[1]
  scales = len(scale_sizes)
  heads, points = num_heads, num_points
  attention_dim = params["value_proj.weight"].shape[0]
  head_dim = attention_dim // heads
  mask = image_mask.to(query.dtype)
  mask3 = mask[:, None, :].expand(batch, queries, num_images) if mask.ndim == 2 else mask

  # 1. relative image index.
  m = mask3.long()
  relpos = (m.sum(-1, keepdim=True) + 1 - m.cumsum(-1)) * m  # [B, Lq, N]
  # 2. values.
  value = linear(values, "value_proj").reshape(batch, num_images * values.shape[2], heads,
                                               head_dim)
  # 3. q' per image: [B, N, Lq, Dq].
  q_prime = linear(query, "dynamic_offset_mask")[:, None].expand(-1, num_images, -1, -1)
  q_prime = q_prime + params["query_relpos.weight"][relpos.transpose(1, 2)]
  # 4. offsets per image, shared by its scales, scaled per scale.
  offsets = linear(q_prime, "sampling_offsets").view(batch, num_images, queries, heads, points, 2)
  locations = torch.empty(batch, queries, heads, num_images, scales, points, 2,
                          dtype=query.dtype)
  ratio_sizes = offset_scale_sizes or scale_sizes
  for n in range(num_images):
    for k, size in enumerate(scale_sizes):
      scaled = offsets[:, n] * (ratio_sizes[k] / base_spatial_shape)  # [B, Lq, H, P, 2]
      locations[:, :, :, n, k] = (reference_points[:, :, None, None, :]
                                  + scaled / torch.tensor([size, size], dtype=query.dtype))
  locations = locations.reshape(batch, queries, heads, num_images * scales, points, 2)
  # 5. logits, mask, ignore slot, one softmax per (query, head).
  logits = linear(q_prime, "attention_weights").view(batch, num_images, queries, heads, scales,
                                                      points + 1)
  logits = logits.permute(0, 2, 3, 1, 4, 5).clone()  # [B, Lq, H, N, K, P+1]
  logits = logits + ((1.0 - mask3) * -10000.0)[:, :, None, :, None, None]
  logits[..., -1] = -math.log(num_images * scales)
  weights = torch.softmax(logits.reshape(batch, queries, heads, -1), dim=-1)
  weights = weights.view(batch, queries, heads, num_images * scales, points + 1)
  # 6. sampling with grid_sample semantics.
  spatial_shapes = [(s, s) for s in scale_sizes] * num_images
  sampled = multi_scale_grid_sample(value, spatial_shapes, locations, weights[..., :points])
  # The ignore slots multiply the ignore token.
  ignore_token = params["ignore_token"].view(heads, head_dim)
  ignored = (weights[..., points:] * ignore_token[None, None, :, None, :]).sum(-2)
  # 7. output projection.
  return linear(sampled + ignored.reshape(batch, queries, attention_dim), "output_proj")


def sincos_2d_table(dim, grid_size):
  """MAE's 2-D sin-cos table `[grid_size ** 2, dim]`: the first half encodes the row, the
  second the column, each as `[sin(p w_k), cos(p w_k)]`, `w_k = 10000 ** (-2k / (dim / 2))`."""
  def one_d(positions, width):
    omega = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float64) / (width / 2))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)
  rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
  table = torch.cat([one_d(rows.reshape(-1), dim // 2), one_d(cols.reshape(-1), dim // 2)], 1)
  return table.float()


def mmfs_block_reference(params, sample, features, image_mask, *, eps, num_heads, num_points,
                         scale_sizes, offset_scale_sizes, base_spatial_shape):
  """The release's `MMFSBlock` (SPEC 7) written from its description, NCHW like the original.

  params: torch tensors: `query_norm.{weight,bias}`, `feat_norm.{weight,bias}`, `pos_embed
  [G * G, C]`, `conv.{weight [C, C, 1, 1], bias}` and the MMFS params under `mmfs.`.
  sample `[B, C, H, W]` (square), features `[B, N, S, Dv]`, image_mask `[B, N]`.
  Returns the residual `[B, C, H, W]`.
  """
  batch, channels, height, width = sample.shape
  query = sample.flatten(2).transpose(1, 2)  # [B, H*W, C], row-major
  query = F.layer_norm(query, (channels,), params["query_norm.weight"],
                       params["query_norm.bias"], eps)
  table = params["pos_embed"]
  grid = int(round(math.sqrt(table.shape[0])))
  if grid != height:
    table = F.interpolate(table.reshape(1, grid, grid, channels).permute(0, 3, 1, 2),
                          size=(height, width), mode="bicubic", align_corners=False)
    table = table.permute(0, 2, 3, 1).reshape(height * width, channels)
  query = query + table
  values = F.layer_norm(features, (features.shape[-1],), params["feat_norm.weight"],
                        params["feat_norm.bias"], eps)
  ys, xs = torch.meshgrid((torch.arange(height) + 0.5) / height,
                          (torch.arange(width) + 0.5) / width, indexing="ij")
  reference_points = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)[None].float()
  mmfs_params = {k[len("mmfs."):]: v for k, v in params.items() if k.startswith("mmfs.")}
  attended = mmfs_reference(mmfs_params, query, reference_points, values, image_mask,
                            num_heads=num_heads, num_points=num_points, scale_sizes=scale_sizes,
                            base_spatial_shape=base_spatial_shape,
                            offset_scale_sizes=offset_scale_sizes)
  attended = attended.transpose(1, 2).reshape(batch, channels, height, width)
  return F.conv2d(attended, params["conv.weight"], params["conv.bias"])


def perturb(model, generator, scale=0.05):
  """Adds `scale * N(0, 1)` to every parameter (diffusers zero-initialises some layers, which
  would make them invisible to a comparison); returns the model in eval mode."""
  with torch.no_grad():
    for param in model.parameters():
      param.add_(scale * torch.randn(param.shape, generator=generator))
  return model.eval()


def to_torch(x, dtype=torch.float32):
  return torch.from_numpy(np.array(x, dtype=np.float32)).to(dtype)


def ms_deform_attn_reference(params, query, reference_points, values, spatial_shapes, *,
                             num_heads, num_levels, num_points, padding_mask=None):
  """Deformable DETR's `MSDeformAttn.forward`, written from the paper's definition.

  params: PyTorch-layout `value_proj`, `sampling_offsets`, `attention_weights`, `output_proj`
  (`.weight`, `.bias`). query `[B, Lq, C]`, reference_points `[B|1, Lq, L|1, 2 or 4]`,
  values `[B, S, C]`, padding_mask `[B, S]` (True = padding). Returns `[B, Lq, C]`.
  """
  linear = lambda x, name: F.linear(x, params[name + ".weight"], params[name + ".bias"])  # noqa
  batch, queries, _ = query.shape
  value = linear(values, "value_proj")
  if padding_mask is not None:
    value = value.masked_fill(padding_mask[..., None], 0.0)
  value = value.view(batch, values.shape[1], num_heads, -1)
  offsets = linear(query, "sampling_offsets").view(batch, queries, num_heads, num_levels,
                                                   num_points, 2)
  weights = torch.softmax(linear(query, "attention_weights").view(batch, queries, num_heads, -1),
                          -1).view(batch, queries, num_heads, num_levels, num_points)
  reference = reference_points.expand(batch, queries, num_levels, reference_points.shape[-1])
  if reference.shape[-1] == 2:
    normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype)
    locations = reference[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :,
                                                                          None, :]
  else:
    locations = (reference[:, :, None, :, None, :2]
                 + offsets / num_points * reference[:, :, None, :, None, 2:] * 0.5)
  sampled = multi_scale_grid_sample(value, spatial_shapes, locations, weights)
  return linear(sampled, "output_proj")
