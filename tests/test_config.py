"""Config loading: dataclasses from YAML, one clear error naming file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from alter_ds.config import ConfigError, ExperimentConfig, MTAConfig, RouterConfig, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
run_name: demo
model:
  name_or_path: some/model
tasks:
  - {name: a, category: x}
  - {name: b}
mta:
  expert_kind: bottleneck
  layers: [0, 1]
  task_experts: {a: [1]}
stages:
  - name: s1
    router: {kind: hard}
  - name: s2
    init_from: s1
    router: {kind: task_weights, temperature: 0.5, top_k: 1}
    train: [router, "*norm*"]
"""


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_good_config_loads_into_dataclasses(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert isinstance(config, ExperimentConfig)
    assert config.task_names() == ["a", "b"]
    assert config.mta.layers == [0, 1]
    assert config.mta.task_experts == {"a": [1]}
    assert config.stages[1].router.kind == "task_weights"
    assert config.stages[1].router.temperature == 0.5
    assert config.stages[1].train == ["router", "*norm*"]
    assert config.stages[0].train == ["task_experts", "shared_experts", "router"]  # dataclass default


@pytest.mark.parametrize("preset", ["alter-ds", "alter-paper"])
def test_presets_load(preset):
    config = load_config(ROOT / "configs" / f"{preset}.yaml")
    assert len(config.stages) == 2
    assert config.stages[1].init_from == config.stages[0].name


@pytest.mark.parametrize(
    "old, new, line, key, message",
    [
        ("  expert_kind: bottleneck", "  expert_knd: bottleneck", 8, "mta.expert_knd", "unknown key"),
        ("    router: {kind: hard}", "    router: {kind: hardd}", 13, "stages[0].router.kind", "unknown value 'hardd'"),
        ("temperature: 0.5", "temperature: hot", 16, "stages[1].router.temperature", "expected a number"),
        ("temperature: 0.5", "temperature: -1", 16, "stages[1].router.temperature", "must be > 0"),
        ("  layers: [0, 1]", "  layers: [0, x]", 9, "mta.layers", "expected"),
        ("  layers: [0, 1]", "  layers: sometimes", 9, "mta.layers", "must be all, middle, none or a list"),
        ("{a: [1]}", "{zz: [1]}", 10, "mta.task_experts.zz", "unknown task 'zz'"),
        ("init_from: s1", "init_from: s9", 15, "stages[1].init_from", "unknown or later stage 's9'"),
        ("  - {name: b}", "  - {name: a}", 6, "tasks[1].name", "duplicate task name 'a'"),
        ("top_k: 1", "top_k: 0", 16, "stages[1].router.top_k", "must be >= 1"),
    ],
)
def test_bad_config_names_file_line_and_key(tmp_path, old, new, line, key, message):
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    text = str(error.value)
    assert text.startswith(f"{path}:{line}: {key}: "), text
    assert message in text


def test_missing_required_key_and_file(tmp_path):
    with pytest.raises(ConfigError, match=r"model: missing required key"):
        load_config(write(tmp_path, "tasks: [{name: a}]\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"cfg.yaml:2: invalid YAML"):
        load_config(write(tmp_path, "model: {name_or_path: x\ntasks: [\n"))


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="ffn experts replace the FFN"):
        config_from_dict(MTAConfig, {"expert_kind": "ffn", "position": "after_ffn"})
    with pytest.raises(ConfigError, match="replace_ffn needs expert_kind: ffn"):
        config_from_dict(MTAConfig, {"position": "replace_ffn"})
    with pytest.raises(ConfigError, match=r"task_experts.a: expert 3 out of range"):
        config_from_dict(MTAConfig, {"num_task_experts": 2, "task_experts": {"a": [3]}})
    with pytest.raises(ConfigError, match="routes: a fixed router needs routes"):
        config_from_dict(RouterConfig, {"kind": "fixed"})
    assert config_from_dict(MTAConfig, {"expert_kind": "ffn"}).resolved_position() == "replace_ffn"


def test_run_name_must_be_a_plain_directory_name(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run_name: ../elsewhere\nmodel: {name_or_path: m}\ntasks: [{name: a, builder: b}]\n")
    with pytest.raises(ConfigError, match=r"run_name.*plain directory name"):
        load_config(path)


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    text = GOOD + "training:\n  micro_batch_size: 4\ntraining:\n  log_every: 2\n"
    first = text.splitlines().index("training:") + 1
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text))
    assert str(error.value) == (
        f"{tmp_path / 'cfg.yaml'}:{first + 2}: training: duplicate key (first given on line {first}, "
        f"again on line {first + 2})"
    )
    nested = GOOD.replace("  layers: [0, 1]\n", "  layers: [0, 1]\n  layers: all\n")
    with pytest.raises(
        ConfigError, match=r"cfg.yaml:10: mta.layers: duplicate key \(first given on line 9, again on line 10\)"
    ):
        load_config(write(tmp_path, nested))


@pytest.mark.parametrize("written, value", [("5e-3", 5e-3), ("1E4", 1e4), ("+2.5e-1", 0.25), ("3.0e-5", 3e-5)])
def test_floats_in_exponent_notation_without_a_dot_are_numbers(tmp_path, written, value):
    def with_stage_line(line):
        return GOOD.replace("    router: {kind: hard}", f"    router: {{kind: hard, prior_other: -1e-1}}\n    {line}")

    config = load_config(write(tmp_path, with_stage_line(f"lr: {written}")))
    assert config.stages[0].lr == value and config.stages[0].router.prior_other == -0.1
    with pytest.raises(ConfigError, match=r"stages\[0\]\.lr: expected a number, got str 'fast'"):
        load_config(write(tmp_path, with_stage_line("lr: fast")))


SUITE = """\
model:
  name_or_path: some/model
tasks:
  suite: default
  root: elsewhere
  override:
    imdb: {max_input_tokens: 64}
    headlines: {metric: rouge_l, max_target_tokens: 8}
"""


def test_a_task_suite_is_named_once_and_changed_by_task_name(tmp_path):
    from alter_ds.data.prepare import default_suite

    config = load_config(write(tmp_path, SUITE))
    suite = {task.name: task for task in default_suite("elsewhere")}
    assert config.task_names() == list(suite)
    changed = {"imdb": {"max_input_tokens": 64}, "headlines": {"max_target_tokens": 8}}
    for task in config.tasks:
        expected = suite[task.name]
        for key, value in changed.get(task.name, {}).items():
            assert getattr(task, key) == value != getattr(expected, key)
            setattr(expected, key, value)
        assert task == expected and task.source == f"elsewhere/{task.name}"


@pytest.mark.parametrize(
    "old, new, line, key, message",
    [
        ("imdb: {max", "imbd: {max", 7, "tasks.override.imbd", "no task named 'imbd'"),
        ("suite: default", "suite: mine", 4, "tasks.suite", "unknown suite 'mine'"),
        ("  root: elsewhere", "  roots: elsewhere", 5, "tasks.roots", "a task suite takes suite, root, override"),
        ("max_input_tokens: 64", "max_input_tokens: -1", 7, "tasks[0].max_input_tokens", "must be >= 1"),
    ],
)
def test_task_suite_mistakes_name_the_file_line_and_key(tmp_path, old, new, line, key, message):
    path = write(tmp_path, SUITE.replace(old, new))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    text = str(caught.value)
    assert key in text and message in text and str(path) in text, text
    if caught.value.line is not None:
        assert caught.value.line == line, text
