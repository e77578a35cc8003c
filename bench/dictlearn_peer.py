"""Samuel Marks' dictionary_learning top-k SAE as a benchmark peer: its TopKTrainer, stepped by
its own `update`.

Needs `dictionary-learning` 0.1.0, installed without its declared dependencies (BUILD.md):
  pip install --no-deps dictionary-learning==0.1.0
Its package __init__ imports its ActivationBuffer, hence nnsight, and its wheel declares nnsight,
circuitsvis, umap-learn, plotly, datasets, wandb, zstandard and llvmlite, none of which its
trainers import. The trainer path (dictionary_learning.trainers.*, .dictionary, .config) imports
only torch and einops, so this module loads it under an empty stand-in for the top-level package
(`_library`): the package's __init__ never runs and nnsight is never imported.

What is dictionary_learning's own, used unchanged (0.1.0, dictionary_learning/trainers/top_k.py):
  * `TopKTrainer.__init__`: under `torch.manual_seed(seed)` it builds `AutoEncoderTopK` (nn.Linear
    decoder init scaled to unit-norm columns, encoder = decoder transposed, encoder bias 0,
    b_dec 0), torch.optim.Adam (betas 0.9/0.999, eps 1e-8), its LambdaLR schedule
    (`get_lr_schedule`: linear warmup from 0, constant, optional linear decay to 0 from
    `decay_start`), its AuxK settings (k_aux = d // 2, auxk_alpha 1/32) and its token counters.
  * `TopKTrainer.update(step, x)`, called as is for every step: on step 0 b_dec = the geometric
    median of the batch; then its loss (dense encoder, ReLU, per-token top-k scattered into a dense
    [B, n] code, dense decoder GEMM; summed-over-d squared error averaged over the batch, plus
    auxk_alpha x AuxK: the top-k_aux dead latents' post-ReLU activations reconstructing the
    residual, normalized by the residual's variance), the counters, the decoder-gradient
    projection, gradient clipping at norm 1.0, the optimizer and scheduler step, the decoder
    columns renormalized, and `loss.item()` (a host read every step).
  * The loop body of its `training.trainSAE` around that call, for one trainer: the batch cast to
    `autocast_dtype`, divided by the norm factor when `normalize_activations`, and `update` run
    under `torch.autocast(cuda, autocast_dtype)` on CUDA (nothing on CPU); at the end
    `ae.scale_biases(norm_factor)` folds the input scale into the biases (`finish`). The one
    departure: the division is out of place (trainSAE's `act /= norm_factor` divides its data
    loader's tensor in place, which would shrink a batch that the benchmark reuses).

What the benchmark sets: the batches (exactly jaxsae's numpy batches, in the same order), n, k,
lr, the number of steps (the schedule's length), `warmup_steps` (jaxsae's, 0 in the benchmark
configs, instead of its default 1000, which its schedule refuses for runs of <= 1000 steps),
`decay_start` (where jaxsae's final linear decay starts, when it has one: the same schedule step
for step), the dead-latent threshold (`trainer.dead_feature_threshold`, hard-coded to 10M tokens
in its __init__, set to jaxsae's dead_tokens afterwards: it counts a latent dead at or above the
threshold, as jaxsae does), and the norm factor: its `normalize_activations` scales inputs to unit
mean squared norm (jaxsae: mean squared norm d), with the mean squared norm jaxsae estimated,
instead of trainSAE estimating it from 100 extra batches.
"""
import contextlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys

import numpy as np

from bench import peers

os.environ.setdefault("TQDM_DISABLE", "1")

LABEL = "dictionary_learning"
DIST = "dictionary-learning"


def _library(module: str = "top_k"):
  """dictionary_learning.trainers.<module>, imported without running dictionary_learning/__init__.py.

  That __init__ imports .buffer, which imports nnsight (and through it transformers and more) at
  module level; the trainers never use it. An empty module made from the package's own spec (its
  __path__ set, its code not executed) stands in for the package in sys.modules, so the submodules
  import from the installed files through their usual relative imports. A package already imported
  in full (nnsight installed and imported elsewhere) is used as it is.
  """
  if "dictionary_learning" not in sys.modules:
    spec = importlib.util.find_spec("dictionary_learning")
    if spec is None:
      raise ImportError("No module named 'dictionary_learning'", name="dictionary_learning")
    package = importlib.util.module_from_spec(spec)   # not executed
    package.__version__ = importlib.metadata.version(DIST)
    sys.modules["dictionary_learning"] = package
  return importlib.import_module(f"dictionary_learning.trainers.{module}")


# architecture -> (its module, its trainer class)
TRAINERS = {"topk": ("top_k", "TopKTrainer"), "batchtopk": ("batch_top_k", "BatchTopKTrainer"),
            "matryoshka_batchtopk": ("matryoshka_batch_top_k", "MatryoshkaBatchTopKTrainer")}


def unit_norm_factor(x: np.ndarray) -> float:
  """The norm_factor that brings rows x to unit mean squared norm (its normalize_activations)."""
  return float(np.sqrt(np.mean(np.sum(np.square(x, dtype=np.float64), axis=1))))


def versions() -> dict:
  import torch
  _library()
  return {"dictionary_learning": importlib.metadata.version(DIST), "torch": torch.__version__,
          "torch_threads": torch.get_num_threads()}


class Peer(peers.TorchPeer):
  """One dictionary_learning AutoEncoderTopK and its TopKTrainer; `step(batch)` trains on a raw
  batch through `TopKTrainer.update`. lr None: its own default, 2e-4 * sqrt(2^14 / n)."""

  def __init__(self, d: int, n: int, k: int, lr: float | None, batch: int, steps: int,
               dead_tokens: int, *, norm_factor: float | None = None, warmup_steps: int = 0,
               decay_steps: int = 0, auxk_alpha: float = 1 / 32, autocast: bool = False,
               device: str = "cpu", seed: int = 0, architecture: str = "topk",
               prefixes: tuple = ()):
    """architecture "batchtopk" / "matryoshka_batchtopk": its BatchTopKTrainer /
    MatryoshkaBatchTopKTrainer (prefixes: the nested dictionaries' sizes below n, turned into its
    group_fractions, equal group weights: its default), with threshold_start_step at a tenth of
    the run (its default, 1000, would leave a run of <= 1000 steps without an inference
    threshold: every positive latent would fire)."""
    import torch
    module, name = TRAINERS[architecture]
    extra = {}
    if architecture != "topk":
      extra["threshold_start_step"] = steps // 10
    if architecture == "matryoshka_batchtopk":
      bounds = (0,) + tuple(prefixes) + (n,)
      extra["group_fractions"] = [(b - a) / n for a, b in zip(bounds, bounds[1:])]
    # Its schedule refuses a decay that starts at the warmup's end (decay_start > warmup_steps),
    # which is jaxsae's default (no warmup, decay over the whole run): it then starts one step
    # later, at warmup + 1 (the rates differ by under lr / steps).
    decay_start = max(steps - decay_steps, warmup_steps + 1) if decay_steps else None
    self.trainer = getattr(_library(module), name)(
        steps=steps, activation_dim=d, dict_size=n, k=k, layer=0, lm_name="jaxsae-bench", lr=lr,
        auxk_alpha=auxk_alpha, warmup_steps=warmup_steps, decay_start=decay_start, seed=seed,
        device=device, **extra)
    self.architecture = architecture
    self.trainer.dead_feature_threshold = dead_tokens
    self.ae = self.trainer.ae
    self.norm_factor, self.dead_tokens, self.device = norm_factor, dead_tokens, device
    self.step_index, self.finished, self._torch = 0, False, torch
    on_cuda = str(device).startswith("cuda")
    # trainSAE casts each batch to autocast_dtype and runs update under CUDA autocast; float32
    # autocast on CUDA is refused by torch ("Disabling autocast"), so fp32 means no autocast.
    self.dtype = torch.bfloat16 if autocast and on_cuda else torch.float32
    self.autocast = (lambda: torch.autocast(device_type="cuda", dtype=self.dtype)) if (
        self.dtype != torch.float32) else contextlib.nullcontext
    schedule = "linear warmup, " if warmup_steps else ""
    schedule += "constant" + (f", linear decay to 0 over the last {decay_steps} steps"
                              if decay_steps else "")
    self.recipe = (f"dictionary_learning {name}: Adam eps 1e-8 lr {self.trainer.lr:.3g} "
                   f"({schedule}), "
                   + (f"threshold from step {extra['threshold_start_step']}, " if extra else "") +
                   f"grad clip 1.0; nn.Linear init, unit decoder columns, encoder = "
                   f"decoder^T, b_dec = geometric median of the first batch; AuxK k_aux={d // 2} "
                   f"alpha={auxk_alpha:g} on post-ReLU dead latents; decoder grads projected, "
                   f"decoder renormalized after each step; "
                   + (f"inputs / {norm_factor:.4g} (unit mean squared norm)" if norm_factor
                      else "raw inputs") + (", bf16 autocast" if self.dtype != torch.float32
                                            else ""))

  def step(self, batch) -> float:
    """trainSAE's loop body for one trainer on a raw batch; returns update's loss."""
    act = self.as_tensor(batch).to(dtype=self.dtype)
    if self.norm_factor:
      act = act / self.norm_factor
    with self.autocast():
      loss = self.trainer.update(self.step_index, act)
    self.step_index += 1
    return loss

  def make_dead(self, frac: float):
    """The first `frac` of latents dead and kept dead (encoder bias -1e4): AuxK runs every step."""
    dead = int(frac * self.ae.dict_size)
    self.trainer.num_tokens_since_fired[:dead] = 10 ** 15
    with self._torch.no_grad():
      self.ae.encoder.bias[:dead] = -1e4

  def finish(self):
    """What trainSAE does after its loop: fold the norm factor into the biases (once)."""
    if self.norm_factor and not self.finished:
      self.ae.scale_biases(self.norm_factor)
    self.finished = True

  def dead_frac(self) -> float:
    """Latents that have not fired for `dead_tokens` tokens (jaxsae's definition and its own)."""
    return float((self.trainer.num_tokens_since_fired >= self.dead_tokens).float().mean())

  def encode_decode(self, x):
    """(x_hat, l0 per row) through AutoEncoderTopK.encode/decode, for `reconstruct`."""
    f = self.ae.encode(x)
    return self.ae.decode(f), (f != 0).sum(-1)

  def _tensors(self) -> tuple:
    """(W_enc [d, n], b_enc, W_dec [n, d], b_dec) as numpy: nn.Linear layers (top-k, BatchTopK)
    or its Matryoshka SAE's own parameters."""
    get = lambda t: t.detach().float().cpu().numpy()
    ae = self.ae
    if hasattr(ae, "W_enc"):
      return get(ae.W_enc), get(ae.b_enc), get(ae.W_dec), get(ae.b_dec)
    return get(ae.encoder.weight).T, get(ae.encoder.bias), get(ae.decoder.weight).T, get(ae.b_dec)

  def sae_weights(self):
    """The SAE in raw units (after `finish`): relu(pre), its top k (or, BatchTopK, those above
    its threshold), then the decoder; sae_io has no reader for dictionary_learning's ae.pt, so
    the tensors are taken directly."""
    from jaxsae import sae_io
    w_enc, b_enc, w_dec, b_dec = self._tensors()
    jump = self.architecture != "topk"
    threshold = np.full(len(b_enc), float(self.ae.threshold), np.float32) if jump else None
    return sae_io.SaeWeights(w_enc, b_enc, w_dec, b_dec, 0 if jump else int(self.ae.k),
                             kind="dictionary_learning", path="dictlearn (its tensors)",
                             threshold=threshold)

  def decoder_directions(self) -> np.ndarray:
    """Unit-norm decoder rows [n, d]."""
    w = self._tensors()[2]
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
