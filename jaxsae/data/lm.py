"""A Hugging Face causal LM run up to one block, offline (the `[dump]` extra: torch, transformers).

Loads a plain HF folder (config.json + weights) or a GGUF file from disk; the hub is never
contacted (offline mode is set before transformers is imported, and every load is local-only).
For the dump, only blocks 0..L run: forward hooks on block L keep what they see and the last one
stops the forward, and the blocks after L are dropped from memory, so the cost is at most L+1 blocks
and no lm_head. The hook points (HOOKS) are block L's output (resid_post) and the input and output
of its `mlp` submodule (mlp_in: after the pre-MLP norm; mlp_out: before the residual add), the pair
a transcoder maps; several are captured in one forward. With whole_model=True (jaxsae.evaluate) the
hook on block L's output can also replace that output and let the forward go on to the logits: one
hook point for both tools.
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
  """Raised by the last hook of block L: nothing after it needs computing."""


# Block L's hook points, in the order the forward reaches them.
HOOKS = ("mlp_in", "mlp_out", "resid_post")


def check_hooks(hooks) -> tuple:
  """hooks as a tuple, or a DataError listing the allowed names."""
  hooks = tuple(hooks)
  if not hooks or len(set(hooks)) < len(hooks) or not set(hooks) <= set(HOOKS):
    raise DataError(f"hooks {','.join(hooks) or '(none)'}: expected distinct names among "
                    f"{', '.join(HOOKS)}")
  return hooks


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


def find_mlp(block, block_name: str):
  """Block L's MLP module: its `mlp` child, as Llama, Gemma 3 and GPT-2 name it."""
  mlp = getattr(block, "mlp", None)
  if not isinstance(mlp, torch.nn.Module):
    raise DataError(f"block {block_name} has no `mlp` submodule to hook (its children: "
                    f"{', '.join(n for n, _ in block.named_children())})")
  return mlp


def _tensor(x):
  return x[0] if isinstance(x, tuple) else x


class BlockOutput:
  """Calls the LM on token windows [B, T] and returns block `layer`'s output as float32 [B, T, d]
  (or, by capture(), each of `hooks` of block `layer`)."""

  def __init__(self, path: str, layer: int, device: str = "auto", compute_dtype: str = "float32",
               save_hf: str = "", whole_model: bool = False, hooks=("resid_post",)):
    hooks = check_hooks(hooks)
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
    self.hooks = hooks
    self.hook_name = f"{name}.{layer}"   # the block: resid_post, as SAEs and evaluate name it
    self.hook_names = {"resid_post": self.hook_name, "mlp_in": f"{self.hook_name}.mlp.input",
                       "mlp_out": f"{self.hook_name}.mlp.output"}
    self.d = model.config.hidden_size
    self.model = model.eval().to(self.device)
    self.compute_dtype = compute_dtype
    self.bos = self._leading_bos()
    self._captured = {}    # hook -> its tensor in the current forward
    self._last = max(hooks, key=HOOKS.index)   # the forward stops after this one
    self._replace = None   # None: stop at the last hook; else a function of the block output
    self._register(blocks[layer])

  def _register(self, block):
    if "mlp_in" in self.hooks or "mlp_out" in self.hooks:
      mlp = find_mlp(block, self.hook_name)
      if "mlp_in" in self.hooks:   # a pre-hook: with mlp_in alone, the MLP itself never runs
        mlp.register_forward_pre_hook(self._mlp_in_hook, with_kwargs=True)
      if "mlp_out" in self.hooks:
        mlp.register_forward_hook(self._mlp_out_hook)
    if "resid_post" in self.hooks:
      block.register_forward_hook(self._block_hook)

  def _keep(self, hook: str, x):
    """Keeps x as hook's rows, then stops the forward if nothing later is needed."""
    self._captured[hook] = x[:, 1:] if self.bos is not None else x   # BOS's row is no window row
    if hook == self._last and self._replace is None:
      raise _Stop

  def _mlp_in_hook(self, module, args, kwargs):
    self._keep("mlp_in", args[0] if args else next(iter(kwargs.values())))

  def _mlp_out_hook(self, module, inputs, output):
    self._keep("mlp_out", _tensor(output))

  def _block_hook(self, module, inputs, output):
    out = _tensor(output)
    self._keep("resid_post", out)   # resid_post is always last: without `replace` this stopped
    new = self._replace(self._captured["resid_post"]).to(out.dtype)
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
    self._captured, self._replace, logits = {}, replace, None
    try:
      with autocast:
        logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                            use_cache=False).logits
    except _Stop:
      pass
    finally:
      self._replace = None
    missing = [self.hook_names[h] for h in self.hooks if h not in self._captured]
    if missing:
      raise DataError(f"the hook on {', '.join(missing)} did not fire")
    return logits[:, 1:] if logits is not None and self.bos is not None else logits

  @torch.no_grad()
  def capture(self, tokens: np.ndarray) -> dict:
    """{hook: its rows [B, T, d] as float32 numpy} for each of `hooks`, all from one forward, which
    stops after the last of them."""
    self._forward(tokens, None)
    return {h: self._captured[h].float().cpu().numpy() for h in self.hooks}

  def __call__(self, tokens: np.ndarray) -> np.ndarray:
    """The first hook's rows (block `layer`'s output by default) [B, T, d] as float32 numpy."""
    return self.capture(tokens)[self.hooks[0]]

  @torch.no_grad()
  def logits(self, tokens: np.ndarray, replace=lambda out: out):
    """(float32 logits [B, T, V], block `layer`'s output as it came out of the block, before
    `replace`) with block `layer`'s output replaced by replace(output) for the rest of the forward;
    the default leaves it as it is (the clean run)."""
    if not self.whole_model or "resid_post" not in self.hooks:
      raise ValueError("logits need the whole model and block `layer`'s output: "
                       "BlockOutput(..., whole_model=True) with resid_post among its hooks")
    logits = self._forward(tokens, replace)
    return logits.float(), self._captured["resid_post"].float()
