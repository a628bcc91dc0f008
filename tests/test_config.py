"""Config parsing: big_vision-style args, locked keys with suggestions, pp
validation at parse time, and durations in steps, epochs or examples."""
import os
import subprocess
import sys

import pytest

from configs import clip_shapes, siglip_shapes
from multimodal.config import config_lib
from multimodal.tasks import config_checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
  """Runs the train program's flag parsing only (it fails before training)."""
  return subprocess.run([sys.executable, "-m", "experiments.train", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.unit
def test_arg_string_overrides_defaults():
  config = clip_shapes.get_config("variant=S/8,steps=3000")
  assert config.model.image.variant == "S/8"
  assert config.total_steps == 3000


@pytest.mark.unit
def test_unknown_arg_names_closest():
  with pytest.raises(config_lib.ConfigError, match="Did you mean 'steps'"):
    clip_shapes.get_config("stepz=5")


@pytest.mark.unit
def test_arg_of_wrong_type_is_an_error():
  with pytest.raises(config_lib.ConfigError, match="steps"):
    clip_shapes.get_config("steps=many")


@pytest.mark.unit
def test_siglip_config_uses_sigmoid_initialisation():
  config = siglip_shapes.get_config()
  assert config.loss == "sigmoid"
  assert config.model.temperature_init == 10.0
  assert config.model.bias_init == -10.0


@pytest.mark.integration
def test_unknown_override_key_is_named_with_suggestions():
  result = run_cli("configs/clip_shapes.py", "--config.input.batchsize=8")
  assert result.returncode == 2
  assert "unknown config key 'input.batchsize'" in result.stderr
  assert "input.batch_size" in result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_bad_pp_op_fails_at_parse_time():
  result = run_cli("configs/clip_shapes.py",
                   "--config.input.pp=decode|rezise(32)|keep('image')")
  assert result.returncode == 2
  assert "config.input.pp" in result.stderr and "rezise" in result.stderr
  assert "resize" in result.stderr  # The suggestion.
  assert "Traceback" not in result.stderr


@pytest.mark.unit
def test_bad_pp_argument_fails_at_parse_time():
  config = clip_shapes.get_config()
  config.evals.retrieval.pp = "decode|value_range(1)"
  with pytest.raises(config_lib.ConfigError, match="value_range"):
    config_checks.check(config)


@pytest.mark.unit
def test_duration_in_epochs_and_examples():
  config = clip_shapes.get_config("batch=100")
  config.total_steps = None
  config.total_epochs = 2.0
  config_checks.check(config)
  assert config_lib.total_steps(config, num_train_examples=5_000) == 100
  config.total_epochs = None
  config.total_examples = 30_000
  assert config_lib.total_steps(config, num_train_examples=None) == 300


@pytest.mark.unit
def test_two_durations_is_an_error():
  config = clip_shapes.get_config()
  config.total_epochs = 1.0
  with pytest.raises(config_lib.ConfigError, match="exactly one"):
    config_checks.check(config)
