"""The quickstart's promise: an SAE trained on synthetic superposition recovers the true features."""
from configs import quickstart
from jaxsae import train


def test_small_quickstart_recovers_ground_truth(tmp_path):
  c = quickstart.get_config()
  c.sae.d, c.sae.n, c.sae.k = 64, 512, 4
  c.data.synthetic.num_features, c.data.synthetic.active = 256, 4.0
  c.train.steps, c.train.batch_size, c.train.log_every = 400, 1024, 100
  c.train.init_rows, c.data.eval_rows = 4096, 2048
  c.sae.dead_tokens = 100_000
  c.mesh.shape = (1, 1)
  record = train.train_and_evaluate(c, str(tmp_path))
  assert record["step"] == 400
  assert record["eval/gt_recovered_frac"] >= 0.9, record
  assert record["eval/gt_mmcs"] >= 0.95, record
  assert record["eval/fvu"] < 0.3, record
