"""`python -m jaxsae.dump` as users run it: real subprocesses, real files, a real SIGKILL.

A dump is killed "midway" deterministically: part of its input is a named pipe (FIFO) that the test
feeds partly, so the dump has committed some rows and then blocks, unable to finish, when it dies.
The rerun reads the same path as a regular file and must produce the store an uninterrupted dump
produces: same rows, same metadata (statistics and counts included).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import ml_dtypes
import numpy as np
import pytest

from jaxsae.data.store import Store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--chunk_rows=16", "--shard_rows=64", "--progress=false"]


def dump(*args, check=True):
  env = dict(os.environ, PYTHONPATH=ROOT)
  r = subprocess.run([sys.executable, "-m", "jaxsae.dump", *args], env=env, capture_output=True,
                     text=True, timeout=300)
  if check and r.returncode:
    raise AssertionError(f"dump failed ({r.returncode}):\n{r.stdout}\n{r.stderr[-3000:]}")
  return r


def start_dump(*args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.Popen([sys.executable, "-m", "jaxsae.dump", *args], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def contents(path):
  s = Store(path)
  return s.metadata, {name: s.read(0, s.rows, name).tobytes() for name in s.columns}


def kill_after_commit(proc, store, min_rows):
  """Waits until the dump committed at least min_rows (it then blocks on its pipe) and kills it."""
  meta_file = os.path.join(store, "metadata.json")
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline:
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    try:
      if json.load(open(meta_file))["rows"] >= min_rows:
        break
    except (OSError, ValueError):
      pass
    time.sleep(0.05)
  else:
    raise AssertionError("the dump never committed")
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  meta = json.load(open(meta_file))
  assert not meta["complete"] and meta["rows"] >= min_rows
  return meta["rows"]


def feed_fifo(path, data: bytes):
  """Writes data into the FIFO at path from a thread (opening blocks until the reader opens)."""
  os.mkfifo(path)

  def write():
    try:
      with open(path, "wb") as f:
        f.write(data)
        threading.Event().wait(600)   # hold the pipe open: the reader waits for more, forever
    except BrokenPipeError:
      pass
  threading.Thread(target=write, daemon=True).start()


def save_npy(path, x):
  np.save(path, x)
  return path


def test_npy_dump_killed_midway_resumes_to_the_same_store(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1000, 8)).astype(np.float32)
  x[::97] *= 50    # massive rows, so the filtered count is part of what must match
  src = save_npy(str(tmp_path / "acts.npy"), x)
  toks = save_npy(str(tmp_path / "toks.npy"), np.arange(1000, dtype=np.int32))
  args = [f"--from-npy={src}", f"--tokens-npy={toks}", "--npy_block_rows=50", "--dtype=bfloat16",
          *SMALL]
  dump(*args, f"--out={tmp_path / 'whole'}")

  whole = open(src, "rb").read()
  os.rename(src, src + ".bak")
  feed_fifo(src, whole[:len(whole) // 2])          # the header and about 500 rows
  proc = start_dump(*args, f"--out={tmp_path / 'killed'}")
  rows = kill_after_commit(proc, str(tmp_path / "killed"), 128)
  os.remove(src)
  os.rename(src + ".bak", src)
  r = dump(*args, f"--out={tmp_path / 'killed'}")
  assert "complete" in r.stdout

  meta, cols = contents(str(tmp_path / "killed"))
  ref_meta, ref_cols = contents(str(tmp_path / "whole"))
  assert 128 <= rows < meta["rows"]
  assert cols == ref_cols and meta == ref_meta
  assert meta["filtered"]["massive"] == 11 and meta["rows"] == 989
  kept = np.linalg.norm(x, axis=1) < 20
  s = Store(str(tmp_path / "killed"))
  assert np.array_equal(s.read(0, s.rows), x[kept].astype(ml_dtypes.bfloat16))
  assert np.array_equal(s.read(0, s.rows, "tokens"), np.flatnonzero(kept))
  assert "already complete" in dump(*args, f"--out={tmp_path / 'killed'}").stdout


def test_nonfinite_rows_are_refused_with_a_count(tmp_path):
  x = np.ones((300, 4), np.float32)
  x[[5, 17, 290], 1] = [np.nan, np.inf, -np.inf]
  src = save_npy(str(tmp_path / "acts.npy"), x)
  r = dump(f"--from-npy={src}", f"--out={tmp_path / 's'}", "--npy_block_rows=1000", *SMALL,
           check=False)
  assert r.returncode == 2
  assert "3 of 300 rows" in r.stderr and "NaN or inf" in r.stderr
  assert r.stderr.count("3 of 300 rows") == 1, r.stderr   # once: not also as a log line
  assert not json.load(open(tmp_path / "s" / "metadata.json"))["complete"]
  # float16 overflow is caught after the cast, too.
  y = np.ones((10, 4), np.float32)
  y[3] = 1e6
  src = save_npy(str(tmp_path / "big.npy"), y)
  r = dump(f"--from-npy={src}", f"--out={tmp_path / 's16'}", "--dtype=float16", *SMALL,
           check=False)
  assert r.returncode == 2 and "1 of 10 rows" in r.stderr


def test_massive_rows_filtered_by_default_and_kept_on_request(tmp_path):
  x = np.random.default_rng(1).standard_normal((200, 4)).astype(np.float32)
  x[[0, 50]] *= 1000
  src = save_npy(str(tmp_path / "acts.npy"), x)
  dump(f"--from-npy={src}", f"--out={tmp_path / 'f'}", *SMALL)
  dump(f"--from-npy={src}", f"--out={tmp_path / 't'}", "--tokens=150", *SMALL)
  assert (Store(str(tmp_path / "t")).rows, Store(str(tmp_path / "t")).metadata["input_rows"]) \
      == (148, 150)   # rows 0 and 50 are massive
  dump(f"--from-npy={src}", f"--out={tmp_path / 'k'}", "--filter_massive=false", *SMALL)
  f, k = Store(str(tmp_path / "f")), Store(str(tmp_path / "k"))
  assert (f.rows, f.metadata["filtered"]["massive"]) == (198, 2)
  assert (k.rows, k.metadata["filtered"]["massive"]) == (200, 0)
  assert np.array_equal(k.read(0, 200), x)
  assert f.metadata["stats"]["norm_max"] < 10


# ---- A tiny randomly initialized Llama, built here: the [dump] extra's end-to-end path. --------

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  tokenizers = pytest.importorskip("tokenizers")
  import torch
  folder = str(tmp_path_factory.mktemp("tiny_llama"))
  tk = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = tokenizers.decoders.ByteLevel()
  tk.train_from_iterator([" ".join(WORDS)] * 4, tokenizers.trainers.BpeTrainer(
      vocab_size=320, special_tokens=["<unk>", "<eos>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>",
                                             unk_token="<unk>")
  cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=128)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
  tok.save_pretrained(folder)
  return folder


def write_texts(folder, n=3, lines=60):
  rng = np.random.default_rng(2)
  paths = []
  for i in range(n):
    path = os.path.join(folder, f"doc{i}.txt")
    with open(path, "w") as f:
      f.write("\n".join(" ".join(rng.choice(WORDS, 10)) for _ in range(lines)))
    paths.append(path)
  return paths


def test_tiny_llama_dump_end_to_end_and_after_a_kill(tiny_llama, tmp_path):
  import torch
  import transformers
  texts = write_texts(str(tmp_path), n=3, lines=40)
  args = [f"--model={tiny_llama}", "--layer=1", f"--text={tmp_path}/*.txt", "--seq_len=32",
          "--batch_size=4", "--dtype=float32", "--filter_massive=false", *SMALL]
  r = dump(*args, f"--out={tmp_path / 'whole'}")
  assert "tok/s" in r.stdout
  s = Store(str(tmp_path / "whole"))
  m = s.metadata
  assert m["complete"] and (s.d, s.dtype) == (32, "float32")
  assert m["info"]["hook"] == "model.layers.1" and m["info"]["files"] == texts
  # The token stream is the documents, tokenized, with EOS between them, cut into windows.
  tok = transformers.AutoTokenizer.from_pretrained(tiny_llama)
  docs = [tok(open(t).read(), add_special_tokens=False)["input_ids"] for t in texts]
  stream = docs[0] + [tok.eos_token_id] + docs[1] + [tok.eos_token_id] + docs[2]
  assert m["rows"] == m["input_rows"] == len(stream) // 32 * 32
  assert np.array_equal(s.read(0, s.rows, "tokens"), stream[:s.rows])
  doc_ids = s.read(0, s.rows, "doc_ids")
  assert np.array_equal(doc_ids[:len(docs[0]) + 1], [0] * (len(docs[0]) + 1))
  assert doc_ids[-1] == 2 and np.all(np.diff(doc_ids) >= 0)
  assert np.array_equal(s.read(0, 64, "positions"), np.tile(np.arange(32), 2))
  # The stored rows are block 1's output (hidden_states[2]) on the stored token windows.
  model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
  with torch.no_grad():
    hidden = model(torch.tensor(stream[:64]).reshape(2, 32), output_hidden_states=True)
  want = hidden.hidden_states[2].reshape(64, 32).numpy()
  np.testing.assert_allclose(s.read(0, 64), want, rtol=1e-5, atol=1e-5)

  # Killed while the last document is still arriving, then rerun: the same store.
  last = open(texts[2], "rb").read()
  os.remove(texts[2])
  feed_fifo(texts[2], last[:100])
  proc = start_dump(*args, f"--out={tmp_path / 'killed'}")
  rows = kill_after_commit(proc, str(tmp_path / "killed"), 128)
  os.remove(texts[2])
  open(texts[2], "wb").write(last)
  dump(*args, f"--out={tmp_path / 'killed'}")
  meta, cols = contents(str(tmp_path / "killed"))
  ref_meta, ref_cols = contents(str(tmp_path / "whole"))
  assert rows < meta["rows"]
  assert cols == ref_cols and meta == ref_meta


def test_bfloat16_autocast_stays_close_to_float32(tiny_llama):
  from jaxsae.data import lm
  tokens = np.arange(64).reshape(2, 32) % 300
  exact = lm.BlockOutput(tiny_llama, 1)(tokens)
  fast = lm.BlockOutput(tiny_llama, 1, compute_dtype="bfloat16")(tokens)
  assert fast.shape == exact.shape == (2, 32, 32) and fast.dtype == np.float32
  assert np.linalg.norm(fast - exact) / np.linalg.norm(exact) < 0.05
  assert not np.array_equal(fast, exact)   # autocast really ran in bfloat16


def test_bos_put_before_each_window_when_the_tokenizer_starts_texts_with_it(tiny_llama, tmp_path):
  import tokenizers
  import torch
  import transformers
  from jaxsae.data import lm
  # The tiny Llama again, with a tokenizer that starts every text with BOS (as Gemma's does);
  # <unk> serves as BOS, so the model's vocabulary stays as it is.
  tk = transformers.AutoTokenizer.from_pretrained(tiny_llama).backend_tokenizer
  bos = tk.token_to_id("<unk>")
  tk.post_processor = tokenizers.processors.TemplateProcessing(
      single="<unk> $A", special_tokens=[("<unk>", bos)])
  with_bos = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>",
                                                  unk_token="<unk>", bos_token="<unk>")
  folder = str(tmp_path / "bos")
  model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
  model.save_pretrained(folder)
  with_bos.save_pretrained(folder)
  tokens = np.arange(64).reshape(2, 32) % 300
  assert lm.BlockOutput(tiny_llama, 1).bos is None
  net = lm.BlockOutput(folder, 1)
  assert net.bos == bos and net.tokenize("the fox")[0] != bos
  got = net(tokens)
  with torch.no_grad():
    ids = torch.cat([torch.full((2, 1), bos), torch.from_numpy(tokens)], 1)
    want = model(ids, output_hidden_states=True).hidden_states[2][:, 1:].numpy()
  assert got.shape == (2, 32, 32)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_model_path_must_exist_locally(tmp_path):
  pytest.importorskip("transformers")
  (tmp_path / "a.txt").write_text("hello")
  r = dump("--model=HuggingFaceTB/SmolLM2-135M", "--layer=1", f"--text={tmp_path / 'a.txt'}",
           f"--out={tmp_path / 's'}", check=False)
  assert r.returncode == 2 and "models load from disk only" in r.stderr


# ---- Several hook points in one pass: the stores a transcoder trains on (mlp_in -> mlp_out). ----

MLP_HOOKS = ("mlp_in", "mlp_out")


@pytest.fixture(scope="module")
def skewed_llama(tiny_llama, tmp_path_factory):
  """The tiny Llama with rows massive in block 1's MLP input that its output does not see: the
  pre-MLP norm scales dims 0-3 by 20 and the MLP ignores those dims. At --massive_ratio=1.5 some
  rows are massive in mlp_in only, others in mlp_out only (a filter on one side misses them)."""
  import torch
  import transformers
  folder = str(tmp_path_factory.mktemp("skewed_llama"))
  model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
  block = model.model.layers[1]
  with torch.no_grad():
    block.post_attention_layernorm.weight[:4] = 20.0
    block.mlp.gate_proj.weight[:, :4] = 0
    block.mlp.up_proj.weight[:, :4] = 0
  model.save_pretrained(folder)
  transformers.AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(folder)
  return folder


@pytest.fixture(scope="module")
def mlp_dump(skewed_llama, tmp_path_factory):
  """An uninterrupted --hooks=mlp_in,mlp_out dump: (its flags, its text files, its --out)."""
  tmp = tmp_path_factory.mktemp("mlp_dump")
  texts = write_texts(str(tmp), n=3, lines=40)
  args = [f"--model={skewed_llama}", "--layer=1", f"--text={tmp}/*.txt", "--seq_len=32",
          "--batch_size=4", "--dtype=float32", "--hooks=mlp_in,mlp_out", "--massive_ratio=1.5",
          *SMALL]
  dump(*args, f"--out={tmp / 'whole'}")
  return args, texts, str(tmp / "whole")


def mlp_rows(model_dir, texts, seq_len=32, batch=4):
  """(token stream, {hook: rows}, {hook: massive mask}) of block 1's MLP on the files' windows, by
  torch hooks on the plain HF model, massive rows marked per forward batch as the dump does."""
  import torch
  import transformers
  from jaxsae.data import inputs
  tok = transformers.AutoTokenizer.from_pretrained(model_dir)
  stream = []
  for t in texts:
    stream += ([tok.eos_token_id] if stream else []) + tok(open(t).read(),
                                                           add_special_tokens=False)["input_ids"]
  stream = np.asarray(stream[:len(stream) // seq_len * seq_len], np.int32)
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  seen = {h: [] for h in MLP_HOOKS}

  def hook(module, args, out):
    seen["mlp_in"].append(args[0])
    seen["mlp_out"].append(out)
  model.model.layers[1].mlp.register_forward_hook(hook)
  windows = torch.from_numpy(stream.astype(np.int64)).reshape(-1, seq_len)
  with torch.no_grad():
    for i in range(0, len(windows), batch):
      model(windows[i:i + batch])
  rows = {h: [x.reshape(-1, x.shape[-1]).numpy() for x in xs] for h, xs in seen.items()}
  massive = {h: np.concatenate([inputs.massive_rows(x, 1.5) for x in xs]) for h, xs in rows.items()}
  return stream, {h: np.concatenate(xs) for h, xs in rows.items()}, massive


def test_mlp_in_and_out_stores_hold_the_mlps_rows_less_those_massive_in_either(mlp_dump,
                                                                              skewed_llama):
  _, texts, out = mlp_dump
  stream, rows, massive = mlp_rows(skewed_llama, texts)
  # Rows massive on one side only, both ways: a filter on either side alone would keep some.
  assert (massive["mlp_in"] & ~massive["mlp_out"]).any()
  assert (massive["mlp_out"] & ~massive["mlp_in"]).any()
  keep = ~(massive["mlp_in"] | massive["mlp_out"])
  stores = {h: Store(os.path.join(out, h)) for h in MLP_HOOKS}
  names = {"mlp_in": "model.layers.1.mlp.input", "mlp_out": "model.layers.1.mlp.output"}
  for h, s in stores.items():
    m = s.metadata
    assert m["complete"] and (s.d, s.dtype) == (32, "float32")
    assert (m["rows"], m["input_rows"], m["filtered"]["massive"]) == \
        (keep.sum(), len(stream), (~keep).sum())
    assert m["info"]["hook"] == names[h] and m["info"]["hook_point"] == h
    assert m["info"]["hooks"] == names
    np.testing.assert_allclose(s.read(0, s.rows), rows[h][keep], rtol=1e-5, atol=1e-5)
    assert np.array_equal(s.read(0, s.rows, "tokens"), stream[keep])
  a, b = stores.values()
  assert a.metadata["layout"] == b.metadata["layout"]
  assert {k: v for k, v in a.metadata["info"].items() if k not in ("hook", "hook_point")} == \
      {k: v for k, v in b.metadata["info"].items() if k not in ("hook", "hook_point")}
  for col in ("tokens", "doc_ids", "positions"):
    assert np.array_equal(a.read(0, a.rows, col), b.read(0, b.rows, col))


def test_killed_mlp_dump_resumes_to_the_same_row_aligned_stores(mlp_dump, tmp_path):
  """Killed twice: the second kill's mlp_out is then swapped for the first's, as if the dump had
  died between its two stores' commits, mlp_in one commit (or more) ahead. The rerun must still
  write exactly the stores of an uninterrupted dump."""
  args, texts, whole = mlp_dump
  out = str(tmp_path / "killed")
  originals = {t: open(t, "rb").read() for t in texts[1:]}
  try:
    os.remove(texts[1])
    feed_fifo(texts[1], originals[texts[1]][:100])   # stops after the first document
    rows = kill_after_commit(start_dump(*args, f"--out={out}"), os.path.join(out, "mlp_out"), 64)
    shutil.copytree(os.path.join(out, "mlp_out"), str(tmp_path / "behind"))
    os.remove(texts[1])
    open(texts[1], "wb").write(originals[texts[1]])
    os.remove(texts[2])
    feed_fifo(texts[2], originals[texts[2]][:100])   # stops after the second
    ahead = kill_after_commit(start_dump(*args, f"--out={out}"), os.path.join(out, "mlp_in"),
                              rows + 1)
  finally:
    for t, data in originals.items():
      if os.path.exists(t):
        os.remove(t)
      open(t, "wb").write(data)
  shutil.rmtree(os.path.join(out, "mlp_out"))
  shutil.copytree(str(tmp_path / "behind"), os.path.join(out, "mlp_out"))
  dump(*args, f"--out={out}")
  for h in MLP_HOOKS:
    meta, cols = contents(os.path.join(out, h))
    ref_meta, ref_cols = contents(os.path.join(whole, h))
    assert rows < ahead < meta["rows"]
    assert cols == ref_cols and meta == ref_meta


def test_hooks_are_checked_and_the_forward_stops_after_the_last(tiny_llama, tmp_path):
  import torch
  from jaxsae.data import lm
  (tmp_path / "a.txt").write_text("the quick brown fox")
  r = dump(f"--model={tiny_llama}", "--layer=1", f"--text={tmp_path / 'a.txt'}",
           "--hooks=mlp_in,attn_out", f"--out={tmp_path / 's'}", check=False)
  assert r.returncode == 2 and "attn_out" in r.stderr and "mlp_in, mlp_out, resid_post" in r.stderr
  with pytest.raises(lm.DataError, match="children: attn, ffn"):
    lm.find_mlp(torch.nn.ModuleDict({"attn": torch.nn.Linear(2, 2), "ffn": torch.nn.Linear(2, 2)}),
                "model.layers.1")
  tokens = np.arange(64).reshape(2, 32) % 300
  ran = []
  for hooks in (("mlp_in",), ("mlp_in", "mlp_out"), ("mlp_out", "resid_post")):
    net = lm.BlockOutput(tiny_llama, 1, hooks=hooks)
    block = net.model.model.layers[1]
    block.mlp.down_proj.register_forward_hook(lambda *a: ran.append((hooks, "mlp ran")))
    block.register_forward_hook(lambda *a: ran.append((hooks, "block ran")))   # after net's own
    got = net.capture(tokens)
    assert list(got) == list(hooks) and all(x.shape == (2, 32, 32) for x in got.values())
  # mlp_in alone: the MLP never runs; mlp_out last: block 1 never finishes.
  assert ran == [(("mlp_in", "mlp_out"), "mlp ran"), (("mlp_out", "resid_post"), "mlp ran")]
  # The first hook's rows for __call__; resid_post among several is still block 1's output.
  np.testing.assert_allclose(got["resid_post"], lm.BlockOutput(tiny_llama, 1)(tokens), rtol=1e-6,
                             atol=1e-6)
