"""EleutherAI sparsify's top-k SAE as a benchmark peer: built and stepped as its Trainer does.

Needs `eai-sparsify` (pinned in the [bench] extra; it pulls PyTorch: install torch first, see
BUILD.md). Written against sparsify 1.3.3.

What is sparsify's own, used unchanged:
  * `sparsify.Trainer.__init__`, run as-is: it builds the `SparseCoder` (under
    `torch.manual_seed(seed)`: nn.Linear's default encoder init, bias 0, decoder = encoder rows
    scaled to unit norm, b_dec 0), its optimizer and LR schedule, and its dead-latent token
    counters. The Trainer wants a Hugging Face model to hook; it is given a stand-in
    `PreTrainedModel` whose one layer ("layers.0") has width d, only for its width probe.
  * `SparseCoder.forward`: its fused encoder (dense GEMM, ReLU, top-k, a backward that
    index-adds over the k selected latents only), its sparse decoder (`decoder_impl`: the Triton
    embedding-bag kernel when Triton imports, else torch's `embedding_bag`; `versions()` says
    which), its FVU and its AuxK (k_aux = d // 2, scaled by min(dead / k_aux, 1), normalized by the
    batch variance), and the bf16 autocast its forward carries on CUDA (always on when the GPU
    supports bf16; nothing on CPU).
  * The optimizer as `Trainer.__init__` makes it: `adam` (bitsandbytes' Adam8bit when installed,
    else torch.optim.Adam, eps 1e-8, with transformers' linear warmup + linear decay to 0 over the
    run) or `signum` (its default: SignSGD inside schedulefree's ScheduleFreeWrapper, momentum
    0.95, no schedule). lr None takes its n-scaled default (adam 2e-4, signum 5e-3, times
    sqrt(2^14 / n)).

What is re-typed, because sparsify has no per-step seam (its step is the body of `fit()`, a
forward hook inside a loop over an LM's batches): `Peer.step` is that body, line for line, for one
hookpoint, loss_fn="fvu", grad_acc_steps = micro_acc_steps = 1, no DDP: on the first step b_dec is
set to the batch mean; every step the decoder rows are renormalized, the dead mask is read from the
token counters (when auxk_alpha > 0), the loss fvu + auxk_alpha * auxk + multi_topk_fvu / 8 is
backpropagated (the FVU is read to the host, as fit() logs it), the decoder gradients lose their
component along the rows, the optimizer and scheduler step, and the counters advance by the
batch's tokens. `torch.set_float32_matmul_precision("high")`, which fit() sets for good, is set
around each step and restored, so it does not leak into a peer timed in the same process.

What the benchmark sets: the batches (exactly jaxsae's numpy batches, in the same order, raw:
sparsify trains on raw hidden states and has no input scaling), n, k, lr, the number of steps (the
schedule's length), `lr_warmup_steps` (jaxsae's warmup, 0 in the benchmark configs, instead of
sparsify's default 1000, which would keep a 150-step run below 15% of its LR), `auxk_alpha`
(jaxsae's 1/32, the paper's value; sparsify's default is 0, AuxK off) and
`dead_feature_threshold` (jaxsae's dead_tokens - 1: sparsify counts a latent dead above the
threshold, jaxsae at or above dead_tokens; the same set).

A transcoder (`transcode=True`: sparsify's SparseCoderConfig, which keeps the output at the input's
width d) takes batches of rows [x | y], the input and target side by side as jaxsae's paired stores
give them (jaxsae/data/paired.py), and steps as fit() does for one: the MLP's input x is encoded
(uncentred), its output y rebuilt; W_dec starts at 0; on the first step the encoder bias is set to
-mean(x) W_enc^T and b_dec to mean(y); the decoder is neither renormalized nor its gradients
projected; FVU and AuxK are y's. `skip_connection=True` adds its W_skip [d, d] (zero at init).
"""
import contextlib
import io
import os

import numpy as np

from bench import peers

os.environ.setdefault("TQDM_DISABLE", "1")

LABEL = "sparsify"
HOOK = "layers.0"


def versions() -> dict:
  import torch
  with contextlib.redirect_stdout(io.StringIO()):   # "Triton not installed, ..." on CPU
    import sparsify
    from sparsify.utils import decoder_impl
  return {"sparsify": sparsify.__version__, "torch": torch.__version__,
          "torch_threads": torch.get_num_threads(), "sparsify_decoder": decoder_impl.__name__}


def default_lr(n: int, optimizer: str) -> float:
  """What sparsify's Trainer picks when lr is None."""
  return {"adam": 2e-4, "signum": 5e-3}[optimizer] / (n / 2 ** 14) ** 0.5


def _rows_model(d: int):
  """A stand-in Hugging Face model with one layer of width d: all that Trainer.__init__ reads."""
  import torch
  from torch import nn
  from transformers import PretrainedConfig, PreTrainedModel

  class RowsConfig(PretrainedConfig):
    model_type = "jaxsae_bench_rows"

  class RowsModel(PreTrainedModel):
    config_class = RowsConfig

    def __init__(self, config):
      super().__init__(config)
      self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)   # gives it a device
      self.layers = nn.ModuleList([nn.Identity()])

    def forward(self, input_ids=None, **_):
      h = self.anchor.new_zeros(*input_ids.shape, self.config.hidden_size)
      for layer in self.layers:
        h = layer(h)
      return h

  return RowsModel(RowsConfig(hidden_size=d, num_hidden_layers=1))


class Peer:
  """One sparsify SparseCoder with its Trainer's optimizer; `step(batch)` trains on a raw batch."""

  def __init__(self, d: int, n: int, k: int, lr: float | None, batch: int, steps: int,
               dead_tokens: int, *, optimizer: str = "adam", auxk_alpha: float = 1 / 32,
               warmup_steps: int = 0, multi_topk: bool = False, device: str = "cpu",
               seed: int = 0, transcode: bool = False, skip: bool = False):
    import torch
    with contextlib.redirect_stdout(io.StringIO()) as log:
      from sparsify import SaeConfig, TrainConfig, Trainer
      cfg = TrainConfig(
          SaeConfig(num_latents=n, k=k, multi_topk=multi_topk, transcode=transcode,
                    skip_connection=skip), batch_size=1,
          optimizer=optimizer, lr=lr, lr_warmup_steps=warmup_steps, auxk_alpha=auxk_alpha,
          dead_feature_threshold=max(dead_tokens - 1, 0), hookpoints=[HOOK], init_seeds=[seed],
          log_to_wandb=False)
      # len(dataset) // cfg.batch_size is the schedule's length in steps: one "sequence" per step.
      self.trainer = Trainer(cfg, range(steps), _rows_model(d).to(device))
    self.setup_log = log.getvalue()
    self.sae = self.trainer.saes[HOOK]
    self.did_fire = torch.zeros(n, device=device, dtype=torch.bool)
    self.device, self.dead_tokens, self.d, self._torch = device, dead_tokens, d, torch
    opt = type(self.trainer.optimizers[0]).__name__
    if optimizer == "signum":
      opt = f"SignSGD in {opt}(momentum 0.95)"
    if transcode:
      model = ("transcoder: nn.Linear encoder init, zero decoder, encoder bias = -(first batch's "
               "input mean) W_enc^T, b_dec = first batch's target mean, decoder not normalized"
               + (", skip connection" if skip else ""))
    else:
      model = ("nn.Linear encoder init, unit decoder, b_dec = first batch mean, decoder grads "
               "projected")
    self.recipe = (f"sparsify Trainer, optimizer={optimizer} ({opt}, lr "
                   f"{self.trainer.optimizers[0].param_groups[0]['lr']:.3g}"
                   + (", linear warmup+decay to 0" if self.trainer.lr_schedulers else "")
                   + f"); {model}, AuxK k_aux={d // 2} alpha={auxk_alpha:g}, raw inputs")

  def to_device(self, batch: np.ndarray):
    torch = self._torch
    # np.array copies: torch wants a writable array, and arrays from jax are read-only.
    return torch.from_numpy(np.array(batch, dtype=np.float32)).to(self.device)

  def step(self, batch) -> float:
    """One step of sparsify's fit() (loss_fn="fvu") on a raw batch (a transcoder's: rows [x | y]);
    returns its FVU."""
    torch = self._torch
    batch = batch if isinstance(batch, torch.Tensor) else self.to_device(batch)
    batch = batch.to(self.device)
    # fit()'s hook: a transcoder's inputs and outputs are the module's; an SAE's both its output.
    x, y = (batch[:, :self.d], batch[:, self.d:]) if self.sae.cfg.transcode else (batch, batch)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")   # fit(): "Use Tensor Cores even for fp32 matmuls"
    try:
      t, sae, cfg = self.trainer, self.sae, self.trainer.cfg
      # ---- fit()'s hook, for one SAE, micro_acc_steps = 1 ----
      if t.global_step == 0 and not cfg.finetune:
        if cfg.sae.transcode:
          sae.encoder.bias.data = -x.mean(0).to(sae.dtype) @ sae.encoder.weight.data.T
        sae.b_dec.data = y.mean(0).to(sae.dtype)
      if sae.cfg.normalize_decoder and not cfg.sae.transcode:
        sae.set_decoder_norm_to_unit_norm()
      dead_mask = (t.num_tokens_since_fired[HOOK] > cfg.dead_feature_threshold
                   if cfg.auxk_alpha > 0 else None)
      total_variance = (y - y.mean(0)).pow(2).sum()
      out = sae(x=x, y=y, dead_mask=dead_mask, total_variance=total_variance)
      self.did_fire[out.latent_indices.flatten()] = True
      fvu = float(out.fvu.detach())            # fit() logs avg_fvu: a host read every step
      if cfg.auxk_alpha > 0:
        float(out.auxk_loss.detach())          # and avg_auxk_loss
      loss = out.fvu + cfg.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
      loss.div(cfg.grad_acc_steps * cfg.micro_acc_steps).backward()
      # ---- fit()'s loop after the forward ----
      if cfg.sae.normalize_decoder and not cfg.sae.transcode:
        sae.remove_gradient_parallel_to_decoder_directions()
      for optimizer in t.optimizers:
        optimizer.step()
        optimizer.zero_grad()
      for scheduler in t.lr_schedulers:
        scheduler.step()
      with torch.no_grad():
        counts = t.num_tokens_since_fired[HOOK]
        counts += x.shape[0]
        counts[self.did_fire] = 0
        self.did_fire.zero_()
      t.global_step += 1
    finally:
      torch.set_float32_matmul_precision(precision)
    return fvu

  def sync(self):
    if str(self.device).startswith("cuda"):
      self._torch.cuda.synchronize()

  def make_dead(self, frac: float):
    """The first `frac` of latents dead and kept dead (encoder bias -1e4): AuxK runs every step."""
    dead = int(frac * self.sae.num_latents)
    self.trainer.num_tokens_since_fired[HOOK][:dead] = 2 ** 62
    with self._torch.no_grad():
      self.sae.encoder.bias[:dead] = -1e4

  def finish(self):
    """What the Trainer does before it saves: schedule-free optimizers to their eval weights."""
    from schedulefree import ScheduleFreeWrapper
    for optimizer in self.trainer.optimizers:
      if isinstance(optimizer, ScheduleFreeWrapper):
        optimizer.eval()

  def dead_frac(self) -> float:
    """Latents that have not fired for `dead_tokens` tokens (jaxsae's definition)."""
    counts = self.trainer.num_tokens_since_fired[HOOK]
    return float((counts >= self.dead_tokens).float().mean())

  def reconstruct(self, x: np.ndarray, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(output, l0 per row) of raw input rows, through SparseCoder.encode/decode plus, with a skip
    connection, x W_skip^T as its forward adds it (after `finish`)."""
    torch = self._torch
    outs, l0s = [], []
    with torch.no_grad():
      for i in range(0, len(x), batch):
        xb = self.to_device(x[i:i + batch])
        acts, idx, _ = self.sae.encode(xb)
        out = self.sae.decode(acts, idx)
        if self.sae.W_skip is not None:
          out += xb @ self.sae.W_skip.mT
        outs.append(out.float().cpu().numpy())
        l0s.append((acts > 0).sum(-1).cpu().numpy())
    return np.concatenate(outs), np.concatenate(l0s)

  def sae_weights(self):
    """The SAE as SparseCoder.save_to_disk writes it, read by jaxsae.sae_io (after `finish`)."""
    return peers.saved_and_read(self.sae.save_to_disk, "sparsify (its save_to_disk)")

  def decoder_directions(self) -> np.ndarray:
    """Unit-norm decoder rows [n, d]."""
    w = self.sae.W_dec.detach().float().cpu().numpy()
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
