"""Performance knobs: config fields that trade only speed or memory, never the result.

Each defaults to None ("automatic"): the system chooses it from the shapes, the mesh and the
backend, logs the choice once at start-up with the reason, and records both in config.json's
`resolved` section (`--dry_run` shows them). A value set in the config is always honoured. Every
resolver returns (value, why) from the config, the mesh and the machine alone, so the step, the
planner and the loader, each calling it, see the same plain Python value before anything compiles.

Where the automatic rule resolves to the field's old fixed default, that default was the measured
best everywhere it was measured; the reason says so.

encoder_tile is the planner's decision (plan.resolve_encoder_tile); the rest are here.
"""
import platform

SET = "set in the config"

# train.dense_op_ratio's automatic value: on the xla path, sparse ops over K latents per token run
# as dense GEMMs over [B, n_local] codes when n_local <= 16 K (ops.Ops.kernels_for). Measured on
# the CI CPU: 1.8x faster AuxK steps at n=4096 (docs/training.md, bench/history.md fourth session).
DENSE_OP_RATIO = 16


def dense_op_ratio(config) -> tuple[int, str]:
  """train.dense_op_ratio: DENSE_OP_RATIO unless set (kernels=pallas never reads it)."""
  if config.train.dense_op_ratio is not None:
    return int(config.train.dense_op_ratio), SET
  return DENSE_OP_RATIO, (f"automatic: on the xla path, ops over K latents run as dense GEMMs "
                          f"where n_local <= {DENSE_OP_RATIO} K, the break-even measured on CPU")


def auxk_buckets(config) -> tuple[bool, str]:
  """train.auxk_buckets: on unless set. The same update at any dead count (step.aux_sizes), and
  never slower: a narrower AuxK is less work."""
  if config.train.auxk_buckets is not None:
    return bool(config.train.auxk_buckets), SET
  return True, "automatic: AuxK only as wide as the dead latents need; same update, less work"


def auxk_compact(config) -> tuple[bool, str]:
  """train.auxk_compact: on unless set. The same update; measured faster on CPU (1.9x AuxK steps
  at n=4096, 1.4x at n=32768, bench/RESULTS.md), not yet timed on GPU."""
  if config.train.auxk_compact is not None:
    return bool(config.train.auxk_compact), SET
  return True, ("automatic: AuxK over a list of the dead latents when few are dead; same update, "
                "1.9x faster AuxK steps on CPU")


def retain_freed_memory(config) -> tuple[bool, str]:
  """data.retain_freed_memory: on for the store loader under glibc (the only libc with the
  mallopt switches, loader.retain_freed_memory), unless set."""
  dc = config.data
  if dc.retain_freed_memory is not None:
    return bool(dc.retain_freed_memory), SET
  if dc.source != "store":
    return False, f"automatic: data.source={dc.source!r} has no store loader"
  libc, version = platform.libc_ver()
  if libc != "glibc":
    return False, f"automatic: the C library is {libc or 'not glibc'}, without glibc's mallopt"
  return True, f"automatic: glibc {version}: the loader reuses freed buffers, ~1.5x faster"


def direct_read(config) -> tuple[bool, str]:
  """data.direct_read: on for a local store, unless set. Its uncompressed chunks are then read by
  pread + crc32c (data/shard_files.py); a compressed one still goes through TensorStore, which
  reads every remote store."""
  from jaxsae.data.shard_files import local_path   # the data package imports this module
  dc = config.data
  if dc.direct_read is not None:
    return bool(dc.direct_read), SET
  if dc.source != "store":
    return False, f"automatic: data.source={dc.source!r} is not a store"
  if local_path(dc.path) is None:
    return False, f"automatic: {dc.path} is not local, TensorStore reads it"
  return True, "automatic: a local store, uncompressed chunks read by pread + crc32c"


# Each knob's key in config.json's `resolved` (beside key + "_source", the why) and its field.
FIELDS = {"encoder_tile": "encoder_tile", "dense_op_ratio": "train.dense_op_ratio",
          "auxk_buckets": "train.auxk_buckets", "auxk_compact": "train.auxk_compact",
          "direct_read": "data.direct_read", "retain_freed_memory": "data.retain_freed_memory"}


def resolve_all(config, data_size: int, model_size: int) -> dict:
  """{key: (value, why)} of every knob (FIELDS), as the run uses them on a (data_size, model_size)
  mesh."""
  from jaxsae import plan   # plan imports model, which imports this module
  return {"encoder_tile": plan.resolve_encoder_tile(config, data_size, model_size),
          "dense_op_ratio": dense_op_ratio(config), "auxk_buckets": auxk_buckets(config),
          "auxk_compact": auxk_compact(config), "direct_read": direct_read(config),
          "retain_freed_memory": retain_freed_memory(config)}


def describe(resolved: dict, indent: str = "  ") -> str:
  """One line per knob of a config.json's `resolved`: field, value, why."""
  return "\n".join(f"{indent}{field:<26}{resolved[key]!s:<8}({resolved[key + '_source']})"
                   for key, field in FIELDS.items())
