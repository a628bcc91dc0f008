r"""A supervised ViT that names the shape and the colour of a single object.

  ./launch.sh run configs/shapes_classifier.py
  ./launch.sh run configs/shapes_classifier.py:res=64,steps=3000

Two heads (shape, colour) on one backbone, so the joint prediction covers
the held-out (shape, colour) pairs too: `test_novel` measures exactly that.
It is the independent recognizer that scores DiT samples
(configs/dit_shapes.py trains it on first use).
"""
from ml_collections import config_dict

from configs import clip_shapes
from multimodal.config import config_lib
from multimodal.data import shapes_world


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="mu/4", steps=1500, res=32, batch=64,
                             crop=False)
  c = config_dict.ConfigDict()
  c.task = "classify"
  c.seed = 0

  c.total_steps = config_dict.placeholder(int)
  c.total_epochs = config_dict.placeholder(float)
  c.total_examples = config_dict.placeholder(int)
  c.total_steps = arg.steps

  c.input = config_dict.ConfigDict()
  c.input.data = "shapes_world"
  c.input.data_dir = config_dict.placeholder(str)
  c.input.shapes_world = dict(clip_shapes.SHAPES_WORLD)
  c.input.split = "train"
  c.input.single_object_only = True
  c.input.batch_size = arg.batch
  c.input.shuffle_buffer = 10_000
  # Training records whose pp fails (an undecodable image, an empty caption)
  # are skipped; the run stops when more than this fraction of those read
  # were (pipeline.StreamTracker.check).
  c.input.max_skipped_fraction = 0.01
  c.input.image_size = arg.res
  # crop: object-centred crops, the images configs/dit_shapes.py generates.
  crop = "|crop_to_object(margin=0.25)" if arg.crop else ""
  image_pp = f"decode{crop}|resize({arg.res})|value_range(-1,1)"
  label_pp = ('|object_label("shape", outkey="shape")'
              '|object_label("colour", outkey="colour")'
              '|keep("image", "shape", "colour")')
  c.input.pp = image_pp + label_pp

  c.model = config_dict.ConfigDict()
  c.model.image = dict(variant=arg.variant, stem="conv", pool_type="gap", posemb="learn")
  c.model.heads = dict(shape=len(shapes_world.SHAPES), colour=len(shapes_world.COLOURS))

  c.compute_dtype = "float32"
  # Memory for time: microbatches per step (accumulate.py) and which block
  # activations the backward pass recomputes (layers.REMAT_POLICIES).
  c.grad_accum_steps = 1
  c.grad_accum_unroll = False
  c.remat = "none"
  c.lr = 3e-3
  c.wd = 1e-4
  c.wd_mask = r".*/kernel"
  c.grad_clip_norm = 1.0
  c.schedule = dict(warmup_steps=100, decay_type="cosine", min_lr_ratio=0.0)
  c.ema_decay = config_dict.placeholder(float)

  c.mesh = dict(data=-1, fsdp=1, tensor=1)  # e.g. --config.mesh.fsdp=8
  c.log_steps = 50
  c.ckpt_steps = 500
  c.keep_ckpts = 1
  c.eval_every = 0

  c.evals = config_dict.ConfigDict()
  for split in ("test", "test_novel"):
    c.evals[f"accuracy_{split}"] = dict(type="classification", split=split,
                                        single_object_only=True, pp=c.input.pp)
  return c
