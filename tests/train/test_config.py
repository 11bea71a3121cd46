"""Run arguments: YAML round trip, errors that name the section and field, command-line overrides."""

import pytest

from memsplice.train.config import TrainConfig, apply_overrides


def test_yaml_round_trip_and_overrides(tmp_path):
    cfg = TrainConfig()
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    again = TrainConfig.from_yaml(path, ["run.steps=7", "optim.lr=2e-3", "data.lengths=[64, 128]"])
    assert again.run.steps == 7 and again.optim.lr == 0.002 and again.data.lengths == [64, 128]
    path.write_text("optim:\n  lr: 3e-4\n  min_lr_ratio: .5\n")
    assert TrainConfig.from_yaml(path).optim.lr == 3e-4
    assert again.memory.to_dict() == cfg.memory.to_dict()


@pytest.mark.parametrize(
    "data, match",
    [
        ({"optim": {"lr": -1}}, "optim.lr"),
        ({"data": {"lengths": []}}, "data.lengths"),
        ({"run": {"compile": "max"}}, "run.compile"),
        ({"run": {"reader_shapes": "dynamic"}}, "run.reader_shapes"),
        ({"run": {"reader_attention": "upper_left"}}, "run.reader_attention"),
        ({"run": {"compile_mode": "fast"}}, "run.compile_mode"),
        ({"objectives": {"reconstruction": 0.0}}, "objectives.reconstruction"),
        (
            {"objectives": {"reconstruction": 0.0, "continuation": 1.0, "refined_target": 1.0}},
            "refined_target",
        ),
        ({"objectives": {"refined_target_steps": 0}}, "objectives.refined_target_steps"),
        ({"run": {"stpes": 3}}, "unknown fields in run"),
        ({"traning": {}}, "unknown config sections"),
        ({"memory": {"num_slots": 0}}, "MemoryConfig.num_slots"),
        ({"data": {"lengths": [1024]}}, "max_memory_tokens"),
    ],
)
def test_bad_values_name_the_field(data, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(data)


def test_bad_override_is_explained():
    with pytest.raises(ValueError, match="section.field=value"):
        apply_overrides({}, ["steps=3"])
    with pytest.raises(ValueError, match="unknown section"):
        apply_overrides({}, ["runs.steps=3"])


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no training config"):
        TrainConfig.from_yaml(tmp_path / "nope.yaml")


def test_shipped_configs_load():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[2] / "configs").glob("*.yaml")):
        TrainConfig.from_yaml(path)
