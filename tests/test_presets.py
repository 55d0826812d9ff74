"""The presets through the real Hugging Face loading path (a local directory), and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tiny_models import tiny_backbone

from alter_ds.cli import main
from alter_ds.config import load_config
from alter_ds.mta import build_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    tiny_backbone("llama").save_pretrained(path)
    return path


def preset_with_local_model(preset, model_dir, tmp_path):
    data = yaml.safe_load((ROOT / "configs" / f"{preset}.yaml").read_text())
    data["model"]["name_or_path"] = str(model_dir)
    path = tmp_path / f"{preset}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("preset", ["alter-ds", "alter-ds-lora", "alter-paper", "task-moe"])
def test_preset_stages_train_what_they_say(preset, local_llama, tmp_path):
    config = load_config(preset_with_local_model(preset, local_llama, tmp_path))
    model = build_model(config)
    stage1 = model.apply_stage(config.stages[0])
    stage2 = model.apply_stage(config.stages[1])
    if preset == "alter-ds":
        assert len(model.blocks) == 2 and stage1["backbone"][0] == 0 and stage1["task_experts"][0] > 0
        assert stage2["task_experts"][0] == 0 and stage2["router"][0] > 0  # experts frozen, mixture learned
    elif preset == "alter-ds-lora":  # 7 projections of both layers, each its LoRA experts, B at zero
        projections = {name.split(".")[-1] for name in model.blocks}
        assert len(model.blocks) == 14 and projections == {"q", "k", "v", "o", "gate", "up", "down"}
        assert all(not block.task_experts.w_up.detach().any() for block in model.blocks.values())
        assert stage1["backbone"][0] == 0 and stage1["task_experts"][0] > 0
        assert stage2["task_experts"][0] == 0 and stage2["router"][0] > 0
    elif preset == "task-moe":  # three copies of both layers; stage 2 trains the (reset) copies only
        assert all(block.task_experts.num_experts == 3 for block in model.blocks.values())
        assert stage1["task_experts"][0] > 0 and stage1["router"][0] > 0 and stage1["task_embeddings"][0] > 0
        assert stage2["task_experts"][0] > 0 and stage2["router"][0] == 0 and stage2["task_embeddings"][0] == 0
        assert stage1["backbone"][0] == stage2["backbone"][0] == 0
    else:
        assert list(model.blocks) == ["decoder.1"]
        assert stage1["backbone"][0] > 0 and stage1["task_experts"][0] > 0
        assert stage2["backbone"][0] == 0 and stage2["shared_experts"][0] > 0 and stage2["router"][0] > 0
    # the backbone came from a path: the artefact references it instead of copying it
    model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "backbone").exists()


def test_cli_check_config_and_params(local_llama, tmp_path, capsys):
    path = preset_with_local_model("alter-paper", local_llama, tmp_path)
    assert main(["check-config", str(path)]) == 0
    assert "stage2: router gate" in capsys.readouterr().out
    assert main(["params", str(path)]) == 0
    out = capsys.readouterr().out
    assert "stage stage1" in out and "shared_experts" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("kind: gate", "kind: gat"))
    assert main(["check-config", str(bad)]) == 2
    assert "stages[1].router.kind: unknown value 'gat'" in capsys.readouterr().err
