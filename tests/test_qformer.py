"""The BLIP-2 Q-Former perceiver against transformers' Blip2QFormerModel and, with the
release's qk-normalization, against the independent reference in torch_vision_references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from mmi_jax import sharding
from mmi_jax.convert import hf
from mmi_jax.models.qformer import Blip2QFormer, PerceiverResampler, QFormerConfig
from torch_vision_references import perturb_, qformer_reference

HF_CONFIG = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                 intermediate_size=48, encoder_hidden_size=24, cross_attention_frequency=2)


def _inputs(seed, batch=2, queries=5, sources=7):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((batch, queries, 32)).astype(np.float32),
          rng.standard_normal((batch, sources, 24)).astype(np.float32))


def _relative_error(actual, expected):
  return np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max()


@pytest.fixture(scope="module")
def hf_qformer(tmp_path_factory):
  torch.manual_seed(0)
  model = perturb_(Blip2QFormerModel(Blip2QFormerConfig(**HF_CONFIG)).eval(), seed=0)
  directory = tmp_path_factory.mktemp("qformer")
  model.save_pretrained(directory)
  return model, directory


def test_equals_transformers_blip2_qformer(hf_qformer):
  model, directory = hf_qformer
  module, params = hf.load_qformer(directory, num_queries=5)
  assert not module.config.qk_normalization
  queries, features = _inputs(0)
  ours = jax.jit(lambda p, q, f: module.apply({"params": p}, q, f))(params, queries, features)
  with torch.no_grad():
    expected = model(query_embeds=torch.from_numpy(queries),
                     encoder_hidden_states=torch.from_numpy(features)).last_hidden_state.numpy()
  assert _relative_error(ours, expected) <= 1e-4


def test_reference_without_qk_norm_equals_transformers(hf_qformer):
  """Checks the test's own reference, which the qk-normalized case relies on."""
  model, _ = hf_qformer
  queries, features = _inputs(1)
  state = dict(model.named_parameters())
  with torch.no_grad():
    reference = qformer_reference(state, torch.from_numpy(queries), torch.from_numpy(features),
                                  num_layers=3, num_heads=4, cross_attention_frequency=2,
                                  eps=1e-12, qk_normalization=False).numpy()
    expected = model(query_embeds=torch.from_numpy(queries),
                     encoder_hidden_states=torch.from_numpy(features)).last_hidden_state.numpy()
  assert _relative_error(reference, expected) <= 1e-5


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "encoder-mask"])
def test_qk_normalized_qformer_equals_reference(hf_qformer, tmp_path, masked):
  """The release's per-head q/k LayerNorms, loaded from Blip2QFormerModel names + q_norm/k_norm
  (as the release's state dict has them)."""
  model, _ = hf_qformer
  generator = torch.Generator().manual_seed(5)
  state = {k: v.detach().clone() for k, v in model.state_dict().items()}
  for index in range(3):
    blocks = ["attention"] + (["crossattention"] if index % 2 == 0 else [])
    for block in blocks:
      for norm in ("q_norm", "k_norm"):
        prefix = f"encoder.layer.{index}.{block}.attention.{norm}"
        state[f"{prefix}.weight"] = 1 + 0.3 * torch.randn(8, generator=generator)
        state[f"{prefix}.bias"] = 0.3 * torch.randn(8, generator=generator)
  model.config.save_pretrained(tmp_path)
  save_file(state, tmp_path / "model.safetensors")
  module, params = hf.load_qformer(tmp_path, num_queries=5)
  assert module.config.qk_normalization
  queries, features = _inputs(2)
  mask = np.array([[1] * 7, [1] * 4 + [0] * 3]) if masked else None
  ours = module.apply({"params": params}, queries, features, mask)
  with torch.no_grad():
    expected = qformer_reference(
        state, torch.from_numpy(queries), torch.from_numpy(features), num_layers=3,
        num_heads=4, cross_attention_frequency=2, eps=1e-12, qk_normalization=True,
        encoder_mask=None if mask is None else torch.from_numpy(mask)).numpy()
  assert _relative_error(ours, expected) <= 1e-4
  if masked:  # masked sources really are ignored
    altered = features.copy()
    altered[1, 4:] = 100.0
    changed = module.apply({"params": params}, queries, altered, mask)
    np.testing.assert_allclose(np.asarray(changed), np.asarray(ours), rtol=1e-6, atol=1e-6)


def test_perceiver_dropout_needs_an_rng_and_is_off_by_default():
  config = QFormerConfig(num_queries=4, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32,
                         cross_attention_frequency=2, qk_normalization=True, dropout=0.5,
                         attention_dropout=0.5)
  module = PerceiverResampler(config)
  features = np.random.default_rng(0).standard_normal((2, 6, 12)).astype(np.float32)
  variables = module.init(jax.random.key(0), features)
  first = module.apply(variables, features)
  np.testing.assert_array_equal(first, module.apply(variables, features))
  dropped = [module.apply(variables, features, deterministic=False,
                          rngs={"dropout": jax.random.key(seed)}) for seed in (1, 2)]
  assert not np.allclose(dropped[0], first) and not np.allclose(dropped[0], dropped[1])
  params = variables["params"]
  assert params["queries"].value.shape == (1, 4, 16)
  assert "q_norm" in params["blip2qformer"]["encoder"]["layer_0"]["crossattention"]["attention"]
  assert "crossattention" not in params["blip2qformer"]["encoder"]["layer_1"]


def test_qformer_config_rejects_unknown_keys():
  with pytest.raises(ValueError, match="unknown keys"):
    QFormerConfig.from_mapping({"hidden_size": 8, "hiden_layers": 2})


def test_encoder_mask_must_match_the_features():
  module = Blip2QFormer(QFormerConfig(num_queries=2, hidden_size=8, num_layers=1, num_heads=2,
                                      mlp_dim=16, cross_attention_frequency=1))
  queries = jnp.zeros((1, 2, 8))
  features = jnp.zeros((1, 3, 4))
  abstract = sharding.abstract_params(module, queries, features)
  params = jax.tree.map(lambda x: jnp.zeros(x.shape), nn.meta.unbox(abstract))
  with pytest.raises(ValueError, match="encoder_attention_mask"):
    module.apply({"params": params}, queries, features, jnp.ones((1, 4)))
