"""A fake Google Cloud Storage server on 127.0.0.1 for tests: gcp-storage-emulator (in memory), with
the two things TensorStore's gcs driver relies on and the emulator lacks added in front of its
handlers:

  generations on reads  a download carries x-goog-generation (TensorStore reads an object's
                        generation from it, and OCDBT writes its manifest conditionally on it)
  conditions            ifGenerationMatch / ifGenerationNotMatch on reads, uploads and deletes
                        (412 Precondition Failed, 304 Not Modified), as GCS answers them
  suffix byte ranges    Range: bytes=-N (TensorStore reads a zarr shard's index at its end so)

  python tests/gcs_fake.py PORT BUCKET   serves until killed; prints "ready" once listening

Clients are pointed at it by environment (see `env`): gcsfs and google-cloud-storage by
STORAGE_EMULATOR_HOST, TensorStore (and so Orbax) by TENSORSTORE_GCS_HTTP_URL.
"""
import re
import sys
import time
from http import HTTPStatus


def env(port: int) -> dict:
  url = f"http://127.0.0.1:{port}"
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
          # No credentials lookups against a metadata server that is not there, and no probe of
          # the bucket's layout (gcsfs asks the storage control API, which the fake lacks).
          "GCE_METADATA_HOST": "127.0.0.1:1", "NO_GCE_CHECK": "True",
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def _object(request, storage):
  """The object's resource; {} if there is none, None if the request names none (a multipart
  upload names its object in the body: no condition is checked there)."""
  from gcp_storage_emulator.exceptions import NotFound
  name = request.params.get("object_id") or (request.query.get("name") or [None])[0]
  if name is None:
    return None
  try:
    return storage.get_file_obj(request.params["bucket_name"], name)
  except NotFound:
    return {}


def _suffix_range(request, obj):
  """bytes=-N (the last N bytes: TensorStore reads a shard's index so) as bytes=START-, which is
  all the emulator parses."""
  headers = request._request_handler.headers   # pylint: disable=protected-access
  got = re.fullmatch(r"\s*bytes=-(\d+)\s*", headers.get("range", ""))
  if got and obj:
    del headers["range"]
    headers["range"] = f"bytes={max(int(obj['size']) - int(got[1]), 0)}-"


def _conditional(handler, read: bool):
  def wrapped(request, response, storage, *args, **kwargs):
    obj = _object(request, storage)
    generation = None if obj is None else str(obj.get("generation", 0))
    if read:
      _suffix_range(request, obj)
    match = request.query.get("ifGenerationMatch")
    not_match = request.query.get("ifGenerationNotMatch")
    if generation is not None:
      if match and match[0] != generation:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return None
      if not_match and not_match[0] == generation:
        response.status = HTTPStatus.NOT_MODIFIED if read else HTTPStatus.PRECONDITION_FAILED
        return None
      if read and generation != "0":
        response["x-goog-generation"] = generation
        response["x-goog-metageneration"] = "1"
    return handler(request, response, storage, *args, **kwargs)
  return wrapped


def patch_handlers():
  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import objects
  wrap = {objects.get: _conditional(objects.get, True),
          objects.download: _conditional(objects.download, True),
          objects.insert: _conditional(objects.insert, False),
          objects.delete: _conditional(objects.delete, False)}
  server.HANDLERS = tuple((regex, {method: wrap.get(fn, fn) for method, fn in handlers.items()})
                          for regex, handlers in server.HANDLERS)


def main(port: int, bucket: str):
  from gcp_storage_emulator.server import create_server
  patch_handlers()
  create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).start()
  print("ready", flush=True)
  while True:
    time.sleep(3600)


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2])
