"""A config file for tests that run `experiments.train` in a subprocess on a
config built in Python: `--config=tests/json_config.py:PATH` loads the
config that `config_lib.to_json` wrote to PATH (as a workdir's config.json)."""
import json

import ml_collections


def get_config(path):
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
