"""Config: both override forms, one-line errors for unknown keys and bad values, every shipped YAML loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from kd.config import all_keys, load_config, to_yaml
from kd.errors import ConfigError
from kd.cli import parse_args

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def test_both_override_forms():
    path, overrides = parse_args(["--config", str(DEMO), "--loss.temperature=3.5", "loss.alpha=0.25",
                                  "--train.max_steps", "7"])
    cfg = load_config(path, overrides)
    assert (cfg.loss.temperature, cfg.loss.alpha, cfg.train.max_steps) == (3.5, 0.25, 7)


def test_user_contract_keys_exist():
    keys = set(all_keys())
    for k in ("train.output_dir", "train.max_steps", "train.save_every", "train.resume", "loss.alpha",
              "loss.temperature", "loss.divergence", "data.erase_strategy"):
        assert k in keys


@pytest.mark.parametrize("override, message", [
    ("loss.temprature=2", "unknown config key 'loss.temprature' (command line) (did you mean 'loss.temperature'?)"),
    ("--los.alpha=1", "unknown config key 'los' (command line) (did you mean 'loss'?)"),
    ("loss.temperature=hot", "bad value for 'loss.temperature' (command line)"),
    ("train.max_steps=1.5", "bad value for 'train.max_steps'"),
    ("loss.divergence=kl", "loss.divergence must be one of forward_kl"),
    ("data.erase_strategy=sometimes", "data.erase_strategy must be on, off or a probability"),
    ("loss.alpha=1.5", "loss.alpha must be in [0, 1]"),
    ("nonsense", "must look like key=value"),
    ("optim.lr=-1", "optim.lr must be > 0"),
    ("optim.warmup_steps=-5", "optim.warmup_steps must be >= 0"),
    ("optim.betas=[0.9,1.5]", "optim.betas"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.max_grad_norm=-1", "optim.max_grad_norm"),
])
def test_errors_are_one_line_and_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("teacher: {name_or_path: a}\nstudent: {name_or_path: b}\noptim:\n  learning_rate: 1.0\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rate' in .*c.yaml"):
        load_config(p)


def test_yaml_syntax_error_is_one_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("loss:\n  alpha: 0.5\nloss:\n  alpha: 0.1\n")
    with pytest.raises(ConfigError, match="cannot parse .*c.yaml.*duplicate key") as e:
        load_config(p)
    assert "\n" not in str(e.value)


def test_erase_strategy_forms():
    for raw, norm, p in (("on", "on", 1.0), ("off", "off", 0.0), ("0.3", "0.3", 0.3), ("true", "on", 1.0)):
        cfg = load_config(DEMO, [f"data.erase_strategy={raw}"])
        assert cfg.data.erase_strategy == norm and cfg.data.erase_probability == p


def test_missing_required_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("student: {name_or_path: builtin:tiny-student}\n")
    with pytest.raises(ConfigError, match="missing required config key 'teacher.name_or_path'"):
        load_config(p)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    if "sweeps" in path.parts or "experiment" in path.parts:
        pytest.skip("sweep and experiment definitions have their own schemas and tests")
    cfg = load_config(path)
    dumped = tmp_path / "dump.yaml"
    dumped.write_text(to_yaml(cfg))
    assert load_config(dumped) == cfg


def test_the_config_page_documents_every_key():
    page = (ROOT / "docs" / "config.md").read_text()
    missing = [k for k in all_keys() if f"`{k}`" not in page]
    assert not missing, f"docs/config.md's table is missing {missing}: regenerate it with `python -m kd.config`"


def test_keys_a_checkpoint_predates_are_no_change_at_their_default():
    from kd.config import flat_dict
    from kd.resume import added_at_default, trajectory_changes

    new = flat_dict(load_config("configs/demo.yaml"))
    old = {k: v for k, v in new.items() if not k.startswith("onpolicy.")}  # a checkpoint from before on-policy
    assert trajectory_changes(old, new) == [] and "onpolicy.fraction" in added_at_default(old, new)
    changed = flat_dict(load_config("configs/demo.yaml", ["onpolicy.fraction=0.5"]))
    assert trajectory_changes(old, changed) == [("onpolicy.fraction", None, 0.5)]


def test_one_path_for_a_list_key_is_a_list_of_one_and_null_is_none():
    cfg = load_config(DEMO, ["data.train_files=data/train.jsonl", "data.eval_files=null"])
    assert cfg.data.train_files == ["data/train.jsonl"] and cfg.data.eval_files == []


def test_the_run_length_given_on_the_command_line_wins_over_the_files_other_one():
    assert load_config(DEMO).train.max_steps is not None  # the shipped config sets max_steps
    cfg = load_config(DEMO, ["train.epochs=1"])
    assert (cfg.train.epochs, cfg.train.max_steps) == (1, None)
    cfg = load_config(DEMO, ["train.max_steps=5"])
    assert (cfg.train.epochs, cfg.train.max_steps) == (None, 5)
    with pytest.raises(ConfigError, match="set exactly one of train.max_steps and train.epochs"):
        load_config(DEMO, ["train.epochs=1", "train.max_steps=5"])
