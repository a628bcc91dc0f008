r"""A class-conditional DiT on the shapes world's single-object scenes.

  ./launch.sh run configs/dit_shapes.py
  ./launch.sh run configs/dit_shapes.py:variant=S/4,res=32,steps=20000
  ./launch.sh run configs/dit_shapes.py:cond=text      # conditioned on captions

One class per (shape, colour) pair: 64 classes, of which the 8 held-out
pairs never occur in training. Pixel space (no VAE), on object-centred crops
at 16x16. Every evaluation writes a PNG grid of EMA samples, one per class,
to the workdir, and scores samples with a recognizer (evals.quality).
"""
from ml_collections import config_dict

from configs import clip_shapes
from multimodal.config import config_lib
from multimodal.data import shapes_world


def get_config(arg=None):
  # nano/2 on 16 px crops: 64 tokens of 2x2 px. At the same cost, mu/4 on
  # 32 px (4x4 px tokens) drew blobs; nano/2 draws the shapes
  # (docs/notes/2026-11-24-dit-default.md).
  arg = config_lib.parse_arg(arg, variant="nano/2", steps=4000, res=16, batch=64,
                             cond="class", cross_attention=False, crop=True)
  if arg.cond not in ("class", "text"):
    raise config_lib.ConfigError(f"cond={arg.cond!r}; use cond=class or cond=text.")
  c = config_dict.ConfigDict()
  c.task = "dit"
  c.seed = 0

  c.total_steps = config_dict.placeholder(int)
  c.total_epochs = config_dict.placeholder(float)
  c.total_examples = config_dict.placeholder(int)
  c.total_steps = arg.steps

  num_colours = len(shapes_world.COLOURS)
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
  # Object-centred crops (crop=True): the object fills the frame, so a small
  # model spends its capacity on the object, not on the empty background of
  # a 3x3 grid (whole 32 px scenes: samples ignored the class for 4000 steps).
  crop = "|crop_to_object(margin=0.25)" if arg.crop else ""
  image_pp = f"decode{crop}|resize({arg.res})|value_range(-1,1)"
  if arg.cond == "class":
    label_pp = f'object_pair_label("shape", "colour", {num_colours})'
    c.input.pp = f'{image_pp}|{label_pp}|keep("image", "label")'
  else:  # One of the image's captions, in the text encoder's tokens.
    c.input.pp = (f'{image_pp}|choice(inkey="captions", outkey="text")'
                  f'|tokenize(max_len={clip_shapes.MAX_TEXT_LEN}, inkey="text", '
                  'outkey="tokens")|keep("image", "tokens")')

  # Pixel space here; configs/dit_xl2.py shows latent diffusion through a VAE.
  c.vae = dict(from_diffusers=config_dict.placeholder(str), scale_factor=0.18215)
  # Initial weights from a diffusers DiTTransformer2DModel directory.
  c.init = dict(from_diffusers=config_dict.placeholder(str))

  c.model = config_dict.ConfigDict()
  c.model.variant = arg.variant
  c.model.conditioning = arg.cond
  c.model.num_classes = len(shapes_world.SHAPES) * num_colours  # cond=class only.
  # cond=text: the frozen text tower of a CLIP run (workdir), or of a run of
  # `config` trained on first use into <data_dir>/text_encoders/.
  c.model.text_encoder = dict(workdir=config_dict.placeholder(str),
                              config="configs/clip_shapes.py")
  c.model.cross_attention = arg.cross_attention  # Also attend to its tokens.
  # Dropped to null together (class, or pooled text and tokens): trains the
  # unconditional half of classifier-free guidance.
  c.model.class_dropout_prob = 0.1
  c.model.learn_sigma = True
  c.model.t_freq_shift = 0.0  # DiT's; imported diffusers weights set 1.0.

  c.diffusion = config_dict.ConfigDict()
  # v-prediction on the cosine schedule, not DiT's epsilon on linear betas.
  # In these images the colour and shape are plain from x_t at all but the
  # highest noise levels, so the class matters only there; epsilon's loss
  # gives those levels almost no weight and the model ignored the class
  # (colour accuracy 0.13 = chance after 2000 steps; with v and cosine, 0.86).
  c.diffusion.beta_schedule = "cosine"  # | "linear"
  c.diffusion.num_timesteps = 1000
  c.diffusion.prediction = "v"  # | "epsilon"

  c.freeze = "text_encoder/.*"  # Matches nothing in cond=class.
  c.compute_dtype = "float32"
  # Memory for time: microbatches per step (accumulate.py) and which block
  # activations the backward pass recomputes (layers.REMAT_POLICIES).
  c.grad_accum_steps = 1
  c.grad_accum_unroll = False
  c.remat = "none"
  # Sampling: rows per model call of the guided (doubled) batch, which goes
  # through the model in that many at a time; the same samples. 0: all at once.
  # 32 keeps a part's activations in a CPU's cache: 1.2x the whole batch of
  # 128 on 2 cores (docs/performance.md); an accelerator wants 0.
  c.sample_microbatch_size = 32
  c.lr = 1e-3
  c.wd = 0.0
  c.wd_mask = r".*/kernel"
  c.grad_clip_norm = 1.0
  c.schedule = dict(warmup_steps=200, decay_type="cosine", min_lr_ratio=0.0)
  c.ema_decay = 0.999

  c.mesh = dict(data=-1, fsdp=1, tensor=1)  # e.g. --config.mesh.fsdp=8
  c.log_steps = 50
  c.ckpt_steps = 1000
  c.keep_ckpts = 2
  c.eval_every = 0

  c.evals = config_dict.ConfigDict()
  c.evals.samples = dict(type="samples", steps=50, cfg_scale=3.0, sampler="ddim",
                         num=c.model.num_classes, cols=num_colours)
  c.evals.val_loss = dict(type="denoising_loss", split="validation",
                          pp=c.input.pp)
  # Generation quality under an independent recognizer, a shape-and-colour
  # classifier trained by this codebase on real images (on first use, into
  # <data_dir>/recognizers/; set recognizer_workdir to use a run of your own).
  c.evals.quality = dict(
      type="quality", recognizer=f"configs/shapes_classifier.py:res={arg.res},crop={arg.crop}",
      recognizer_workdir=config_dict.placeholder(str), per_class=8, steps=50,
      cfg_scale=3.0, sampler="ddim", split="test", batch_size=arg.batch,
      pp=image_pp + '|object_label("shape", outkey="shape")'
      '|object_label("colour", outkey="colour")|keep("image", "shape", "colour")')
  return c
