"""Reads a top-k SAE from any file it is kept in, into one small in-memory form.

  load(PATH [, step]) -> SaeWeights

PATH may be a jaxsae workdir (a checkpoint step, newest by default), any jaxsae export (saelens or
sparsify folder, .npz with its .metadata.json), or a top-k SAE saved by the peers themselves:
SAELens's `save_model` / `save_inference_model` folder (cfg.json + sae_weights.safetensors) or
sparsify's `save_to_disk` folder (cfg.json + sae.safetensors; sparsify names each folder after its
hook point). jaxsae.inspect and jaxsae.evaluate both read SAEs through here.

Every SAE comes out in one convention, on *raw* activations x:

  z = relu(topk((x - b_dec) W_enc + b_enc, k)),   x_hat = z W_dec + b_dec

with W_enc [d, n], W_dec [n, d], float32; or, for a JumpReLU SAE (a jaxsae BatchTopK export, a
SAELens "jumprelu" folder, an npz with a threshold array), z = pre where pre > threshold [n], k 0. What the formats do differently is folded into the
weights, exactly: jaxsae's input scale (already folded by the export, and here for a workdir),
SAELens's apply_b_dec_to_input=False (b_dec W_enc moved into b_enc) and
rescale_acts_by_decoder_norm (decoder norms moved into the encoder). sparsify's topk(relu(pre))
keeps the same latents as SAELens's relu(topk(pre)): both keep the k largest pre-activations that
are positive. What cannot be folded (per-input normalization, skip connections, transcoders, other
activations) is refused with the field that says so.
"""
import dataclasses
import json
import os

import numpy as np

from jaxsae import checkpoint_layout, export as export_lib, paths

SAELENS_FILE, SPARSIFY_FILE = "sae_weights.safetensors", "sae.safetensors"
TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")


class SaeError(ValueError):
  """An SAE that cannot be read or used; the message names the path and what is wrong."""


@dataclasses.dataclass
class SaeWeights:
  w_enc: np.ndarray          # [d, n]
  b_enc: np.ndarray          # [n]
  w_dec: np.ndarray          # [n, d]
  b_dec: np.ndarray          # [d]: subtracted before encoding, added after decoding
  k: int                     # 0 for a JumpReLU SAE (threshold set)
  input_scale: float = 1.0   # the constant jaxsae trained with; already folded into the weights
  model: str = ""            # the model and hook point the SAE was trained on ("": not recorded)
  hook: str = ""
  kind: str = ""             # where it came from: "jaxsae workdir", "saelens", "sparsify", "npz"
  path: str = ""
  meta: dict = dataclasses.field(default_factory=dict)   # everything else the file records
  cfg: dict = dataclasses.field(default_factory=dict)    # the folder's cfg.json, if any
  threshold: np.ndarray | None = None   # [n]: a JumpReLU SAE's, instead of k

  def __post_init__(self):
    for name in ("w_enc", "b_enc", "w_dec", "b_dec"):
      setattr(self, name, np.asarray(getattr(self, name), np.float32))
    d, n = self.w_enc.shape
    if self.w_dec.shape != (n, d) or self.b_enc.shape != (n,) or self.b_dec.shape != (d,):
      raise SaeError(f"{self.path}: inconsistent shapes W_enc {self.w_enc.shape}, W_dec "
                     f"{self.w_dec.shape}, b_enc {self.b_enc.shape}, b_dec {self.b_dec.shape}")
    if self.threshold is not None:
      self.threshold = np.asarray(self.threshold, np.float32)
      if self.threshold.shape != (n,):
        raise SaeError(f"{self.path}: threshold of shape {self.threshold.shape}, not [n={n}]")
    elif not 0 < self.k <= n:
      raise SaeError(f"{self.path}: k={self.k} is not in 1..n={n} (is k recorded?)")

  @property
  def d(self) -> int:
    return self.w_enc.shape[0]

  @property
  def n(self) -> int:
    return self.w_enc.shape[1]

  def encode_dense(self, x):
    """[rows, n] codes: relu(top-k((x - b_dec) W_enc + b_enc)), zeros elsewhere (JumpReLU: pre
    where it is above the threshold)."""
    pre = (np.asarray(x, np.float32) - self.b_dec) @ self.w_enc + self.b_enc
    if self.threshold is not None:
      return np.where(pre > self.threshold, np.maximum(pre, 0.0), 0.0)
    kth = np.partition(pre, -self.k, axis=1)[:, -self.k][:, None]
    return np.where(pre >= kth, np.maximum(pre, 0.0), 0.0)


def load(path: str, step: int = -1) -> SaeWeights:
  """The SAE at `path` (see the module docstring); `step` picks a workdir's checkpoint."""
  remote = paths.is_url(path)   # gs://...: a workdir is read there; exports from a local copy
  if not remote and not os.path.exists(path):
    raise SaeError(f"{path}: no such file or folder")
  if paths.of(checkpoint_layout.checkpoint_dir(path)).is_dir():
    try:
      return from_reader(checkpoint_layout.StepReader(path, step))
    except checkpoint_layout.CheckpointNotFound as e:   # no such step, or none complete yet
      raise SaeError(str(e)) from None
  if remote:   # an export on a bucket: read from a temporary local copy
    try:
      with paths.local_copy(path) as local:
        return dataclasses.replace(load(local), path=path)
    except FileNotFoundError:
      raise SaeError(f"{path}: no such file or folder") from None
  if path.endswith(".npz"):
    return _npz(path)
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, SAELENS_FILE)):
      return _saelens(path)
    if os.path.exists(os.path.join(path, SPARSIFY_FILE)):
      return _sparsify(path)
    inner = sorted(f for f in os.listdir(path)
                   if os.path.exists(os.path.join(path, f, SPARSIFY_FILE)))
    if inner:   # a sparsify run folder: one SAE folder per hook point
      raise SaeError(f"{path} holds one SAE per hook point ({', '.join(inner)}): name one, e.g. "
                     f"{os.path.join(path, inner[0])}")
  raise SaeError(f"{path} is not an SAE: expected a jaxsae workdir (checkpoints/), a .npz, or a "
                 f"folder with {SAELENS_FILE} or {SPARSIFY_FILE}")


def from_reader(reader: checkpoint_layout.StepReader) -> SaeWeights:
  """A workdir's checkpoint step, with the input scale folded in as the exports fold it."""
  if reader.transcoder:
    raise SaeError(f"{reader.path} is a transcoder ({reader.config['data']['target_path']} from "
                   f"{reader.config['data']['path']}); only SAEs are read here")
  folded = export_lib.FoldedSae(reader)
  parts = {name: np.concatenate([b for _, b in folded.blocks(name)]) for name in TENSORS}
  meta = reader.describe()
  meta["dump"] = ((reader.run.get("data") or {}).get("info") or {})
  # Without a model behind the data (a store dumped --from-npy), describe() names the source.
  model = "" if meta["model"] in ("npy", "store") else meta["model"]
  threshold = None if folded.threshold is None else np.full(reader.n, folded.threshold)
  return SaeWeights(parts["W_enc"].T, parts["b_enc"], parts["W_dec"], parts["b_dec"],
                    0 if threshold is not None else reader.k, meta["input_scale"], _text(model),
                    _text(meta["hook"]), "jaxsae workdir", paths.normalize(reader.path), meta,
                    threshold=threshold)


def _npz(path: str) -> SaeWeights:
  with np.load(path) as z:
    arrays = {name: z[name] for name in z.files}
  missing = [name for name in TENSORS if name not in arrays]
  if missing:
    raise SaeError(f"{path}: no {', '.join(missing)} array (has {', '.join(sorted(arrays))})")
  meta_path = os.path.splitext(path)[0] + ".metadata.json"
  meta = _read_json(meta_path) if os.path.exists(meta_path) else {}
  if meta.get("transcoder") or "W_skip" in arrays:
    raise SaeError(f"{path} is a transcoder (its output is another hook's); only SAEs are read")
  threshold = arrays.get("threshold")   # a JumpReLU SAE (Gemma Scope, jaxsae BatchTopK)
  if threshold is None and "k" not in meta:
    raise SaeError(f"{path}: k is not recorded (jaxsae's npz export writes it to {meta_path})")
  return SaeWeights(*(arrays[name] for name in TENSORS),
                    0 if threshold is not None else int(meta["k"]),
                    float(meta.get("input_scale", 1.0)), _text(meta.get("model")),
                    _text(meta.get("hook")), "npz", path, meta, threshold=threshold)


def _header(file: str) -> tuple[dict, dict]:
  """(float32 tensors, parsed __metadata__) of a safetensors file."""
  from safetensors import safe_open
  with safe_open(file, framework="numpy") as f:
    meta = {k: _parse(v) for k, v in (f.metadata() or {}).items()}
    tensors = {key: f.get_tensor(key).astype(np.float32) for key in f.keys()}
  return tensors, meta


def _saelens(path: str) -> SaeWeights:
  cfg = _read_json(os.path.join(path, "cfg.json"))
  t, meta = _header(os.path.join(path, SAELENS_FILE))
  where = f"{path}/cfg.json"
  architecture = cfg.get("architecture", "topk")
  if architecture not in ("topk", "jumprelu"):
    raise SaeError(f"{where}: architecture={architecture!r}; only top-k and JumpReLU SAEs are read")
  norm = cfg.get("normalize_activations", "none")
  if norm != "none":
    raise SaeError(f"{where}: normalize_activations={norm!r} scales each input at run time; only "
                   "'none' is read (SAELens folds expected_average_only_in at the end of training)")
  if cfg.get("reshape_activations", "none") != "none":
    raise SaeError(f"{where}: reshape_activations={cfg['reshape_activations']!r} (attention "
                   "heads); only residual-stream SAEs are read")
  jumprelu = architecture == "jumprelu"
  if jumprelu and "threshold" not in t:
    raise SaeError(f"{path}/{SAELENS_FILE}: a jumprelu SAE without a threshold tensor")
  if not jumprelu and "k" not in cfg:
    raise SaeError(f"{where}: no k")
  w_enc, b_enc, w_dec, b_dec = (t[name] for name in TENSORS)
  if cfg.get("rescale_acts_by_decoder_norm", False):
    # pre * |W_dec_j| and z / |W_dec_j|: move the norms into the encoder and out of the decoder.
    norms = np.maximum(np.linalg.norm(w_dec, axis=1), 1e-8)
    w_enc, b_enc, w_dec = w_enc * norms, b_enc * norms, w_dec / norms[:, None]
  if not cfg.get("apply_b_dec_to_input", True):
    b_enc = b_enc + b_dec @ w_enc   # x W_enc + b_enc == (x - b_dec) W_enc + (b_enc + b_dec W_enc)
  recorded = {**(cfg.get("metadata") or {}), **meta}
  model = recorded.get("model") or recorded.get("model_name") or cfg.get("model_name")
  hook = recorded.get("hook") or recorded.get("hook_name") or cfg.get("hook_name")
  return SaeWeights(w_enc, b_enc, w_dec, b_dec, 0 if jumprelu else int(cfg["k"]),
                    float(recorded.get("input_scale", 1.0)), _text(model), _text(hook),
                    "saelens", path, recorded, cfg, threshold=t.get("threshold"))


def _sparsify(path: str) -> SaeWeights:
  cfg = _read_json(os.path.join(path, "cfg.json"))
  t, meta = _header(os.path.join(path, SPARSIFY_FILE))
  where = f"{path}/cfg.json"
  for key, ok in (("activation", "topk"), ("transcode", False), ("skip_connection", False)):
    if cfg.get(key, ok) != ok:
      raise SaeError(f"{where}: {key}={cfg[key]!r}; only plain top-k SAEs ({key}={ok!r}) are read")
  if "W_skip" in t:
    raise SaeError(f"{path}/{SPARSIFY_FILE} has a skip connection (W_skip); it is not read")
  if "k" not in cfg:
    raise SaeError(f"{where}: no k")
  # sparsify's trainer saves each SAE in a folder named after its hook point ("layers.6").
  folder = os.path.basename(os.path.normpath(path))
  hook = meta.get("hook") or (folder if any(c.isdigit() for c in folder) else "")
  return SaeWeights(t["encoder.weight"].T, t["encoder.bias"], t["W_dec"], t["b_dec"],
                    int(cfg["k"]), float(meta.get("input_scale", 1.0)), _text(meta.get("model")),
                    _text(hook), "sparsify", path, meta, cfg)


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise SaeError(f"{path}: cannot read it as JSON ({e})") from None


def _parse(text: str):
  try:
    return json.loads(text)
  except ValueError:
    return text


def _text(value) -> str:
  return "" if value is None else str(value)
