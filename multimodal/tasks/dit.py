"""Diffusion with a DiT denoiser, conditioned on a class or on text.

Training draws one timestep and one noise per example and minimises the
DiT objective (`diffusion/losses.py`); evaluators sample with the (EMA)
params the trainer passes, measure the held-out denoising loss, and score
samples with an independent recognizer.

`config.model.conditioning`:
  "class": a label table (DiT's class-conditional model).
  "text":  the frozen text tower of a CLIP/SigLIP run of this codebase
           (`config.model.text_encoder`): its pooled embedding goes into adaLN,
           and with `config.model.cross_attention` every block also attends
           to its token sequence. The tower's weights live in the params
           under "text_encoder" and `config.freeze` keeps them fixed.
Either way, a sampler is asked for (shape, colour) class ids; in text mode
they become the prompts "a {colour} {shape}".
"""
from __future__ import annotations

import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from multimodal.config import config_lib
from multimodal.data import pipeline, preprocess, shapes_world
from multimodal.diffusion import losses, samplers, schedules
from multimodal.evaluators import generation
from multimodal.importers import diffusers_dit, diffusers_vae
from multimodal.models import dit
from multimodal.parallel import sharding
from multimodal.tasks import (base, classify, clip, recognizer as recognizer_lib, text_encoder,
                              trained_runs)
from multimodal.train import accumulate


class DiffusionTask(base.Task):
  """config.model: DiT fields (variant, num_classes, learn_sigma, ...) and
  the conditioning; config.diffusion: beta_schedule, num_timesteps, prediction."""

  def __init__(self, config):
    super().__init__(config)
    m = config.model
    # Latent diffusion: a frozen VAE between pixels and the DiT. Read first,
    # so that latents the patch does not divide fail before anything else.
    vae_dir = config.get("vae", {}).get("from_diffusers")
    self.codec = (diffusers_vae.load_codec(vae_dir, config.vae.get("scale_factor"))
                  if vae_dir else None)
    self._check_latent_size()
    self.imported = self._import_diffusers_dit()
    self.text_encoder = self._text_encoder()
    text = {}
    if self.text_encoder is not None:
      text = dict(text_dim=self.text_encoder.out_dim,
                  cross_attention=m.get("cross_attention", False),
                  text_token_dim=self.text_encoder.width)
    self.model = dit.DiT(
        variant=m.variant, num_classes=m.num_classes if self.text_encoder is None else None,
        class_dropout_prob=m.class_dropout_prob, learn_sigma=m.learn_sigma, **text,
        t_freq_shift=(self.imported[0]["t_freq_shift"] if self.imported
                      else m.get("t_freq_shift", 0.0)),
        remat=self.remat, dtype=jnp.dtype(config.get("compute_dtype", "float32")))
    d = config.diffusion
    self.num_timesteps = d.num_timesteps
    self.schedule = schedules.named_schedule(d.beta_schedule, d.num_timesteps)
    self.prediction = d.prediction

  def _check_latent_size(self) -> None:
    """Through a VAE the DiT patchifies latents: the image size must be a
    multiple of the VAE's downsampling, and the latents' of the patch (pixel
    space: config_checks.check_image_patch)."""
    if self.codec is None:
      return
    size, factor = self.config.input.image_size, self.codec.model.downsample_factor
    vae = f"the VAE of config.vae.from_diffusers={self.config.vae.from_diffusers!r}"
    if size % factor:
      raise config_lib.ConfigError(
          f"config.input.image_size={size} is not divisible by the downsampling "
          f"factor {factor} of {vae}: use {size // factor * factor or factor} or "
          f"{(size // factor + 1) * factor}.")
    ph, pw = dit.DiT(variant=self.config.model.variant)._config()["patch_size"]
    h, w, _ = self.image_shape
    if h % ph or w % pw:
      step = factor * ph
      raise config_lib.ConfigError(
          f"config.input.image_size={size} gives {h}x{w} latents through {vae} "
          f"(which downsamples by {factor}), not divisible by the {ph}x{pw} patch of "
          f"config.model.variant={self.config.model.variant!r}: use an image size "
          f"that is a multiple of {step} (e.g. {size // step * step or step} or "
          f"{(size // step + 1) * step}), or a smaller patch.")

  def _text_encoder(self):
    conditioning = self.config.model.get("conditioning", "class")
    if conditioning == "class":
      return None
    if conditioning != "text":
      raise config_lib.ConfigError(
          f"config.model.conditioning={conditioning!r}; use 'class' or 'text'.")
    freeze = self.config.get("freeze") or ""
    if not re.fullmatch(freeze, f"{text_encoder.PARAMS_KEY}/Encoder_0/kernel"):
      raise config_lib.ConfigError(
          f"text conditioning needs the text encoder frozen: set "
          f"--config.freeze='{text_encoder.PARAMS_KEY}/.*' (it is {freeze!r}).")
    run = self.config.model.text_encoder
    data = dict(data_dir=self.config.input.get("data_dir"),
                shapes_world=self.config.input.get("shapes_world"))
    # The encoder's architecture and tokenizer come from the run's config;
    # its run is resolved (trained on first use) only when training reads
    # its weights: a finished run holds them in its own checkpoint.
    return text_encoder.FrozenTextEncoder(
        trained_runs.resolve_config(run, **data),
        lambda: trained_runs.resolve(
            run, clip.ContrastiveTask,
            cache_root=os.path.join(self.source.data_dir, "text_encoders"), **data),
        name=trained_runs.describe(run))

  def _import_diffusers_dit(self):
    """(kwargs, params) of `config.init.from_diffusers`, checked against
    the architecture this config builds, or None."""
    directory = self.config.get("init", {}).get("from_diffusers")
    if not directory:
      return None
    kwargs, params = diffusers_dit.load_dit(directory)
    m = self.config.model
    ours = dict(dit.decode_variant(m.variant), num_classes=m.num_classes,
                learn_sigma=m.learn_sigma)
    for key, value in ours.items():
      if tuple(np.atleast_1d(kwargs[key])) != tuple(np.atleast_1d(value)):
        raise config_lib.ConfigError(
            f"config.init.from_diffusers={directory} holds a DiT with {key}="
            f"{kwargs[key]}, but this config builds {key}={value} (config.model."
            f"{'variant' if key in ('width', 'depth', 'num_heads', 'patch_size') else key}"
            "); make them agree.")
    return kwargs, params

  def pretrained_params(self):
    result = []
    if self.imported is not None:
      result.append((f"the diffusers DiT in {self.config.init.from_diffusers}",
                     self.imported[1]))
    if self.text_encoder is not None:
      result.append((f"the text tower of the CLIP run {self.text_encoder.workdir}",
                     {text_encoder.PARAMS_KEY: self.text_encoder.weights()}))
    return result

  @property
  def image_shape(self):
    """What the DiT denoises: pixels, or the VAE's latents of them."""
    size = self.config.input.image_size
    if self.codec is not None:
      return self.codec.latent_shape((size, size, 3))
    return (size, size, 3)

  def label_from_prompt(self, prompt: str) -> int:
    """'a red circle' -> the class id of (circle, red), as object_pair_label."""
    words = prompt.lower().replace(",", " ").replace(".", " ").split()
    shapes = [s for s in shapes_world.SHAPES if s in words]
    colours = [c for c in shapes_world.COLOURS if c in words]
    if len(shapes) != 1 or len(colours) != 1:
      raise ValueError(
          f"the prompt {prompt!r} must name exactly one colour "
          f"({', '.join(shapes_world.COLOURS)}) and one shape "
          f"({', '.join(shapes_world.SHAPES)}), e.g. 'a red circle'; this "
          "model is conditioned on (shape, colour) classes.")
    return (shapes_world.SHAPES.index(shapes[0]) * len(shapes_world.COLOURS)
            + shapes_world.COLOURS.index(colours[0]))

  def condition_for_labels(self, labels: np.ndarray) -> np.ndarray:
    """What the sampler takes for (shape, colour) class ids: the ids
    themselves, or in text mode the tokens of "a {colour} {shape}"."""
    labels = np.asarray(labels, np.int32)
    if self.text_encoder is None:
      return labels
    n = len(shapes_world.COLOURS)
    return self.text_encoder.tokenize(
        [f"a {shapes_world.COLOURS[k % n]} {shapes_world.SHAPES[k // n]}" for k in labels])

  def condition_for_prompt(self, prompt: str, n: int) -> np.ndarray:
    """n copies of a prompt's condition: any text in text mode; in class
    mode the prompt must name one shape and one colour."""
    if self.text_encoder is None:
      return np.full((n,), self.label_from_prompt(prompt), np.int32)
    return self.text_encoder.tokenize([prompt] * n)

  def _condition_kwargs(self, params, condition) -> dict:
    """DiT keyword inputs for a batch's condition (labels or tokens)."""
    if self.text_encoder is None:
      return {"y": condition}
    frozen = jax.lax.stop_gradient(params[text_encoder.PARAMS_KEY])
    pooled, tokens, mask = self.text_encoder(frozen, condition)
    kwargs = {"text_emb": pooled}
    if self.model.cross_attention:
      kwargs.update(text_tokens=tokens, text_mask=mask)
    return kwargs

  @staticmethod
  def _dit_params(params):
    return {k: v for k, v in params.items() if k != text_encoder.PARAMS_KEY}

  @property
  def condition_key(self) -> str:
    return "label" if self.text_encoder is None else "tokens"

  # --- the trainer's interface -------------------------------------------

  @property
  def num_labels(self) -> int:
    """How many class ids samplers can be asked for: the label table's, or
    in text mode the shapes world's (shape, colour) prompts."""
    if self.text_encoder is None:
      return self.model.num_classes
    return len(shapes_world.SHAPES) * len(shapes_world.COLOURS)

  def _pp(self, spec: str):
    tokenizer = self.text_encoder.tokenizer if self.text_encoder is not None else None
    return preprocess.build(spec, tokenizer=tokenizer)

  def train_pp(self):
    return self._pp(self.config.input.pp)

  def train_filter(self):
    if self.config.input.get("single_object_only"):
      return pipeline.is_single_object
    return None

  def init(self, rng):
    x = jnp.zeros((1, *self.image_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    params_rng, dropout_rng, text_rng = jax.random.split(rng, 3)
    if self.text_encoder is None:
      return self.model.init({"params": params_rng, "dropout": dropout_rng},
                             x, t, jnp.zeros((1,), jnp.int32))["params"]
    encoder = self.text_encoder.init(text_rng)
    tokens = jnp.zeros((1, self.text_encoder.max_len), jnp.int32)
    kwargs = self._condition_kwargs({text_encoder.PARAMS_KEY: nn.unbox(encoder)}, tokens)
    params = self.model.init({"params": params_rng, "dropout": dropout_rng}, x, t,
                             **kwargs)["params"]
    return {**params, text_encoder.PARAMS_KEY: encoder}

  @property
  def _conditioned(self) -> bool:
    m = self.model
    return bool(m.num_classes) or m.text_dim is not None or m.cross_attention

  def random_draws(self, batch, rng, *, train: bool = True):
    """Per example: the timestep, the noise, the posterior sample's noise
    (latent DiT) and, in training, whether its condition is dropped to null
    (for classifier-free guidance)."""
    t_rng, noise_rng, drop_rng, vae_rng = jax.random.split(rng, 4)
    b = batch["image"].shape[0]
    draws = {"t": jax.random.randint(t_rng, (b,), 0, self.num_timesteps),
             "noise": jax.random.normal(noise_rng, (b, *self.image_shape))}
    if self.codec is not None:
      draws["posterior_noise"] = jax.random.normal(vae_rng, (b, *self.image_shape))
    if train and self._conditioned:
      draws["drop"] = jax.random.uniform(drop_rng, (b,)) < self.model.class_dropout_prob
    return {**batch, "draws": draws}

  def _losses(self, params, batch):
    draws = batch["draws"]
    x0 = batch["image"]
    if self.codec is not None:  # DiT trains on posterior samples, as train.py.
      x0 = jax.lax.stop_gradient(self.codec.encode(x0, noise=draws["posterior_noise"]))
    condition = self._condition_kwargs(params, batch[self.condition_key])
    if "drop" in draws:
      condition["force_drop_ids"] = draws["drop"].astype(jnp.int32)

    def model_fn(x_t, timesteps):
      return self.model.apply({"params": self._dit_params(params)}, x_t, timesteps,
                              **condition)
    return losses.training_losses(
        self.schedule, model_fn, x0, draws["t"], draws["noise"].astype(x0.dtype),
        prediction=self.prediction, learn_sigma=self.model.learn_sigma)

  def loss_fn(self, params, batch, rng):
    del rng  # All randomness is in batch["draws"] (random_draws).
    terms = self._losses(params, batch)
    return terms["loss"].mean(), {"mse": terms["mse"].mean(), "vb": terms["vb"].mean()}

  def sampler(self, mesh, *, steps: int, cfg_scale: float, sampler: str = "ddim",
              eta: float = 0.0, seed: int = 0, microbatch_size: int | None = None):
    """A jitted (params, condition) -> images [N, H, W, 3] in [-1, 1], for
    conditions from `condition_for_labels` or `condition_for_prompt`.
    `microbatch_size`: rows per model call (None: the config's
    sample_microbatch_size; 0: the whole guided batch)."""
    if microbatch_size is None:
      microbatch_size = self.config.get("sample_microbatch_size", 0)
    use = schedules.space_timesteps(self.num_timesteps, steps)
    respaced, timestep_map = schedules.respace(self.schedule, use)

    def sample(params, condition):
      n = condition.shape[0]
      # Conditional half, then the same condition dropped to null: the
      # unconditional half, exactly as label dropout trained it.
      doubled_condition = self._condition_kwargs(
          params, jnp.concatenate([condition, condition]))
      drop = jnp.concatenate([jnp.zeros((n,), jnp.int32), jnp.ones((n,), jnp.int32)])

      def call_model(x, t, drop, condition_kwargs):
        return self.model.apply({"params": self._dit_params(params)}, x, t,
                                force_drop_ids=drop, **condition_kwargs)

      def doubled(x, t):
        # In parts of at most sample_microbatch_size rows: the same samples.
        k = accumulate.count_for_size(2 * n, microbatch_size)
        return accumulate.in_microbatches(call_model, k)(x, t, drop, doubled_condition)
      model_fn = samplers.cfg_model_fn(doubled, cfg_scale)
      shape = (n, *self.image_shape)
      kwargs = dict(timestep_map=timestep_map, prediction=self.prediction,
                    learn_sigma=self.model.learn_sigma, clip_denoised=True)
      key = jax.random.key(seed)
      if sampler == "ddim":
        x = samplers.ddim_sample(model_fn, respaced, shape, key, eta=eta, **kwargs)
      elif sampler == "ddpm":
        x = samplers.ddpm_sample(model_fn, respaced, shape, key, **kwargs)
      else:
        raise ValueError(f"unknown sampler {sampler!r}; use 'ddim' or 'ddpm'.")
      if self.codec is not None:
        x = self.codec.decode(x)
      return jnp.clip(x, -1, 1)
    return jax.jit(sample, out_shardings=sharding.replicated(mesh))

  def _samples(self, name, cfg, mesh, workdir):
    labels = np.arange(self.num_labels, dtype=np.int32)[:cfg.get("num", 64)]
    sample = self.sampler(mesh, steps=cfg.steps, cfg_scale=cfg.cfg_scale,
                          sampler=cfg.get("sampler", "ddim"))
    return generation.SampleGrid(
        name=name, labels=labels, cols=cfg.get("cols", 8), output_dir=workdir,
        sample=lambda params, labels: sample(params, self.condition_for_labels(labels)))

  def _denoising_loss(self, name, cfg, mesh, workdir):
    del workdir  # It writes no files.
    batches = self.eval_batches(
        mesh, split=cfg.split, pp_fn=self._pp(cfg.pp), filter_fn=self.train_filter(),
        batch_size=cfg.get("batch_size", self.config.input.batch_size))
    # A fixed key: every evaluation sees the same timesteps and noise.
    loss = jax.jit(lambda params, batch: self._losses(
        params, self.random_draws(batch, jax.random.key(0), train=False))["loss"])
    return generation.DenoisingLoss(name=name, batches=batches, loss=loss)

  def _quality(self, name, cfg, mesh, workdir):
    """Conditional accuracy and FID under a shape-and-colour recognizer."""
    del workdir  # It writes no files; the recognizer's run has its own.
    recognizer_dir = cfg.get("recognizer_workdir") or trained_runs.ensure_trained(
        cfg.recognizer, classify.ClassificationTask,
        cache_root=os.path.join(self.source.data_dir, "recognizers"),
        data_dir=self.config.input.get("data_dir"),
        shapes_world=self.config.input.get("shapes_world"))
    recognizer = recognizer_lib.Recognizer(recognizer_dir, mesh)
    if recognizer.heads != ["colour", "shape"]:
      raise ValueError(f"config.evals.{name}: the recognizer in {recognizer_dir} has heads "
                       f"{recognizer.heads}; scoring (shape, colour) classes needs "
                       "heads 'shape' and 'colour' (configs/shapes_classifier.py).")
    labels = np.arange(self.num_labels, dtype=np.int32)
    num_colours = len(shapes_world.COLOURS)
    novel = tuple(shapes_world.SHAPES.index(s) * num_colours + shapes_world.COLOURS.index(c)
                  for s, c in shapes_world.NOVEL_PAIRS)
    batch_size = cfg.get("batch_size", self.config.input.batch_size)
    return generation.GenerationQuality(
        name=name, labels=labels, per_label=cfg.per_class, batch_size=batch_size,
        targets={"shape": labels // num_colours, "colour": labels % num_colours},
        novel_labels=novel, recognizer=recognizer.predict,
        real_batches=self.eval_batches(
            mesh, split=cfg.split, pp_fn=preprocess.build(cfg.pp),
            filter_fn=pipeline.is_single_object, batch_size=batch_size),
        sample=self.sampler(mesh, steps=cfg.steps, cfg_scale=cfg.cfg_scale,
                            sampler=cfg.get("sampler", "ddim")),
        put=lambda labels: jax.device_put(self.condition_for_labels(labels),
                                          sharding.batch_sharding(mesh)))

  EVALUATORS = {"samples": _samples, "denoising_loss": _denoising_loss, "quality": _quality}
