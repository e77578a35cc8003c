"""`python -m jaxsae.plot` on a real 2-step run, and the pictures in `jaxsae.inspect --html`."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, run_cli
from test_cli import TINY

pytest.importorskip("matplotlib")
import matplotlib.image  # noqa: E402

CURVES = ["auxk.png", "dead_frac.png", "fvu.png", "l0.png", "tokens_per_sec.png"]


def run_module(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def evaluation_json(path, rows=500):
  """What `jaxsae.evaluate --json` writes, with the fields the histogram reads (the evaluation
  itself is tested in test_evaluate.py; here only its picture)."""
  from jaxsae import evaluate
  freq = [0.0, 0.0, 1 / rows, 0.01, 0.01, 0.2, 0.5]
  import numpy as np
  data = {"freq_hist": evaluate.frequency_histogram(np.array(freq), rows), "sae_rows": rows,
          "l0": 2.5, "fvu": 0.3}
  path.write_text(json.dumps(data))
  return data


def readable_png(path):
  assert os.path.getsize(path) > 0, path
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, (path, image.shape)


def test_two_step_run_pictures_and_the_inspect_page(tmp_path):
  wd = str(tmp_path / "run")
  r = run_cli([*TINY, f"--workdir={wd}", "--config.train.steps=2", "--config.train.log_every=1"])
  assert r.returncode == 0, r.stderr[-3000:]
  hist = evaluation_json(tmp_path / "run" / "eval.json")
  assert hist["freq_hist"]["dead"] == 2 and sum(hist["freq_hist"]["counts"]) == 5

  r = run_module("jaxsae.plot", wd)
  assert r.returncode == 0, r.stderr[-3000:]
  plots = os.path.join(wd, "plots")
  assert sorted(os.listdir(plots)) == sorted(CURVES + ["freq_hist.png"])
  for name in os.listdir(plots):
    readable_png(os.path.join(plots, name))
    assert f"wrote {os.path.join(plots, name)}" in r.stdout

  page = tmp_path / "page.html"
  r = run_module("jaxsae.inspect", wd, f"--html={page}")
  assert r.returncode == 0, r.stderr[-3000:]
  text = page.read_text()
  assert text.count('<img src="data:image/png;base64,') == 6 and "fvu.png" in text
  assert "d=32 n=128 k=4" in text   # the summary is on the page too

  # --out elsewhere, an explicit --eval, and a folder that is not a run.
  from jaxsae import plot
  written = plot.write_plots(wd, str(tmp_path / "elsewhere"), [str(tmp_path / "run" / "eval.json")])
  assert sorted(os.listdir(tmp_path / "elsewhere")) == sorted(CURVES + ["freq_hist.png"])
  assert len(written) == 6
  with pytest.raises(plot.PlotError, match="metrics.jsonl: no such file"):
    plot.write_plots(str(tmp_path / "nothing"))
  with pytest.raises(plot.PlotError, match="not the --json of"):
    plot.write_plots(wd, str(tmp_path / "x"), [os.path.join(wd, "config.json")])
