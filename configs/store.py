"""Your own activation store (from `python -m jaxsae.dump`): d, dtype and the steps read from it.

  python -m jaxsae.main --config=configs/store.py:/path/to/store --workdir=/tmp/my_sae
  python -m jaxsae.main --config=configs/store.py:/path/to/store --workdir=/tmp/my_sae \
      --config.sae.n=16384 --config.sae.k=64 --config.train.steps=20000

Without --config.train.steps the run makes about one pass over the store's rows. The store's path
goes after the colon (a local folder or a gs:// URL); `--dry_run` prints what the run would do.
"""
import json

from configs import base

TARGET = {"hardware": "one device with 24 GiB (at d=576; the planner checks yours at start-up)",
          "devices": 1, "device_memory": "24GiB"}


def get_config(path: str = ""):
  if not path:
    raise ValueError("configs/store.py needs the store's path: --config=configs/store.py:PATH")
  from jaxsae import paths   # light: no JAX
  text = paths.read_text(paths.join(path, "metadata.json"))
  if text is None:
    raise ValueError(f"{path} is not an activation store (it has no metadata.json): make one "
                     "with python -m jaxsae.dump")
  meta = json.loads(text)
  c = base.get_config()
  c.data.source = "store"
  c.data.path = path
  c.data.dtype = ""                  # whatever the dump wrote (bfloat16 by default)
  c.sae.d = int(meta["d"])
  # About one pass, following --config.train.batch_size and --config.data.eval_rows overrides.
  c.train.steps = (int(meta["rows"]) - c.data.get_ref("eval_rows")) // c.train.get_ref("batch_size")
  return c
