"""Runs of this codebase that other runs need, trained on demand and cached.

A DiT run scores its samples with a recognizer and may condition on a CLIP
text tower; both are ordinary runs of this codebase. `ensure_trained` makes
them cost the user nothing: the first run that needs one trains it into a
cache directory beside the data, keyed by the full config (a changed config
trains anew), later runs reuse it, and a run interrupted half-way resumes
from its checkpoint.
"""
from __future__ import annotations

import hashlib
import os

import ml_collections

from multimodal.config import config_lib
from multimodal.parallel import sharding
from multimodal.tasks import config_checks
from multimodal.train import trainer


def cache_workdir(config, cache_root: str, name: str) -> str:
  """`cache_root/name-<hash of the config>`: a changed config trains anew."""
  digest = hashlib.sha256(config_lib.to_json(config).encode()).hexdigest()[:12]
  return os.path.join(cache_root, f"{name}-{digest}")


def _run_config(config_spec: str, *, data_dir: str | None, shapes_world: dict | None,
                overrides: dict | None) -> ml_collections.ConfigDict:
  """The config `ensure_trained` trains (see there for the arguments)."""
  config = config_lib.load_config_file(config_spec)
  with config.unlocked():
    config.input.data_dir = data_dir
    if shapes_world is not None:
      config.input.shapes_world = dict(shapes_world)
    for key, value in (overrides or {}).items():
      config_lib.set_dotted(config, key, value)
  config_checks.check(config)
  return config


def ensure_trained(config_spec: str, task_class, *, cache_root: str, data_dir: str | None,
                   shapes_world: dict | None, overrides: dict | None = None) -> str:
  """The workdir of a finished run of `config_spec`, training it if needed.

  The run reads the same data (data_dir, shapes-world settings) as the run
  that asks for it: a recognizer is trained on the world it judges, a text
  encoder on the captions it will encode. `overrides` ({"dotted.key":
  value}) are set on its config too (a VLM's earlier stages get its vision
  tower). `task_class` is the Task the run must be (the caller knows: a
  recognizer is a classifier); taking it here, not from the tasks table,
  keeps the tasks that need other runs free of an import cycle.
  """
  config = _run_config(config_spec, data_dir=data_dir, shapes_world=shapes_world,
                       overrides=overrides)
  name = os.path.splitext(os.path.basename(config_spec.partition(":")[0]))[0]
  workdir = cache_workdir(config, cache_root, name)
  if not os.path.exists(os.path.join(workdir, "results.json")):
    print(f"Training {config_spec} into {workdir}, which this run needs (once; "
          "later runs reuse it).")
    trainer.train(task_class(config), config, workdir)
  return workdir


def resolve(run, task_class, *, cache_root: str, data_dir: str | None, shapes_world: dict | None,
            overrides: dict | None = None) -> str:
  """A config's reference to another run, {"workdir", "config"}: the given
  workdir, or else a cached run of `config` trained on first use into
  `cache_root` (see ensure_trained for the other arguments)."""
  if run.get("workdir"):
    return run.workdir
  return ensure_trained(run.config, task_class, cache_root=cache_root, data_dir=data_dir,
                        shapes_world=shapes_world, overrides=overrides)


def resolve_config(run, *, data_dir: str | None,
                   shapes_world: dict | None) -> ml_collections.ConfigDict:
  """The config of the run `resolve` names, without training it: what a
  model built on that run needs to know of its architecture. (Training is
  only needed for its weights, which a finished run's checkpoint holds.)"""
  if run.get("workdir"):
    return config_lib.load_workdir_config(run.workdir)
  return _run_config(run.config, data_dir=data_dir, shapes_world=shapes_world,
                     overrides=None)


def describe(run) -> str:
  """A run reference for messages: "in '<workdir>'" or "of '<config spec>'"."""
  return f"in {run.workdir!r}" if run.get("workdir") else f"of {run.config!r}"


def eval_params(workdir: str, task_class) -> dict:
  """The eval params (EMA if kept) of a run's latest checkpoint, on host."""
  import jax

  config = config_lib.load_workdir_config(workdir)
  task = task_class(config)
  mesh = sharding.make_mesh({"data": -1})
  state = trainer.restore_latest(task, config, workdir, mesh)
  return jax.device_get(trainer.eval_params(state))
