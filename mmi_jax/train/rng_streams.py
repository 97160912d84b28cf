"""Named random streams: every random draw of a training job, each consumer's key its own.

All of a job's randomness comes from `config.seed`. Each consumer draws from its own stream,
the seed's key with the stream's number folded in, and names it: the training core the
params' initialisation and the train steps (`CORE_STREAMS`); each extension its own fits and
evaluations (`Extension.rng_streams`). `RngStreams` refuses a name or a number claimed twice,
so two consumers cannot share a key by accident. A consumer that must draw another stream's
key names that stream instead of a number (an alias, `{"vision_fit": "train_steps"}`):
declared where it is used and listed by `RngStreams.aliases`, never implicit.
"""

from __future__ import annotations

from typing import Mapping

import jax

# The training core's streams. The train steps' stream is the train state's base key: step s
# draws from `fold_in(key, s)` (`mmi_jax.train.train_step`).
CORE_STREAMS = {"params": 0, "train_steps": 2}


class RngStreams:
  """The keys of one job's named streams.

  Args:
    seed: the job's seed (`config.seed`).
    tables: `(owner, {name: number or aliased stream name})`, one per owner (the training
      core, each extension). A name or a number claimed twice, in one table or two, raises
      ValueError naming both claims; so does an alias of a stream no table numbers.
  """

  def __init__(self, seed: int, *tables: tuple[str, Mapping[str, int | str]]):
    self._root = jax.random.key(int(seed))
    self._numbers: dict[str, int] = {}
    self._aliases: dict[str, str] = {}
    claims: dict[str, str] = {}
    owners: dict[int, str] = {}
    for owner, table in tables:
      for name, number in table.items():
        claim = f"{owner}'s stream {name!r} ({number})"
        if name in claims:
          raise ValueError(f"random stream name {name!r} is claimed twice: {claim} and "
                           f"{claims[name]}")
        claims[name] = claim
        if isinstance(number, str):
          self._aliases[name] = number
          continue
        if number in owners:
          raise ValueError(f"random stream number {number} is claimed twice: {claim} and "
                           f"{owners[number]}")
        self._numbers[name], owners[number] = int(number), claim
    for name, target in self._aliases.items():
      if target not in self._numbers:
        raise ValueError(f"random stream {claims[name]} draws stream {target!r}, which no "
                         f"table numbers")

  @property
  def names(self) -> tuple[str, ...]:
    """Every stream's name, aliases included."""
    return tuple(self._numbers) + tuple(self._aliases)

  @property
  def aliases(self) -> dict[str, str]:
    """`{stream: the stream whose key it draws}`."""
    return dict(self._aliases)

  def key(self, name: str, *data: int) -> jax.Array:
    """The key of stream `name`, with `data` (a step, say) folded in after its number."""
    number = self._numbers.get(self._aliases.get(name, name))
    if number is None:
      raise KeyError(f"no random stream {name!r}; the streams are {sorted(self.names)}")
    key = jax.random.fold_in(self._root, number)
    for value in data:
      key = jax.random.fold_in(key, int(value))
    return key


__all__ = ["CORE_STREAMS", "RngStreams"]
