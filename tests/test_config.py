"""Every attention and task YAML composes, and bad choices fail with a helpful message."""

from types import SimpleNamespace

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lra.build import build_model
from lra.summary import MODEL_TARGET
from tests.helpers import ATTENTIONS, TASKS, compose_config


def test_registry_is_complete():
    assert {"softmax", "taylorshift", "fastmax", "performer", "linformer"} <= set(ATTENTIONS)
    assert {"listops", "text", "retrieval", "image"} <= set(TASKS)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("profile", ["official", "cpu"])
def test_every_combination_composes(task, attention, profile):
    cfg = compose_config([f"task={task}", f"attention={attention}", f"profile={profile}"])
    assert cfg.task.name == task
    assert cfg.data._target_.startswith("data.")
    assert cfg.model.qkv_dim % cfg.model.num_heads == 0
    assert cfg.trainer.max_steps > 0
    factory = instantiate(cfg.attention)
    module = factory(
        num_heads=cfg.model.num_heads,
        head_dim=cfg.model.qkv_dim // cfg.model.num_heads,
        max_len=cfg.data.seq_len + 1,
    )
    assert module.name == attention


def test_cpu_profile_is_smaller_than_official():
    official = compose_config(["task=listops", "profile=official"])
    cpu = compose_config(["task=listops", "profile=cpu"])
    assert cpu.trainer.max_steps < official.trainer.max_steps
    assert cpu.model.d_model < official.model.d_model
    assert cpu.data.num_train < official.data.num_train


def test_unknown_attention_lists_the_choices():
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(["attention=flashy"])
    message = str(error.value)
    assert "flashy" in message
    for name in ATTENTIONS:
        assert name in message


def test_unknown_task_lists_the_choices():
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(["task=sorting"])
    for name in TASKS:
        assert name in str(error.value)


def test_a_model_node_from_before_its_target_still_builds_the_same_model():
    """Analyses rebuild models from old runs' config_resolved.yaml, whose model node had no ``_target_`` and
    held attn_dropout."""
    cfg = compose_config(["task=listops", "attention=softmax", "profile=cpu"])
    assert cfg.model._target_ == MODEL_TARGET  # the name both layout conversions rely on
    legacy = OmegaConf.to_container(cfg.model)
    del legacy["_target_"]
    legacy["attn_dropout"] = cfg.attn_dropout
    datamodule = SimpleNamespace(vocab_size=20, seq_len=32, num_classes=10, dual=False)
    weights = []
    for node in (OmegaConf.create(legacy), cfg.model):
        torch.manual_seed(0)
        weights.append(build_model(node, instantiate(cfg.attention), datamodule).state_dict())
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
