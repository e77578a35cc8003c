"""What a compiled step communicates: the collectives in its optimized HLO text and their sizes.

Used by tests (no [B, n] array may ever cross devices) and bench/sharding.py (collective bytes per
step beside the analytic minimum). Sizes are per device: the bytes of each collective's result.
"""
import dataclasses
import math
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
          "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]")
_OP = re.compile(r"^\s*(?:ROOT )?%?(\S+) = (.*?) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass
class Collective:
  name: str
  kind: str                  # all-gather, all-reduce, ...
  arrays: list               # [(dtype, shape tuple)] of the result
  op_name: str               # the JAX source op, e.g. jit(_train_step)/shard_map/.../all_gather

  @property
  def bytes(self) -> int:
    return sum(_BYTES[t] * math.prod(s) for t, s in self.arrays)

  @property
  def largest(self) -> int:
    """Elements of the largest array it moves."""
    return max((math.prod(s) for _, s in self.arrays), default=0)


def collectives(hlo_text: str) -> list[Collective]:
  """Every collective of an optimized HLO module (compiled.as_text()), once each."""
  out = []
  for line in hlo_text.splitlines():
    m = _OP.match(line)
    if not m:
      continue
    arrays = [(t, tuple(int(x) for x in dims.split(",") if x))
              for t, dims in _ARRAY.findall(m.group(2))]
    op = _OP_NAME.search(line)
    out.append(Collective(m.group(1), m.group(3), arrays, op.group(1) if op else ""))
  return out


def by_branch(colls: list[Collective]) -> dict[str, list[Collective]]:
  """Splits a train step's collectives by the AuxK lax.switch: 'common' (the main selection, the
  gradients' and sums' psums: every step), and 'branch_0' (no dead latents: nothing), 'branch_1',
  ... (AuxK at each width and dead-list length, step.StepFns.aux_branches; the last: AuxK at full
  width over all latents), of which one runs per step."""
  groups = {"common": [], "branch_0": [], "branch_1": []}
  for c in colls:
    m = re.search(r"/(branch_\d+)_fun/", c.op_name)
    groups.setdefault(m.group(1) if m else "common", []).append(c)
  return groups


def last_branch(groups: dict) -> str:
  """The name of the highest-numbered branch: AuxK at full width over all latents."""
  return max((g for g in groups if g.startswith("branch_")), key=lambda g: int(g.split("_")[1]))
