"""bench/sparsify_peer.py steps exactly as sparsify's own Trainer.fit() does (needs eai-sparsify,
from the [bench] extra; skipped without it)."""
import os
import sys

import numpy as np
import pytest

sparsify = pytest.importorskip("sparsify")
torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fit_reference(table, d, n, k, batch, steps, optimizer, alpha, dead_tokens, tmp_path):
  """sparsify's Trainer.fit() on a stand-in LM whose hooked layer emits the table's rows."""
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
      self.layers = nn.ModuleList([nn.Identity()])

    def forward(self, input_ids=None, **_):
      h = self.emb(input_ids.clamp(max=len(table) - 1))   # the width probe's dummy ids too
      for layer in self.layers:
        h = layer(h)
      return h

  cfg = sparsify.TrainConfig(
      sparsify.SaeConfig(num_latents=n, k=k), batch_size=1, optimizer=optimizer, lr=3e-3,
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
