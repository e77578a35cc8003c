"""The launch scripts, run for real on this machine (gcloud only as a dry run)."""
import json
import os
import random
import re
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


POD = ["bash", "launch/tpu_pod.sh", "--name=sae-pod", "--zone=us-east5-a", "--project=my-proj",
       "--dry-run"]
WHERE = "--zone=us-east5-a --project=my-proj"
GCLOUD = "+ gcloud compute tpus tpu-vm"
STOP = (f"{GCLOUD} ssh sae-pod {WHERE} --worker=all --command=if\\ \\[\\ -f\\ "
        "~/jaxsae/launch/tpu_worker.sh\\ \\]\\;\\ then\\ bash\\ ~/jaxsae/launch/tpu_worker.sh\\ "
        "stop\\;\\ fi")


def test_tpu_pod_dry_run_prints_the_gcloud_commands():
  r = _sh([*POD, "--accelerator-type=v5p-16", "--workdir=gs://bucket/runs/r1", "--",
           "--config=configs/quickstart.py", "--config.sae.n=4096"])
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert lines[0] == f"{GCLOUD} describe sae-pod {WHERE}"
  assert lines[1] == (f"{GCLOUD} create sae-pod {WHERE} --accelerator-type=v5p-16 "
                      "--version=v2-alpha-tpuv5")
  # A run this script started before is stopped by its recorded PID, before the code is replaced;
  # nothing is killed by name.
  assert lines[2] == STOP
  assert not any("pkill" in l or "killall" in l for l in lines)
  assert any(l.startswith(f"{GCLOUD} scp /tmp/jaxsae-sae-pod.tar.gz sae-pod:") and
             l.endswith(f"{WHERE} --worker=all") for l in lines)
  install = [l for l in lines if "pip\\ install" in l]
  assert len(install) == 1 and "\\'jax\\[tpu\\]==0.10.2\\'" in install[0]   # pinned
  # The run starts detached through tpu_worker.sh (setsid/nohup, PID recorded) and the launcher
  # returns: no foreground training over ssh, no log fetch, no teardown.
  run = [l for l in lines if "jaxsae.main\\ --distributed" in l]
  assert len(run) == 1 and "--worker=all" in run[0]
  assert "bash\\ ~/jaxsae/launch/tpu_worker.sh\\ start\\ --\\ python3\\ -m\\ jaxsae.main" in run[0]
  assert "--workdir=gs://bucket/runs/r1" in run[0] and "--config.sae.n=4096" in run[0]
  assert lines.index(run[0]) == len(lines) - 2 and "--attach" in lines[-1]
  assert not any(" delete " in l or "scp sae-pod:" in l for l in lines)


def test_tpu_pod_subcommands_follow_check_and_stop_the_run():
  out = lambda *a: _sh([*POD, *a]).stdout.splitlines()
  assert out("--attach", "--worker=1") == [
      f"{GCLOUD} ssh sae-pod {WHERE} --worker=1 --command=bash\\ ~/jaxsae/launch/tpu_worker.sh\\ "
      "follow"]
  logs = out("--logs", "--workers=2")
  assert logs[0] == (f"{GCLOUD} ssh sae-pod {WHERE} --worker=all "
                     "--command=bash\\ ~/jaxsae/launch/tpu_worker.sh\\ status")
  fetch = [l for l in logs if l.startswith(f"{GCLOUD} scp sae-pod:\\~/jaxsae_run/train.log")]
  assert [l.rsplit("--worker=", 1)[1] for l in fetch] == ["0", "1"]
  assert out("--stop") == [STOP]
  down = out("--teardown", "--workers=2")
  assert down[0] == STOP and down[1:-1] == logs
  assert down[-1] == f"{GCLOUD} delete sae-pod {WHERE} --quiet"


def test_tpu_pod_version_pin_can_be_overridden():
  r = _sh([*POD, "--accelerator-type=v6e-8", "--workdir=gs://b/r", "--jax=0.11.2"])
  assert r.returncode == 0 and "jax\\[tpu\\]==0.11.2" in r.stdout, r.stderr
  r = _sh([*POD, "--accelerator-type=v6e-8", "--workdir=gs://b/r", "--jax=latest"])
  assert r.returncode == 2 and "no version" in r.stderr


def test_tpu_pod_requires_its_flags():
  r = _sh(["bash", "launch/tpu_pod.sh", "--name=x", "--dry-run"])
  assert r.returncode == 2 and "--zone is required" in r.stderr


def test_slurm_scripts_parse_and_run_under_a_fake_srun(tmp_path):
  for script in ("launch/slurm_gpu.sbatch", "launch/slurm_task.sh", "launch/local.sh",
                 "launch/tpu_pod.sh", "launch/tpu_worker.sh"):
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


def test_tpu_worker_run_survives_its_session_and_stops_on_request(tmp_path):
  """launch/tpu_worker.sh for real: the run started from a session (an ssh login's stand-in) goes
  on after that session is hung up and killed; status, log and stop act on the recorded PID only;
  stop is a SIGTERM, so the run checkpoints and exits 0."""
  import signal
  import sys
  import time
  wd, rd = str(tmp_path / "run"), str(tmp_path / "jaxsae_run")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXSAE_RUN_DIR": rd}
  env.pop("XLA_FLAGS", None)
  worker = lambda *a, **kw: subprocess.run(["bash", "launch/tpu_worker.sh", *a], cwd=REPO,
                                           env=env, capture_output=True, text=True, **kw)
  cmd = [sys.executable, "-m", "jaxsae.main", *SMALL, f"--workdir={wd}",
         "--config.train.steps=1000000", "--config.checkpoint.every_steps=0"]
  session = subprocess.Popen(["bash", "-c", 'bash launch/tpu_worker.sh start -- "$@"; sleep 60',
                              "_", *cmd], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
  try:
    assert session.stdout.readline().startswith("started PID ")
    pid = int(open(os.path.join(rd, "pid")).read())
    os.killpg(session.pid, signal.SIGHUP)        # the connection drops ...
    os.killpg(session.pid, signal.SIGKILL)       # ... and the login's processes are gone
    session.wait(timeout=10)
    deadline = time.time() + 180
    metrics = os.path.join(wd, "metrics.jsonl")
    while not (os.path.exists(metrics) and os.path.getsize(metrics)):
      assert time.time() < deadline, open(os.path.join(rd, "train.log")).read()[-3000:]
      time.sleep(0.2)
    status = worker("status")
    assert status.returncode == 0 and status.stdout.startswith(f"running PID {pid}")
    assert worker("start", "--", *cmd).returncode == 3        # one run at a time
    # The log's tail: by now the run may be many steps on (a loaded machine is slow to get here).
    assert re.search(r"step \d+/1000000 \|", worker("log", "50").stdout)
    stop = worker("stop", "120", timeout=150)
    assert stop.returncode == 0 and f"stopped PID {pid}" in stop.stdout, stop.stdout + stop.stderr
    assert worker("status").stdout.startswith("exited 0")
    assert "stopped at step" in open(os.path.join(rd, "train.log")).read()
    assert os.listdir(os.path.join(wd, "checkpoints"))
  finally:
    if session.poll() is None:
      os.killpg(session.pid, signal.SIGKILL)
    try:
      os.kill(int(open(os.path.join(rd, "pid")).read()), signal.SIGKILL)
    except (OSError, ValueError):
      pass


def test_tpu_worker_stops_only_a_jaxsae_run(tmp_path):
  """A recorded PID that is not a jaxsae training (or no longer the recorded process) is left
  alone."""
  rd = str(tmp_path / "jaxsae_run")
  env = {**os.environ, "JAXSAE_RUN_DIR": rd}
  worker = lambda *a: subprocess.run(["bash", "launch/tpu_worker.sh", *a], cwd=REPO, env=env,
                                     capture_output=True, text=True, timeout=30)
  r = worker("start", "--", "sleep", "30")
  assert r.returncode == 0, r.stderr
  pid = int(open(os.path.join(rd, "pid")).read())
  try:
    r = worker("stop", "1")
    assert r.returncode == 1 and "not a jaxsae run" in r.stderr
    os.kill(pid, 0)   # still alive
    with open(os.path.join(rd, "ident"), "w") as f:
      f.write("1\n")   # as if the PID had been recycled: not the process that was started
    assert worker("stop").stdout.startswith("no run to stop")
    assert worker("status").returncode == 3
  finally:
    os.kill(pid, 9)
