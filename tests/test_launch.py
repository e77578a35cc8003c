"""The launch scripts, run for real on this machine (gcloud only as a dry run)."""
import json
import os
import random
import subprocess

from conftest import REPO

SMALL = ["--config=configs/quickstart.py", "--config.sae.n=256", "--config.train.batch_size=512",
         "--config.data.eval_rows=0", "--config.train.init_rows=1024", "--config.train.log_every=2"]


def _sh(args, env=None, timeout=300):
  full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
  full_env.pop("XLA_FLAGS", None)
  return subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True,
                        timeout=timeout)


def _steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


def test_local_two_processes_train_checkpoint_and_resume(tmp_path):
  wd = str(tmp_path / "run")
  flags = [*SMALL, f"--workdir={wd}", "--config.checkpoint.every_steps=2"]
  first = _sh(["bash", "launch/local.sh", "--processes=2", "--devices=2", "--",
               *flags, "--config.train.steps=4"])
  assert first.returncode == 0, first.stdout + first.stderr
  logs = sorted(os.listdir(os.path.join(wd, "logs")))
  assert logs == ["process_0.log", "process_1.log"]
  for log in logs:  # every process logs; both saw the 2 x 2 = 4-device mesh
    text = open(os.path.join(wd, "logs", log)).read()
    assert "'data': 4" in text and "step 4/4" in text, text[-2000:]
  assert _steps(wd) == [2, 4]
  assert os.listdir(os.path.join(wd, "checkpoints"))

  again = _sh(["bash", "launch/local.sh", "--processes=2", "--devices=2", "--",
               *flags, "--config.train.steps=6"])
  assert again.returncode == 0, again.stdout + again.stderr
  assert _steps(wd) == [2, 4, 6], "the second launch did not continue from step 4"
  log0 = open(os.path.join(wd, "logs", "process_0.log")).read()
  assert "step 6/6" in log0 and "step 2/6" not in log0


def test_tpu_pod_dry_run_prints_the_gcloud_commands():
  r = _sh(["bash", "launch/tpu_pod.sh", "--name=sae-pod", "--zone=us-east5-a",
           "--project=my-proj", "--accelerator-type=v5p-16", "--workdir=gs://bucket/runs/r1",
           "--dry-run", "--teardown", "--", "--config=configs/quickstart.py",
           "--config.sae.n=4096"])
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  where = "--zone=us-east5-a --project=my-proj"
  gcloud = "+ gcloud compute tpus tpu-vm"
  assert lines[0] == f"{gcloud} describe sae-pod {where}"
  assert lines[1] == (f"{gcloud} create sae-pod {where} --accelerator-type=v5p-16 "
                      "--version=v2-alpha-tpuv5")
  assert any(l.startswith(f"{gcloud} scp /tmp/jaxsae-sae-pod.tar.gz sae-pod:") and
             l.endswith(f"{where} --worker=all") for l in lines)
  assert f"{gcloud} ssh sae-pod {where} --worker=all --command=pkill\\ -f\\ jaxsae.main\\ \\|\\|\\ true" in lines
  run = [l for l in lines if "jaxsae.main\\ --distributed" in l]
  assert len(run) == 1 and "--worker=all" in run[0]
  assert "--workdir=gs://bucket/runs/r1" in run[0] and "--config.sae.n=4096" in run[0]
  fetch = [l for l in lines if l.startswith(f"{gcloud} scp sae-pod:")]
  assert [l.rsplit("--worker=", 1)[1] for l in fetch] == ["0", "1"]  # v5p-16: 2 hosts
  assert lines[-1] == f"{gcloud} delete sae-pod {where} --quiet"


def test_tpu_pod_requires_its_flags():
  r = _sh(["bash", "launch/tpu_pod.sh", "--name=x", "--dry-run"])
  assert r.returncode == 2 and "--zone is required" in r.stderr


def test_slurm_scripts_parse_and_run_under_a_fake_srun(tmp_path):
  for script in ("launch/slurm_gpu.sbatch", "launch/slurm_task.sh", "launch/local.sh",
                 "launch/tpu_pod.sh"):
    assert _sh(["bash", "-n", script]).returncode == 0, script
  wd = str(tmp_path / "slurm")
  env = {"SLURM_JOB_ID": str(random.randint(1, 4000)), "SLURM_NTASKS": "2",
         "SLURM_SUBMIT_DIR": REPO, "JAX_NUM_CPU_DEVICES": "1",
         "PATH": os.path.join(REPO, "tests", "bin") + os.pathsep + os.environ["PATH"]}
  r = _sh(["bash", "launch/slurm_gpu.sbatch", *SMALL, f"--workdir={wd}",
           "--config.train.steps=2"], env=env)
  assert r.returncode == 0, r.stdout + r.stderr
  assert sorted(os.listdir(os.path.join(wd, "logs"))) == ["task_0.log", "task_1.log"]
  assert "'data': 2" in open(os.path.join(wd, "logs", "task_1.log")).read()
  assert _steps(wd) == [2]
