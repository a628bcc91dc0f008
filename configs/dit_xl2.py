r"""DiT-XL/2 on ImageNet 256x256 in the latent space of Stable Diffusion's VAE:
the real-scale recipe of Peebles & Xie (2023), after facebookresearch/DiT's
train.py and sample.py. Written down, not run here (400k steps of XL/2 is
~a few hundred accelerator-days).

  ./launch.sh run configs/dit_xl2.py \
      --config.input.data_dir=/data/tensorflow_datasets \
      --config.vae.from_diffusers=/weights/sd-vae-ft-ema
  # Fine-tune / evaluate the published weights instead of training from scratch:
  #   --config.init.from_diffusers=/weights/DiT-XL-2-256/transformer

Data: TFDS ``imagenet2012`` prepared beforehand (`tfds build imagenet2012
--data_dir ...`, with the ILSVRC2012 tars in its manual_dir); labels are TFDS'
"label" (0..999). Images are mapped to [-1, 1] at ``res`` pixels and encoded
on the fly by the VAE (``vae.from_diffusers``: a local diffusers
AutoencoderKL directory, e.g. stabilityai/sd-vae-ft-ema, which is DiT's
default ``--vae ema``) into res/8 x res/8 x 4 latents, sampled from the
posterior and multiplied by 0.18215, exactly as DiT's train.py does. The DiT
denoises those 32x32x4 latents.

Known deviation: DiT resizes the SHORT side to 256 (aspect preserved) and
centre-crops 256x256 (center_crop_arr). Our pp vocabulary has no
aspect-preserving resize, so ``resize`` squashes the whole image to 256x256.
Add a short-side resize op (then ``central_crop(256)``) before comparing FIDs
with the paper.

Model and optimisation follow DiT exactly: XL/2 (28 blocks, width 1152, 16
heads, patch 2), 1000 classes with label dropout 0.1 (for classifier-free
guidance), learned sigma (hybrid MSE + VLB loss), linear beta schedule over
1000 steps, epsilon prediction, AdamW lr 1e-4 constant, no warmup, no weight
decay, no gradient clipping, global batch 256, EMA 0.9999, fp32. 400k steps
is the length of the paper's model-comparison runs (XL/2: FID-50K 19.5 without
guidance); the headline FID 2.27 took 7M steps (--config.total_steps=7000000).
"""
from ml_collections import config_dict

from multimodal.config import config_lib

# The VAE downsamples by 8 (four blocks of sd-vae-ft-*): 256 px -> 32x32x4.
VAE_DOWNSAMPLE = 8
VAE_SCALE_FACTOR = 0.18215  # Stable Diffusion's latent scale (DiT's mul_(0.18215)).


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="XL/2", steps=400_000, res=256, batch=256)
  c = config_dict.ConfigDict()
  c.task = "dit"
  c.seed = 0  # DiT's --global-seed.

  c.total_steps = config_dict.placeholder(int)
  c.total_epochs = config_dict.placeholder(float)
  c.total_examples = config_dict.placeholder(int)
  c.total_steps = arg.steps

  c.input = config_dict.ConfigDict()
  c.input.data = "imagenet2012"
  c.input.data_dir = config_dict.placeholder(str)  # Where `tfds build` wrote it.
  c.input.split = "train"
  c.input.batch_size = arg.batch  # Global; DiT's --global-batch-size.
  # The shuffle holds encoded JPEGs (~110 kB each): 50k is ~5.5 GB per host.
  c.input.shuffle_buffer = 50_000
  # Training records whose pp fails (an undecodable image, an empty caption)
  # are skipped; the run stops when more than this fraction of those read
  # were (pipeline.StreamTracker.check).
  c.input.max_skipped_fraction = 0.01
  c.input.image_size = arg.res  # Pixels; the DiT sees res/8 latents.
  image_pp = f'decode|resize({arg.res}, method="bicubic")'
  # DiT trains with RandomHorizontalFlip and Normalize(0.5, 0.5): [-1, 1].
  c.input.pp = f'{image_pp}|flip_lr|value_range(-1, 1)|keep("image", "label")'

  # The frozen VAE between pixels and the DiT (multimodal/models/vae.py,
  # loaded by multimodal/importers/diffusers_vae.py).
  c.vae = config_dict.ConfigDict()
  c.vae.from_diffusers = config_dict.placeholder(str)  # e.g. /weights/sd-vae-ft-ema
  c.vae.scale_factor = VAE_SCALE_FACTOR

  # Optional initial DiT weights from a diffusers DiTTransformer2DModel
  # directory (importers/diffusers_dit.py). When set, the importer's model
  # kwargs (incl. t_freq_shift=1.0, diffusers' timestep frequencies) replace
  # the architecture fields of c.model, which must agree with them.
  c.init = config_dict.ConfigDict()
  c.init.from_diffusers = config_dict.placeholder(str)  # e.g. /weights/DiT-XL-2-256/transformer

  c.model = config_dict.ConfigDict()
  c.model.conditioning = "class"
  c.model.variant = arg.variant
  c.model.num_classes = 1000
  c.model.class_dropout_prob = 0.1  # Trains the unconditional half of CFG.
  c.model.learn_sigma = True
  # 0.0 = DiT's own timestep frequencies (training from scratch); weights
  # imported from diffusers need 1.0 (see init.from_diffusers above).
  c.model.t_freq_shift = 0.0

  c.diffusion = config_dict.ConfigDict()
  c.diffusion.beta_schedule = "linear"
  c.diffusion.num_timesteps = 1000
  c.diffusion.prediction = "epsilon"

  # DiT trains in fp32 (its train.py has no autocast; the paper's runs are
  # TF32 at most). "bfloat16" roughly halves the step time on TPU/GPU, but
  # then the result is no longer the paper's recipe.
  c.freeze = config_dict.placeholder(str)  # Nothing frozen (a regex over param paths).
  c.compute_dtype = "float32"
  # Memory for time: microbatches per step (accumulate.py) and which block
  # activations the backward pass recomputes (layers.REMAT_POLICIES).
  c.grad_accum_steps = 1
  c.grad_accum_unroll = False
  c.remat = "none"
  # Sampling: rows per model call of the guided (doubled) batch, which goes
  # through the model in that many at a time; the same samples. 0: all at once.
  c.sample_microbatch_size = 0
  c.lr = 1e-4
  c.wd = 0.0
  c.wd_mask = r".*/kernel"  # Moot at wd=0; kept so --config.wd=... decays kernels only.
  c.grad_clip_norm = config_dict.placeholder(float)  # DiT does not clip.
  c.schedule = dict(warmup_steps=0, decay_type="constant", min_lr_ratio=1.0)
  # DiT updates its EMA with 0.9999 from step 0; our trainer warms the decay
  # up as min(0.9999, (1 + step) / (10 + step)), which only matters for the
  # first ~10k of 400k steps.
  c.ema_decay = 0.9999

  # Pure data parallelism over every device, as DiT (DDP). XL/2 is 675M
  # params: fp32 params + AdamW state + EMA are ~11 GB per replica; on
  # accelerators with less memory shard them with FSDP, e.g.
  # --config.mesh.fsdp=8 (and data=-1 takes the other devices).
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.log_steps = 100  # DiT's --log-every.
  c.ckpt_steps = 50_000  # DiT's --ckpt-every.
  c.keep_ckpts = 2
  c.eval_every = 50_000

  eval_pp = f'{image_pp}|value_range(-1, 1)|keep("image", "label")'
  c.evals = config_dict.ConfigDict()
  # DiT's sample.py: 250 DDPM steps, classifier-free guidance scale 4.0 (the
  # visual-quality setting; FID-50K is reported at 1.5 and with no guidance).
  c.evals.samples = dict(type="samples", steps=250, cfg_scale=4.0, sampler="ddpm",
                         num=32, cols=8)
  c.evals.val_loss = dict(type="denoising_loss", split="validation", pp=eval_pp)
  return c
