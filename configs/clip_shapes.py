r"""A small CLIP trained from scratch on the shapes world: the embedded default.

  ./launch.sh run                                   # this config
  ./launch.sh run configs/clip_shapes.py:variant=S/8,steps=3000
  ./launch.sh run configs/clip_shapes.py --config.lr=3e-4 --config.input.batch_size=128
  ./launch.sh sweep configs/clip_shapes.py          # lr in 1e-3, 3e-3, 1e-2 (get_sweep)

It trains on the 2-core CPU in minutes and reaches zero-shot shape and colour
accuracy above 0.9 (chance 0.125); docs/families/clip.md gives the measured numbers.
"""
from ml_collections import config_dict

from multimodal.config import config_lib

SHAPES_WORLD = dict(image_size=64, train_examples=50_000, eval_examples=2_000,
                    seed=0)
MAX_TEXT_LEN = 40  # Tokens per caption; the longest shapes-world caption fits.


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="mu/8", stem="conv", text_variant="mu",
                             steps=3000, res=64, batch=64, loss="softmax",
                             text_len=MAX_TEXT_LEN, pool="gap")
  c = config_dict.ConfigDict()
  c.task = "clip"
  c.seed = 0
  c.loss = arg.loss

  # Training length: exactly one of these three is set.
  c.total_steps = config_dict.placeholder(int)
  c.total_epochs = config_dict.placeholder(float)
  c.total_examples = config_dict.placeholder(int)
  c.total_steps = arg.steps

  c.input = config_dict.ConfigDict()
  c.input.data = "shapes_world"
  c.input.data_dir = config_dict.placeholder(str)
  c.input.shapes_world = dict(SHAPES_WORLD)
  c.input.split = "train"
  c.input.batch_size = arg.batch
  c.input.shuffle_buffer = 10_000
  # Training records whose pp fails (an undecodable image, an empty caption)
  # are skipped; the run stops when more than this fraction of those read
  # were (pipeline.StreamTracker.check).
  c.input.max_skipped_fraction = 0.01
  c.input.image_size = arg.res
  # Captions longer than text_len tokens are cut (and counted).
  c.input.tokenizer = dict(model=config_dict.placeholder(str), vocab_size=256,
                           max_len=arg.text_len)
  image_pp = f"decode|resize({arg.res})|value_range(-1,1)"
  # No flip_lr: captions name left and right, and a flip would falsify them.
  c.input.pp = (image_pp + '|choice(inkey="captions", outkey="text")'
                f'|tokenize(max_len={arg.text_len}, inkey="text", outkey="tokens")'
                '|keep("image", "tokens")')

  c.model = config_dict.ConfigDict()
  # A convolutional stem: a tiny ViT with patchify learns colour at once but
  # shape only slowly; early convolutions (beside a linear patchify) fix that
  # (see models/vit.py).
  # pool="map" (SigLIP's attention pooling) learnt shape better here than
  # "gap" (zero-shot 0.97 vs 0.95; docs/notes/2026-12-04-vlm-default.md).
  c.model.image = dict(variant=arg.variant, stem=arg.stem, pool_type=arg.pool,
                       posemb="learn")
  # The last text block computes the EOS token alone, all the loss reads:
  # the same embeddings for 1/depth less of the tower's work (models/text.py).
  c.model.text = dict(variant=arg.text_variant, causal=True, pool="eos",
                      last_block_pooled_only=True)
  c.model.out_dim = 128
  if arg.loss == "softmax":
    c.model.temperature_init = 1 / 0.07
    c.model.bias_init = config_dict.placeholder(float)
  else:  # SigLIP's initialisation: t' = log 10, b = -10.
    c.model.temperature_init = 10.0
    c.model.bias_init = -10.0

  c.compute_dtype = "float32"
  # Memory for time: microbatches per step (accumulate.py) and which block
  # activations the backward pass recomputes (layers.REMAT_POLICIES).
  c.grad_accum_steps = 1
  c.grad_accum_unroll = False
  c.remat = "none"
  # "ring" (sigmoid loss only): the loss without the global [B, B] logits.
  c.loss_impl = "dense"
  # Many small steps beat fewer large ones here: at a fixed time budget,
  # batch 64 x 2400 steps learnt shape to 0.85 where 128 x 1200 reached 0.49.
  c.lr = 3e-3
  c.wd = 1e-4
  c.wd_mask = r".*/kernel"  # Decay matmul kernels only.
  c.grad_clip_norm = 1.0
  c.schedule = dict(warmup_steps=100, decay_type="cosine", min_lr_ratio=0.0)

  # An exponential moving average of the params, which evaluators then use
  # (e.g. 0.999); None keeps none.
  c.ema_decay = config_dict.placeholder(float)

  c.mesh = dict(data=-1, fsdp=1, tensor=1)  # e.g. --config.mesh.fsdp=8
  c.log_steps = 50
  c.ckpt_steps = 500
  c.keep_ckpts = 2
  c.eval_every = 0  # 0: evaluate only at the end.

  c.evals = config_dict.ConfigDict()
  for attribute, classes in (("shape", "objects/shape"),
                             ("colour", "objects/colour")):
    for split in ("test", "test_novel"):
      suffix = "" if split == "test" else "_novel"
      c.evals[f"zero_shot_{attribute}{suffix}"] = dict(
          type="zero_shot", split=split, single_object_only=True,
          classes=classes, templates=f"shapes_{attribute}",
          pp=image_pp + f'|object_label("{attribute}")|keep("image", "label")')
  c.evals.retrieval = dict(
      type="retrieval", split="test", single_object_only=False,
      pp=image_pp + f'|tokenize(max_len={arg.text_len}, inkey="captions", '
      'outkey="caption_tokens")|keep("image", "caption_tokens")')
  return c


def get_sweep(arg=None):
  """`./launch.sh sweep configs/clip_shapes.py`: the learning rate, 3 points.

  `--sweep_args=lrs=1e-3/3e-3` sweeps other values ("/" between them).
  """
  arg = config_lib.parse_arg(arg, lrs=None)
  text = "1e-3/3e-3/1e-2" if arg.lrs is None else str(arg.lrs)
  try:
    lrs = [float(v) for v in text.split("/")]
  except ValueError:
    raise config_lib.ConfigError(
        f"sweep argument lrs={text!r}: give learning rates separated by '/', "
        "e.g. lrs=1e-3/3e-3/1e-2.") from None
  return {"lr": lrs}
