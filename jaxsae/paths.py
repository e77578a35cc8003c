"""Workdir, store and export paths: a local folder or a URL (gs://bucket/dir, s3://, az://, hf://).

Every file jaxsae reads or writes in a workdir goes through here, etils.epath or TensorStore, never
through os.path/open() on a string that may be a URL:

  local path, or file:///abs/path   an absolute local path (os backend of epath; TensorStore file://)
  gs://bucket/dir (s3://, az://...) left as it is: epath reaches it through fsspec (gcsfs for gs://,
                                    which `pip install jaxsae` brings), TensorStore and Orbax through
                                    their own gcs driver, TensorBoard events through tensorboardX's.

A fake endpoint (an emulator, tests/gcs_fake.py) is set by the environment: STORAGE_EMULATOR_HOST
for gcsfs and google-cloud-storage, TENSORSTORE_GCS_HTTP_URL for TensorStore (and so Orbax).
"""
import contextlib
import logging
import os
import shutil
import tempfile

from etils import epath

try:
  import fsspec.config
except ImportError:   # no remote filesystem: local paths only
  pass
else:
  # gcsfs caches folder listings forever by default, so objects that TensorStore (checkpoints) or
  # another process wrote would stay unseen: jaxsae lists checkpoint folders to find their steps.
  fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)
  logging.getLogger("fsspec.caching").setLevel(logging.WARNING)   # a line per file read otherwise


def is_url(path) -> bool:
  """True for a remote URL (gs://...); a file:// URL is a local path."""
  path = os.fspath(path)
  return "://" in path and not path.startswith("file://")


def _local_or_url(path) -> str:
  path = os.fspath(path)
  return path[len("file://"):] if path.startswith("file://") else path


def normalize(path) -> str:
  """The canonical string of a path: absolute if local, the URL without a trailing / if remote."""
  path = _local_or_url(path)
  return path.rstrip("/") if is_url(path) else os.path.abspath(path)


def join(path, *names: str) -> str:
  """path/name/...: a local path joined as os.path.join does (relative stays relative)."""
  path = _local_or_url(path)
  return "/".join([path.rstrip("/"), *names]) if is_url(path) else os.path.join(path, *names)


def of(path) -> epath.Path:
  return epath.Path(normalize(path))


def kvstore_url(path) -> str:
  """The TensorStore kvstore URL of a folder (file:///abs/dir/ or gs://bucket/dir/)."""
  path = normalize(path)
  return (path if is_url(path) else "file://" + path).rstrip("/") + "/"


def write_text(path, text: str):
  """Atomic: readers never see a half-written file. An object store's write is atomic by itself
  (the object appears whole on close); a local file is written beside and renamed into place."""
  target = of(path)
  if is_url(path):
    target.write_text(text)
    return
  tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
  tmp.write_text(text)
  tmp.replace(target)


def read_text(path):
  """The file's text, or None if there is none."""
  p = of(path)
  return p.read_text() if p.exists() else None


@contextlib.contextmanager
def local_output(path):
  """Yields a local file name to write `path` into (for writers that need a seekable local file:
  os.pwrite, zipfile); it lands at `path` only if the block completes.

  Local: a temporary file beside `path`, renamed into place. URL: a temporary file in the local temp
  folder, uploaded to `path` in one object write, then deleted.
  """
  if not is_url(path):
    target = normalize(path)
    tmp = f"{target}.tmp{os.getpid()}"
    try:
      yield tmp
    except BaseException:
      if os.path.exists(tmp):
        os.unlink(tmp)
      raise
    os.replace(tmp, target)
    return
  fd, tmp = tempfile.mkstemp(prefix="jaxsae-upload-")
  os.close(fd)
  try:
    yield tmp
    with open(tmp, "rb") as src, of(path).open("wb") as dst:
      shutil.copyfileobj(src, dst, 16 << 20)
  finally:
    os.unlink(tmp)


@contextlib.contextmanager
def local_copy(path):
  """Yields a local path holding `path`: itself when local; for a URL, a temporary download of the
  file (with its `<stem>.metadata.json` beside it, if any: the npz export's) or of the flat folder
  (the saelens and sparsify exports), removed afterwards. For readers that need local files
  (safetensors, numpy)."""
  if not is_url(path):
    yield normalize(path)
    return
  src = of(path)
  if not src.exists():
    raise FileNotFoundError(f"{path}: no such file or folder")
  tmp = tempfile.mkdtemp(prefix="jaxsae-download-")
  try:
    dst = os.path.join(tmp, src.name)
    if src.is_dir():
      os.makedirs(dst)
      files, into = [f for f in src.iterdir() if f.is_file()], dst
    else:
      sidecar = src.with_name(os.path.splitext(src.name)[0] + ".metadata.json")
      files, into = [src] + ([sidecar] if sidecar.exists() else []), tmp
    for f in files:
      with f.open("rb") as r, open(os.path.join(into, f.name), "wb") as w:
        shutil.copyfileobj(r, w, 16 << 20)
    yield dst
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
