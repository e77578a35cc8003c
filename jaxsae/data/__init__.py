"""Activation sources: each returns a `Data` (see source.py) for one JAX process."""
from jaxsae import knobs
from jaxsae.data import loader, source, synthetic
from jaxsae.data.source import BatchIterator, Data, DataError

SOURCES = ("synthetic", "npy", "store")


def create(config, process_index: int = 0, process_count: int = 1) -> Data:
  """Opens config.data for this process; raises DataError naming the file or field at fault."""
  dc = config.data
  common = dict(global_batch=config.train.batch_size, eval_rows=dc.eval_rows,
                eval_batches=dc.eval_batches, process_index=process_index,
                process_count=process_count)
  if dc.source == "synthetic":
    return synthetic.create(dc.synthetic, config.sae.d, **common)
  if dc.source == "npy":
    return source.open_npy(dc.path, seed=dc.shuffle_seed, **common)
  if dc.source == "store":
    if knobs.retain_freed_memory(config)[0]:
      loader.retain_freed_memory()
    data = loader.open_store(dc.path, seed=dc.shuffle_seed, epochs=dc.epochs,
                             group_chunks=dc.shuffle_buffer_chunks, num_threads=dc.num_threads,
                             prefetch=dc.prefetch, allow_incomplete=dc.allow_incomplete,
                             direct_read=knobs.direct_read(config)[0],
                             dtype=dc.dtype, missing_hint=dc.missing_hint,
                             target_path=dc.target_path, **common)
    if data.d != config.sae.d:   # checked here too, so the message names the store
      data.close()
      raise DataError(f"sae.d={config.sae.d} but the store at {dc.path} holds d={data.d}")
    d_out = config.sae.d_out or config.sae.d
    if dc.target_path and data.d_target != d_out:
      data.close()
      raise DataError(f"sae.d_out={config.sae.d_out} ({d_out} wide) but the target store at "
                      f"{dc.target_path} holds d={data.d_target}: set sae.d_out={data.d_target}")
    return data
  raise DataError(f"data.source={dc.source!r}: expected one of {SOURCES}")
