"""Independent PyTorch references of the vision stack (SPEC sections 3 and 4), for the tests.

Built from transformers' CLIP modules, torch's convolutions, norms and `F.interpolate`, and the
grid_sample-based deformable attention of `torch_references`. Module attribute names are the
release's, so `state_dict()` has the released checkpoint's keys (under `visual_tokenizer.` when
the whole tokenizer is built). Nothing here imports mmi_jax.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel, CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPEncoder, CLIPVisionEmbeddings

from torch_references import ms_deform_attn_reference


def qformer_reference(state, query_embeds, encoder_hidden_states, *, num_layers, num_heads,
                      cross_attention_frequency, eps, qk_normalization, encoder_mask=None):
  """BLIP-2's Q-Former on query tokens, from a `Blip2QFormerModel`-named state dict.

  With `qk_normalization`, each head's queries and keys pass a LayerNorm over head_dim
  (`...attention.q_norm` / `k_norm`), in self- and cross-attention (the release's patch).
  encoder_mask `[B, S]`: 1 = attend.
  """
  def linear(x, name):
    return F.linear(x, state[name + ".weight"], state[name + ".bias"])

  def layer_norm(x, name):
    return F.layer_norm(x, x.shape[-1:], state[name + ".weight"], state[name + ".bias"], eps)

  def attention(x, source, name, mask):
    batch, length, width = x.shape
    head_dim = width // num_heads
    split = lambda t: t.view(t.shape[0], t.shape[1], num_heads, head_dim).transpose(1, 2)  # noqa
    query = split(linear(x, f"{name}.attention.query"))
    key = split(linear(source, f"{name}.attention.key"))
    value = split(linear(source, f"{name}.attention.value"))
    if qk_normalization:
      query = layer_norm(query, f"{name}.attention.q_norm")
      key = layer_norm(key, f"{name}.attention.k_norm")
    scores = query @ key.transpose(-1, -2) / math.sqrt(head_dim)
    if mask is not None:
      scores = scores.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
    context = (scores.softmax(-1) @ value).transpose(1, 2).reshape(batch, length, width)
    return layer_norm(linear(context, f"{name}.output.dense") + x, f"{name}.output.LayerNorm")

  x = layer_norm(query_embeds, "layernorm")
  for index in range(num_layers):
    prefix = f"encoder.layer.{index}"
    x = attention(x, x, f"{prefix}.attention", None)
    if index % cross_attention_frequency == 0:
      x = attention(x, encoder_hidden_states, f"{prefix}.crossattention", encoder_mask)
    hidden = F.gelu(linear(x, f"{prefix}.intermediate_query.dense"))
    x = layer_norm(linear(hidden, f"{prefix}.output_query.dense") + x,
                   f"{prefix}.output_query.LayerNorm")
  return x


def reference_points(shapes):
  points = []
  for height, width in shapes:
    ys, xs = torch.meshgrid(torch.linspace(0.5, height - 0.5, height) / height,
                            torch.linspace(0.5, width - 0.5, width) / width, indexing="ij")
    points.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], -1))
  return torch.cat(points)[None, :, None]


class DeformAttn(nn.Module):
  def __init__(self, dim, levels, heads, points, ratio):
    super().__init__()
    self.levels, self.heads, self.points = levels, heads, points
    self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
    self.attention_weights = nn.Linear(dim, heads * levels * points)
    self.value_proj = nn.Linear(dim, int(dim * ratio))
    self.output_proj = nn.Linear(int(dim * ratio), dim)

  def forward(self, query, points, feat, shapes):
    params = {name: value for name, value in self.named_parameters()}
    return ms_deform_attn_reference(params, query, points, feat, shapes, num_heads=self.heads,
                                    num_levels=self.levels, num_points=self.points)


class ChannelsFirstLayerNorm(nn.Module):
  def __init__(self, channels, eps):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(channels))
    self.bias = nn.Parameter(torch.zeros(channels))
    self.eps = eps

  def forward(self, x):  # [B, C, H, W], normalized over C in float32
    x32 = x.float()
    mean = x32.mean(1, keepdim=True)
    var = (x32 - mean).pow(2).mean(1, keepdim=True)
    out = (x32 - mean) / torch.sqrt(var + self.eps)
    return (self.weight[:, None, None] * out + self.bias[:, None, None]).to(x.dtype)


class SpatialPrior(nn.Module):
  def __init__(self, inplanes, dim, eps=1e-6):
    super().__init__()
    conv = lambda i, o, s: nn.Conv2d(i, o, 3, s, 1, bias=False)  # noqa: E731
    norm = lambda c: ChannelsFirstLayerNorm(c, eps)  # noqa: E731
    self.stem = nn.Sequential(conv(3, inplanes, 2), norm(inplanes), nn.ReLU(),
                              conv(inplanes, inplanes, 1), norm(inplanes), nn.ReLU(),
                              conv(inplanes, inplanes, 1), norm(inplanes), nn.ReLU(),
                              nn.MaxPool2d(3, 2, 1))
    self.conv2 = nn.Sequential(conv(inplanes, 2 * inplanes, 2), norm(2 * inplanes), nn.ReLU())
    self.conv3 = nn.Sequential(conv(2 * inplanes, 4 * inplanes, 2), norm(4 * inplanes),
                               nn.ReLU())
    self.conv4 = nn.Sequential(conv(4 * inplanes, 4 * inplanes, 2), norm(4 * inplanes),
                               nn.ReLU())
    for index, channels in enumerate((inplanes, 2 * inplanes, 4 * inplanes, 4 * inplanes), 1):
      setattr(self, f"fc{index}", nn.Conv2d(channels, dim, 1))

  def forward(self, x):
    c1 = self.stem(x)
    c2 = self.conv2(c1)
    c3 = self.conv3(c2)
    c4 = self.conv4(c3)
    return self.fc1(c1), self.fc2(c2), self.fc3(c3), self.fc4(c4)


class DWConv(nn.Module):
  def __init__(self, channels):
    super().__init__()
    self.dwconv = nn.Conv2d(channels, channels, 3, 1, 1, groups=channels)

  def forward(self, tokens, shapes):
    outputs, start = [], 0
    for height, width in shapes:
      part = tokens[:, start:start + height * width]
      start += height * width
      grid = part.transpose(1, 2).reshape(part.shape[0], -1, height, width)
      outputs.append(self.dwconv(grid).flatten(2).transpose(1, 2))
    return torch.cat(outputs, 1)


class ConvFFN(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.dwconv = DWConv(hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, tokens, shapes):
    return self.fc2(F.gelu(self.dwconv(self.fc1(tokens), shapes)))


class Injector(nn.Module):
  def __init__(self, dim, heads, points, ratio, eps):
    super().__init__()
    self.gamma = nn.Parameter(torch.zeros(dim))
    self.query_norm = nn.LayerNorm(dim, eps=eps)
    self.feat_norm = nn.LayerNorm(dim, eps=eps)
    self.attn = DeformAttn(dim, 3, heads, points, ratio)

  def forward(self, query, points, feat, shapes):
    return query + self.gamma * self.attn(self.query_norm(query), points, self.feat_norm(feat),
                                          shapes)


class Extractor(nn.Module):
  def __init__(self, dim, heads, points, ratio, eps, ffn_ratio):
    super().__init__()
    self.query_norm = nn.LayerNorm(dim, eps=eps)
    self.feat_norm = nn.LayerNorm(dim, eps=eps)
    self.attn = DeformAttn(dim, 1, heads, points, ratio)
    self.ffn = ConvFFN(dim, int(dim * ffn_ratio))
    self.ffn_norm = nn.LayerNorm(dim, eps=eps)

  def forward(self, query, points, feat, feat_shapes, query_shapes):
    query = query + self.attn(self.query_norm(query), points, self.feat_norm(feat), feat_shapes)
    return query + self.ffn(self.ffn_norm(query), query_shapes)


class Interaction(nn.Module):
  def __init__(self, dim, heads, points, ratio, eps, ffn_ratio, extra):
    super().__init__()
    self.injector = Injector(dim, heads, points, ratio, eps)
    self.extractor = Extractor(dim, heads, points, ratio, eps, ffn_ratio)
    if extra:
      self.extra_extractors = nn.Sequential(*[Extractor(dim, heads, points, ratio, eps,
                                                        ffn_ratio) for _ in range(extra)])


class ViTAdapter(nn.Module):
  """SPEC section 3: CLIP ViT (transformers' modules) + ViT-Adapter, NCHW, release names."""

  def __init__(self, config: CLIPVisionConfig, *, interaction_indexes, conv_inplane,
               adapter_heads, points=4, ratio=0.5, ffn_ratio=0.25, eps=1e-5, extra=2):
    super().__init__()
    dim = config.hidden_size
    self.config, self.interaction_indexes = config, interaction_indexes
    self.embeddings = CLIPVisionEmbeddings(config)
    self.pre_layrnorm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
    self.encoder = CLIPEncoder(config)
    self.adapter_level_embed = nn.Parameter(torch.zeros(3, dim))
    self.adapter_spm = SpatialPrior(conv_inplane, dim)
    last = len(interaction_indexes) - 1
    self.adapter_interactions = nn.Sequential(*[
        Interaction(dim, adapter_heads, points, ratio, eps, ffn_ratio, extra if i == last else 0)
        for i in range(len(interaction_indexes))])
    self.adapter_up = nn.ConvTranspose2d(dim, dim, 2, 2)

  def forward(self, pixels):  # [B, 3, H, W], normalized
    batch, dim = pixels.shape[0], self.config.hidden_size
    grid = self.config.image_size // self.config.patch_size
    hidden = self.pre_layrnorm(self.embeddings(pixels))
    prior = F.interpolate(pixels, size=(16 * grid, 16 * grid), mode="bilinear",
                          align_corners=False)
    c1, c2, c3, c4 = self.adapter_spm(prior)
    tokens = lambda m: m.flatten(2).transpose(1, 2)  # noqa: E731
    pyramid = torch.cat([tokens(c2) + self.adapter_level_embed[0],
                         tokens(c3) + self.adapter_level_embed[1],
                         tokens(c4) + self.adapter_level_embed[2]], 1)
    pyramid_shapes = [(2 * grid, 2 * grid), (grid, grid), (grid // 2, grid // 2)]
    patch_shapes = [(grid, grid)]
    patch_points, pyramid_points = reference_points(patch_shapes), reference_points(
        pyramid_shapes)
    cls, x = hidden[:, :1], hidden[:, 1:]
    outs = []
    for block, (start, stop) in zip(self.adapter_interactions, self.interaction_indexes):
      x = block.injector(x, patch_points, pyramid, pyramid_shapes)
      x = torch.cat([cls, x], 1)
      for layer in self.encoder.layers[start:stop + 1]:
        x = layer(x, None)
      cls, x = x[:, :1], x[:, 1:]
      extractors = [block.extractor] + list(getattr(block, "extra_extractors", []))
      for extractor in extractors:
        pyramid = extractor(pyramid, pyramid_points, x, patch_shapes, pyramid_shapes)
      outs.append(x.transpose(1, 2).reshape(batch, dim, grid, grid))
    sizes = [h * w for h, w in pyramid_shapes]
    c2, c3, c4 = (part.transpose(1, 2).reshape(batch, dim, h, w)
                  for part, (h, w) in zip(pyramid.split(sizes, 1), pyramid_shapes))
    c1 = self.adapter_up(c2) + c1
    x1, x2, x3, x4 = outs
    last_hidden = torch.cat([cls, x4.flatten(2).transpose(1, 2)], 1)
    resized = [F.interpolate(x1, scale_factor=4, mode="bilinear", align_corners=False),
               F.interpolate(x2, scale_factor=2, mode="bilinear", align_corners=False), x3,
               F.interpolate(x4, scale_factor=0.5, mode="bilinear", align_corners=False)]
    maps = [c + r for c, r in zip((c1, c2, c3, c4), resized)]
    return last_hidden, maps


class EncoderWrapper(nn.Module):  # Hugging Face's model wrapper: `encoder.vision_model.`
  def __init__(self, vision_model):
    super().__init__()
    self.vision_model = vision_model


def sincos_2d_reference(dim, grid):
  """MAE's 2-D table, written out: [row half | column half], each [sin | cos]."""
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  parts = []
  for coordinate in (rows.reshape(-1), cols.reshape(-1)):
    angles = coordinate[:, None] * omega[None]
    parts += [np.sin(angles), np.cos(angles)]
  return np.concatenate([np.zeros((1, dim)), np.concatenate(parts, 1)], 0)


class PerceiverResampler(nn.Module):
  def __init__(self, qformer_config: Blip2QFormerConfig, num_queries, qk_normalization):
    super().__init__()
    self.blip2qformer = Blip2QFormerModel(qformer_config)
    self.queries = nn.Parameter(torch.randn(1, num_queries, qformer_config.hidden_size) * 0.02)
    self.qk_normalization = qk_normalization
    self.qformer_config = qformer_config
    if qk_normalization:  # the release's extra per-head LayerNorms
      head_dim = qformer_config.hidden_size // qformer_config.num_attention_heads
      for layer in self.blip2qformer.encoder.layer:
        for block in [layer.attention] + ([layer.crossattention]
                                          if hasattr(layer, "crossattention") else []):
          block.attention.q_norm = nn.LayerNorm(head_dim, eps=qformer_config.layer_norm_eps)
          block.attention.k_norm = nn.LayerNorm(head_dim, eps=qformer_config.layer_norm_eps)

  def forward(self, encoder_hidden_states):
    config = self.qformer_config
    queries = self.queries.expand(encoder_hidden_states.shape[0], -1, -1)
    return qformer_reference(
        dict(self.blip2qformer.named_parameters()), queries, encoder_hidden_states,
        num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
        cross_attention_frequency=config.cross_attention_frequency, eps=config.layer_norm_eps,
        qk_normalization=self.qk_normalization)


class VisualTokenizer(nn.Module):
  """SPEC section 4, with the release's module names (`encoder.vision_model.*`, ...)."""

  def __init__(self, adapter: ViTAdapter, qformer_config: Blip2QFormerConfig, *, num_queries,
               qk_normalization, llm_width, pos_grid):
    super().__init__()
    dim = adapter.config.hidden_size
    self.encoder = EncoderWrapper(adapter)
    self.pos_proj = nn.Linear(dim, dim)
    self.pos_ln = nn.LayerNorm(dim, eps=1e-6)
    self.pos_embed = nn.Parameter(torch.tensor(sincos_2d_reference(dim, pos_grid),
                                               dtype=torch.float32), requires_grad=False)
    self.perceiver_resampler = PerceiverResampler(qformer_config, num_queries, qk_normalization)
    self.post_ln = nn.LayerNorm(dim, eps=1e-6)
    self.proj = nn.Linear(qformer_config.hidden_size, llm_width)
    self.pos_grid = pos_grid
    self.register_buffer("clip_mean", torch.tensor([0.48145466, 0.4578275,
                                                    0.40821073]).view(1, 3, 1, 1))
    self.register_buffer("clip_std", torch.tensor([0.26862954, 0.26130258,
                                                   0.27577711]).view(1, 3, 1, 1))

  def positions(self, side):
    table = self.pos_embed[1:].reshape(1, self.pos_grid, self.pos_grid, -1).permute(0, 3, 1, 2)
    if side != self.pos_grid:
      table = F.interpolate(table, size=(side, side), mode="bicubic", align_corners=False)
    return table[0]  # [D, side, side]

  def forward(self, images):  # [B, 3, H, W] in [0, 1]
    pixels = (images - self.clip_mean) / self.clip_std
    last_hidden, maps = self.encoder.vision_model(pixels)
    maps = [m + self.positions(m.shape[-1]) for m in maps]
    grid = math.isqrt(last_hidden.shape[1] - 1)
    patch_positions = self.positions(grid).flatten(1).T
    positions = torch.cat([self.pos_embed[:1], patch_positions], 0)
    qformer_inputs = self.post_ln(self.pos_ln(self.pos_proj(last_hidden)) + positions)
    vis_embed = self.proj(self.perceiver_resampler(qformer_inputs))
    return vis_embed, (last_hidden + positions)[:, 1:], maps


def perturb_(module: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
  """Adds noise to every parameter, so zero-initialised parts (gamma, offsets) do matter."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for param in module.parameters():
      param.add_(torch.randn(param.shape, generator=generator) * scale)
  return module
