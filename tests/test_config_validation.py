"""Config validation before compilation, and safe loading.

Each mistake fails before anything compiles with an error that names the
key: an unknown key (test_config.py), a value of the wrong type, a batch the
data-parallel devices do not divide, an image size the patch does not divide,
a missing run or weights directory to start from. Config arguments are
parsed, never evaluated, and one carrying Python code is refused; no load
path unpickles anything."""
import ast
import json
import pathlib
import re
import types

import pytest

from conftest import ROOT, tiny_clip_config
from multimodal.config import config_lib
from multimodal.sweep import points as sweep
from multimodal.tasks import config_checks
from test_config import run_cli

# What a smuggled command would do: create this file. It must never exist.
PAYLOAD = "__import__('os').system('touch {}')"


def _payload(tmp_path):
  marker = tmp_path / "pwned"
  return PAYLOAD.format(marker), marker


# -- A value of the wrong type -------------------------------------------------


@pytest.mark.parametrize("override, kind", [
    ("--config.total_steps=many", "an int"),
    ("--config.lr=fast", "a float"),
    ("--config.input.batch_size=1.5", "an int"),
    ("--config.model.bias_init=x", "a float"),  # A placeholder: None for now.
    ("--config.evals.retrieval.single_object_only=maybe", "a bool (True or False)"),
])
@pytest.mark.unit
def test_override_of_the_wrong_type_names_key_value_and_type(override, kind):
  key, value = override[len("--config."):].split("=")
  with pytest.raises(Exception) as caught:  # The real flag parser, in process.
    sweep.parse_overrides("configs/clip_shapes.py", [override])
  config = config_lib.load_config_file("configs/clip_shapes.py")
  message = config_lib.explain_override_error(caught.value, config, [override])
  assert message.startswith(f"{override}: config.{key} takes {kind}, not {value!r}")
  assert "\n" not in message


@pytest.mark.integration
def test_override_of_the_wrong_type_is_one_line_on_the_command_line():
  result = run_cli("configs/clip_shapes.py", "--config.total_steps=many")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      "error: --config.total_steps=many: config.total_steps takes an int, not "
      "'many' (e.g. --config.total_steps=3000, its current value).")
  assert "Traceback" not in result.stderr


@pytest.mark.unit
def test_config_file_argument_of_the_wrong_type_names_key_value_and_type():
  from configs import clip_shapes, vlm_shapes
  with pytest.raises(config_lib.ConfigError,
                     match=r"config argument steps='many' should be an int, like its default 3000"):
    clip_shapes.get_config("steps=many")
  with pytest.raises(config_lib.ConfigError, match=r"p_caption='high' should be a float"):
    vlm_shapes.get_config("p_caption=high")
  with pytest.raises(config_lib.ConfigError, match=r"causal='1' should be a bool"):
    vlm_shapes.get_config("causal=1")


# -- A batch the data-parallel devices do not divide ---------------------------


class _UntouchableTask:
  """All the trainer may ask before it checks the batch is the data size."""

  def num_train_examples(self):
    return None

  def __getattr__(self, name):
    raise AssertionError(f"the trainer used task.{name} before checking the batch")


@pytest.mark.unit
def test_batch_not_divisible_by_data_parallel_devices_fails_before_compiling(tmp_path):
  import jax
  import jax.numpy as jnp
  from multimodal.train import trainer
  config = tiny_clip_config(str(tmp_path / "no_data"), **{"input.batch_size": 12})
  compiled = []

  def listen(event, duration, **kwargs):
    if event.startswith("/jax/core/compile"):
      compiled.append(event)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    with pytest.raises(config_lib.ConfigError) as caught:
      trainer.train(_UntouchableTask(), config, str(tmp_path / "run"))
    assert compiled == []
    jax.jit(lambda x: x * 3 + 1)(jnp.arange(5)).block_until_ready()
    assert compiled  # The listener does hear compilations.
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  message = str(caught.value)
  assert "config.input.batch_size=12" in message
  assert "8 data-parallel devices" in message and "config.mesh=" in message
  assert not (tmp_path / "run" / "config.json").exists()


# -- An image size the patch does not divide -----------------------------------


@pytest.mark.parametrize("spec, message", [
    ("configs/clip_shapes.py:res=60",
     "config.input.image_size=60 is not divisible by the 8x8 patch of "
     "config.model.image.variant='mu/8': use 56 or 64, or a patch that divides 60."),
    ("configs/siglip_shapes.py:variant=S/16,res=56",
     "config.input.image_size=56 is not divisible by the 16x16 patch of "
     "config.model.image.variant='S/16'"),
    ("configs/shapes_classifier.py:res=30",
     "config.input.image_size=30 is not divisible by the 4x4 patch of "
     "config.model.image.variant='mu/4'"),
    ("configs/dit_shapes.py:res=15",
     "config.input.image_size=15 is not divisible by the 2x2 patch of "
     "config.model.variant='nano/2'"),
    ("configs/dit_xl2.py:variant=S/8,res=260",
     "config.input.image_size=260 is not divisible by the 8x8 patch of "
     "config.model.variant='S/8'"),
])
@pytest.mark.unit
def test_image_size_not_divisible_by_the_patch_names_both_keys(spec, message):
  with pytest.raises(config_lib.ConfigError) as caught:
    config_checks.check(config_lib.load_config_file(spec))
  assert str(caught.value).startswith(message)


@pytest.mark.unit
def test_pp_resize_not_divisible_by_the_patch_or_not_the_model_size():
  from configs import clip_shapes, dit_shapes
  config = clip_shapes.get_config("res=32")
  config.evals.retrieval.pp = config.evals.retrieval.pp.replace("resize(32)", "resize(36)")
  with pytest.raises(config_lib.ConfigError, match=r"config.evals.retrieval.pp makes 36x36 "
                     r"images, not divisible by the 8x8 patch of config.model.image.variant="
                     r"'mu/8': in its resize/crop, use 32 or 40"):
    config_checks.check(config)
  config = clip_shapes.get_config("res=32")
  config.input.pp = config.input.pp.replace("resize(32)", "resize(64)")
  with pytest.raises(config_lib.ConfigError, match=r"config.input.pp makes 64x64 images, but "
                     r"the model is built for config.input.image_size=32"):
    config_checks.check(config)
  # The last op that sets the size counts; a crop after a resize, too.
  assert config_checks.pp_image_size("decode|resize(64)|central_crop((48, 56))|value_range(-1,1)"
                                  ) == (48, 56)
  assert config_checks.pp_image_size("decode|resize(64)|resize_small(32)") is None
  assert config_checks.pp_image_size('decode|resize(64, key="other")') is None
  # A DiT's quality eval feeds the recognizer, not the DiT: not its patch.
  config = dit_shapes.get_config("variant=nano/4,res=16")
  config.evals.quality.pp = config.evals.quality.pp.replace("resize(16)", "resize(18)")
  config_checks.check(config)


@pytest.mark.unit
def test_vlm_images_must_fit_the_vision_run(tmp_path):
  from configs import clip_shapes, vlm_shapes
  from multimodal.tasks import vlm
  vision = clip_shapes.get_config("res=32")  # The vision run's saved config.
  task = object.__new__(vlm.VisionLanguageTask)
  task.image_size = 32
  task.config = vlm_shapes.get_config("res=32,tower=mu/8")
  task._check_image_sizes(vision)
  task.config = vlm_shapes.get_config("res=36,tower=mu/8")
  with pytest.raises(config_lib.ConfigError, match=r"config.input.pp makes 36x36 images, "
                     r"not divisible by the 8x8 patch of model.image.variant='mu/8' of the "
                     r"vision run \(config.model.vision\) of "
                     r"'configs/clip_shapes.py:variant=mu/8,res=36'"):
    task._check_image_sizes(vision)
  task.config = vlm_shapes.get_config("res=64,tower=mu/8")
  with pytest.raises(config_lib.ConfigError, match=r"config.input.pp makes 64x64 images, but "
                     r"the model is built for input.image_size of the vision run"):
    task._check_image_sizes(vision)


@pytest.mark.unit
def test_vlm_vision_layer_must_name_a_block_of_the_tower():
  from configs import clip_shapes, vlm_shapes
  from multimodal.tasks import vlm
  image = clip_shapes.get_config("variant=mu/8").model.image.to_dict()  # 2 blocks.
  task = object.__new__(vlm.VisionLanguageTask)
  for layer in (-2, -1, 0, 1):
    task.config = vlm_shapes.get_config(f"tower=mu/8,vision_layer={layer}")
    task._check_vision_layer(image)
  task.config = vlm_shapes.get_config("tower=mu/8")  # The default vision_layer=-4.
  with pytest.raises(config_lib.ConfigError, match=re.escape(
      "config.model.vision_layer=-4 names no block of the vision run (config.model.vision) "
      "of 'configs/clip_shapes.py:variant=mu/8,res=96': its tower "
      "model.image.variant='mu/8' has 2 blocks, so use -2 .. -1")):
    task._check_vision_layer(image)


@pytest.mark.unit
def test_latent_dit_latents_must_fit_the_patch():
  from configs import dit_xl2
  from multimodal.tasks import dit
  task = object.__new__(dit.DiffusionTask)
  task.codec = types.SimpleNamespace(
      model=types.SimpleNamespace(downsample_factor=8),
      latent_shape=lambda shape: (shape[0] // 8, shape[1] // 8, 4))
  task.config = dit_xl2.get_config()
  task.config.vae.from_diffusers = "/weights/sd-vae-ft-ema"
  task._check_latent_size()  # 256 px: 32x32 latents, patch 2.
  task.config.input.image_size = 264
  with pytest.raises(config_lib.ConfigError, match=r"config.input.image_size=264 gives 33x33 "
                     r"latents through the VAE of config.vae.from_diffusers='/weights/sd-vae"
                     r"-ft-ema' .* 2x2 patch of config.model.variant='XL/2': use an image "
                     r"size that is a multiple of 16 \(e.g. 256 or 272\)"):
    task._check_latent_size()
  task.config.input.image_size = 260
  with pytest.raises(config_lib.ConfigError, match=r"image_size=260 is not divisible by the "
                     r"downsampling factor 8"):
    task._check_latent_size()


# -- A missing run or weights to start from ------------------------------------


def _fake_run(path, checkpoint=True):
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps({"task": "clip"}))
  if checkpoint:
    (path / "checkpoints" / "10").mkdir(parents=True)
  return str(path)


@pytest.mark.parametrize("config_spec, key", [
    ("configs/vlm_shapes.py", "model.vision.workdir"),
    ("configs/vlm_shapes.py", "init.lm.workdir"),
    ("configs/vlm_shapes.py", "init.run.workdir"),
    ("configs/vlm_shapes.py", "init.from_hf"),
    ("configs/dit_shapes.py:cond=text", "model.text_encoder.workdir"),
    ("configs/dit_shapes.py", "evals.quality.recognizer_workdir"),
    ("configs/dit_shapes.py", "init.from_diffusers"),
    ("configs/dit_xl2.py", "vae.from_diffusers"),
    ("configs/dit_xl2.py", "init.from_diffusers"),
    ("configs/clip_shapes.py", "input.tokenizer.model"),
])
@pytest.mark.unit
def test_missing_run_or_weights_to_start_from_names_key_and_path(config_spec, key, tmp_path):
  config = config_lib.load_config_file(config_spec)
  config_checks.check(config)  # Unset: trained on first use, or not used.
  missing = str(tmp_path / "missing")
  config_lib.set_dotted(config, key, missing)
  with pytest.raises(config_lib.ConfigError) as caught:
    config_checks.check(config)
  assert str(caught.value).startswith(f"config.{key}={missing!r}: no such ")


@pytest.mark.unit
def test_a_run_to_start_from_needs_its_config_and_a_checkpoint(tmp_path):
  from configs import vlm_shapes
  config = vlm_shapes.get_config()
  config.model.vision.workdir = _fake_run(tmp_path / "no_ckpt", checkpoint=False)
  with pytest.raises(config_lib.ConfigError, match=r"no_ckpt' has no checkpoint to start "
                     r"from .* or set it to None to train one from config.model.vision.config"):
    config_checks.check(config)
  config.model.vision.workdir = str(tmp_path)
  with pytest.raises(config_lib.ConfigError, match="is not the workdir of a run: it has no config.json"):
    config_checks.check(config)
  config.model.vision.workdir = _fake_run(tmp_path / "good")
  config_checks.check(config)
  config.init.lm.config = "configs/no_such.py:stage=lm"  # Trained on first use: must exist.
  with pytest.raises(config_lib.ConfigError, match=r"config.init.lm.config=.*no such config "
                     r"file 'configs/no_such.py'"):
    config_checks.check(config)


@pytest.mark.unit
def test_tasks_check_before_reading_data_or_weights(tmp_path):
  """Tasks built without the command line check too, before their data."""
  from multimodal.tasks import clip
  config = tiny_clip_config(str(tmp_path / "no_data"))
  config.input.tokenizer.model = str(tmp_path / "missing.model")
  with pytest.raises(config_lib.ConfigError, match="config.input.tokenizer.model="):
    clip.ContrastiveTask(config)
  config = tiny_clip_config(str(tmp_path / "no_data"), "res=36")
  with pytest.raises(config_lib.ConfigError, match="config.input.image_size=36"):
    clip.ContrastiveTask(config)


@pytest.mark.parametrize("key, value, valid", [
    ("stage", "pretrain", "('lm', 'align', 'tune')"),
    ("model.projector", "mpl", "('linear', 'mlp', 'conv', 'block')"),
    ("model.image_positions", "2d", "('sequence', 'shared')"),
])
@pytest.mark.unit
def test_vlm_names_a_wrong_stage_projector_or_image_layout_before_its_data(
    key, value, valid, tmp_path):
  from multimodal.tasks import vlm
  config = config_lib.load_config_file("configs/vlm_shapes.py")
  config.input.data_dir = str(tmp_path / "no_data")
  config_lib.set_dotted(config, key, value)
  with pytest.raises(config_lib.ConfigError,
                     match=re.escape(f"config.{key}={value!r} is not one of {valid}.")):
    vlm.VisionLanguageTask(config)
  assert not (tmp_path / "no_data").exists()


# -- Arguments are parsed, never evaluated -------------------------------------


@pytest.mark.unit
def test_code_in_a_config_file_argument_is_rejected(tmp_path):
  from configs import clip_shapes
  code, marker = _payload(tmp_path)
  for spec in (f"variant={code}", f"res=64,variant={code}"):
    with pytest.raises(config_lib.ConfigError) as caught:
      clip_shapes.get_config(spec)
    message = str(caught.value)
    assert message.startswith(f"config argument variant={code!r} is Python code")
    assert "never evaluated" in message
  # Through the loader too, whatever the config file does with its argument.
  with pytest.raises(config_lib.ConfigError, match="is Python code"):
    config_lib.load_config_file(f"configs/dit_shapes.py:variant={code}")
  for code in ("(lambda: 1)", "[x for x in 'ab']", "open('/etc/passwd')", "().__class__"):
    with pytest.raises(config_lib.ConfigError, match="is Python code"):
      clip_shapes.get_config(f"stem={code}")
  assert not marker.exists()


@pytest.mark.unit
def test_plain_strings_and_literals_still_parse():
  from configs import clip_shapes
  config = clip_shapes.get_config("variant=S/8,text_variant=mu,steps=10,loss=sigmoid")
  assert (config.model.image.variant, config.model.text.variant) == ("S/8", "mu")
  parsed = config_lib.parse_arg("path=/tmp/some.dir/x,lrs=1e-3/3e-3,n=3,on", path="",
                                lrs=None, n=1, on=False)
  assert parsed.to_dict() == {"path": "/tmp/some.dir/x", "lrs": "1e-3/3e-3", "n": 3,
                              "on": True}
  # --config values may be preprocessing specs: calls of ops on literals.
  for value in ('decode|resize(64)|keep("image", "tokens")', "img/.*|llm/.*", ".*/kernel",
                "configs/vlm_shapes.py:stage=lm,lm=mu", "S/8", "two words"):
    config_lib.check_override_value("k", value)
  for value in ("os.system('x')", "exec('x')", "decode|resize(f(1))", "lambda: 0"):
    with pytest.raises(config_lib.ConfigError, match=r"--config.k=.* is Python code"):
      config_lib.check_override_value("k", value)


@pytest.mark.unit
def test_config_flags_takes_override_text_raw_never_evaluated(tmp_path):
  """ml_collections' flag parser, for a str field: the text itself."""
  code, marker = _payload(tmp_path)
  config = sweep.parse_overrides("configs/clip_shapes.py", [f"--config.input.data_dir={code}"])
  assert config.input.data_dir == code
  assert not marker.exists()


@pytest.mark.integration
def test_code_in_a_config_override_is_rejected(tmp_path):
  code, marker = _payload(tmp_path)
  # Two training lengths as well: if the override were let through, the run
  # still stops at validation, never trains.
  result = run_cli("configs/clip_shapes.py", f"--config.input.data_dir={code}",
                   "--config.total_epochs=1.0", f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith(
      f"error: --config.input.data_dir={code!r} is Python code (a call of "
      "__import__('os').system); --config values are literals")
  assert "Traceback" not in result.stderr
  assert not marker.exists()


@pytest.mark.unit
def test_code_in_a_sweep_argument_is_rejected(tmp_path):
  code, marker = _payload(tmp_path)
  with pytest.raises(config_lib.ConfigError,
                     match=r"config argument lrs=.* is Python code .*never evaluated"):
    sweep.load_sweep("configs/clip_shapes.py", f"lrs={code}")
  with pytest.raises(sweep.SweepError, match=r"sweep: --config.model.image.variant=.* is "
                     r"Python code"):
    sweep.expand({"model.image.variant": ["mu/8", code]})
  assert not marker.exists()
  # Plain '/'-separated values still sweep.
  assert sweep.load_sweep("configs/clip_shapes.py", "lrs=1e-3/3e-3") == {"lr": [1e-3, 3e-3]}


# -- No pickle on any load path --------------------------------------------------

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib",
                  "shelve", "marshal"}
UNSAFE_BUILTINS = {"eval", "exec", "compile", "__import__"}
NUMPY_NAMES = {"np", "numpy", "jnp", "onp"}


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
  """Every pickle-capable import, eval/exec and unsafe load call in `source`."""
  found = []
  for node in ast.walk(ast.parse(source, filename)):
    where = f"{filename}:{getattr(node, 'lineno', '?')}"
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      names = [a.name for a in node.names] + ([node.module] if isinstance(
          node, ast.ImportFrom) and node.module else [])
      for name in names:
        if name.split(".")[0] in UNSAFE_MODULES:
          found.append(f"{where}: imports {name}")
    if isinstance(node, ast.keyword) and node.arg == "allow_pickle" and not (
        isinstance(node.value, ast.Constant) and node.value.value is False):
      found.append(f"{where}: allow_pickle={ast.unparse(node.value)}")
    if not isinstance(node, ast.Call):
      continue
    func = ast.unparse(node.func)
    base, _, attr = func.rpartition(".")
    if isinstance(node.func, ast.Name) and func in UNSAFE_BUILTINS:
      found.append(f"{where}: {func}()")
    elif base.split(".")[0] in UNSAFE_MODULES:
      found.append(f"{where}: {func}()")
    elif base == "torch" and attr == "load":
      found.append(f"{where}: torch.load()")
    elif base == "yaml" and attr in ("load", "load_all", "unsafe_load", "full_load"):
      found.append(f"{where}: {func}() (use yaml.safe_load)")
    elif attr == "read_pickle":
      found.append(f"{where}: {func}()")
    elif base in NUMPY_NAMES and attr == "load" and not any(
        k.arg == "allow_pickle" for k in node.keywords):
      found.append(f"{where}: {func}() without allow_pickle=False")
  return found


@pytest.mark.unit
def test_the_scan_finds_each_unsafe_load():
  source = "\n".join([
      "import pickle", "from dill import loads", "import numpy as np",
      "x = np.load(path)", "y = np.load(path, allow_pickle=True)", "z = torch.load(f)",
      "w = yaml.load(s)", "v = eval(text)", "exec(code)", "u = pd.read_pickle(p)",
      "t = pickle.loads(b)",
      # Safe: these are not reported.
      "ok = np.load(path, allow_pickle=False)", "ok = yaml.safe_load(s)",
      "ok = json.load(f)", "ok = model.eval()", "ok = ast.literal_eval(s)"])
  found = unsafe_loads(source)
  assert len(found) == 10, found
  assert {int(f.split(":")[1]) for f in found} == set(range(1, 12)) - {3}, found


@pytest.mark.unit
def test_no_load_path_uses_pickle_or_eval():
  """multimodal/, experiments/ and configs/: checkpoints restore through
  orbax, imported weights through safetensors, configs and records through
  json. (Config FILES are Python by design and run via exec_module; their
  argument strings are parsed, never evaluated: tests above.)"""
  files = sorted(p for d in ("multimodal", "experiments", "configs")
                 for p in pathlib.Path(ROOT, d).rglob("*.py"))
  assert len(files) > 40
  found = [f for path in files for f in unsafe_loads(path.read_text(), str(path))]
  assert found == []
  source = {name: pathlib.Path(ROOT, "multimodal", name).read_text()
            for name in ("train/checkpoint.py", "importers/safetensors_io.py",
                                   "config/config_lib.py")}
  assert "import orbax.checkpoint" in source["train/checkpoint.py"]
  assert "StandardRestore" in source["train/checkpoint.py"]
  assert "safetensors.numpy.load_file" in source["importers/safetensors_io.py"]


@pytest.mark.unit
def test_workdir_configs_are_read_as_json(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"task": "clip", "lr": 1e-3}))
  assert config_lib.load_workdir_config(str(tmp_path)).to_dict() == {"task": "clip", "lr": 1e-3}
  (tmp_path / "config.json").write_bytes(b"\x80\x04\x95")  # A pickle's first bytes.
  with pytest.raises(ValueError):  # Not JSON: refused, never unpickled.
    config_lib.load_workdir_config(str(tmp_path))


# -- One dotted-key walk ---------------------------------------------------------


@pytest.mark.unit
def test_dotted_keys_get_set_and_name_unknown_keys():
  from configs import clip_shapes
  config = clip_shapes.get_config()
  config.lock()
  assert config_lib.get_dotted(config, "input.tokenizer.vocab_size") == 256
  config_lib.set_dotted(config, "input.tokenizer.vocab_size", 128)
  assert config.input.tokenizer.vocab_size == 128
  assert config_lib.has_dotted(config, "model.image.variant")
  assert not config_lib.has_dotted(config, "model.image.variant.x")
  assert not config_lib.has_dotted(config, "model.imag")
  with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'input.batchsize'. "
                     r"Did you mean 'input.batch_size'"):
    config_lib.get_dotted(config, "input.batchsize")
  with pytest.raises(config_lib.ConfigError, match="unknown config key 'inptu.batch_size'"):
    config_lib.set_dotted(config, "inptu.batch_size", 1)
  with pytest.raises(config_lib.ConfigError, match="unknown config key 'input.batchsize'"):
    config_lib.set_dotted(config, "input.batchsize", 1)  # Locked: no new leaves.
  with config.unlocked():
    config_lib.set_dotted(config, "input.batchsize", 1)
  assert config.input.batchsize == 1
