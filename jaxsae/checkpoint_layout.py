"""Where a training run's checkpoints lie and how to read one without JAX.

checkpoint.py writes them (through Orbax) and resumes from them; export.py, sae_io.py and
inspect.py read them through StepReader, which imports neither JAX nor Orbax, so a dictionary is
exported or inspected on any machine.
"""
import json

import numpy as np
import tensorstore as ts

from jaxsae import paths


class CheckpointNotFound(ValueError):
  """No complete checkpoint, or not the step asked for; says which steps exist."""


COMMIT_FILE = "commit_success.txt"   # Orbax's mark of a finished step on gs://


def checkpoint_dir(workdir: str) -> str:
  """workdir/checkpoints: an absolute local path, or a URL (gs://...); see jaxsae/paths.py."""
  return paths.join(paths.normalize(workdir), "checkpoints")


def complete_steps(directory: str) -> list[int]:
  """Steps Orbax finished. Locally a step is renamed into place once complete (an unfinished save
  carries a tmp suffix); on gs:// it is written under its own name and marked complete last by a
  commit_success.txt file (Orbax's CommitFileTemporaryPath: GCS has no atomic folder rename)."""
  folder = paths.of(directory)
  if not folder.is_dir():
    return []
  steps = [p for p in folder.iterdir() if p.name.isdigit()]
  if str(directory).startswith("gs://"):
    steps = [p for p in steps if (p / COMMIT_FILE).exists()]
  return sorted(int(p.name) for p in steps)


class StepReader:
  """One complete checkpoint step: its "run" JSON, and its state's arrays opened through TensorStore
  (Orbax stores each as a zarr array inside an OCDBT database; chunks are at most 64 MiB)."""

  def __init__(self, workdir: str, step: int = -1):
    directory = checkpoint_dir(workdir)
    steps = complete_steps(directory)
    if not steps:
      raise CheckpointNotFound(f"no complete checkpoint in {directory}: train with "
                               f"`python -m jaxsae.main --workdir={workdir} ...` first")
    if step < 0:
      step = steps[-1]
    if step not in steps:
      raise CheckpointNotFound(f"no checkpoint of step {step} in {directory}; steps there: "
                               f"{', '.join(map(str, steps))}")
    self.step, self.path = step, paths.join(directory, str(step))
    self.run = json.loads(paths.of(paths.join(self.path, "run", "metadata")).read_text())
    meta = json.loads(paths.of(paths.join(self.path, "state", "_METADATA")).read_text())
    # Orbax stores the array at tree path (params, W_enc) under the name "params.W_enc".
    self.names = sorted(".".join(str(k["key"]) for k in leaf["key_metadata"])
                        for leaf in meta["tree_metadata"].values()
                        if leaf["value_metadata"]["value_type"] in ("jax.Array", "np.ndarray"))
    self._driver = "zarr3" if meta.get("use_zarr3") else "zarr"
    self._ocdbt = meta.get("use_ocdbt", True)
    self.config = self.run["config"]
    sae, data = self.config["sae"], self.config.get("data", {})
    self.d, self.n, self.k = (int(sae[key]) for key in ("d", "n", "k"))
    self.transcoder = bool(data.get("target_path"))
    self.d_out = int(sae.get("d_out") or self.d)
    self.skip = bool(sae.get("skip", False))

  def array(self, name: str) -> ts.TensorStore:
    """The saved array at a state path such as "params.W_enc" (read lazily, uncached)."""
    state = paths.kvstore_url(paths.join(self.path, "state"))
    if self._ocdbt:
      kvstore = {"driver": "ocdbt", "base": state, "path": name}
    else:
      kvstore = state + name
    return ts.open({"driver": self._driver, "kvstore": kvstore,
                    "context": {"cache_pool": {"total_bytes_limit": 0}}},
                   open=True, read=True).result()

  def read(self, name: str) -> np.ndarray:
    return self.array(name).read().result()

  def input_scale(self) -> float:
    return float(self.read("input_scale"))

  def target_scale(self) -> float:
    """What the rebuilt output is in units of: the input's for an SAE."""
    return float(self.read("target_scale")) if self.transcoder else self.input_scale()

  def describe(self) -> dict:
    """What every export records about where its SAE came from."""
    data = self.run.get("data") or {}
    info = data.get("info") or {}
    return {"model": info.get("model") or data.get("model") or data.get("source", ""),
            "hook": info.get("hook") or data.get("hook", ""),
            "layer": info.get("layer", ""), "tokenizer": info.get("tokenizer", ""),
            "d": self.d, "n": self.n, "k": self.k, "steps": self.step,
            "tokens": int(self.run.get("tokens", 0)), "metrics": self.run.get("metrics") or {},
            "input_scale": self.input_scale(), "jaxsae_version": self.run.get("jaxsae_version", ""),
            "checkpoint": self.path, "architecture": self.architecture,
            **({"threshold": self.threshold()} if self.has_threshold else {}),
            **(self._describe_target(data) if self.transcoder else {})}

  def _describe_target(self, data: dict) -> dict:
    target = data.get("target") or {}
    info = target.get("info") or {}
    return {"transcoder": True, "d_out": self.d_out, "skip": self.skip,
            "target_scale": self.target_scale(),
            "hook_out": info.get("hook") or target.get("hook", ""),
            "target_path": self.config["data"]["target_path"]}

  @property
  def has_b_dec(self) -> bool:
    """Saved since the SAE's output bias b_dec became its own parameter (before, b_pre was both)."""
    return "params.b_dec" in self.names

  @property
  def has_threshold(self) -> bool:
    """A BatchTopK or Matryoshka BatchTopK state holds its inference threshold."""
    return "threshold" in self.names

  @property
  def architecture(self) -> str:
    return self.config["sae"].get("architecture", "topk")

  def threshold(self) -> float:
    """A BatchTopK SAE's inference threshold (in the pre-activations' units, which folding the
    input scale leaves unchanged)."""
    return float(self.read("threshold"))
