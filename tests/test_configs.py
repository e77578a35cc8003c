"""Every config in configs/ loads, validates, and fits the hardware its docstring names (TARGET)."""
import importlib
import os
import re

import pytest

from conftest import REPO
from jaxsae import config_check, plan

NAMES = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs"))
               if f.endswith(".py") and f != "__init__.py")


def test_the_expected_configs_exist():
  assert {"base", "quickstart", "smollm2_fixture", "gpt2_small", "dict_1m", "dict_16m"} <= set(NAMES)


def _load(name, tmp_path):
  """(module, config); configs/store.py is given a store (the metadata it reads: d and rows)."""
  module = importlib.import_module(f"configs.{name}")
  if name != "store":
    return module, module.get_config()
  (tmp_path / "metadata.json").write_text('{"d": 576, "rows": 1000000}')
  return module, module.get_config(str(tmp_path))


@pytest.mark.parametrize("name", NAMES)
def test_config_loads_validates_and_documents_its_command(name, tmp_path):
  module, config = _load(name, tmp_path)
  config_check.validate(config)
  assert re.search(r"python -m jaxsae\.(main|dump)|launch/", module.__doc__), name
  assert f"configs/{name}.py" in module.__doc__, "the docstring's command must name this config"


@pytest.mark.parametrize("name", [n for n in NAMES if n != "base"])
def test_config_fits_its_target_hardware(name, tmp_path):
  module, config = _load(name, tmp_path)
  target = module.TARGET
  shape = [target["devices"] if s == -1 else s for s in config.mesh.shape]
  assert shape[0] * shape[1] == target["devices"], (shape, target)
  p = plan.estimate(plan.Problem.from_config(config), shape[0], shape[1])
  fits, text = plan.verdict(p, plan.parse_bytes(target["device_memory"]))
  assert fits, f"{name} on {target['hardware']}:\n{text}"
  # The docstring quotes the planner's peak for that hardware.
  if target["devices"] > 1 or name == "gpt2_small":
    assert plan.fmt_bytes(p.peak) in module.__doc__, (plan.fmt_bytes(p.peak), name)
