"""SAELens's top-k SAE as a peer for the benchmarks: built and stepped as SAELens itself does.

Needs the [bench] extra (`sae-lens`, which pulls PyTorch: install torch first, see BUILD.md).

What is SAELens's own, used unchanged (sae-lens 6.x):
  * `TopKTrainingSAE` / `TopKTrainingSAEConfig`: its init (kaiming-uniform decoder rows scaled to
    norm 0.1, encoder = decoder transposed, b_dec = 0), its forward and loss (summed-over-d MSE
    averaged over the batch, plus its AuxK with k_aux = d // 2 and coefficient 1.0 over latents
    dead for `dead_feature_window` steps), its decoder-norm handling
    (`rescale_acts_by_decoder_norm=True`: pre-activations times the decoder row norms).
  * `SAETrainer`: its Adam (torch.optim.Adam, betas 0.9/0.999, eps 1e-8), gradient clipping at
    norm 1.0, LR scheduler, dead-latent counters, and its `ActivationScaler`
    (`normalize_activations="expected_average_only_in"`).

What the benchmark sets instead of SAELens's LM-driven runner: the batches. `SAETrainer.step` (its
public per-step seam, the one `fit()` calls) is fed exactly the numpy batches jaxsae trains on, in the
same order, so both see the same data. The input scale is preset on SAELens's ActivationScaler to
jaxsae's constant (mean squared norm d) instead of SAELens estimating sqrt(d) / mean norm from 1000
extra batches, so both train on identical inputs (the two constants differ by under 1% on
SmolLM2 activations); SAELens folds it into its weights at the end as it always does.
"""
import os
import time

import numpy as np

from bench import peers

os.environ.setdefault("TQDM_DISABLE", "1")

LABEL = "SAELens"


def versions() -> dict:
  import sae_lens
  import torch
  return {"sae_lens": sae_lens.__version__, "torch": torch.__version__,
          "torch_threads": torch.get_num_threads()}


class Peer:
  """One SAELens top-k SAE and its SAETrainer; `step(batch)` trains on a raw numpy batch."""

  def __init__(self, d: int, n: int, k: int, lr: float, batch: int, steps: int,
               dead_window_steps: int, input_scale: float | None = None, decay_steps: int = 0,
               warmup_steps: int = 0, device: str = "cpu", seed: int = 0, aux_loss_coefficient: float = 1.0,
               autocast: bool = False, sae_options: dict | None = None,
               architecture: str = "topk", prefixes: tuple = ()):
    """sae_options: other TopKTrainingSAEConfig fields (e.g. rescale_acts_by_decoder_norm,
    decoder_init_norm), to find out which of SAELens's choices make a difference. architecture
    "batchtopk": its BatchTopKTrainingSAE (k on average over the batch; its running threshold
    makes it a JumpReLU at inference, as its save_inference_model writes it);
    "matryoshka_batchtopk": its MatryoshkaBatchTopKTrainingSAE with matryoshka_widths = the
    prefixes and n."""
    import torch
    import sae_lens
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(seed)
    scaled = input_scale is not None and input_scale != 1.0
    name = {"topk": "TopK", "batchtopk": "BatchTopK",
            "matryoshka_batchtopk": "MatryoshkaBatchTopK"}[architecture]
    batchtopk = self.jumprelu = architecture != "topk"
    if prefixes:
      sae_options = {"matryoshka_widths": [*prefixes, n], **(sae_options or {})}
    cfg = getattr(sae_lens, f"{name}TrainingSAEConfig")(
        d_in=d, d_sae=n, k=k, dtype="float32", device=device,
        aux_loss_coefficient=aux_loss_coefficient,
        normalize_activations="expected_average_only_in" if scaled else "none",
        **(sae_options or {}))
    self.sae = getattr(sae_lens, f"{name}TrainingSAE")(cfg)
    tcfg = SAETrainerConfig(
        total_training_samples=steps * batch, train_batch_size_samples=batch, lr=lr,
        lr_end=lr / 10,   # what LanguageModelSAERunnerConfig sets (unused by a constant schedule)
        lr_decay_steps=decay_steps, lr_warm_up_steps=warmup_steps, device=device, autocast=autocast,
        # SAELens counts a latent dead when it has not fired for *more than* this many steps;
        # jaxsae when it has not fired for dead_tokens tokens: the same set with window - 1.
        dead_feature_window=max(dead_window_steps - 1, 0),
        feature_sampling_window=max(steps, 1))
    self.trainer = SAETrainer(cfg=tcfg, sae=self.sae, data_provider=iter(()))
    self.sae.to(device)
    if scaled:
      self.trainer.activation_scaler.scaling_factor = float(input_scale)
    self.device, self.window = device, dead_window_steps
    self._torch, self._weights = torch, None
    self.recipe = (f"SAELens {type(self.sae).__name__}: decoder init norm "
                   f"{cfg.decoder_init_norm}, b_dec=0, "
                   + (f"threshold lr {cfg.topk_threshold_lr}, " if batchtopk else "") +
                   f"rescale_acts_by_decoder_norm={cfg.rescale_acts_by_decoder_norm}, AuxK "
                   f"k_aux={d // 2} coef {aux_loss_coefficient:g}, grad clip 1.0, Adam eps 1e-8"
                   + (", bf16 autocast" if autocast else ""))

  def to_device(self, batch: np.ndarray):
    """A raw batch as a float32 tensor on the peer's device (for timing without the copy)."""
    torch = self._torch
    # np.array copies: torch wants a writable array, and arrays from jax are read-only.
    return torch.from_numpy(np.array(batch, dtype=np.float32)).to(self.device)

  def make_dead(self, frac: float):
    """The first `frac` of latents dead and kept dead (b_enc -1e4), so AuxK runs every step."""
    dead = int(frac * self.sae.cfg.d_sae)
    self.trainer.n_forward_passes_since_fired[:dead] = 10 ** 9
    with self._torch.no_grad():
      self.sae.b_enc[:dead] = -1e4

  def step(self, batch):
    """One SAELens training step on a raw batch (numpy, or a tensor from `to_device`); returns
    its loss tensor."""
    torch, self._weights = self._torch, None   # the weights change: a saved copy is stale
    x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(
        np.ascontiguousarray(batch, dtype=np.float32))
    out = self.trainer.step(x)
    self.trainer.n_training_steps += 1
    return out.loss

  def sync(self):
    if self.device.startswith("cuda"):
      self._torch.cuda.synchronize()

  def finish(self):
    """What `fit()` does after its loop: fold the input scale into the weights."""
    scaler = self.trainer.activation_scaler
    if scaler.scaling_factor is not None:
      self.sae.fold_activation_norm_scaling_factor(scaler.scaling_factor)
      scaler.scaling_factor = None

  def dead_frac(self) -> float:
    """Latents that have not fired for `dead_window_steps` steps (jaxsae's definition)."""
    return float((self.trainer.n_forward_passes_since_fired >= self.window).float().mean())

  def reconstruct(self, x: np.ndarray, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(x_hat, l0 per row) of raw rows, through SAELens's inference forward (after `finish`); a
    BatchTopK SAE through the JumpReLU its save_inference_model writes."""
    if self.jumprelu:
      return peers.numpy_reconstruct(self.sae_weights(), x, batch)
    torch = self._torch
    outs, l0s = [], []
    self.sae.eval()
    with torch.no_grad():
      for i in range(0, len(x), batch):
        xb = torch.from_numpy(np.ascontiguousarray(x[i:i + batch], dtype=np.float32)).to(self.device)
        z = self.sae.encode(xb)
        outs.append(self.sae.decode(z).cpu().numpy())
        l0s.append((z != 0).sum(-1).cpu().numpy())
    self.sae.train()
    return np.concatenate(outs), np.concatenate(l0s)

  def sae_weights(self):
    """The SAE as save_inference_model writes it, read by jaxsae.sae_io (after `finish`); written
    and read once (a JumpReLU's held-out scoring and jaxsae.evaluate both use it)."""
    if self._weights is None:
      self._weights = peers.saved_and_read(self.sae.save_inference_model,
                                           "saelens (its save_inference_model)")
    return self._weights

  def decoder_directions(self) -> np.ndarray:
    """Unit-norm decoder rows [n, d]."""
    w = self.sae.W_dec.detach().cpu().numpy()
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)


def time_steps(peer: Peer, batch: np.ndarray, steps: int) -> float:
  """Seconds per SAELens step after one warm-up step, on one fixed batch."""
  peer.step(batch)
  peer.sync()
  t0 = time.perf_counter()
  for _ in range(steps):
    peer.step(batch)
  peer.sync()
  return (time.perf_counter() - t0) / steps
