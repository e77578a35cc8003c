"""A Hugging Face causal LM run up to one block, offline (the `[dump]` extra: torch, transformers).

Loads a plain HF folder (config.json + weights) or a GGUF file from disk; the hub is never
contacted (offline mode is set before transformers is imported, and every load is local-only).
For the dump, only blocks 0..L run: a forward hook on block L keeps its output and stops the
forward, and the blocks after L are dropped from memory, so the cost is L+1 blocks and no lm_head.
With whole_model=True (jaxsae.evaluate) the same hook, on the same block, can also replace that
output and let the forward go on to the logits: one hook point for both tools.
A tokenizer that starts every text with BOS (Gemma's) gets BOS put before each window too, and
that position is left out of the output, the logits and what `replace` sees: such models are off
their training distribution without it (Gemma 3 270M: ~0.7 nat higher loss even 32+ tokens in).
"""
import itertools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

from jaxsae.data import inputs  # noqa: E402
from jaxsae.data.source import DataError  # noqa: E402

try:
  import torch
  import transformers
except ImportError as e:  # pragma: no cover
  raise ImportError("the dump tool needs the [dump] extra: pip install torch==2.13.0 first (a CPU "
                    "build; or your CUDA build), then pip install 'jaxsae[dump]'") from e


class _Stop(Exception):
  """Raised by the hook on block L: nothing after it needs computing."""


def _locate(path: str) -> tuple[str, dict]:
  """(folder, extra from_pretrained kwargs) for an HF folder or a .gguf file."""
  if os.path.isfile(path) and path.endswith(".gguf"):
    return os.path.dirname(os.path.abspath(path)), {"gguf_file": os.path.basename(path)}
  if not os.path.isdir(path):
    raise DataError(f"--model={path}: no such folder or .gguf file (models load from disk only)")
  if os.path.exists(os.path.join(path, "config.json")):
    return path, {}
  ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
  if len(ggufs) == 1:
    return path, {"gguf_file": ggufs[0]}
  raise DataError(f"--model={path}: expected config.json or exactly one .gguf file, found "
                  f"{ggufs or os.listdir(path)[:10]}")


def find_blocks(model) -> tuple[str, "torch.nn.ModuleList"]:
  """The list of transformer blocks: the ModuleList as long as config.num_hidden_layers."""
  n = model.config.num_hidden_layers
  for name, module in model.named_modules():
    if isinstance(module, torch.nn.ModuleList) and len(module) == n:
      return name, module
  raise DataError(f"cannot find the {n} transformer blocks of {type(model).__name__}")


class BlockOutput:
  """Calls the LM on token windows [B, T] and returns block `layer`'s output as float32 [B, T, d]."""

  def __init__(self, path: str, layer: int, device: str = "auto", compute_dtype: str = "float32",
               save_hf: str = "", whole_model: bool = False):
    folder, extra = _locate(path)
    self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    load = dict(local_files_only=True, **extra)
    self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **load)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **load)
    if save_hf:   # a plain HF folder loads far faster than dequantizing the GGUF again
      if "gguf_file" in extra:   # weights are dequantized fp32 now; drop the GGUF marker
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
      model.save_pretrained(save_hf)
      self.tokenizer.save_pretrained(save_hf)
    name, blocks = find_blocks(model)
    if not 0 <= layer < len(blocks):
      raise DataError(f"--layer={layer}: the model has blocks 0..{len(blocks) - 1}")
    if not whole_model:
      del blocks[layer + 1:]
    self.whole_model = whole_model
    self.hook_name = f"{name}.{layer}"
    self.d = model.config.hidden_size
    self.model = model.eval().to(self.device)
    self.compute_dtype = compute_dtype
    self.bos = self._leading_bos()
    self._out = None
    self._replace = None   # None: stop at the hook; else a function of the block output
    blocks[layer].register_forward_hook(self._hook)

  def _hook(self, module, inputs, output):
    out = output[0] if isinstance(output, tuple) else output
    self._out = out[:, 1:] if self.bos is not None else out   # BOS's row is no window row
    if self._replace is None:
      raise _Stop
    new = self._replace(self._out).to(out.dtype)
    if self.bos is not None:
      new = torch.cat([out[:, :1], new], 1)
    return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

  def _leading_bos(self):
    """The BOS id if the tokenizer puts it at the start of every text by default, else None."""
    bos = self.tokenizer.bos_token_id
    return int(bos) if bos is not None and self.tokenizer("a")["input_ids"][:1] == [bos] else None

  def separator(self) -> int:
    """The token put between documents: EOS, else BOS."""
    tok = self.tokenizer
    sep = tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id
    if sep is None:
      raise DataError("the tokenizer has neither an EOS nor a BOS token to separate documents")
    return int(sep)

  def tokenize(self, text: str) -> list:
    return self.tokenizer(text, add_special_tokens=False)["input_ids"]

  def windows(self, files: list, seq_len: int, tokens: int = 0):
    """(token ids, document ids) windows of the files as the dump cuts them: documents joined by
    separator(), seq_len tokens each, the first ceil(tokens / seq_len) of them (0: all)."""
    limit = -(-tokens // seq_len) if tokens else None
    return itertools.islice(
        inputs.token_windows(files, self.tokenize, self.separator(), seq_len), limit)

  def _forward(self, tokens: np.ndarray, replace):
    ids = torch.from_numpy(np.asarray(tokens, np.int64)).to(self.device)
    if self.bos is not None:
      ids = torch.cat([torch.full_like(ids[:, :1], self.bos), ids], 1)
    autocast = torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16,
                              enabled=self.compute_dtype == "bfloat16")
    self._out, self._replace, logits = None, replace, None
    try:
      with autocast:
        logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                            use_cache=False).logits
    except _Stop:
      pass
    finally:
      self._replace = None
    if self._out is None:
      raise DataError(f"the hook on {self.hook_name} did not fire")
    return logits[:, 1:] if logits is not None and self.bos is not None else logits

  @torch.no_grad()
  def __call__(self, tokens: np.ndarray) -> np.ndarray:
    """Block `layer`'s output [B, T, d] as float32 numpy; the forward stops there."""
    self._forward(tokens, None)
    return self._out.float().cpu().numpy()

  @torch.no_grad()
  def logits(self, tokens: np.ndarray, replace=lambda out: out):
    """(float32 logits [B, T, V], block `layer`'s output as it came out of the block, before
    `replace`) with block `layer`'s output replaced by replace(output) for the rest of the forward;
    the default leaves it as it is (the clean run)."""
    if not self.whole_model:
      raise ValueError("logits need the whole model: BlockOutput(..., whole_model=True)")
    logits = self._forward(tokens, replace)
    return logits.float(), self._out.float()
