"""The performance knobs (jaxsae/knobs.py, plan.resolve_encoder_tile): each resolver's automatic
choice and reason, an explicit value honoured, and the step built with the resolved values."""
import dataclasses
import types

import pytest

from jaxsae import knobs, plan, train


def _memory_between(config, tile):
  """A device memory in which config's step fits with this encoder tile and not with twice it
  (nor un-tiled), on one device."""
  p = plan.Problem.from_config(config, encoder_tile=0)
  need = lambda t: plan.estimate(dataclasses.replace(p, encoder_tile=t), 1, 1).peak  # noqa: E731
  assert need(tile) < need(2 * tile) < need(0)
  return need(tile), need(0)


@pytest.fixture
def wide_config(tiny_config):
  """n = 65536 latents at batch 1024: pre[B, n] (512 MiB with AuxK's copy) dominates the step."""
  c = tiny_config
  c.sae.n, c.train.batch_size = 65536, 1024
  return c


def test_encoder_tile_untiled_where_it_fits(wide_config):
  tile, why = plan.resolve_encoder_tile(wide_config, 1, 1)
  assert tile == 0 and why.startswith("automatic: pre[B, n_local] in one piece fits"), why
  wide_config.mesh.device_memory = "off"
  assert plan.resolve_encoder_tile(wide_config, 1, 1) == (
      0, "automatic: device memory unknown or not checked, pre[B, n_local] in one piece")


def test_encoder_tile_the_largest_that_fits_where_untiled_does_not(wide_config):
  fits, untiled = _memory_between(wide_config, 4096)
  wide_config.mesh.device_memory = str(fits)
  tile, why = plan.resolve_encoder_tile(wide_config, 1, 1)
  assert tile == 4096, why
  assert f"tiles of 4096 latents need {plan.fmt_bytes(fits)}" in why
  assert f"the un-tiled step needs {plan.fmt_bytes(untiled)}" in why
  # Over 8 latent shards (an eighth of the weights and of pre[B, n] each) the un-tiled step fits.
  assert plan.resolve_encoder_tile(wide_config, 1, 8)[0] == 0
  # The start-up check plans with the resolved tile: it accepts the automatic choice, and refuses
  # the un-tiled step once it is asked for (an explicit value is honoured).
  specs = types.SimpleNamespace(data_size=1, model_size=1)
  assert plan.check(wide_config, specs, log=False).problem.encoder_tile == 4096
  wide_config.encoder_tile = 0
  assert plan.resolve_encoder_tile(wide_config, 1, 1) == (0, "set in the config")
  with pytest.raises(plan.PlanError, match="does not fit"):
    plan.check(wide_config, specs, log=False)


def test_encoder_tile_none_fits(wide_config):
  wide_config.mesh.device_memory = "1MiB"   # less than the parameters
  tile, why = plan.resolve_encoder_tile(wide_config, 1, 1)
  assert tile == 0 and why.endswith("and no tile makes it fit"), why


def test_step_knobs_default_to_todays_values_and_honour_a_setting(tiny_config):
  assert knobs.dense_op_ratio(tiny_config) == (16, "automatic: on the xla path, ops over K "
                                               "latents run as dense GEMMs where n_local <= 16 K, "
                                               "the break-even measured on CPU")
  assert knobs.auxk_buckets(tiny_config)[0] is True
  assert knobs.auxk_compact(tiny_config)[0] is True
  tiny_config.train.dense_op_ratio = 0
  tiny_config.train.auxk_buckets = tiny_config.train.auxk_compact = False
  for resolve in (knobs.dense_op_ratio, knobs.auxk_buckets, knobs.auxk_compact):
    assert resolve(tiny_config) in ((0, "set in the config"), (False, "set in the config"))


def test_loader_knobs_follow_the_store(tiny_config, monkeypatch):
  dc = tiny_config.data
  assert knobs.direct_read(tiny_config) == (
      False, "automatic: data.source='synthetic' is not a store")
  assert knobs.retain_freed_memory(tiny_config) == (
      False, "automatic: data.source='synthetic' has no store loader")
  dc.source, dc.path = "store", "/data/acts"
  assert knobs.direct_read(tiny_config) == (
      True, "automatic: a local store, uncompressed chunks read by pread + crc32c")
  dc.path = "gs://bucket/acts"
  assert knobs.direct_read(tiny_config) == (
      False, "automatic: gs://bucket/acts is not local, TensorStore reads it")
  monkeypatch.setattr(knobs.platform, "libc_ver", lambda: ("glibc", "2.35"))
  assert knobs.retain_freed_memory(tiny_config) == (
      True, "automatic: glibc 2.35: the loader reuses freed buffers, ~1.5x faster")
  monkeypatch.setattr(knobs.platform, "libc_ver", lambda: ("", ""))
  assert knobs.retain_freed_memory(tiny_config)[0] is False
  dc.direct_read, dc.retain_freed_memory = True, True
  assert knobs.direct_read(tiny_config) == knobs.retain_freed_memory(tiny_config) == (
      True, "set in the config")


def test_the_step_is_built_with_the_resolved_values(tiny_config):
  """n=128, k_aux=16: AuxK may run over a 16-long dead list (auxk_compact) or all latents."""
  auto = train.setup(tiny_config)
  auto.data.close()
  assert auto.steps.ops.encoder_tile == 0 and auto.steps.ops.dense_op_ratio == 16
  assert auto.steps.aux_branches == [(0, 0), (16, 16), (16, 0)]
  tiny_config.encoder_tile, tiny_config.train.dense_op_ratio = 64, 0
  tiny_config.train.auxk_compact = False
  manual = train.setup(tiny_config)
  manual.data.close()
  assert manual.steps.ops.encoder_tile == 64 and manual.steps.ops.dense_op_ratio == 0
  assert manual.steps.aux_branches == [(0, 0), (16, 0)]
