"""`config.init.from_diffusers` and `config.vae.from_diffusers` through the
DiT task and the generic trainer: imported weights land in the train state
(params and EMA), latent diffusion trains and samples through the VAE."""
import jax
import numpy as np
import pytest

pytestmark = pytest.mark.unit

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import TINY_WORLD  # noqa: E402
from multimodal.config import config_lib  # noqa: E402
from multimodal.parallel import sharding
from multimodal.train import trainer
from multimodal.importers import diffusers_dit  # noqa: E402
from multimodal.tasks import dit as dit_task  # noqa: E402


@pytest.fixture(scope="module")
def diffusers_dirs(tmp_path_factory):
  """A tiny DiT matching our mu/2 on 8x8x4 latents, and a VAE (factor 2)."""
  torch.manual_seed(0)
  transformer = diffusers.DiTTransformer2DModel(
      num_attention_heads=2, attention_head_dim=32, num_layers=2, sample_size=8,
      patch_size=2, in_channels=4, out_channels=8, num_embeds_ada_norm=64)
  first = transformer.transformer_blocks[0].norm1.emb  # Tied, as DiT's own.
  with torch.no_grad():
    for p in transformer.parameters():
      p.add_(0.02 * torch.randn(p.shape))
    for block in transformer.transformer_blocks[1:]:
      for p, p0 in zip(block.norm1.emb.parameters(), first.parameters()):
        p.copy_(p0)
  vae = diffusers.AutoencoderKL(
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
      block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
      latent_channels=4, sample_size=16)
  dit_dir, vae_dir = tmp_path_factory.mktemp("dit"), tmp_path_factory.mktemp("vae")
  transformer.save_pretrained(dit_dir)
  vae.save_pretrained(vae_dir)
  return str(dit_dir), str(vae_dir)


def latent_config(data_dir, dit_dir, vae_dir, variant="mu/2"):
  from configs import dit_shapes
  config = dit_shapes.get_config(f"variant={variant},steps=3,res=16,batch=16")
  config.input.data_dir = data_dir
  config.input.shapes_world = dict(TINY_WORLD)
  config.input.shuffle_buffer = 100
  config.init.from_diffusers = dit_dir
  config.vae.from_diffusers = vae_dir
  config.log_steps = 1
  config.evals.samples.steps = 2
  config.evals.samples.num = 8
  for name in ("val_loss", "quality"):
    del config.evals[name]
  return config


def test_imported_weights_are_the_initial_params_and_ema(data_dir, diffusers_dirs):
  config = latent_config(data_dir, *diffusers_dirs)
  task = dit_task.DiffusionTask(config)
  assert task.image_shape == (8, 8, 4)  # 16 px through a factor-2 VAE.
  assert task.model.t_freq_shift == 1.0  # diffusers' timestep frequencies.
  _, imported = diffusers_dit.load_dit(diffusers_dirs[0])
  mesh = sharding.make_mesh({"data": -1})
  weights = list(task.pretrained_params())
  with sharding.mesh_context(mesh):
    init_fn, shardings, _, _ = trainer.create_train_state(task, config, mesh, 3)
    state = trainer.with_pretrained(weights, init_fn(), shardings)
  for key in ("params", "ema_params"):
    got = jax.tree_util.tree_leaves_with_path(state[key])
    want = dict(jax.tree_util.tree_leaves_with_path(imported))
    assert len(got) == len(want)
    for path, value in got:
      np.testing.assert_array_equal(np.asarray(value), want[path], err_msg=str(path))


def test_latent_dit_trains_and_samples_pixels(data_dir, diffusers_dirs, tmp_path):
  config = latent_config(data_dir, *diffusers_dirs)
  summary = trainer.train(dit_task.DiffusionTask(config), config, str(tmp_path / "run"))
  assert np.isfinite(summary["metrics"]["samples/pixel_mean"])
  from PIL import Image
  grid = np.asarray(Image.open(tmp_path / "run" / "samples_latest.png"))
  assert grid.shape == (18 + 2, 8 * 18 + 2, 3)  # Decoded to 16 px images.


def test_imported_architecture_must_match_the_config(data_dir, diffusers_dirs):
  config = latent_config(data_dir, *diffusers_dirs, variant="mu/4")
  with pytest.raises(config_lib.ConfigError, match="patch_size"):
    dit_task.DiffusionTask(config)
