"""bench/quality.py's run variants: --set overrides onto the config, and their labels in the tables."""
import pytest
from absl import app

from bench import quality
from configs import quickstart


def test_set_overrides_fields_with_typed_values():
  c = quickstart.get_config()
  quality.apply_overrides(c, ["sae.auxk_coef=1.0", "sae.auxk_norm=residual", "train.steps=7"])
  assert (c.sae.auxk_coef, c.sae.auxk_norm, c.train.steps) == (1.0, "residual", 7)


@pytest.mark.parametrize("item", ["sae.nope=1", "auxk_coef=1.0", "sae.auxk_coef", "sae.k=1.5"])
def test_set_refuses_unknown_fields_and_bad_values(item):
  with pytest.raises(app.UsageError, match="--set"):
    quality.apply_overrides(quickstart.get_config(), [item])


def test_variants_are_their_own_rows_and_best_entries():
  base = dict(dataset="fixture", lr=1e-3, tokens=1, eval_l0=32.0, setup_s=0.0, train_s=1.0,
              tokens_per_s=1.0, load_start=0.0, load_end=0.0, trainer="jaxsae")
  rows = [dict(base, eval_fvu=0.3, dead_frac=0.0),
          dict(base, eval_fvu=0.2, dead_frac=0.5, variant="sae.auxk_coef=1.0")]
  text = quality.table(rows)
  best = text.split("Best learning rate")[1]
  assert "| fixture | jaxsae | 0.001 | 0.3000 |" in best
  assert "| fixture | jaxsae[sae.auxk_coef=1.0] | 0.001 | 0.2000 |" in best


def test_saelens_set_parses_and_refuses_unknown_fields():
  fields = {"rescale_acts_by_decoder_norm", "decoder_init_norm"}
  got = quality.peer_options(["rescale_acts_by_decoder_norm=False", "decoder_init_norm=1.0"], fields)
  assert got == {"rescale_acts_by_decoder_norm": False, "decoder_init_norm": 1.0}
  for item in ["nope=1", "decoder_init_norm"]:
    with pytest.raises(app.UsageError, match="--saelens_set"):
      quality.peer_options([item], fields)


def test_saelens_options_reach_its_sae():
  """The options land in SAELens's own config and change what it builds (needs sae-lens)."""
  pytest.importorskip("sae_lens")
  import numpy as np
  from bench import saelens_peer
  plain = saelens_peer.Peer(16, 64, 4, 1e-3, 32, 2, 1)
  other = saelens_peer.Peer(16, 64, 4, 1e-3, 32, 2, 1, sae_options=dict(
      rescale_acts_by_decoder_norm=False, decoder_init_norm=1.0))
  norms = lambda p: np.linalg.norm(p.sae.W_dec.detach().numpy(), axis=1)
  np.testing.assert_allclose(norms(plain), 0.1, rtol=1e-5)
  np.testing.assert_allclose(norms(other), 1.0, rtol=1e-5)
  assert plain.sae.cfg.rescale_acts_by_decoder_norm and not other.sae.cfg.rescale_acts_by_decoder_norm
  assert "rescale_acts_by_decoder_norm=False" in other.recipe


def test_summary_has_best_and_default_per_dataset_and_trainer():
  base = dict(dataset="fixture", n=4096, steps=150, tokens=614400, eval_l0=32.0, setup_s=0.0,
              train_s=1.0, tokens_per_s=1.0, load_start=0.0, load_end=0.0)
  rows = [dict(base, trainer="jaxsae", lr=1e-3, eval_fvu=0.30, dead_frac=0.0),
          dict(base, trainer="jaxsae", lr=4e-3, eval_fvu=0.20, dead_frac=0.01),
          dict(base, trainer="jaxsae", lr=2e-3, eval_fvu=0.21, dead_frac=0.0,
               lr_choice="default"),
          dict(base, trainer="sparsify", lr=4e-4, eval_fvu=0.40, dead_frac=0.0,
               lr_choice="default"),
          dict(base, trainer="jaxsae", lr=4e-3, eval_fvu=0.10, dead_frac=0.0, variant="x.y=1")]
  head = quality.table(rows).split("All runs:")[0]
  assert ("| fixture | 4096 | 614,400 | jaxsae | 0.2000 / 1.0% (lr 0.004) | "
          "0.2100 / 0.0% (lr 0.002) | 1.050 |") in head
  # A newer rule's default: the older default is one more swept rate, the newest the default.
  rows.append(dict(base, trainer="jaxsae", lr=3e-3, eval_fvu=0.19, dead_frac=0.0,
                   lr_choice="default"))
  rows[2]["eval_fvu"] = 0.18
  head = quality.table(rows).split("All runs:")[0]
  assert ("| fixture | 4096 | 614,400 | jaxsae | 0.1800 / 0.0% (lr 0.002) | "
          "0.1900 / 0.0% (lr 0.003) | 1.056 |") in head
  assert "| fixture | 4096 | 614,400 | sparsify | - | 0.4000 / 0.0% (lr 0.0004) | - |" in head
  assert "x.y=1" not in head   # variants stay out of the summary


def test_summary_shows_jaxsaes_newest_recipe_only():
  """A recipe change makes old jaxsae rows history: the summary's best and default come from the
  newest recipe's runs (by date, whatever their order in the file); the full table keeps all. The
  default is the newest default run by date too (an older rule's default is a swept rate)."""
  base = dict(dataset="fixture", n=4096, steps=150, tokens=614400, eval_l0=32.0, setup_s=0.0,
              train_s=1.0, tokens_per_s=1.0, load_start=0.0, load_end=0.0, trainer="jaxsae")
  old = dict(base, recipe="one b_pre", date="2026-12-04 10:00")
  new = dict(base, recipe="b_pre and b_dec", date="2026-12-05 10:00")
  rows = [dict(new, lr=6e-3, eval_fvu=0.25, dead_frac=0.0),
          dict(old, lr=1.2e-2, eval_fvu=0.15, dead_frac=0.0),   # the old recipe's best rate
          dict(new, lr=9.6e-3, eval_fvu=0.24, dead_frac=0.0, lr_choice="default"),
          dict(new, lr=8e-3, eval_fvu=0.26, dead_frac=0.0, lr_choice="default",
               date="2026-12-04 12:00"),   # an older rule's default, later in the file
          dict(old, lr=3e-3, eval_fvu=0.30, dead_frac=0.0)]
  text = quality.table(rows)
  head = text.split("All runs:")[0]
  assert ("| fixture | 4096 | 614,400 | jaxsae | 0.2500 / 0.0% (lr 0.006) | "
          "0.2400 / 0.0% (lr 0.0096) | 0.960 |") in head
  assert "0.1500" in text.split("All runs:")[1]


def test_jaxsae_weights_fold_both_biases_as_the_export_does():
  """The weights bench/quality.py scores in the LM and as a JumpReLU: raw units, b_dec - b_pre
  folded into b_enc, so they encode and decode as jaxsae's own model does."""
  import jax
  import numpy as np
  from jaxsae import model
  d, n, k, scale = 16, 64, 4, 2.5
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  params = model.init_params(keys[0], d, n, jax.random.normal(keys[1], (d,)), 0.3)
  params["b_dec"] = params["b_pre"] + jax.random.normal(keys[2], (d,))
  x = np.random.default_rng(0).normal(size=(32, d)).astype(np.float32)
  vals, idx = model.encode(params, x * scale, k)
  want = np.zeros((32, n), np.float32)
  np.put_along_axis(want, np.asarray(idx), np.asarray(vals), axis=1)
  w = quality.jaxsae_weights(params, scale, k, None)
  z = w.encode_dense(x)
  np.testing.assert_allclose(z, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(z @ w.w_dec + w.b_dec, np.asarray(model.decode(params, vals, idx)) / scale,
                             rtol=1e-4, atol=1e-4)


def test_default_learning_rates_are_each_trainers_own():
  from jaxsae import data, optim, train
  c = quickstart.get_config()
  c.sae.n, c.train.steps, c.train.lr = 4096, 150, 3e-3
  c.mesh.shape = (1, 1)
  # jaxsae's: what its own start-up resolves, the data's density included (the synthetic data's
  # Gaussian-like elements are denser than the reference's: a lower rate than the shapes' alone).
  shapes_only = optim.default_lr(c.sae.d, c.sae.k, 4096, c.train.batch_size, 150)
  lr = quality.default_lr("jaxsae", c)
  assert 0.75 * shapes_only < lr < 0.9 * shapes_only
  unset = c.copy_and_resolve_references()
  unset.train.lr = None
  source = data.create(unset)
  assert lr == optim.resolve_lr(unset, train.init_statistics(unset, source).density)[0]
  source.close()
  run = train.setup(unset)   # and what a run's own start-up resolves
  run.data.close()
  assert lr == run.lr
  assert c.train.lr == 3e-3   # the caller's config is left alone
  assert quality.default_lr("sparsify", c) == pytest.approx(4e-4)
  assert quality.default_lr("dictlearn", c) == pytest.approx(4e-4)
  assert quality.default_lr("sparsify_signum", c) == pytest.approx(1e-2)
  assert quality.default_lr("saelens", c) == 3e-4


def test_a_run_at_another_n_or_variant_is_not_skipped():
  row = dict(dataset="smollm2-L25", n=4096, lr=6e-3, trainer="jaxsae", steps=150)
  have = {quality.run_key(row)}
  assert quality.run_key(dict(row)) in have
  for change in (dict(n=16384), dict(steps=1250), dict(variant="train.seed=1"), dict(lr=1.2e-2),
                 dict(lr_choice="default"), dict(transcoder=True)):
    assert quality.run_key(dict(row, **change)) not in have, change
  # A default is the run at the rate its rule gave; another rule's default is another run.
  default = dict(row, lr=8.5e-3, lr_choice="default")
  assert quality.run_key(default) == quality.run_key(dict(default, lr=0.0085000001))
  assert quality.run_key(default) != quality.run_key(dict(default, lr=9.6e-3))


def test_a_jumprelu_is_scored_at_exactly_k_latents_per_row_on_average():
  """peers.at_equal_l0: the one threshold keeping rows * k positive pre-activations; x_hat is the
  JumpReLU decode at that threshold, whatever the SAE's own threshold was."""
  import numpy as np
  from bench import peers
  from jaxsae import sae_io
  rng = np.random.default_rng(0)
  d, n, k, rows = 16, 64, 3, 500
  sae = sae_io.SaeWeights(rng.normal(size=(d, n)), rng.normal(size=n) - 1.0,
                          rng.normal(size=(n, d)), rng.normal(size=d), 0,
                          threshold=np.full(n, 0.01))
  x = rng.normal(size=(rows, d)).astype(np.float32)
  threshold, x_hat = peers.at_equal_l0(sae, x, k, batch=128)
  pre = (x - sae.b_dec) @ sae.w_enc + sae.b_enc
  assert np.sum(pre >= threshold) == rows * k and threshold > 0.01
  np.testing.assert_allclose(x_hat, np.where(pre >= threshold, pre, 0) @ sae.w_dec + sae.b_dec,
                             rtol=1e-5, atol=1e-5)
  own, _ = peers.numpy_reconstruct(sae, x)   # its own threshold: many more latents per row
  assert not np.allclose(own, x_hat)
  # One row with every latent far above the rest: more than the 8k candidates a row offers, so
  # the threshold comes from every pre-activation, still exactly rows * k of them kept.
  sae.w_enc[:] = np.abs(sae.w_enc)
  x[0] = 50.0 + np.abs(x[0])
  threshold, _ = peers.at_equal_l0(sae, x, k, batch=128)
  pre = (x - sae.b_dec) @ sae.w_enc + sae.b_enc
  assert np.all(pre[0] >= threshold) and np.sum(pre >= threshold) == rows * k


def test_ground_truth_recovery_matches_one_to_one_and_saelens_mcc():
  import numpy as np
  rng = np.random.default_rng(0)
  truth = rng.standard_normal((48, 16))
  truth /= np.linalg.norm(truth, axis=1, keepdims=True)
  # Latents that are a permutation of 12 features with flipped signs: a perfect one-to-one match
  # (|cos| = 1), while gt_mmcs (signed, over all 48 features) stays far below 1.
  exact = -truth[rng.permutation(48)[:12]]
  r = quality.gt_recovery(exact, truth)
  assert r["gt_mcc"] == pytest.approx(1.0, abs=1e-6)
  assert r["gt_mmcs"] < 0.6 and r["gt_recovered_frac"] == 0.0
  # Two latents on one feature: a one-to-one matching gives the second its next-best feature.
  next_best = np.max(np.abs(truth[1:] @ truth[0]))
  assert quality.gt_recovery(truth[[0, 0]], truth)["gt_mcc"] == pytest.approx(
      (1 + next_best) / 2, abs=1e-6)
  noisy = truth[:20] + 0.3 * rng.standard_normal((20, 16))
  noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
  ours = quality.gt_recovery(noisy, truth)["gt_mcc"]
  synthetic = pytest.importorskip("sae_lens.synthetic")
  import torch
  theirs = synthetic.mean_correlation_coefficient(torch.tensor(noisy), torch.tensor(truth))
  assert ours == pytest.approx(theirs, rel=1e-5)


def test_a_store_is_scored_against_the_features_left_beside_it(tmp_path):
  import numpy as np
  config = quickstart.get_config()
  assert quality.store_ground_truth(config) is None   # synthetic: its truth is the source's
  config.data.source, config.data.path = "store", str(tmp_path / "s") + "/"
  assert quality.store_ground_truth(config) is None
  np.save(tmp_path / "s.ground_truth.npy", np.eye(4, dtype=np.float32))
  np.testing.assert_array_equal(quality.store_ground_truth(config), np.eye(4))



def test_rotate_acts_writes_the_same_rows_in_another_basis(tmp_path):
  """bench/rotate_acts.py (run as a script: its flags would clash with quality.py's here): the
  store holds the rows times an orthogonal matrix (every inner product between rows kept), on all
  coordinates or on the share asked for (the others untouched), the element density rises, and
  --fraction=0 is the rows as they were; the .npy it goes through is gone after."""
  import os
  import subprocess
  import sys
  import numpy as np
  from conftest import REPO
  from jaxsae import stats
  from jaxsae.data.store import Store
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(512, 16)) * np.where(np.arange(16) < 2, 8.0, 1.0)).astype(np.float32)
  np.save(tmp_path / "x.npy", x)
  kept = {}
  for fraction in ("1.0", "0.5", "0"):
    out = tmp_path / f"rot{fraction}"
    r = subprocess.run([sys.executable, os.path.join(REPO, "bench", "rotate_acts.py"),
                        f"--from_npy={tmp_path / 'x.npy'}", f"--out={out}", f"--fraction={fraction}"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "element density" in r.stdout
    y = Store(str(out)).read(0, len(x))
    np.testing.assert_allclose(y @ y.T, x @ x.T, rtol=1e-4, atol=1e-3)   # a rotation
    kept[fraction] = int(np.sum(np.all(y == x, axis=0)))   # coordinates left as they were
    assert not os.path.exists(str(out) + ".rotated.f32.npy")
  assert kept == {"1.0": 0, "0.5": 8, "0": 16}
  assert stats.element_density(Store(str(tmp_path / "rot1.0")).read(0, len(x))) > (
      stats.element_density(x) + 0.1)


# ---- transcoders ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlp_stores(tmp_path_factory):
  """A transcoder's pair of stores as `jaxsae.dump --hooks=mlp_in,mlp_out` lays them out (DIR/mlp_in,
  DIR/mlp_out), made by two real --from-npy dumps with the same token ids: inputs that are sparse
  sums of 32 features (2 per row) in d=16, targets a fixed affine map of them at 3x their scale and
  off centre (so a target rebuilt in the input's units would be far off)."""
  import subprocess
  import sys
  import numpy as np
  from conftest import REPO
  root = tmp_path_factory.mktemp("mlp")
  rng = np.random.default_rng(0)
  rows, d, features = 4096, 16, 32
  dirs = rng.standard_normal((features, d))
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  codes = np.zeros((rows, features))
  for i in range(rows):
    codes[i, rng.choice(features, 2, replace=False)] = rng.uniform(1, 3, 2)
  x = (codes @ dirs).astype(np.float32)
  y = (3 * (x @ rng.standard_normal((d, d)) / d ** 0.5 + rng.standard_normal(d))).astype(np.float32)
  np.save(root / "tokens.npy", (np.arange(rows) % 1000).astype(np.int32))
  for hook, rows_of in (("mlp_in", x), ("mlp_out", y)):
    np.save(root / f"{hook}.npy", rows_of)
    r = subprocess.run([sys.executable, "-m", "jaxsae.dump", f"--from-npy={root / hook}.npy",
                        f"--tokens-npy={root / 'tokens.npy'}", f"--out={root / 'dump' / hook}",
                        "--chunk_rows=256", "--shard_rows=1024", "--dtype=float32",
                        "--filter_massive=false", "--progress=false"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
  return str(root / "dump")


def _quality(tmp_path, *args, overrides=""):
  import os
  import subprocess
  import sys
  from conftest import REPO
  cmd = [sys.executable, os.path.join(REPO, "bench", "quality.py"), f"--out={tmp_path / 'q.jsonl'}",
         f"--table={tmp_path / 'q.md'}", "--n=64", "--eval_rows=512",
         "--set=train.batch_size=64,train.init_rows=512,sae.k=4,sae.dead_tokens=1024" + overrides,
         *args]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_store_pairs_name_a_transcoders_input_and_target(mlp_stores):
  import os
  assert quality.store_pair(mlp_stores) == (os.path.join(mlp_stores, "mlp_in"),
                                            os.path.join(mlp_stores, "mlp_out"))
  one = os.path.join(mlp_stores, "mlp_in")
  assert quality.store_pair(one) == (one, "")   # a store of its own: an SAE's
  assert quality.store_pair("/a/in:/a/out") == ("/a/in", "/a/out")
  assert quality.store_pair("gs://b/in:gs://b/out") == ("gs://b/in", "gs://b/out")
  for bad in ("/a:/b:/c", "/a:"):
    with pytest.raises(app.UsageError, match="--stores"):
      quality.store_pair(bad)


@pytest.mark.parametrize("skip", [False, True])
def test_a_transcoder_is_benchmarked_against_sparsifys(mlp_stores, tmp_path, skip):
  """quality.py on a pair of stores: jaxsae and sparsify both train a transcoder (with skip, each
  its skip transcoder) on the same batches, each scored by the FVU of the held-out targets (a
  learnable affine map: well below 1; an input's FVU, or a target in the input's units, would be
  far off), and the rows and tables keep them apart from SAE rows."""
  import json
  pytest.importorskip("sparsify")
  r = _quality(tmp_path, "--datasets=mlp", f"--stores=mlp={mlp_stores}", "--steps=150",
               "--lrs=3e-3", "--trainers=jaxsae,sparsify",
               overrides=",sae.skip=True" if skip else "")
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in open(tmp_path / "q.jsonl")]
  assert sorted(row["trainer"] for row in rows) == ["jaxsae", "sparsify"]
  for row in rows:
    assert row["transcoder"] and row["target_path"].endswith("mlp_out"), row
    assert row["eval_rows"] == 512 and row["eval_l0"] <= 4
    assert 0 < row["eval_fvu"] < 0.6, (row["trainer"], row["eval_fvu"])
  recipes = {row["trainer"]: row["recipe"] for row in rows}
  assert recipes["jaxsae"].startswith("transcoder" + (" with skip" if skip else ":"))
  assert "transcoder:" in recipes["sparsify"] and ("skip connection" in recipes["sparsify"]) == skip
  table = (tmp_path / "q.md").read_text()
  for trainer in ("jaxsae", "sparsify"):   # --set makes them variants: the full tables only
    assert f"| mlp (transcoder) | 64 | {trainer}[" in table
    assert f"| mlp (transcoder) | {trainer}[" in table.split("Best learning rate")[1]
  assert "| mlp |" not in table


@pytest.mark.parametrize("trainer,why", [("dictlearn", "no transcoder trainer"),
                                         ("saelens", "for inference only")])
def test_peers_without_transcoders_are_refused(mlp_stores, tmp_path, trainer, why):
  r = _quality(tmp_path, "--datasets=mlp", f"--stores=mlp={mlp_stores}", "--steps=1",
               f"--trainers=jaxsae,{trainer}")
  assert r.returncode != 0
  assert f"--datasets=mlp is a transcoder: --trainers {trainer} cannot train one" in r.stderr
  assert why in r.stderr
  assert not (tmp_path / "q.jsonl").exists()
