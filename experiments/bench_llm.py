"""Benchmark of the Flax Llama (prefill and cached decoding) against transformers' PyTorch Llama.

Both run the same weights: a random `transformers.LlamaForCausalLM` of a small config is saved
with `save_pretrained` and loaded through `mmi_jax.convert.hf.load_llama`. Reported, in the same
run on the same machine:

  * prefill: tokens/s of one forward over `batch x prompt` tokens that fills the KV cache;
  * cached decode: tokens/s (batch x steps / time) of greedy decoding one token per step, both
    driven from a Python loop (one jitted call per step in JAX; `past_key_values` in torch);
  * cached decode, whole loop in one `jax.lax.scan` (JAX only; torch has no equivalent).

  python experiments/bench_llm.py                           # CPU-sized defaults
  python experiments/bench_llm.py --hidden=1024 --layers=16 --prompt=1024
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mmi_jax.convert.hf import load_llama  # noqa: E402
from mmi_jax.models.llama import KVCache  # noqa: E402
from timing import median_seconds  # noqa: E402


def _torch_model(args, directory):
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
      intermediate_size=args.mlp, max_position_embeddings=args.prompt + args.steps,
      attn_implementation="sdpa")
  model = transformers.LlamaForCausalLM(config).eval()
  model.save_pretrained(directory)
  return model


def _bench_torch(model, ids, steps, repeats):
  import torch  # noqa: PLC0415

  tokens = torch.tensor(ids)

  def run_prefill():
    with torch.no_grad():
      return model(tokens, use_cache=True)

  def run_decode():
    with torch.no_grad():
      out = model(tokens, use_cache=True)
      cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
      start = time.perf_counter()
      for _ in range(steps):
        out = model(token, cache=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
      return time.perf_counter() - start

  prefill = median_seconds(run_prefill, repeats)
  run_decode()
  decode = statistics.median(run_decode() for _ in range(repeats))
  return prefill, decode


def _bench_jax(module, params, ids, steps, repeats):
  batch, prompt = ids.shape
  max_length = prompt + steps
  dtype = jnp.float32

  @jax.jit
  def prefill(params, ids):
    cache = KVCache.empty(module.config, batch, max_length, dtype)
    logits, cache = module.apply({"params": params}, ids, None, None, cache)
    return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

  def greedy_step(params, token, cache):
    logits, cache = module.apply({"params": params}, token[:, None], None, None, cache)
    return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

  step = jax.jit(greedy_step, donate_argnums=(2,))

  @jax.jit
  def scanned(params, token, cache):
    def body(carry, _):
      token, cache = greedy_step(params, *carry)
      return (token, cache), token
    return jax.lax.scan(body, (token, cache), None, length=steps)[1]

  ids = jnp.asarray(ids)
  prefill_s = median_seconds(lambda: jax.block_until_ready(prefill(params, ids)), repeats)

  def run_loop():
    token, cache = prefill(params, ids)
    jax.block_until_ready(cache)
    start = time.perf_counter()
    for _ in range(steps):
      token, cache = step(params, token, cache)
    jax.block_until_ready(token)
    return time.perf_counter() - start

  def run_scan():
    token, cache = prefill(params, ids)
    jax.block_until_ready(cache)
    start = time.perf_counter()
    jax.block_until_ready(scanned(params, token, cache))
    return time.perf_counter() - start

  run_loop()
  loop_s = statistics.median(run_loop() for _ in range(repeats))
  run_scan()
  scan_s = statistics.median(run_scan() for _ in range(repeats))
  return prefill_s, loop_s, scan_s


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--kv_heads", type=int, default=8)
  parser.add_argument("--mlp", type=int, default=1376)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--prompt", type=int, default=512)
  parser.add_argument("--steps", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--torch_threads", type=int, default=0, help="0: torch's default")
  args = parser.parse_args()

  import torch  # noqa: PLC0415
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.prompt))
  with tempfile.TemporaryDirectory() as directory:
    model = _torch_model(args, directory)
    module, params = load_llama(directory)
  torch_prefill, torch_decode = _bench_torch(model, ids, args.steps, args.repeats)
  jax_prefill, jax_loop, jax_scan = _bench_jax(module, params, ids, args.steps, args.repeats)

  prefill_tokens = args.batch * args.prompt
  decode_tokens = args.batch * args.steps
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); hidden {args.hidden}, {args.layers} layers, "
        f"{args.heads}/{args.kv_heads} heads, mlp {args.mlp}, vocab {args.vocab}, batch "
        f"{args.batch}, prompt {args.prompt}, {args.steps} decode steps, float32")
  print("| | jax tokens/s | torch tokens/s | jax / torch |")
  print("|---|---|---|---|")
  rows = [("prefill", prefill_tokens / jax_prefill, prefill_tokens / torch_prefill),
          ("cached decode, Python loop", decode_tokens / jax_loop, decode_tokens / torch_decode),
          ("cached decode, one lax.scan", decode_tokens / jax_scan, decode_tokens / torch_decode)]
  for name, jax_rate, torch_rate in rows:
    print(f"| {name} | {jax_rate:.1f} | {torch_rate:.1f} | {jax_rate / torch_rate:.2f}x |")


if __name__ == "__main__":
  main()
