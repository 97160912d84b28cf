"""The Flax Llama against transformers' `LlamaForCausalLM`, loaded through `load_llama`."""

import numpy as np
import pytest
import torch
import transformers
import jax
import jax.numpy as jnp

from mmi_jax.convert.hf import load_llama
from mmi_jax.convert.torch_names import ConversionError

VOCAB = 96


def _hf_llama(num_kv_heads, tie=False, seed=0):
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
      num_key_value_heads=num_kv_heads, intermediate_size=64, max_position_embeddings=64,
      rms_norm_eps=1e-6, tie_word_embeddings=tie, attn_implementation="eager")
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():  # norms away from 1 so that their weights are exercised
    for name, param in model.named_parameters():
      if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
        param.add_(0.2 * torch.randn_like(param))
  return model


def _assert_close(actual, expected, rtol=1e-4):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  scale = np.abs(expected).max()
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


def _batch(seed=0, length=12):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, VOCAB, (3, length))
  mask = np.ones((3, length), np.int64)
  mask[1, 7:] = 0  # right padding
  mask[2, 3:] = 0
  return ids, mask


@pytest.mark.parametrize("num_kv_heads,tie,save_kw", [
    (4, False, dict()),  # multi-head attention, safetensors
    (2, False, dict(safe_serialization=False, max_shard_size="40KB")),  # GQA, sharded .bin
    (1, True, dict(max_shard_size="40KB")),  # multi-query, tied head, sharded safetensors
], ids=["mha-safetensors", "gqa-sharded-bin", "mqa-tied-sharded-safetensors"])
def test_load_llama_equals_transformers_on_a_right_padded_batch(tmp_path, num_kv_heads, tie,
                                                                 save_kw):
  model = _hf_llama(num_kv_heads, tie)
  model.save_pretrained(tmp_path, **save_kw)
  module, params = load_llama(tmp_path)
  ids, mask = _batch()
  with torch.no_grad():
    expected = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  logits = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  assert logits.shape == (3, 12, VOCAB) and logits.dtype == jnp.float32
  # Every position, padding included: positions are 0..L-1 in both.
  _assert_close(logits, expected)


def test_left_padding_with_positions_from_the_mask_equals_each_row_alone(tmp_path):
  model = _hf_llama(2)
  model.save_pretrained(tmp_path)
  module, params = load_llama(tmp_path)
  ids, _ = _batch(1)
  lengths = [12, 7, 3]
  mask = np.zeros_like(ids)
  for row, n in enumerate(lengths):
    mask[row, 12 - n:] = 1
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  logits = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                        jnp.asarray(positions))
  for row, n in enumerate(lengths):
    with torch.no_grad():
      expected = model(torch.tensor(ids[row:row + 1, 12 - n:])).logits.numpy()[0]
    _assert_close(logits[row, 12 - n:], expected)


def test_growing_the_vocabulary_keeps_the_checkpoint_and_draws_new_rows(tmp_path):
  model = _hf_llama(4)
  model.save_pretrained(tmp_path)
  module, params = load_llama(tmp_path, vocab_size=VOCAB + 2, rng=jax.random.key(0))
  assert module.config.vocab_size == VOCAB + 2
  embedding = np.asarray(params["model"]["embed_tokens"]["embedding"])
  head = np.asarray(params["lm_head"]["kernel"])
  assert embedding.shape == (VOCAB + 2, 32) and head.shape == (32, VOCAB + 2)
  np.testing.assert_array_equal(embedding[:VOCAB], model.model.embed_tokens.weight.detach())
  np.testing.assert_array_equal(head[:, :VOCAB], model.lm_head.weight.detach().T)
  for new in (embedding[VOCAB:], head[:, VOCAB:].T):
    assert np.all(new != 0) and np.abs(new).max() < 0.02 * 6
  ids, mask = _batch()
  with torch.no_grad():
    expected = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  logits = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  _assert_close(logits[..., :VOCAB], expected)
  with pytest.raises(ValueError, match="rng"):
    load_llama(tmp_path, vocab_size=VOCAB + 2)


def test_a_broken_checkpoint_names_every_problem(tmp_path):
  model = _hf_llama(4)
  state = model.state_dict()
  state.pop("model.layers.1.mlp.up_proj.weight")
  state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
  model.save_pretrained(tmp_path, state_dict=state)
  with pytest.raises(ConversionError) as error:
    load_llama(tmp_path)
  message = str(error.value)
  assert "model.layers.1.mlp.up_proj.weight" in message
  assert "model.layers.0.self_attn.q_proj.weight" in message


def test_unsupported_rope_fails_clearly(tmp_path):
  model = _hf_llama(4)
  model.config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
  model.save_pretrained(tmp_path)
  with pytest.raises((NotImplementedError, ValueError), match="dynamic"):
    load_llama(tmp_path)


def test_remat_and_the_plain_attention_fallback_leave_values_and_gradients_unchanged(tmp_path):
  model = _hf_llama(2)
  model.save_pretrained(tmp_path)
  module, params = load_llama(tmp_path)
  variant = module.clone(remat_policy="nothing_saveable", attention_implementation="xla")
  ids, mask = _batch()

  def loss(module, params):
    logits = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask)

  value, grads = jax.jit(jax.value_and_grad(lambda p: loss(module, p)))(params)
  value_remat, grads_remat = jax.jit(jax.value_and_grad(lambda p: loss(variant, p)))(params)
  np.testing.assert_allclose(value_remat, value, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_remat), jax.tree.leaves(grads)):
    _assert_close(a, b, 1e-5)
