"""CLIP ViT + ViT-Adapter: the multi-scale image encoder of MM-Interleaved (SPEC section 3).

Mirrors `mm_interleaved/models/encoders/vit_adapter/` (`CLIPVisionTransformerAdapter` and
`adapter_modules.py`). The frozen CLIP ViT runs in four groups of layers; around each group an
interaction block exchanges information with a convolutional feature pyramid:

  * the spatial prior module (SPM) turns the image, bilinearly resized to 16 x the patch grid,
    into maps c1..c4 at strides 4, 8, 16, 32 (of that resized image), projected to the ViT
    width; a learned level embedding is added to c2, c3, c4;
  * the injector lets the patch tokens attend (deformable attention, 3 levels) into [c2, c3, c4]
    and adds the result scaled by `gamma` (initialised to 0, so the ViT starts unchanged);
  * the ViT layers of the group run on [cls, patches];
  * the extractor lets [c2, c3, c4] attend (1 level) into the patch tokens, then applies a
    ConvFFN whose depthwise 3x3 conv runs on each of the three maps (the same weights);
    the last block has two more extractors.

Outputs: the 4 multi-scale maps `c_i + resize(block_i patches, x4, x2, x1, x0.5)` (after
`c1 = ConvTranspose(c2) + c1`), at 4x, 2x, 1x and 0.5x the patch grid, and the last hidden
state `[cls, block-4 patches]`. Maps are channels-last `[B, h, w, D]`.

Param names follow the release's (`adapter_spm/stem_0`,
`adapter_interactions_3/extra_extractors_1/ffn/dwconv/dwconv`, ...) and Hugging Face's for the
ViT, so the state dict maps by the rule in `mmi_jax.convert.torch_names`.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmi_jax import sharding
from mmi_jax.models.clip_vision import CLIPVisionTransformer
from mmi_jax.models.conv import Conv2d, ConvTranspose2d, DepthwiseConv2d
from mmi_jax.models.deformable_attention import MultiScaleDeformableAttention
from mmi_jax.models.linear import Linear
from mmi_jax.models.norms import ChannelsFirstLayerNorm, LayerNorm
from mmi_jax.models.remat import remat_layer
from mmi_jax.ops.resize import resize

SpatialShapes = tuple[tuple[int, int], ...]


def reference_points(spatial_shapes: SpatialShapes) -> np.ndarray:
  """Pixel-centre (x, y) points of each map in `[0, 1]`, maps concatenated: `[1, sum(h*w), 1,
  2]` (the release's `get_reference_points`)."""
  points = []
  for height, width in spatial_shapes:
    ys = np.linspace(0.5, height - 0.5, height, dtype=np.float32) / height
    xs = np.linspace(0.5, width - 0.5, width, dtype=np.float32) / width
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    points.append(np.stack([grid_x.reshape(-1), grid_y.reshape(-1)], -1))
  return np.concatenate(points, 0)[None, :, None, :]


def split_maps(tokens: jax.Array, spatial_shapes: SpatialShapes) -> list[jax.Array]:
  """`[B, sum(h*w), C]` -> one `[B, h, w, C]` map per spatial shape."""
  maps, start = [], 0
  for height, width in spatial_shapes:
    maps.append(tokens[:, start:start + height * width].reshape(
        tokens.shape[0], height, width, tokens.shape[-1]))
    start += height * width
  return maps


def flatten_maps(maps: Sequence[jax.Array]) -> jax.Array:
  """One or more `[B, h, w, C]` maps -> `[B, sum(h*w), C]`."""
  return jnp.concatenate([m.reshape(m.shape[0], -1, m.shape[-1]) for m in maps], axis=1)


def adapter_shapes(grid: int) -> tuple[SpatialShapes, SpatialShapes]:
  """(patch map shape, pyramid shapes) for a g x g patch grid: `((g, g),)` and
  `((2g, 2g), (g, g), (g/2, g/2))` (c2, c3, c4 at strides 8, 16, 32 of the 16g-pixel image)."""
  return ((grid, grid),), ((2 * grid, 2 * grid), (grid, grid), (grid // 2, grid // 2))


class SpatialPriorModule(nn.Module):
  """The release's `SpatialPriorModule`: a conv stem and three stride-2 stages.

  Each conv is followed by a LayerNorm over channels computed in float32 (the release's
  channels-first `LayerNorm`, eps 1e-6: `ChannelsFirstLayerNorm`) and ReLU; the stem ends with
  a 3x3/2 max-pool. `[B, S, S, 3]` -> c1 `[B, S/4, S/4, D]` and c2, c3, c4 as tokens
  `[B, (S/8)^2 | (S/16)^2 | (S/32)^2, D]`.
  """

  inplanes: int = 64
  embed_dim: int = 1024
  layer_norm_eps: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, images: jax.Array):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)

    def conv_norm_relu(x, features, stride, conv_name, norm_name):
      x = Conv2d(features, 3, stride=stride, padding=1, use_bias=False,
                 in_features=x.shape[-1], name=conv_name, **kw)(x)
      normed = LayerNorm(epsilon=self.layer_norm_eps, axis_name=None, dtype=jnp.float32,
                         param_dtype=self.param_dtype, name=norm_name,
                         module_class=ChannelsFirstLayerNorm)(x)
      return jax.nn.relu(normed.astype(x.dtype))

    x = conv_norm_relu(images, self.inplanes, 2, "stem_0", "stem_1")
    x = conv_norm_relu(x, self.inplanes, 1, "stem_3", "stem_4")
    x = conv_norm_relu(x, self.inplanes, 1, "stem_6", "stem_7")
    c1 = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    c2 = conv_norm_relu(c1, 2 * self.inplanes, 2, "conv2_0", "conv2_1")
    c3 = conv_norm_relu(c2, 4 * self.inplanes, 2, "conv3_0", "conv3_1")
    c4 = conv_norm_relu(c3, 4 * self.inplanes, 2, "conv4_0", "conv4_1")

    def project(x, name):
      return Conv2d(self.embed_dim, 1, in_features=x.shape[-1],
                    kernel_axes=(None, "vision_embed"), name=name, **kw)(x)

    c1, c2, c3, c4 = (project(c, f"fc{i}") for i, c in enumerate((c1, c2, c3, c4), start=1))
    return c1, flatten_maps([c2]), flatten_maps([c3]), flatten_maps([c4])


class DepthwiseConvPerScale(nn.Module):
  """The release's `DWConv`: one depthwise 3x3 conv applied to each map of a token sequence.

  `[B, sum(h*w), C]` with the maps' `spatial_shapes` -> same shape.
  """

  features: int
  spatial_shapes: SpatialShapes
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    conv = DepthwiseConv2d(self.features, 3, padding=1, kernel_axes="mlp", dtype=self.dtype,
                           param_dtype=self.param_dtype, name="dwconv")
    return flatten_maps([conv(m) for m in split_maps(tokens, self.spatial_shapes)])


class ConvFFN(nn.Module):
  """The release's `ConvFFN`: fc1 -> per-scale depthwise conv -> exact GELU -> fc2."""

  embed_dim: int
  hidden_dim: int
  spatial_shapes: SpatialShapes
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    x = Linear(self.hidden_dim, kernel_axes=("vision_embed", "mlp"), name="fc1", **kw)(tokens)
    x = DepthwiseConvPerScale(self.hidden_dim, self.spatial_shapes, name="dwconv", **kw)(x)
    x = jax.nn.gelu(x, approximate=False)
    return Linear(self.embed_dim, kernel_axes=("mlp", "vision_embed"), name="fc2", **kw)(x)


class _AdapterAttentionBlock(nn.Module):
  """Settings shared by the injector and the extractor."""

  embed_dim: int
  num_heads: int = 16
  num_points: int = 4
  value_ratio: float = 0.5
  layer_norm_eps: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  def norm(self, name: str) -> nn.LayerNorm:
    return LayerNorm(epsilon=self.layer_norm_eps, axis_name="vision_embed", dtype=self.dtype,
                     param_dtype=self.param_dtype, name=name)

  def attend(self, query, points, feat, spatial_shapes: SpatialShapes) -> jax.Array:
    attention = MultiScaleDeformableAttention(
        self.embed_dim, num_levels=len(spatial_shapes), num_heads=self.num_heads,
        num_points=self.num_points, value_ratio=self.value_ratio, embed_axis="vision_embed",
        dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision, name="attn")
    return attention(self.norm("query_norm")(query), points, self.norm("feat_norm")(feat),
                     spatial_shapes)


class Injector(_AdapterAttentionBlock):
  """The release's `Injector`: `query + gamma * attn(query_norm(query), feat_norm(feat))`.

  `query [B, Lq, D]` (patch tokens), `feat [B, S, D]` (maps of `feat_shapes`: c2, c3, c4)
  -> `[B, Lq, D]`.
  """

  feat_shapes: SpatialShapes = ()
  gamma_init: float = 0.0

  @nn.compact
  def __call__(self, query, points, feat) -> jax.Array:
    feat_shapes = self.feat_shapes
    gamma = self.param("gamma", nn.with_logical_partitioning(
        nn.initializers.constant(self.gamma_init), ("vision_embed",)), (self.embed_dim,),
                       self.param_dtype)
    attended = self.attend(query, points, feat, feat_shapes)
    return query + gamma.astype(attended.dtype) * attended


class Extractor(_AdapterAttentionBlock):
  """The release's `Extractor`: `q += attn(query_norm(q), feat_norm(feat))`, then
  `q += ConvFFN(ffn_norm(q))` over the query maps.

  `query [B, Lq, D]` (maps of `query_shapes`: c2, c3, c4), `feat [B, S, D]` (maps of
  `feat_shapes`: the patch grid) -> `[B, Lq, D]`.
  """

  feat_shapes: SpatialShapes = ()
  query_shapes: SpatialShapes = ()
  ffn_ratio: float = 0.25

  @nn.compact
  def __call__(self, query, points, feat) -> jax.Array:
    query = query + self.attend(query, points, feat, self.feat_shapes)
    ffn = ConvFFN(self.embed_dim, int(self.embed_dim * self.ffn_ratio), self.query_shapes,
                  dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                  name="ffn")
    return query + ffn(self.norm("ffn_norm")(query))


class InteractionBlock(nn.Module):
  """The release's `InteractionBlockWithCls`, split into its two halves around the ViT layers.

  `inject(x, c)` updates the patch tokens from the pyramid; `extract(c, x)` updates the pyramid
  from the patch tokens (with `num_extra_extractors` more extractors in the last block).
  `grid` is the patch grid's side g; the pyramid maps are 2g, g and g/2.
  """

  embed_dim: int
  grid: int
  num_heads: int = 16
  num_points: int = 4
  value_ratio: float = 0.5
  ffn_ratio: float = 0.25
  gamma_init: float = 0.0
  layer_norm_eps: float = 1e-5
  num_extra_extractors: int = 0
  remat_policy: str | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  def setup(self):
    kw = dict(num_heads=self.num_heads, num_points=self.num_points,
              value_ratio=self.value_ratio, layer_norm_eps=self.layer_norm_eps,
              dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    injector_cls = remat_layer(Injector, self.remat_policy)
    extractor_cls = remat_layer(Extractor, self.remat_policy)
    patch_shape, pyramid_shapes = adapter_shapes(self.grid)
    self.injector = injector_cls(self.embed_dim, feat_shapes=pyramid_shapes,
                                 gamma_init=self.gamma_init, **kw)
    make_extractor = lambda: extractor_cls(  # noqa: E731
        self.embed_dim, feat_shapes=patch_shape, query_shapes=pyramid_shapes,
        ffn_ratio=self.ffn_ratio, **kw)
    self.extractor = make_extractor()
    self.extra_extractors = [make_extractor() for _ in range(self.num_extra_extractors)]

  def inject(self, patches: jax.Array, patch_points: jax.Array,
             pyramid: jax.Array) -> jax.Array:
    """Patch tokens `[B, g*g, D]` attend into the pyramid tokens `[B, 21 g*g / 4, D]`."""
    return self.injector(patches, patch_points, pyramid)

  def extract(self, pyramid: jax.Array, pyramid_points: jax.Array,
              patches: jax.Array) -> jax.Array:
    """Pyramid tokens attend into the patch tokens, through each extractor in turn."""
    for extractor in [self.extractor, *self.extra_extractors]:
      pyramid = extractor(pyramid, pyramid_points, patches)
    return pyramid


class CLIPViTAdapter(CLIPVisionTransformer):
  """The release's `CLIPVisionTransformerAdapter`: the CLIP ViT (inherited, same param names)
  plus the adapter modules (`adapter_level_embed`, `adapter_spm`, `adapter_interactions_N`,
  `adapter_up`).

  Attributes, beyond `CLIPVisionTransformer`'s (from the config's `vision_adapter` section):
    prior_image_size: side of the resized image the SPM sees; must be 16 x the patch grid.
    conv_inplane: SPM stem width.
    adapter_num_heads, num_points, value_ratio: the deformable attentions'.
    ffn_ratio: ConvFFN hidden width / model width.
    gamma_init: initial injector scale.
    interaction_indexes: inclusive ViT layer ranges of the interaction blocks.
    extra_extractors: extractors added to the last block.
    adapter_layer_norm_eps: injector/extractor LayerNorms; prior_layer_norm_eps: the SPM's.
  """

  prior_image_size: int = 256
  conv_inplane: int = 64
  adapter_num_heads: int = 16
  num_points: int = 4
  value_ratio: float = 0.5
  ffn_ratio: float = 0.25
  gamma_init: float = 0.0
  interaction_indexes: tuple[tuple[int, int], ...] = ((0, 5), (6, 11), (12, 17), (18, 23))
  extra_extractors: int = 2
  adapter_layer_norm_eps: float = 1e-5
  prior_layer_norm_eps: float = 1e-6

  @classmethod
  def from_config(cls, model_config: Any, **attributes) -> "CLIPViTAdapter":
    """Builds the encoder from a model config (`config.model`): its `vision_encoder` and
    `vision_adapter` sections."""
    adapter = model_config.vision_adapter
    adapter_attributes = dict(
        prior_image_size=adapter.prior_image_size, conv_inplane=adapter.conv_inplane,
        adapter_num_heads=adapter.num_heads, num_points=adapter.num_points,
        value_ratio=adapter.value_ratio, ffn_ratio=adapter.ffn_ratio,
        gamma_init=adapter.gamma_init,
        interaction_indexes=tuple(tuple(int(i) for i in r)
                                  for r in adapter.interaction_indexes),
        extra_extractors=adapter.extra_extractors,
        adapter_layer_norm_eps=adapter.layer_norm_eps,
        prior_layer_norm_eps=adapter.prior_layer_norm_eps)
    return super().from_config(model_config, **adapter_attributes, **attributes)

  def setup(self):
    super().setup()
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    self.adapter_level_embed = self.param(
        "adapter_level_embed",
        nn.with_logical_partitioning(nn.initializers.zeros, (None, "vision_embed")),
        (3, self.hidden_size), self.param_dtype)
    self.adapter_spm = SpatialPriorModule(self.conv_inplane, self.hidden_size,
                                          self.prior_layer_norm_eps, **kw)
    last = len(self.interaction_indexes) - 1
    self.adapter_interactions = [
        InteractionBlock(self.hidden_size, self.image_size // self.patch_size,
                         self.adapter_num_heads, self.num_points,
                         self.value_ratio, self.ffn_ratio, self.gamma_init,
                         self.adapter_layer_norm_eps,
                         self.extra_extractors if index == last else 0, self.remat_policy,
                         **kw)
        for index in range(len(self.interaction_indexes))
    ]
    self.adapter_up = ConvTranspose2d(self.hidden_size, 2, stride=2,
                                      kernel_axes=("vision_embed", "query_proj"), **kw)

  def _check(self, pixel_values: jax.Array) -> int:
    name = type(self).__name__
    if pixel_values.ndim != 4 or pixel_values.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"{name}: pixel_values must be [B, {self.image_size}, {self.image_size}, "
                       f"C] (the adapter's maps are tied to the configured image size), got "
                       f"{pixel_values.shape}")
    grid = self.image_size // self.patch_size
    if self.prior_image_size != 16 * grid or grid % 2:
      raise ValueError(f"{name}: prior_image_size must be 16 x the patch grid ({16 * grid}) "
                       f"and the grid even, got prior_image_size={self.prior_image_size}, "
                       f"grid={grid}")
    covered = [i for start, stop in self.interaction_indexes for i in range(start, stop + 1)]
    if covered != list(range(self.num_layers)):
      raise ValueError(f"{name}: interaction_indexes {self.interaction_indexes} must cover "
                       f"layers 0..{self.num_layers - 1} in order")
    return grid

  def __call__(self, pixel_values: jax.Array) -> dict[str, Any]:
    """Normalized images `[B, H, W, 3]` at `image_size` -> encoder outputs.

    Returns:
      `last_hidden_state`: `[B, 1 + g*g, D]` ([cls, block-4 patch tokens]), g the patch grid;
      `multiscale_features`: 4 maps `[B, 4g, 4g, D]`, `[B, 2g, 2g, D]`, `[B, g, g, D]`,
      `[B, g/2, g/2, D]`.
    """
    grid = self._check(pixel_values)
    batch = pixel_values.shape[0]
    hidden_states, _ = self.embed(pixel_values)
    size = self.prior_image_size
    prior_input = resize(pixel_values, (size, size), mode="bilinear")
    c1, c2, c3, c4 = self.adapter_spm(prior_input)
    level_embed = self.adapter_level_embed.astype(c2.dtype)
    pyramid = jnp.concatenate([c2 + level_embed[0], c3 + level_embed[1], c4 + level_embed[2]],
                              axis=1)
    patch_shape, pyramid_shapes = adapter_shapes(grid)
    patch_points = jnp.asarray(reference_points(patch_shape))
    pyramid_points = jnp.asarray(reference_points(pyramid_shapes))
    token_axes = ("activation_batch", "activation_length", "activation_embed")
    map_axes = ("activation_batch", None, None, "activation_embed")

    cls_token, patches = hidden_states[:, :1], hidden_states[:, 1:]
    block_outputs = []
    for block, (start, stop) in zip(self.adapter_interactions, self.interaction_indexes):
      patches = block.inject(patches, patch_points, pyramid)
      tokens = self.encoder(jnp.concatenate([cls_token, patches], axis=1), start, stop + 1)
      cls_token, patches = tokens[:, :1], tokens[:, 1:]
      pyramid = sharding.constrain(
          block.extract(pyramid, pyramid_points, patches),
          token_axes)
      # Constraining the maps explicitly also sidesteps an XLA sharding-propagation bug
      # (jax 0.10, CPU): without it, with the batch split over (data, fsdp), the sums below
      # mixed up batch entries.
      block_outputs.append(sharding.constrain(
          patches.reshape(batch, grid, grid, self.hidden_size), map_axes))

    c2, c3, c4 = (sharding.constrain(c, map_axes) for c in split_maps(pyramid, pyramid_shapes))
    c1 = sharding.constrain(self.adapter_up(c2) + c1, map_axes)
    x1, x2, x3, x4 = block_outputs
    multiscale = tuple(sharding.constrain(m, map_axes) for m in (
        c1 + resize(x1, scale_factor=4), c2 + resize(x2, scale_factor=2), c3 + x3,
        c4 + resize(x4, scale_factor=0.5)))
    last_hidden_state = jnp.concatenate([cls_token, flatten_maps([x4])], axis=1)
    return {"last_hidden_state": last_hidden_state, "multiscale_features": multiscale}
