"""A vision-language model trained in stages, LLaVA's recipe on the shapes world.

  stage "lm"     the decoder alone learns the world's language (captions,
                 questions and answers as plain text, loss on every token);
  stage "align"  the projector alone learns to turn a frozen CLIP/SigLIP
                 vision tower's patch features into tokens the frozen LM
                 captions from (`config.freeze` = "img/.*|llm/.*");
  stage "tune"   projector and LM learn VQA and captioning together
                 (the vision tower stays frozen; `config.lr_mults` may slow
                 the LM down).

Each stage is an ordinary run; a stage's config names the runs it starts
from (`config.init`), which are trained on first use and cached
(trained_runs), so `./launch.sh run configs/vlm_shapes.py` runs them all.

`config.init.from_hf=DIR` takes the LM from a local Hugging Face
LlamaForCausalLM instead (config.json, safetensors and tokenizer.json): its
architecture replaces `config.model.lm`, its tokenizer the world's, and stage
"align" reads its weights in place of an "lm" stage run.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from multimodal.config import config_lib
from multimodal.data import preprocess, tokenizer as tokenizer_lib
from multimodal.evaluators import captioning, vqa
from multimodal.importers import hf_llama, hf_tokenizer, safetensors_io
from multimodal.models import decoder, decoding, vit, vlm
from multimodal.tasks import base, clip, config_checks, trained_runs

STAGES = ("lm", "align", "tune")
TOKENIZER_TRAINING_EXAMPLES = 20_000


class VisionLanguageTask(base.Task):
  """Next-token loss on the answer tokens (all tokens in stage "lm")."""

  def __init__(self, config):
    # Runs saved before image_positions existed laid the image out in sequence.
    image_positions = config.model.get("image_positions", "sequence")
    # Before any data is read: names the models build from.
    for key, value, valid in (("stage", config.stage, STAGES),
                              ("model.projector", config.model.projector, vlm.PROJECTORS),
                              ("model.image_positions", image_positions, vlm.IMAGE_POSITIONS)):
      if value not in valid:
        raise config_lib.ConfigError(f"config.{key}={value!r} is not one of {valid}.")
    super().__init__(config)
    self.text_only = config.stage == "lm"
    self.hf_lm = config.get("init", {}).get("from_hf")
    self.tokenizer = self._tokenizer()
    self.max_len = config.input.max_len
    self._vision_workdir = None
    image = None
    if not self.text_only:
      # The tower's architecture comes from the vision run's config, so that
      # a finished run (whose checkpoint holds the tower) answers, captions
      # and evaluates without that run at hand; only training resolves it,
      # training it first if needed (`vision_workdir`).
      vision_config = trained_runs.resolve_config(
          config.model.vision, data_dir=config.input.get("data_dir"),
          shapes_world=config.input.get("shapes_world"))
      image = vision_config.model.image.to_dict()
      self.image_size = vision_config.input.image_size
      self._check_image_sizes(vision_config)
      self._check_vision_layer(image)
    if self.hf_lm:  # The checkpoint's architecture, whatever model.lm says.
      hf_config = safetensors_io.read_json_object(os.path.join(self.hf_lm, "config.json"))
      self.lm_kwargs = hf_llama.decoder_kwargs_from_config(hf_config)
    else:
      self.lm_kwargs = {**config.model.lm.to_dict(), "vocab_size": self.tokenizer.vocab_size}
    if image is not None:
      image = {**image, "remat": self.remat}
    self.model = vlm.VisionLanguageModel(
        image=image, lm={**self.lm_kwargs, "remat": self.remat},
        projector_type=config.model.projector,
        vision_layer=config.model.vision_layer,
        stem_features=config.model.get("stem_features", False), causal=config.model.causal,
        image_positions=image_positions,
        dtype=jnp.dtype(config.get("compute_dtype", "float32")))
    self.decoder = decoder.Decoder(**self.lm_kwargs)

  def _check_image_sizes(self, vision_config) -> None:
    """This config's images (input.pp, evals.*.pp) against the vision run's
    patch and, for its learned position embeddings, its image size."""
    found = config_checks.tower_patch(vision_config.model.image, "model.image")
    if found is None:
      return
    vision = self.config.model.vision
    where = f"the vision run (config.model.vision) {trained_runs.describe(vision)}"
    patch_key, patch = found
    config_checks.check_image_sizes(
        self.config, patch=patch, patch_key=f"{patch_key} of {where}",
        pp_keys=config_checks.image_pp_keys(self.config),
        image_size=self.image_size, image_size_key=f"input.image_size of {where}",
        same_size=vision_config.model.image.get("posemb", "learn") == "learn")

  def _check_vision_layer(self, image: dict) -> None:
    """model.vision_layer names one of the vision tower's blocks, counted
    from the end (-1 its final tokens) or from 0; a tower with fewer blocks
    would fail deep inside the model's first trace."""
    layer = self.config.model.vision_layer
    depth = vit.ViT(**image)._config()["depth"]
    if not -depth <= layer < depth:
      vision = self.config.model.vision
      raise config_lib.ConfigError(
          f"config.model.vision_layer={layer} names no block of the vision run "
          f"(config.model.vision) {trained_runs.describe(vision)}: its tower "
          f"model.image.variant={image.get('variant')!r} has {depth} blocks, so use "
          f"-{depth} .. -1 (-1 its final tokens) or 0 .. {depth - 1}.")

  @property
  def vision_workdir(self) -> str:
    """The vision run, trained on first use (its weights start stage align,
    its workdir names the earlier stages' runs)."""
    if self._vision_workdir is None:
      self._vision_workdir = self._resolve(self.config.model.vision, clip.ContrastiveTask)
    return self._vision_workdir

  def _resolve(self, run_config, task_class, overrides=None) -> str:
    return trained_runs.resolve(
        run_config, task_class, cache_root=os.path.join(self.source.data_dir, "trained_runs"),
        data_dir=self.config.input.get("data_dir"),
        shapes_world=self.config.input.get("shapes_world"), overrides=overrides)

  def _resolve_stage(self, run_config) -> str:
    """An earlier stage's run, with this run's vision tower and HF LM."""
    vision = self.config.model.vision
    return self._resolve(run_config, VisionLanguageTask,
                         {"model.vision.workdir": self.vision_workdir,
                          "model.vision.config": vision.config,
                          "init.from_hf": self.hf_lm})

  def _tokenizer(self):
    """One SentencePiece model over captions, questions and answers, shared
    by every stage (they must agree on ids)."""
    if self.hf_lm:
      return hf_tokenizer.load_hf_tokenizer(self.hf_lm, family="llama")
    cfg = self.config.input.tokenizer

    def texts():
      ds = self.source.read(self.config.input.split).take(TOKENIZER_TRAINING_EXAMPLES)
      for example in ds.as_numpy_iterator():
        for key in ("captions", "questions", "answers"):
          for text in np.atleast_1d(example[key]):
            yield text.decode("utf-8")

    name = "".join(c if c.isalnum() else "_" for c in self.source.builder.info.full_name)
    return tokenizer_lib.get_tokenizer(
        cfg.get("model"), cache_dir=self.source.data_dir, cache_name=f"{name}_vlm",
        texts_fn=texts, vocab_size=cfg.vocab_size)

  # --- the trainer's interface -------------------------------------------

  def train_pp(self):
    return preprocess.build(self.config.input.pp, tokenizer=self.tokenizer)

  def init(self, rng):
    text = jnp.zeros((1, self.max_len - 1), jnp.int32)
    if self.text_only:
      images = None
    else:
      images = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
    return self.model.init(rng, images, text, text, text)["params"]

  def loss_fn(self, params, batch, rng):
    del rng  # No dropout.
    text = batch["text"]
    mask_ar, input_mask = batch["mask_ar"], batch["input_mask"]
    if self.text_only:  # A plain causal LM over every real token.
      mask_ar, weights = jnp.ones_like(mask_ar), input_mask[:, 1:]
    else:
      weights = batch["mask_loss"][:, 1:]
    logits = self.model.apply({"params": params}, batch.get("image"), text[:, :-1],
                              mask_ar[:, :-1], input_mask[:, :-1])
    targets = text[:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    weights = weights.astype(jnp.float32)
    # Each example's mean over its target tokens, then the batch mean (as in
    # big_vision's PaliGemma trainer): a one-word answer counts as much as a
    # 20-token caption, so captions do not drown out the questions.
    per_example = jnp.sum(ce * weights, -1) / jnp.maximum(jnp.sum(weights, -1), 1.0)
    loss = jnp.sum(per_example) / jnp.maximum(jnp.sum(jnp.any(weights > 0, -1)), 1.0)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    accuracy = jnp.sum(correct * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    return loss, {"token_accuracy": accuracy}

  def pretrained_params(self):
    init = self.config.get("init", {})
    result = []
    if self.hf_lm and self.config.stage in ("lm", "align"):
      _, lm = hf_llama.load_hf_llama(self.hf_lm)
      result.append((f"the Hugging Face Llama in {self.hf_lm}", {"llm": lm}))
    if self.config.stage == "align":
      vision = trained_runs.eval_params(self.vision_workdir, clip.ContrastiveTask)["img"]
      vision = {k: v for k, v in vision.items() if k not in ("head", "MAPHead_0")}
      result.append((f"the vision tower of the run {self.vision_workdir}", {"img": vision}))
      if not self.hf_lm:
        lm_dir = self._resolve(init.lm, VisionLanguageTask)
        lm = trained_runs.eval_params(lm_dir, VisionLanguageTask)["llm"]
        result.append((f"the LM of the run {lm_dir}", {"llm": lm}))
    elif self.config.stage == "tune":
      run_dir = self._resolve_stage(init.run)
      result.append((f"the aligned model of the run {run_dir}",
                     trained_runs.eval_params(run_dir, VisionLanguageTask)))
    return result

  # --- generation --------------------------------------------------------

  def generate_fn(self, max_new_tokens: int, temperature: float = 0.0,
                  top_p: float = 1.0):
    """jitted (params, images, prompt_tokens, prompt_mask, rng) -> tokens
    [B, max_new_tokens] (pad after EOS)."""
    model, lm = self.model, self.decoder

    def generate(params, images, prompt_tokens, prompt_mask, rng):
      prefix = model.apply({"params": params}, images, prompt_tokens,
                           method=model.embed_prefix)
      num_image = prefix.shape[1] - prompt_tokens.shape[1]
      prefix_ar, prefix_input = model.apply(
          {"params": params}, num_image, jnp.zeros_like(prompt_tokens), prompt_mask,
          method=model.full_masks)
      positions = model.apply({"params": params}, num_image, prefix_input,
                              method=model.positions)
      return decoding.generate(
          lm, params["llm"], prefix, prefix_ar, prefix_input,
          max_new_tokens=max_new_tokens, eos_id=self.tokenizer.eos_id,
          pad_id=self.tokenizer.pad_id, rng=rng, temperature=temperature, top_p=top_p,
          prefix_positions=positions)
    return jax.jit(generate)

  def prompt_tokens(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) [n, max_prompt_len] of prompts without EOS, right-padded."""
    length = self.config.input.max_prompt_len
    ids = self.tokenizer.encode(list(prompts), length + 1)
    mask = (ids != self.tokenizer.pad_id) & (ids != self.tokenizer.eos_id)
    return np.where(mask, ids, self.tokenizer.pad_id)[:, :length], mask[:, :length].astype(np.int32)

  def answer(self, params, images, prompts: list[str], *, max_new_tokens: int,
             generate=None) -> list[str]:
    """Greedy answers (strings) to one prompt per image."""
    generate = generate or self.generate_fn(max_new_tokens)
    tokens, mask = self.prompt_tokens(prompts)
    out = generate(params, images, tokens, mask, jax.random.key(0))
    return self.tokenizer.decode_batch(np.asarray(jax.device_get(out)))

  # --- evaluators ------------------------------------------------------

  def _generation_inputs(self, cfg, mesh):
    """(batches, outputs): the eval split's batches, and the model's text for
    a batch's images and prompts, up to cfg.max_new_tokens."""
    pp_fn = preprocess.build(cfg.pp, tokenizer=self.tokenizer)
    batches = self.eval_batches(mesh, split=cfg.split, pp_fn=pp_fn,
                                batch_size=cfg.get("batch_size", self.config.input.batch_size))
    generate = self.generate_fn(cfg.max_new_tokens)

    def outputs(params, batch):
      prompts = [p.decode("utf-8") if isinstance(p, bytes) else str(p)
                 for p in np.asarray(batch["prompt"])]
      return self.answer(params, batch["image"], prompts,
                         max_new_tokens=cfg.max_new_tokens, generate=generate)
    return batches, outputs

  def _vqa(self, name, cfg, mesh, workdir):
    del workdir  # It writes no files.
    batches, outputs = self._generation_inputs(cfg, mesh)
    return vqa.VQAAccuracy(name=name, batches=batches, answer_fn=outputs)

  def _captioning(self, name, cfg, mesh, workdir):
    del workdir  # It writes no files.
    batches, outputs = self._generation_inputs(cfg, mesh)
    return captioning.CaptionQuality(name=name, batches=batches, caption_fn=outputs)

  EVALUATORS = {"vqa": _vqa, "captioning": _captioning}

