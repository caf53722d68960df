"""BnConfig and its presets carry AdapterHub's option names and defaults: built with the same overrides, each
equals, field for field, the config AdapterHub itself saved in the fixtures (tests/fixtures/adapterhub)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastpeft import config as cfg
from fastpeft.errors import ConfigError

MANIFEST = Path(__file__).parent / "fixtures" / "adapterhub" / "manifest.json"
CASES = [c for c in json.loads(MANIFEST.read_text())["cases"] if c["family"] == "llama" and c["status"] == "ok"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["case"])
def test_preset_equals_adapterhubs_saved_config(case):
    config = getattr(cfg, case["config_class"])(**case["overrides"])
    ours = {k: v for k, v in config.to_dict().items() if k != "method"}
    theirs = case["adapter_config"]
    assert ours == theirs


@pytest.mark.parametrize("kwargs, field", [
    (dict(reduction_factor=0), "reduction_factor"),
    (dict(reduction_factor={"1": 4}), "reduction_factor"),
    (dict(reduction_factor={"x": 4, "default": 8}), "reduction_factor"),
    (dict(non_linearity="softsign"), "non_linearity"),
    (dict(leave_out=[-1]), "leave_out"),
    (dict(scaling="sometimes"), "scaling"),
    (dict(inv_adapter="real_nvp"), "inv_adapter"),
    (dict(phm_dim=0), "phm_dim"),
    (dict(mh_adapter=False, output_adapter=False), "output_adapter"),
    (dict(init_weights="xavier"), "init_weights"),
])
def test_bad_fields(kwargs, field):
    with pytest.raises(ConfigError, match=f"BnConfig.{field}"):
        cfg.SeqBnConfig(**kwargs)


def test_mam_is_an_alias_of_mam_adapter():
    assert cfg.BnConfig(init_weights="mam").init_weights == "mam_adapter"
