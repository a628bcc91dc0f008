"""Each task's {evaluator type: factory} table, and the names that config
checks use in its place (so a config is checked without importing JAX)."""
from __future__ import annotations

import pytest

from multimodal import tasks
from multimodal.config import config_lib
from multimodal.tasks import config_checks

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", sorted(config_checks.EVALUATOR_TYPES))
def test_the_config_checks_name_each_tasks_evaluator_table(name):
  assert tuple(tasks.get(name).EVALUATORS) == config_checks.EVALUATOR_TYPES[name]


def test_an_unknown_evaluator_type_is_a_config_error_when_the_config_is_checked():
  config = config_lib.load_config_file("configs/clip_shapes.py")
  with config.unlocked():
    config.evals.zero_shot_shape.type = "zero-shot"
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.evals.zero_shot_shape.type='zero-shot'.*'zero_shot'"):
    config_checks.check(config)


def test_an_unknown_task_is_a_config_error():
  config = config_lib.load_config_file("configs/clip_shapes.py")
  with config.unlocked():
    config.task = "clipp"
  with pytest.raises(config_lib.ConfigError, match="unknown config.task 'clipp'.*clip"):
    config_checks.check(config)
  with pytest.raises(config_lib.ConfigError, match="unknown config.task 'clipp'"):
    tasks.get("clipp")
