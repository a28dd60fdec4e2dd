"""Job config: TOML + overrides, and every refusal names the key and what to change."""
import re

import pytest

from launch.train import main as train_main
from model.config import ConfigError
from trainer.config import _field_docs, config_keys, load_config


def test_toml_and_overrides(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('[train]\nsteps = 7\n[model.lm]\nlayers = 6\n[optim]\nlr = 1e-3\n')
    cfg = load_config(["--config", str(path), "--data.uri", "synthetic", "--train.seed", "5", "--optim.lr=2e-3",
                       "--model.lm.first_k_dense", "2"])
    cfg.validate()
    assert (cfg.train.steps, cfg.train.seed, cfg.optim.lr) == (7, 5, 2e-3)
    assert (cfg.model.lm.layers, cfg.model.lm.first_k_dense) == (6, 2)
    # the preset sets the defaults of the other model fields
    small = load_config(["--model.preset", "small"])
    assert small.model.lm.hidden == 1024


@pytest.mark.parametrize("argv, message", [
    (["--train.stepz", "3"], "unknown config key 'train.stepz'"),
    (["--nosuch.key", "3"], "unknown config key 'nosuch.key'"),
    (["--train.steps", "three"], "train.steps: expected int"),
    (["--model.preset", "huge"], "model.preset='huge' is unknown"),
    (["--model.lm.qk_rope_head_dim", "15"], "qk_rope_head_dim=15 must be even"),
    (["--model.vision.heads", "3"], "not divisible by model.vision.heads=3"),
    (["--model.lm.num_experts", "2"], "num_experts=2 is smaller than model.lm.top_k=4"),
    (["--model.lm.first_k_dense", "9"], "first_k_dense=9 must lie in"),
    (["--train.global_batch", "6", "--train.micro_batch", "4"], "divisible by parallel.dp"),
    (["--parallel.encoder", "both"], "choose 'dep' or 'colocated'"),
    (["--optim.min_lr", "1.0"], "optim.min_lr <= optim.lr"),
    (["--train.steps", "0"], "train.steps must be positive"),
    (["--train.steps"], "--train.steps needs a value"),
])
def test_bad_configs_are_refused_with_their_key(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(argv).validate()


def test_entry_point_refuses_before_training(tmp_path, capsys):
    code = train_main(["--model.lm.num_experts", "2", "--job.run_dir", str(tmp_path / "r")])
    assert code == 2
    assert "num_experts=2 is smaller than model.lm.top_k=4" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_missing_dataset_names_the_command_that_builds_it(tmp_path):
    with pytest.raises(ConfigError, match="python -m launch.make_dataset --out"):
        load_config(["--data.uri", str(tmp_path / "nowhere")]).validate()


def test_missing_config_file():
    with pytest.raises(ConfigError, match="no such file"):
        load_config(["--config", "/nonexistent/job.toml"])


def test_help_lists_every_key_with_type_default_and_doc(capsys):
    keys = config_keys()
    undocumented = [k.key for k in keys if not k.doc]
    assert not undocumented, f"document these config fields (a comment beside them): {undocumented}"
    assert {"train.global_batch", "model.lm.hidden", "data.workers", "parallel.layout",
            "resume"} <= {k.key for k in keys}
    assert train_main(["--help"]) == 0
    out = capsys.readouterr().out
    for k in keys:
        line = next(line for line in out.splitlines() if line.startswith(f"--{k.key} "))
        assert k.type in line and k.doc in line
    assert re.search(r"--train\.micro_batch +int +1 +sequences per microbatch", out)
    # a field without a comment is what the check above refuses
    from dataclasses import dataclass

    @dataclass
    class Section:
        documented: int = 1  # says why
        # the line above documents this one
        above: int = 2
        bare: int = 3

    assert _field_docs(Section) == {"documented": "says why",
                                    "above": "the line above documents this one", "bare": ""}
