"""The PyTorch peers step exactly as their libraries do: bench/sparsify_peer.py as sparsify's own
Trainer.fit() (needs eai-sparsify, from the [bench] extra), bench/dictlearn_peer.py as
dictionary_learning's own trainSAE (needs dictionary-learning 0.1.0, installed --no-deps as BUILD.md
says); each test is skipped without its library."""
import importlib
import importlib.util
import os
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fit_reference(table, d, n, k, batch, steps, optimizer, alpha, dead_tokens, tmp_path,
                   layer=None, **sae_options):
  """sparsify's Trainer.fit() on a stand-in LM whose hooked layer takes the table's rows and emits
  them (layer None) or layer's output of them (a transcoder's module, with sae_options
  transcode=True)."""
  import sparsify
  from torch import nn
  from transformers import PretrainedConfig, PreTrainedModel

  class Cfg(PretrainedConfig):
    model_type = "bench_peer_rows"

  class Rows(PreTrainedModel):
    config_class = Cfg

    def __init__(self, config):
      super().__init__(config)
      self.emb = nn.Embedding(len(table), d)
      self.emb.weight.data = torch.from_numpy(table)
      self.layers = nn.ModuleList([layer or nn.Identity()])

    def forward(self, input_ids=None, **_):
      h = self.emb(input_ids.clamp(max=len(table) - 1))   # the width probe's dummy ids too
      for layer in self.layers:
        h = layer(h)
      return h

  cfg = sparsify.TrainConfig(
      sparsify.SaeConfig(num_latents=n, k=k, **sae_options), batch_size=1, optimizer=optimizer,
      lr=3e-3,
      lr_warmup_steps=2, auxk_alpha=alpha, dead_feature_threshold=dead_tokens - 1,
      hookpoints=["layers.0"], log_to_wandb=False, save_dir=str(tmp_path))
  data = [{"input_ids": torch.arange(i * batch, (i + 1) * batch)} for i in range(steps)]
  trainer = sparsify.Trainer(cfg, data, Rows(Cfg(hidden_size=d, num_hidden_layers=1)))
  trainer.fit()
  return trainer


@pytest.mark.parametrize("optimizer,alpha,dead_tokens", [
    ("adam", 1 / 32, 3 * 128),      # AuxK running: latents die after 3 batches
    ("signum", 0.0, 10 ** 9),       # sparsify's default optimizer, AuxK off
])
def test_sparsify_peer_matches_fit(optimizer, alpha, dead_tokens, tmp_path):
  pytest.importorskip("sparsify")
  from bench import sparsify_peer
  d, n, k, batch, steps = 32, 256, 8, 128, 10
  rng = np.random.default_rng(0)
  table = (rng.standard_normal((batch * steps, d)) * 3 + 1).astype(np.float32)
  ref = _fit_reference(table, d, n, k, batch, steps, optimizer, alpha, dead_tokens, tmp_path)
  peer = sparsify_peer.Peer(d, n, k, 3e-3, batch, steps, dead_tokens, optimizer=optimizer,
                            auxk_alpha=alpha, warmup_steps=2)
  dead_seen = 0.0
  for i in range(steps):
    peer.step(table[i * batch:(i + 1) * batch])
    dead_seen = max(dead_seen, peer.dead_frac())
  want = dict(ref.saes["layers.0"].named_parameters())
  for name, p in peer.sae.named_parameters():
    # fit() ends with a save(), which flips schedule-free optimizers to eval and back: ~1e-10.
    np.testing.assert_allclose(p.detach().numpy(), want[name].detach().numpy(), rtol=0, atol=1e-8,
                               err_msg=name)
  np.testing.assert_array_equal(peer.trainer.num_tokens_since_fired["layers.0"].numpy(),
                                ref.num_tokens_since_fired["layers.0"].numpy())
  if optimizer == "adam":
    assert dead_seen > 0   # some latents were dead, so the AuxK branch ran


@pytest.mark.parametrize("skip", [False, True])
def test_sparsify_transcoder_peer_matches_fit(skip, tmp_path):
  """A transcoder (transcode=True, skip_connection=skip): the peer, given rows [x | y], trains the
  parameters fit() trains on a module mapping x to y, and reconstructs y as sparsify's forward
  does."""
  pytest.importorskip("sparsify")
  from torch import nn
  from bench import sparsify_peer
  d, n, k, batch, steps, dead_tokens = 32, 256, 8, 128, 10, 3 * 128
  rng = np.random.default_rng(0)
  table = (rng.standard_normal((batch * steps, d)) * 3 + 1).astype(np.float32)
  mlp = nn.Linear(d, d)
  with torch.no_grad():
    mlp.weight.copy_(torch.from_numpy(rng.standard_normal((d, d)).astype(np.float32) / d ** 0.5))
    mlp.bias.copy_(torch.from_numpy(rng.standard_normal(d).astype(np.float32)))
    target = mlp(torch.from_numpy(table)).numpy()
  ref = _fit_reference(table, d, n, k, batch, steps, "adam", 1 / 32, dead_tokens, tmp_path,
                       layer=mlp, transcode=True, skip_connection=skip)
  peer = sparsify_peer.Peer(d, n, k, 3e-3, batch, steps, dead_tokens, optimizer="adam",
                            warmup_steps=2, transcode=True, skip=skip)
  rows = np.concatenate([table, target], axis=1)
  for i in range(steps):
    peer.step(rows[i * batch:(i + 1) * batch])
  want = dict(ref.saes["layers.0"].named_parameters())
  assert ("W_skip" in want) == skip
  for name, p in peer.sae.named_parameters():
    np.testing.assert_allclose(p.detach().numpy(), want[name].detach().numpy(), rtol=0, atol=1e-6,
                               err_msg=name)
  # A transcoder's decoder is left free (no unit rows), its skip term trained.
  assert np.abs(np.linalg.norm(peer.sae.W_dec.detach().numpy(), axis=1) - 1).max() > 0.1
  if skip:
    assert np.abs(peer.sae.W_skip.detach().numpy()).max() > 0
  y_hat, l0 = peer.reconstruct(table[:batch])
  with torch.no_grad():
    want_out = ref.saes["layers.0"](torch.from_numpy(table[:batch])).sae_out.numpy()
  np.testing.assert_allclose(y_hat, want_out, rtol=1e-5, atol=1e-5)
  assert np.all(l0 <= k)


def _train_sae_reference(batches, steps, normalize, dead_tokens, monkeypatch, **trainer_kwargs):
  """dictionary_learning's own trainSAE over `batches`; its TopKTrainer (its dead-latent threshold
  is a hard-coded attribute, set here after its __init__ as the peer sets it) and norm factor."""
  from bench import dictlearn_peer
  top_k = dictlearn_peer._library()
  # training.py imports wandb and, through .evaluation and .buffer, nnsight; trainSAE uses neither
  # without wandb logging, so a bare stand-in is enough where they are not installed.
  for name in ("nnsight", "wandb"):
    if importlib.util.find_spec(name) is None:
      monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(LanguageModel=object))
  training = importlib.import_module("dictionary_learning.training")

  class Trainer(top_k.TopKTrainer):
    made = []

    def __init__(self, dead_feature_threshold, **kwargs):
      super().__init__(**kwargs)
      self.dead_feature_threshold = dead_feature_threshold
      Trainer.made.append(self)

  data = [torch.from_numpy(b.copy()) for b in batches]
  norm_factor = training.get_norm_factor(data, steps=100) if normalize else None
  training.trainSAE(
      data, [dict(trainer=Trainer, dead_feature_threshold=dead_tokens, steps=steps, layer=0,
                  lm_name="rows", device="cpu", **trainer_kwargs)],
      steps=steps, normalize_activations=normalize, device="cpu")
  return Trainer.made[0], norm_factor


@pytest.mark.parametrize("normalize,dead_tokens,warmup,decay", [
    (True, 2 * 128, 2, 4),     # unit-normalized inputs, AuxK running, warmup and final decay
    (False, 10 ** 9, 0, 0),    # raw inputs, no latent dead, constant LR
])
def test_dictlearn_peer_matches_train_sae(normalize, dead_tokens, warmup, decay, monkeypatch):
  if importlib.util.find_spec("dictionary_learning") is None:
    pytest.skip("dictionary_learning is not installed (pip install --no-deps "
                "dictionary-learning==0.1.0)")
  pytest.importorskip("einops")
  from bench import dictlearn_peer
  d, n, k, batch, steps, lr = 32, 1024, 8, 128, 10, 3e-3   # n > batch x k: some latents idle
  rng = np.random.default_rng(0)
  table = (rng.standard_normal((batch * steps, d)) * 3 + 1).astype(np.float32)
  batches = [table[i * batch:(i + 1) * batch] for i in range(steps)]
  ref, norm_factor = _train_sae_reference(
      batches, steps, normalize, dead_tokens, monkeypatch, activation_dim=d, dict_size=n, k=k,
      lr=lr, warmup_steps=warmup, decay_start=steps - decay if decay else None, seed=0)
  peer = dictlearn_peer.Peer(d, n, k, lr, batch, steps, dead_tokens, norm_factor=norm_factor,
                             warmup_steps=warmup, decay_steps=decay)
  dead_seen = 0.0
  for b in batches:
    peer.step(b)
    dead_seen = max(dead_seen, peer.dead_frac())
  peer.finish()   # trainSAE ends by folding the norm factor into the biases
  want = ref.ae.state_dict()
  for name, value in peer.ae.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), want[name].numpy(), err_msg=name)
  np.testing.assert_array_equal(peer.trainer.num_tokens_since_fired.numpy(),
                                ref.num_tokens_since_fired.numpy())
  assert peer.trainer.scheduler.get_last_lr() == ref.scheduler.get_last_lr()
  if dead_tokens < batch * steps:
    assert dead_seen > 0   # some latents were dead, so the AuxK branch ran
