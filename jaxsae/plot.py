r"""Pictures of a run: training curves from metrics.jsonl, and an evaluation's firing frequencies.

  python -m jaxsae.plot WORKDIR [--out=DIR] [--eval=EVAL.json,...]

Writes one PNG per curve against tokens seen (fvu.png: train and held-out FVU; l0.png;
dead_frac.png; auxk.png; tokens_per_sec.png; a curve the log never recorded is skipped) and, for
each evaluation written by `python -m jaxsae.evaluate --json=...`, the histogram of its latents'
log10 firing frequencies (freq_hist.png, or freq_hist_<name>.png when there are several). By
default the evaluations are the JSON files in WORKDIR that hold one, and DIR is WORKDIR/plots,
where `python -m jaxsae.inspect WORKDIR --html=PAGE` finds the pictures and puts them in its page.
WORKDIR, DIR and the evaluations may be on gs:// (jaxsae/paths.py). Needs matplotlib (the `plot`
extra).
"""
import json
import sys

from absl import app, flags

from jaxsae import paths

# (file name, title, y label, [(metrics key, legend)], log-scale y)
CURVES = (
    ("fvu", "Fraction of variance unexplained", "FVU",
     [("train/fvu", "train"), ("eval/fvu", "held out")], True),
    ("l0", "Active latents per token", "L0", [("train/l0", "train"), ("eval/l0", "held out")],
     False),
    ("dead_frac", "Dead latents", "fraction of latents", [("sparsity/dead_frac", "dead")], False),
    ("auxk", "AuxK loss", "AuxK loss (normalized like FVU)", [("losses/auxk", "AuxK")], False),
    ("tokens_per_sec", "Throughput", "tokens / s", [("perf/tokens_per_sec", "tokens/s")], False),
)


class PlotError(ValueError):
  pass


def _pyplot():
  try:
    import matplotlib
  except ImportError:
    raise PlotError("jaxsae.plot needs matplotlib: pip install 'jaxsae[plot]'") from None
  matplotlib.use("Agg")   # files only; no display needed
  import matplotlib.pyplot as plt
  return plt


def read_metrics(workdir: str) -> list[dict]:
  path = paths.join(workdir, "metrics.jsonl")
  text = paths.read_text(path)
  if text is None:
    raise PlotError(f"{path}: no such file (is {workdir} a training workdir?)")
  records = []
  for line in text.splitlines():
    try:
      records.append(json.loads(line))
    except ValueError:   # a line cut short by a kill
      pass
  if not records:
    raise PlotError(f"{path} holds no records yet")
  return records


def find_evaluations(workdir: str) -> list[str]:
  """JSON files directly in workdir written by jaxsae.evaluate (they hold a freq_hist)."""
  found = []
  for path in sorted(paths.join(workdir, p.name) for p in paths.of(workdir).glob("*.json")):
    try:
      if "freq_hist" in json.loads(paths.of(path).read_text()):
        found.append(path)
    except (OSError, ValueError):
      pass
  return found


def plot_curves(records: list[dict], out: str) -> list[str]:
  plt = _pyplot()
  written = []
  for name, title, ylabel, series, log in CURVES:
    lines = [([r["tokens"] for r in records if key in r and "tokens" in r],
              [r[key] for r in records if key in r and "tokens" in r], label)
             for key, label in series]
    lines = [line for line in lines if line[0]]
    if not lines:
      continue
    fig, ax = plt.subplots(figsize=(6, 4))
    for x, y, label in lines:
      ax.plot(x, y, marker="o" if len(x) < 20 else None, label=label)
    if log and all(v > 0 for _, y, _ in lines for v in y):
      ax.set_yscale("log")
    ax.set(title=title, xlabel="tokens", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(lines) > 1:
      ax.legend()
    fig.tight_layout()
    written.append(_save(fig, plt, paths.join(out, f"{name}.png")))
  return written


def plot_frequencies(evaluation: dict, path: str) -> str:
  plt = _pyplot()
  hist = evaluation["freq_hist"]
  edges, counts = hist["log10_edges"], hist["counts"]
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.stairs(counts, edges, fill=True, alpha=0.7)
  ax.set(xlabel="log10 firing frequency (fraction of tokens)", ylabel="latents",
         title=f"Latent firing frequencies over {evaluation.get('sae_rows', '?'):,} tokens")
  ax.text(0.02, 0.95, f"dead (never fired): {hist['dead']}\nL0 {evaluation.get('l0', 0):.1f}, "
          f"FVU {evaluation.get('fvu', 0):.3f}", transform=ax.transAxes, va="top")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return _save(fig, plt, path)


def _save(fig, plt, path: str) -> str:
  with paths.of(path).open("wb") as f:
    fig.savefig(f, format="png", dpi=100)
  plt.close(fig)
  return path


def write_plots(workdir: str, out: str = "", evaluations=None) -> list[str]:
  """Every picture of the module docstring; returns the paths written."""
  out = out or paths.join(workdir, "plots")
  records = read_metrics(workdir)
  evaluations = find_evaluations(workdir) if evaluations is None else evaluations
  paths.of(out).mkdir(parents=True, exist_ok=True)
  written = plot_curves(records, out)
  for path in evaluations:
    try:
      evaluation = json.loads(paths.of(path).read_text())
    except (OSError, ValueError) as e:
      raise PlotError(f"{path}: cannot read it as JSON ({e})") from None
    if "freq_hist" not in evaluation:
      raise PlotError(f"{path} is not the --json of `python -m jaxsae.evaluate` (no freq_hist)")
    name = "freq_hist" if len(evaluations) == 1 else \
        f"freq_hist_{paths.of(path).stem}"
    written.append(plot_frequencies(evaluation, paths.join(out, f"{name}.png")))
  return written


FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("out", "", "Folder for the PNGs; default WORKDIR/plots.")
  flags.DEFINE_list("eval", None, "jaxsae.evaluate --json files; default: those in WORKDIR.")


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: python -m jaxsae.plot WORKDIR [--out=DIR] [--eval=FILES]")
  try:
    written = write_plots(argv[1], FLAGS.out, FLAGS.eval)
  except (PlotError, OSError) as e:
    print(f"jaxsae.plot: error: {e}", file=sys.stderr)
    sys.exit(1)
  for path in written:
    print(f"wrote {path}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
