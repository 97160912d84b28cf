"""Device mesh, logical-axis rules and the shardings derived from them.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`), and
activations are constrained with logical names too (`constrain`). One table,
`LOGICAL_AXIS_RULES`, maps those names onto the mesh axes `data`, `fsdp` and `tensor`; the same
model code then runs on one CPU, on 8 simulated CPU devices, on a GPU host or on a TPU pod.

A logical axis whose size is not divisible by the mesh axes it maps to is replicated instead,
so odd sizes (a 32002-row vocabulary on 4-way tensor parallelism, a 10-row position table) do
not need special cases in the rules.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LogicalRules = tuple[tuple[str, Any], ...]

# Logical name -> mesh axis (or tuple of axes, or None for replicated). The first rule whose
# mesh axes are still free wins, as in `flax.linen.logical_to_mesh_axes`.
LOGICAL_AXIS_RULES: LogicalRules = (
    # Activations.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_images", None),
    # Parameters.
    ("embed", "fsdp"),  # a model's residual width (LLM hidden, UNet channels, ViT width)
    ("vision_embed", "fsdp"),  # width of the image features MMFS samples
    ("mlp", "tensor"),
    ("vocab", "tensor"),  # rows of a token embedding, columns of an output head
    ("heads", "tensor"),  # any head-major flattened dim (H * head_dim, H * points * 2, ...)
    ("query_proj", "tensor"),  # output of a square projection (MMFS dynamic offsets, pos_proj)
    ("qformer_embed", "fsdp"),  # a Q-Former's width
    ("image_slots", None),  # rows of MMFS's relative-image-position table
)


def make_mesh(mesh_shape: Mapping[str, int] | Sequence[int],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `Mesh` with axes (data, fsdp, tensor); one size may be -1 (= the remaining devices).

  Args:
    mesh_shape: sizes of `data`, `fsdp`, `tensor`, as a mapping (e.g. a config's `mesh`
      ConfigDict) or a sequence in that order.
    devices: the devices to use; all of `jax.devices()` by default.
  """
  devices = list(jax.devices() if devices is None else devices)
  if isinstance(mesh_shape, Mapping) or hasattr(mesh_shape, "items"):
    unknown = set(mesh_shape.keys()) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"mesh: unknown axes {sorted(unknown)}; the axes are {MESH_AXES}")
    sizes = [int(mesh_shape.get(axis, 1)) for axis in MESH_AXES]
  else:
    sizes = [int(s) for s in mesh_shape]
    if len(sizes) != len(MESH_AXES):
      raise ValueError(f"mesh: expected {len(MESH_AXES)} sizes for {MESH_AXES}, got {sizes}")
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh: {len(devices)} devices cannot be split as "
                       f"{dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"but {len(devices)} are given")
  return jax.make_mesh(tuple(sizes), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int],
                    mesh_axis_sizes: Mapping[str, int],
                    rules: LogicalRules = LOGICAL_AXIS_RULES) -> PartitionSpec:
  """The `PartitionSpec` for an array of `shape` whose dims are named `logical_axes`.

  Dims whose size is not divisible by their mesh axes are replicated.
  """
  if len(logical_axes) != len(shape):
    raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
  mesh_axes = nn.logical_to_mesh_axes(tuple(logical_axes), rules)
  spec = []
  for size, axes in zip(shape, mesh_axes):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    unknown = [a for a in names if a not in mesh_axis_sizes]
    if unknown:
      raise ValueError(f"logical axes {tuple(logical_axes)} map onto mesh axes {unknown} "
                       f"that the mesh {dict(mesh_axis_sizes)} lacks")
    ways = math.prod(mesh_axis_sizes[a] for a in names)
    spec.append(axes if names and size % ways == 0 else None)
  return PartitionSpec(*spec)


def abstract_params(module: nn.Module, *init_args, **init_kwargs) -> Any:
  """`module.init(rng, *init_args, **init_kwargs)["params"]` as shape structs, nothing allocated.

  Leaves are `nn.LogicallyPartitioned` boxes around `jax.ShapeDtypeStruct`s. `init_args` are
  arrays (or shape structs); static settings belong in the module's attributes or kwargs.
  """
  return jax.eval_shape(
      lambda *args: module.init(jax.random.key(0), *args, **init_kwargs)["params"], *init_args)


def param_shardings(abstract_or_boxed_params: Any, mesh: Mesh,
                    rules: LogicalRules = LOGICAL_AXIS_RULES) -> Any:
  """`NamedSharding`s for a params tree whose leaves carry logical axis names.

  Args:
    abstract_or_boxed_params: the output of `abstract_params` (or of `module.init`), whose
      leaves are `nn.LogicallyPartitioned` boxes. Unannotated leaves are replicated.
  Returns:
    A tree with the unboxed structure of the params and a `NamedSharding` at each leaf.
  """

  def sharding(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      spec = logical_to_spec(leaf.names, leaf.value.shape, mesh.shape, rules)
    else:
      spec = PartitionSpec()
    return NamedSharding(mesh, spec)

  return jax.tree.map(sharding, abstract_or_boxed_params,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def init_sharded(module: nn.Module, rng: jax.Array, mesh: Mesh, *init_args,
                 rules: LogicalRules = LOGICAL_AXIS_RULES, **init_kwargs):
  """Initializes `module`'s params directly into their shards (no full copy on one device).

  Returns:
    (params, shardings): unboxed params placed by the logical rules, and their shardings.
  """
  shardings = param_shardings(abstract_params(module, *init_args, **init_kwargs), mesh, rules)

  def init(rng, *args):
    return nn.meta.unbox(module.init(rng, *args, **init_kwargs)["params"])

  with use_mesh(mesh, rules):
    params = jax.jit(init, out_shardings=shardings)(rng, *init_args)
  return params, shardings


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: LogicalRules = LOGICAL_AXIS_RULES) -> Iterator[None]:
  """Makes `mesh` and `rules` the context in which `constrain` places activations."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Constrains an activation's sharding by logical axis names.

  A no-op outside `use_mesh` (one device, or code that does not shard), so modules call it
  unconditionally.
  """
  rules = nn.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return x
  spec = logical_to_spec(logical_axes, x.shape, dict(mesh.shape), rules)
  return jax.lax.with_sharding_constraint(x, spec)


def shard_shapes(tree: Any) -> Any:
  """The shape of each array's first addressable shard (to check that params are split)."""
  return jax.tree.map(lambda x: tuple(x.addressable_shards[0].data.shape), tree)


__all__ = [
    "LOGICAL_AXIS_RULES", "MESH_AXES", "abstract_params", "constrain", "init_sharded",
    "logical_to_spec", "make_mesh", "param_shardings", "shard_shapes",
    "use_mesh",
]
