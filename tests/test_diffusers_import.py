"""Importing diffusers weights (DiT transformer, AutoencoderKL) into our Flax
models: numerical parity with the PyTorch reference on random weights, clear
errors for bad inputs, and the dit_xl2 recipe's shapes.

The reference models are tiny diffusers modules with random weights (no
network), perturbed after construction so that no zero-initialised layer can
hide a mapping bug, saved with save_pretrained and read back through our
importers exactly as a downloaded model would be.
"""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch

pytestmark = pytest.mark.unit

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import assert_logically_partitioned  # noqa: E402
from parity import TOL, assert_parity, perturb_, rel_err  # noqa: E402
from multimodal.config import config_lib  # noqa: E402
from multimodal.tasks import config_checks  # noqa: E402
from multimodal.parallel import sharding
from multimodal.train import optim
from multimodal.importers import diffusers_dit, diffusers_vae, safetensors_io as io  # noqa: E402
from multimodal.importers.safetensors_io import WeightImportError  # noqa: E402
from multimodal.models import dit, vae  # noqa: E402



def nchw_to_nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


# ====================================================================== I/O


def test_read_safetensors_roundtrip_and_bfloat16(tmp_path):
  arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16)}
  safetensors.numpy.save_file(arrays, str(tmp_path / "x.safetensors"))
  got = io.read_safetensors(str(tmp_path / "x.safetensors"))
  assert set(got) == {"a", "b"}
  np.testing.assert_array_equal(got["a"], arrays["a"])
  assert got["b"].dtype == np.float16
  # bfloat16, which numpy cannot name, comes back exactly.
  t = torch.randn(3, 5).to(torch.bfloat16)
  safetensors.torch.save_file({"w": t, "v": torch.arange(3)}, str(tmp_path / "bf.safetensors"))
  got = io.read_safetensors(str(tmp_path / "bf.safetensors"))
  np.testing.assert_array_equal(np.asarray(got["w"], np.float32), t.float().numpy())
  np.testing.assert_array_equal(got["v"], [0, 1, 2])


def test_directory_errors_name_the_file_and_the_fix(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(WeightImportError, match="nope.*does not exist.*save_pretrained"):
    io.read_model_dir(missing)
  d = tmp_path / "model"
  d.mkdir()
  with pytest.raises(WeightImportError, match="config.json does not exist"):
    io.read_model_dir(str(d))
  (d / "config.json").write_text("{not json")
  with pytest.raises(WeightImportError, match="config.json is not valid JSON"):
    io.read_model_dir(str(d))
  (d / "config.json").write_text("{}")
  with pytest.raises(WeightImportError, match="no weights in .*diffusion_pytorch_model"):
    io.read_model_dir(str(d))
  (d / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
  with pytest.raises(WeightImportError, match="safe_serialization=True"):
    io.read_model_dir(str(d))
  # A truncated download.
  path = d / "diffusion_pytorch_model.safetensors"
  safetensors.numpy.save_file({"w": np.ones((64, 64), np.float32)}, str(path))
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(WeightImportError, match=r"diffusion_pytorch_model\.safetensors.*truncated"):
    io.read_model_dir(str(d))
  path.write_bytes(b"garbage")
  with pytest.raises(WeightImportError, match="not a readable safetensors file"):
    io.read_model_dir(str(d))


def test_pipeline_root_points_at_its_model_folders(tmp_path):
  (tmp_path / "model_index.json").write_text("{}")
  for sub in ("vae", "transformer"):
    (tmp_path / sub).mkdir()
    (tmp_path / sub / "config.json").write_text("{}")
  with pytest.raises(WeightImportError, match=r"PIPELINE.*\['transformer', 'vae'\]"):
    io.read_config(str(tmp_path))


def test_sharded_weights_are_read_through_the_index(tmp_path):
  safetensors.numpy.save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "s1.safetensors"))
  safetensors.numpy.save_file({"b": np.ones(3, np.float32)}, str(tmp_path / "s2.safetensors"))
  (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(
      json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
  state = io.read_state_dict(str(tmp_path))
  assert set(state) == {"a", "b"} and state["b"].shape == (3,)


def test_check_tree_lists_missing_unexpected_and_misshaped():
  expected = {"a": {"kernel": jax.ShapeDtypeStruct((2, 3), jnp.float32),
                    "bias": jax.ShapeDtypeStruct((3,), jnp.float32)},
              "b": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((4,), jnp.float32), ("embed",))}
  io.check_tree({"a": {"kernel": np.zeros((2, 3)), "bias": np.zeros(3)}, "b": np.zeros(4)},
                expected)
  with pytest.raises(WeightImportError) as e:
    io.check_tree({"a": {"kernel": np.zeros((3, 2))}, "b": np.zeros(4), "c": np.zeros(1)},
                  expected)
  msg = str(e.value)
  assert "1 missing: a/bias (3,)" in msg
  assert "1 unexpected: c (1,)" in msg
  assert "1 mis-shaped: a/kernel: got (3, 2), model has (2, 3)" in msg


# ====================================================================== DiT

DIT_CONFIGS = {
    # learned sigma, patch 2, diffusers' default norm_eps (1e-5).
    "sigma_p2": dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, sample_size=8,
                     patch_size=2, in_channels=4, out_channels=8, num_embeds_ada_norm=10),
    # fixed sigma, patch 4, other depth/heads, DiT's norm_eps.
    "eps_p4": dict(num_attention_heads=4, attention_head_dim=8, num_layers=3, sample_size=16,
                   patch_size=4, in_channels=4, out_channels=4, num_embeds_ada_norm=7,
                   norm_eps=1e-6),
}


def tie_embedders_(model):
  """What a checkpoint converted from DiT looks like: every block's
  norm1.emb is a copy of block 0's (diffusers builds independent ones)."""
  first = model.transformer_blocks[0].norm1.emb
  with torch.no_grad():
    for block in model.transformer_blocks[1:]:
      for p, p0 in zip(block.norm1.emb.parameters(), first.parameters()):
        p.copy_(p0)


@pytest.fixture(scope="module", params=sorted(DIT_CONFIGS))
def dit_case(request, tmp_path_factory):
  """(name, torch model, saved directory, inputs, torch output NHWC)."""
  name = request.param
  torch.manual_seed(0)
  model = diffusers.DiTTransformer2DModel(**DIT_CONFIGS[name]).eval().float()
  perturb_(model)
  tie_embedders_(model)
  directory = str(tmp_path_factory.mktemp(f"dit_{name}"))
  model.save_pretrained(directory)
  cfg = DIT_CONFIGS[name]
  rng = np.random.RandomState(1)
  size, n = cfg["sample_size"], cfg["num_embeds_ada_norm"]
  x = rng.randn(3, cfg["in_channels"], size, size).astype(np.float32)
  t = np.asarray([0, 437, 999])
  y = np.asarray([1, n, n - 1])  # n = the null (unconditional) class.
  with torch.no_grad():
    ref = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).sample.numpy()
  return name, model, directory, (nchw_to_nhwc(x), t, y), nchw_to_nhwc(ref)


def dit_forward(kwargs, params, x, t, y):
  model = dit.DiT(**kwargs)
  return np.asarray(jax.jit(lambda p: model.apply({"params": p}, x, t, y))(params))


def test_dit_parity(dit_case):
  name, _, directory, (x, t, y), ref = dit_case
  kwargs, params = diffusers_dit.load_dit(directory)
  cfg = DIT_CONFIGS[name]
  assert kwargs["t_freq_shift"] == 1.0
  assert kwargs["learn_sigma"] == (cfg["out_channels"] == 2 * cfg["in_channels"])
  assert kwargs["patch_size"] == (cfg["patch_size"],) * 2
  assert all(v.dtype == np.float32 for v in jax.tree.leaves(params))
  assert_parity(dit_forward(kwargs, params, x, t, y), ref, f"DiT[{name}] output")


def test_dit_parity_is_sensitive_to_mapping_details(dit_case):
  """The parity test is not vacuous: the diffusers-specific details the
  importer gets right (freq shift 1, final-layer (shift, scale) order) each
  break parity by far more than the tolerance when changed."""
  _, _, directory, (x, t, y), ref = dit_case
  kwargs, params = diffusers_dit.load_dit(directory)
  assert rel_err(dit_forward(dict(kwargs, t_freq_shift=0.0), params, x, t, y), ref) > 100 * TOL
  swapped = jax.tree.map(lambda a: a, params)
  for leaf in ("kernel", "bias"):
    shift, scale = np.split(params["final_layer"]["adaLN_modulation"][leaf], 2, axis=-1)
    swapped["final_layer"]["adaLN_modulation"][leaf] = np.concatenate([scale, shift], -1)
  assert rel_err(dit_forward(kwargs, swapped, x, t, y), ref) > 100 * TOL


def test_dit_refuses_untied_block_embedders(dit_case):
  """diffusers' blocks each condition on their own embedder copy; ours share
  one, so a checkpoint whose copies differ cannot be imported exactly."""
  name, _, directory, _, _ = dit_case
  cfg, state = io.read_model_dir(directory)
  key = "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"
  state[key] = state[key] + 1e-3
  with pytest.raises(WeightImportError, match=r"transformer_blocks\.1\.norm1\.emb.*differs"):
    diffusers_dit.convert_dit(state, cfg)


def test_dit_checkpoint_errors():
  cfg = dict(DIT_CONFIGS["sigma_p2"])
  model = diffusers.DiTTransformer2DModel(**cfg)
  tie_embedders_(model)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  diffusers_dit.convert_dit(state, cfg)  # The unmodified state converts.
  with pytest.raises(WeightImportError, match="no tensor 'proj_out_2.weight'"):
    diffusers_dit.convert_dit({k: v for k, v in state.items() if k != "proj_out_2.weight"}, cfg)
  with pytest.raises(WeightImportError, match="not mapped.*extra.weight"):
    diffusers_dit.convert_dit({**state, "extra.weight": np.zeros(3)}, cfg)
  # A checkpoint of another shape than its config says.
  with pytest.raises(WeightImportError, match="mis-shaped"):
    diffusers_dit.convert_dit(state, dict(cfg, out_channels=4))


@pytest.mark.parametrize("field,value", [
    ("norm_type", "ada_norm_single"), ("activation_fn", "gelu"), ("out_channels", 5),
    ("norm_eps", 1e-3), ("attention_bias", False), ("norm_elementwise_affine", True),
    ("dropout", 0.1), ("cross_attention_dim", 768), ("sample_size", 9), ("num_layers", 0)])
def test_dit_unsupported_config_names_the_field(field, value):
  with pytest.raises(WeightImportError, match=f"field {field}="):
    diffusers_dit.dit_kwargs_from_config({**DIT_CONFIGS["sigma_p2"], field: value})


def test_dit_kwargs_from_published_xl2_config():
  """facebook/DiT-XL-2-256's transformer config (legacy class name, which
  diffusers remaps to DiTTransformer2DModel) gives XL/2's shape."""
  cfg = {"_class_name": "Transformer2DModel", "activation_fn": "gelu-approximate",
         "attention_bias": True, "attention_head_dim": 72, "cross_attention_dim": None,
         "dropout": 0.0, "in_channels": 4, "norm_elementwise_affine": False,
         "norm_num_groups": 32, "norm_type": "ada_norm_zero", "num_attention_heads": 16,
         "num_embeds_ada_norm": 1000, "num_layers": 28, "num_vector_embeds": None,
         "only_cross_attention": False, "out_channels": 8, "patch_size": 2,
         "sample_size": 32, "upcast_attention": False, "use_linear_projection": False}
  kwargs = diffusers_dit.dit_kwargs_from_config(cfg)
  xl = dit.decode_variant("XL/2")
  assert {k: kwargs[k] for k in xl} == xl
  assert kwargs["num_classes"] == 1000 and kwargs["learn_sigma"] and kwargs["mlp_ratio"] == 4.0
  with pytest.raises(WeightImportError, match="_class_name='UNet2DModel'"):
    diffusers_dit.dit_kwargs_from_config(dict(cfg, _class_name="UNet2DModel"))


# ====================================================================== VAE

VAE_CONFIGS = {
    "two_blocks": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                       latent_channels=4, sample_size=32),
    # Three blocks (two downsamples), two resnets per block, no quant_conv.
    "three_blocks": dict(block_out_channels=(16, 32, 32), layers_per_block=2,
                         norm_num_groups=16, latent_channels=4, sample_size=16,
                         use_quant_conv=False),
}


def make_torch_vae(cfg):
  n = len(cfg["block_out_channels"])
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                                  up_block_types=("UpDecoderBlock2D",) * n, **cfg).eval().float()
  perturb_(model)
  return model


@pytest.fixture(scope="module", params=sorted(VAE_CONFIGS))
def vae_case(request, tmp_path_factory):
  """(name, torch model, directory, image NHWC, z NHWC, torch refs NHWC)."""
  name = request.param
  cfg = VAE_CONFIGS[name]
  model = make_torch_vae(cfg)
  directory = str(tmp_path_factory.mktemp(f"vae_{name}"))
  model.save_pretrained(directory)
  rng = np.random.RandomState(1)
  size = cfg["sample_size"]
  x = rng.uniform(-1, 1, (2, 3, size, size)).astype(np.float32)
  f = 2**(len(cfg["block_out_channels"]) - 1)
  z = rng.randn(2, 4, size // f, size // f).astype(np.float32)
  with torch.no_grad():
    post = model.encode(torch.from_numpy(x)).latent_dist
    refs = dict(mean=post.mean.numpy(), logvar=post.logvar.numpy(),
                decoded=model.decode(torch.from_numpy(z)).sample.numpy())
  return (name, model, directory, nchw_to_nhwc(x), nchw_to_nhwc(z),
          {k: nchw_to_nhwc(v) for k, v in refs.items()})


def vae_apply(kwargs, params, method, x):
  model = vae.AutoencoderKL(**kwargs)
  return jax.jit(lambda p, a: model.apply({"params": p}, a, method=method))(params, x)


def test_vae_parity(vae_case):
  name, _, directory, x, z, refs = vae_case
  kwargs, params = diffusers_vae.load_vae(directory)
  cfg = VAE_CONFIGS[name]
  assert kwargs["block_out_channels"] == cfg["block_out_channels"]
  assert kwargs["use_quant_conv"] == cfg.get("use_quant_conv", True)
  assert ("quant_conv" in params) == kwargs["use_quant_conv"]
  mean, logvar = vae_apply(kwargs, params, vae.AutoencoderKL.encode, x)
  assert_parity(mean, refs["mean"], f"VAE[{name}] encoder mean")
  assert_parity(logvar, refs["logvar"], f"VAE[{name}] encoder logvar")
  decoded = vae_apply(kwargs, params, vae.AutoencoderKL.decode, z)
  assert_parity(decoded, refs["decoded"], f"VAE[{name}] decoder")


def test_vae_legacy_attention_names(vae_case):
  """Older VAEs name the mid-block attention query/key/value/proj_attn (some
  as 1x1 convs); they convert to the same params as to_q/to_k/to_v/to_out.0."""
  _, _, directory, _, _, _ = vae_case
  cfg, state = io.read_model_dir(directory)
  renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  legacy = {}
  for key, value in state.items():
    for new, old in renames.items():
      if f"attentions.0.{new}." in key:
        key = key.replace(f".{new}.", f".{old}.")
        if old == "query" and value.ndim == 2:
          value = value[:, :, None, None]
    legacy[key] = value
  assert any(".proj_attn." in k for k in legacy) and not any(".to_q." in k for k in legacy)
  ours = io.flatten(diffusers_vae.convert_vae(legacy, cfg))
  want = io.flatten(diffusers_vae.convert_vae(state, cfg))
  assert ours.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(ours[k], want[k], err_msg=k)


def test_vae_unsupported_config_names_the_field():
  base = dict(VAE_CONFIGS["two_blocks"], down_block_types=["DownEncoderBlock2D"] * 2,
              up_block_types=["UpDecoderBlock2D"] * 2)
  diffusers_vae.vae_kwargs_from_config(base)
  for field, value in (("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
                       ("up_block_types", ["UpDecoderBlock2D"]), ("act_fn", "gelu"),
                       ("norm_num_groups", 12), ("_class_name", "AutoencoderTiny")):
    with pytest.raises(WeightImportError, match=f"{field}="):
      diffusers_vae.vae_kwargs_from_config({**base, field: value})


def test_latent_codec(vae_case):
  """LatentCodec: scaled posterior mean / sample, unscale-then-decode, jitted
  with the codec passed as a pytree argument."""
  _, _, directory, x, z, refs = vae_case
  codec = diffusers_vae.load_codec(directory, scale_factor=0.5)
  size, f = x.shape[1], x.shape[1] // z.shape[1]
  assert codec.latent_shape(x.shape[1:]) == z.shape[1:]
  with pytest.raises(ValueError, match=f"multiple of the VAE's factor {f}"):
    codec.latent_shape((size + 1, size, 3))
  encode = jax.jit(lambda c, images, rng: c.encode(images, rng))
  decode = jax.jit(lambda c, latents: c.decode(latents))
  np.testing.assert_allclose(jax.jit(lambda c, i: c.encode(i))(codec, x), 0.5 * refs["mean"],
                             rtol=0, atol=1e-4)
  rng = jax.random.key(3)
  noise = np.asarray(jax.random.normal(rng, refs["mean"].shape))
  want = 0.5 * (refs["mean"] + np.exp(0.5 * refs["logvar"]) * noise)
  np.testing.assert_allclose(encode(codec, x, rng), want, rtol=0, atol=1e-4)
  assert_parity(decode(codec, 0.5 * z), refs["decoded"], "LatentCodec.decode")
  # The default scale is the config's scaling_factor (SD's 0.18215).
  assert diffusers_vae.load_codec(directory).scale_factor == pytest.approx(0.18215)
  # logvar is clamped to [-30, 20] like diffusers' DiagonalGaussianDistribution.
  kwargs, params = diffusers_vae.load_vae(directory)
  last = params["quant_conv"] if kwargs["use_quant_conv"] else params["encoder"]["conv_out"]
  last["bias"] = last["bias"] + np.asarray([0] * 4 + [1e4] * 4, np.float32)
  _, logvar = vae_apply(kwargs, params, vae.AutoencoderKL.encode, x)
  assert np.all(np.asarray(logvar) == 20.0)


def test_vae_sd_scale_shapes_partitioning_and_param_count():
  """At Stable Diffusion's VAE size (sd-vae-ft-ema): every param has logical
  axes, they shard on the project rules, and the parameter count equals
  diffusers' (a meta-device model: nothing is allocated)."""
  sd = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            norm_num_groups=32)
  model = vae.AutoencoderKL(**sd)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                         jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))["params"]
  assert_logically_partitioned(boxed)
  with torch.device("meta"):
    ref = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, **sd)
  ours = sum(math.prod(v.shape) for v in jax.tree.leaves(sharding.strip_boxes(boxed)))
  assert ours == sum(p.numel() for p in ref.parameters()) == 83_653_863
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  shardings = sharding.logical_shardings(boxed, mesh)
  for s, v in zip(jax.tree.leaves(shardings), jax.tree.leaves(sharding.strip_boxes(boxed))):
    for dim, axes in zip(v.shape, tuple(s.spec) + (None,) * (v.ndim - len(s.spec))):
      size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
      assert dim % size == 0, (v.shape, s.spec)


def test_downsample_pads_bottom_right_only():
  """diffusers' Downsample2D(padding=0) pads (0, 1, 0, 1): output pixel (0, 0)
  sees input rows/cols 0..2, not a zero row above. With a kernel that only
  reads its top-left tap, the output is x[::2, ::2] exactly (a symmetric SAME
  pad would give zeros in the first row and column)."""
  x = jnp.arange(1.0, 1 + 8 * 8).reshape(1, 8, 8, 1)
  kernel = np.zeros((3, 3, 1, 1), np.float32)
  kernel[0, 0] = 1.0
  params = {"conv": {"kernel": kernel, "bias": np.zeros(1, np.float32)}}
  out = vae.Downsample().apply({"params": params}, x)
  np.testing.assert_array_equal(out[0, :, :, 0], np.asarray(x)[0, ::2, ::2, 0])


# ====================================================================== dit_xl2 config

XL2_PUBLISHED = 675_129_632  # facebookresearch/DiT README, incl. pos_embed.
XL2_POS_EMBED = 256 * 1152  # DiT's frozen buffer, recomputed here (not a param).


def test_dit_xl2_config_loads_locked_and_validates():
  from configs import dit_shapes, dit_xl2
  c = dit_xl2.get_config()
  # The same task reads both configs: the same top-level keys, and the
  # class-conditional model fields.
  assert set(c.keys()) == set(dit_shapes.get_config().keys())
  assert set(c.model.keys()) >= {"conditioning", "variant", "num_classes",
                                 "class_dropout_prob", "learn_sigma", "t_freq_shift"}
  config_checks.check(c)
  c.lock()
  c.vae.from_diffusers = "/weights/sd-vae-ft-ema"
  c.init.from_diffusers = "/weights/DiT-XL-2-256/transformer"
  c.input.data_dir = "/data/tfds"
  with pytest.raises(AttributeError):
    c.vae.from_difusers = "/typo"
  with pytest.raises(TypeError):
    c.vae.from_diffusers = 3
  assert c.vae.scale_factor == 0.18215 and c.input.data == "imagenet2012"
  assert (c.model.variant, c.model.num_classes, c.model.learn_sigma) == ("XL/2", 1000, True)
  assert (c.total_steps, c.input.batch_size, c.ema_decay) == (400_000, 256, 0.9999)
  assert c.evals.samples.cfg_scale == 4.0 and c.evals.samples.steps == 250
  # Constant 1e-4 from the first step: no warmup, no decay.
  schedule = optim.learning_rate_schedule(c, c.total_steps)
  for step in (0, 1, 200_000, 400_000):
    assert float(schedule(step)) == pytest.approx(1e-4)
  assert dit_xl2.get_config("variant=B/4,steps=10").model.variant == "B/4"


def test_dit_xl2_model_has_the_published_parameter_count():
  """The config's model at XL/2 shape (jax.eval_shape: no params exist) has
  DiT-XL/2's published count minus the pos_embed buffer. diffusers' XL/2 has
  the same parameters plus one redundant embedder copy in each of blocks
  1..27 (counted on the meta device)."""
  from configs import dit_xl2
  c = dit_xl2.get_config()
  latent = c.input.image_size // dit_xl2.VAE_DOWNSAMPLE
  model = dit.DiT(variant=c.model.variant, num_classes=c.model.num_classes,
                  class_dropout_prob=c.model.class_dropout_prob, learn_sigma=c.model.learn_sigma,
                  t_freq_shift=c.model.t_freq_shift)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, latent, latent, 4), jnp.float32),
                          jax.ShapeDtypeStruct((1,), jnp.int32),
                          jax.ShapeDtypeStruct((1,), jnp.int32))["params"]
  ours = sum(math.prod(v.shape) for v in jax.tree.leaves(sharding.strip_boxes(shapes)))
  assert ours == XL2_PUBLISHED - XL2_POS_EMBED == 674_834_720

  cfg = dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, sample_size=latent,
             patch_size=2, in_channels=4, out_channels=8, num_embeds_ada_norm=1000)
  with torch.device("meta"):
    ref = diffusers.DiTTransformer2DModel(**cfg)
  copies = sum(p.numel() for k, p in ref.named_parameters()
               if ".norm1.emb." in k and not k.startswith("transformer_blocks.0."))
  assert sum(p.numel() for p in ref.parameters()) - copies == ours
  # The importer's tree for that checkpoint is this exact tree.
  kwargs = diffusers_dit.dit_kwargs_from_config(cfg)
  want = io.flatten(sharding.strip_boxes(shapes))
  got = io.flatten(sharding.strip_boxes(diffusers_dit.expected_params(kwargs, (latent,) * 2 + (4,))))
  assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
