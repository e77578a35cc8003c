r"""Loader throughput: rows/s and MB/s delivered to the host, beside the raw read rate of the files.

For each (d, dtype) it writes a store of --rows random rows, then, in the same run and on the same
files, warm in the page cache (a store that fits in RAM) or, with --cold, off the disk:

  raw        every shard file read front to back with plain readinto(): the bytes-off-disk ceiling
  ts_seq     the chunks read in order through TensorStore (checksums verified), no shuffling
  loader_ts  the training pipeline reading through TensorStore (data.direct_read=False)
  loader     the training pipeline as configured by default: chunks read by pread() with their
             crc32c checked (shard_files.py), shuffled chunk order, groups mixed, batches cut

The readers take turns within each repeat, so a busy neighbour slows all of them alike.

  python bench/loader.py --rows=262144 --batch=4096 [--cold] [--train_rows_per_sec=N]

--train_rows_per_sec (what the CPU train step consumes, from the trainer's perf/tokens_per_sec)
adds the loader/train ratio. Prints a markdown table and appends it, with the date, machine and
command, to --results (bench/RESULTS.md by default; '' to skip).

On a many-core host (the GPU machine has 16 cores) more reader threads use more of the memory
system: `bash bench/gpu/run_all.sh loader` runs this with 2 and with 8 threads.
"""
import datetime
import glob
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxsae.data.loader import open_store, retain_freed_memory  # noqa: E402
from jaxsae.data.store import Layout, Store, StoreWriter, numpy_dtype  # noqa: E402

flags.DEFINE_integer("rows", 262144, "Rows per store.")
flags.DEFINE_integer("batch", 4096, "Batch rows (one process).")
flags.DEFINE_integer("chunk_rows", 4096, "Rows per chunk.")
flags.DEFINE_integer("shard_rows", 65536, "Rows per shard file.")
flags.DEFINE_bool("checksum", True, "crc32c per chunk (the store default).")
flags.DEFINE_integer("group", 8, "data.shuffle_buffer_chunks")
flags.DEFINE_integer("threads", 2, "data.num_threads")
flags.DEFINE_integer("prefetch", 2, "data.prefetch")
flags.DEFINE_list("dims", ["576", "768"], "Widths d.")
flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Stored dtypes.")
flags.DEFINE_integer("repeats", 3, "Timed passes of each reader; the best is kept.")
flags.DEFINE_bool("cold", False, "Drop the page cache before every timed pass (needs root): "
                  "the files then come off the disk, as for a store larger than RAM.")
flags.DEFINE_bool("retain_freed_memory", True, "data.retain_freed_memory (the trainer's default), "
                  "set before any reader runs so all three share the allocator policy.")
flags.DEFINE_float("train_rows_per_sec", 0.0, "CPU train step consumption, for the ratio.")
flags.DEFINE_string("dir", "", "Where to write the stores (default: a temporary folder).")
flags.DEFINE_string("results", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                            "RESULTS.md"), "markdown file to append to ('' to skip)")
FLAGS = flags.FLAGS


def make_store(path, d, dtype):
  w = StoreWriter(path, d, dtype, {}, Layout(FLAGS.chunk_rows, FLAGS.shard_rows, checksum=FLAGS.checksum), {"bench": 1})
  rng = np.random.default_rng(0)
  block = FLAGS.shard_rows
  for start in range(0, FLAGS.rows, block):
    x = rng.standard_normal((min(block, FLAGS.rows - start), d), np.float32)
    w.append(x.astype(numpy_dtype(dtype)))
    if w.should_commit():
      w.commit({})
  w.finish({})


def best(readers):
  """{name: (what it returned, best time)}, the readers taking turns within each repeat."""
  times = {name: [] for name in readers}
  for _ in range(FLAGS.repeats):
    for name, fn in readers.items():
      if FLAGS.cold:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
          f.write("3\n")
      t = time.perf_counter()
      got = fn()
      times[name].append((time.perf_counter() - t, got))
  return {name: (t[0][1], min(x for x, _ in t)) for name, t in times.items()}


def raw_read(path):
  buf = bytearray(16 << 20)
  total = 0
  for name in sorted(glob.glob(os.path.join(path, "acts", "c", "*", "0"))):
    with open(name, "rb", buffering=0) as f:
      while n := f.readinto(buf):
        total += n
  return total


def ts_sequential(path):
  s = Store(path)
  rows = 0
  for i in range(s.num_chunks):
    rows += len(s.read(*s.chunk(i)))
  return rows


def loader_pass(path, direct_read=True):
  data = open_store(path, direct_read=direct_read, global_batch=FLAGS.batch, eval_rows=0, eval_batches=0, seed=0, epochs=1,
                    group_chunks=FLAGS.group, num_threads=FLAGS.threads, prefetch=FLAGS.prefetch,
                    allow_incomplete=False, process_index=0, process_count=1)
  rows = sum(len(b) for b in data.train)
  data.close()
  return rows


def main(_):
  root = FLAGS.dir or tempfile.mkdtemp(prefix="jaxsae_bench_loader_")
  retained = FLAGS.retain_freed_memory and retain_freed_memory()
  setting = (f"{'cold' if FLAGS.cold else 'warm'} page cache; {FLAGS.rows} rows per store, "
             f"batch {FLAGS.batch}, chunks {FLAGS.chunk_rows}, shards {FLAGS.shard_rows}, group "
             f"{FLAGS.group} chunks, {FLAGS.threads} threads, prefetch {FLAGS.prefetch}, "
             f"{os.cpu_count()} CPUs; best of {FLAGS.repeats}; freed memory "
             f"{'retained' if retained else 'returned to the OS'}; load {os.getloadavg()[0]:.1f}")
  print(setting, flush=True)
  head = ("| d | dtype | raw MB/s | ts_seq MB/s | loader_ts MB/s | loader rows/s | loader MB/s |"
          " loader/raw |")
  head += " loader/train |" if FLAGS.train_rows_per_sec else ""
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  try:
    for d in map(int, FLAGS.dims):
      for dtype in FLAGS.dtypes:
        path = os.path.join(root, f"d{d}_{dtype}")
        make_store(path, d, dtype)
        os.sync()   # the new store's dirty pages go to disk now, not during the timed reads
        row_bytes = d * numpy_dtype(dtype).itemsize
        got = best({"raw": lambda: raw_read(path), "ts_seq": lambda: ts_sequential(path),
                    "loader_ts": lambda: loader_pass(path, direct_read=False),
                    "loader": lambda: loader_pass(path)})
        (raw_bytes, t_raw), (ts_rows, t_ts), (ts_ld_rows, t_ts_ld), (rows, t_ld) = got.values()
        raw_mb = raw_bytes / t_raw / 1e6
        ts_mb = ts_rows * row_bytes / t_ts / 1e6
        ts_ld_mb = ts_ld_rows * row_bytes / t_ts_ld / 1e6
        ld_mb = rows * row_bytes / t_ld / 1e6
        line = (f"| {d} | {dtype} | {raw_mb:,.0f} | {ts_mb:,.0f} | {ts_ld_mb:,.0f} | "
                f"{rows / t_ld:,.0f} | {ld_mb:,.0f} | {ld_mb / raw_mb:.0%} |")
        if FLAGS.train_rows_per_sec:
          line += f" {rows / t_ld / FLAGS.train_rows_per_sec:.1f}x |"
        lines.append(line)
        print(line, flush=True)
        shutil.rmtree(path)
  finally:
    if not FLAGS.dir:
      shutil.rmtree(root, ignore_errors=True)
  print("\n".join(lines))
  if FLAGS.results:
    cmd = "python bench/loader.py " + " ".join(sys.argv[1:])
    with open(FLAGS.results, "a") as f:
      f.write(f"\n### Loader, {datetime.date.today()}: `{cmd.strip()}`\n\n{setting}, load at the "
              f"end {os.getloadavg()[0]:.1f}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
  app.run(main)
