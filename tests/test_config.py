from pathlib import Path

import pytest

from wq.config import QuantConfig
from wq.quantize import build_parser, config_from_argv
from wq.scheme import QuantScheme

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_recipe_loads_and_is_valid(path):
    cfg = QuantConfig.from_yaml(path)
    QuantScheme.parse(cfg.scheme)


def test_flags_override_recipe_and_repeatables_add(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("scheme: W3G128\nalgo: rtn\niters: 50\nskip: [lm_head, 'layers\\.0\\.']\n")
    cfg, _ = config_from_argv(["m", "--recipe", str(recipe), "--scheme", "W2G128", "--skip", "mlp", "-o", "x"])
    assert (cfg.model, cfg.scheme, cfg.iters, cfg.output) == ("m", "W2G128", 50, "x")
    assert cfg.skip == ["lm_head", "layers\\.0\\.", "mlp"]


def test_unknown_recipe_key_is_named(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("schema: W4G128\n")
    with pytest.raises(ValueError, match="schema"):
        QuantConfig.from_yaml(recipe)


def test_cli_flags_come_from_the_dataclass():
    helptext = build_parser().format_help()
    import dataclasses

    for f in dataclasses.fields(QuantConfig):
        if f.metadata.get("cli", True):
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            assert flag in helptext, flag


def test_config_round_trips_through_dict():
    cfg = QuantConfig(scheme="W2G128", override=["a=W4G128"])
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("name", ["fast", "balanced", "best"])
def test_named_recipes_resolve_to_the_bundled_yaml(name):
    from wq.algorithms import ALGORITHMS

    cfg, _ = config_from_argv(["--recipe", name, "-o", "x"])
    bundled = QuantConfig.from_yaml(Path(__file__).parent.parent / "configs" / f"{name}.yaml")
    bundled.output = "x"
    assert cfg == bundled
    ALGORITHMS.get(cfg.algo)
    assert cfg.scheme == "W4G128"  # recipes choose how, not how many bits: --scheme stays the user's


def test_unknown_recipe_name_lists_the_bundled_ones(capsys):
    from wq.quantize import main

    assert main(["--recipe", "fastest", "-o", "x"]) == 2
    err = capsys.readouterr().err
    assert "fastest" in err and "balanced" in err and "best" in err


def test_new_settings_reach_the_algorithm():
    cfg, _ = config_from_argv(["--algo", "recon", "--init", "gptq", "--iters", "7", "--recon-batch", "2",
                               "--scale-lr", "0.01", "--rotate", "--bits-budget", "3.25", "--bits-candidates", "W3G128",
                               "--bits-candidates", "W4G128", "-o", "x"])
    args = cfg.algo_args()
    assert (args["init"], args["iters"], args["recon_batch"], args["scale_lr"]) == ("gptq", 7, 2, 0.01)
    assert cfg.model_args() == {"rotate": True, "bits_budget": 3.25, "bits_candidates": ["W3G128", "W4G128"],
                                "budget_samples": 16, "budget_format": None, "e2e_steps": 0, "e2e_lr": None}
