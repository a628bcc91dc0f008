"""multimodal/flops.py: analytic FLOPs against hand counts, and against an
independent count of the dot_general/conv equations of the real models'
traced forward passes (exact equality: every matmul counted, nothing else)."""
import jax
import jax.numpy as jnp
import optax
import pytest

from configs import clip_shapes, dit_shapes, shapes_classifier, siglip_shapes, vlm_shapes
from multimodal.config import config_lib
from multimodal.diffusion import losses as diffusion_losses, schedules
from multimodal.models import classifier, decoder, dit, text, two_towers, vit, vlm
from multimodal.perf import flops
from multimodal.tasks import contrastive_losses as losses

pytestmark = pytest.mark.unit

# A tiny ViT: 16x16x3 images, 4x4 patches -> 16 patches; width 8, 2 heads of 4.
TINY_VIT = dict(width=8, depth=2, mlp_dim=16, num_heads=2, patch_size=(4, 4),
                stem="patch", num_classes=10)
# A tiny Llama: 4 query heads, 2 kv heads, head_dim 4, SwiGLU 24, vocab 32.
TINY_LM = dict(vocab_size=32, width=16, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=24)


def traced_flops(model, *inputs, **kwargs):
  """The jaxpr count of model.apply on abstract params (nothing runs)."""
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, **kwargs))
  return flops.jaxpr_matmul_flops(lambda p, *x: model.apply(p, *x, **kwargs), params, *inputs)


# --- 1. ViT by hand ---------------------------------------------------------


@pytest.mark.parametrize("pool", ["tok", "gap"])
def test_tiny_vit_by_hand(pool):
  t = 17 if pool == "tok" else 16  # 16 patches, + the cls token for "tok".
  patch_embed = 2 * 16 * (4 * 4 * 3) * 8       # conv: 16 positions x 48 inputs x 8 outputs
  qkv = 3 * (2 * t * 8 * 8)                    # q, k, v projections, width -> 2 heads x 4
  scores = 2 * t * t * 2 * 4                   # QK^T: t x t per head, head_dim 4
  mix = 2 * t * t * 2 * 4                      # weights @ V
  out = 2 * t * 8 * 8                          # output projection
  mlp = 2 * t * 8 * 16 + 2 * t * 16 * 8        # Dense 8->16, Dense 16->8
  head = 2 * 1 * 8 * 10                        # the pooled vector -> 10 classes
  expected = patch_embed + 2 * (qkv + scores + mix + out + mlp) + head
  assert expected == (65760 if pool == "tok" else 61600)  # The arithmetic, spelt out.
  assert flops.vit_flops({**TINY_VIT, "pool_type": pool}, 16) == expected


# --- 2. Decoder LM by hand --------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_decoder_by_hand(tied):
  length = 10
  q = 2 * length * 16 * (4 * 4)                # width 16 -> 4 heads x 4
  kv = 2 * (2 * length * 16 * (2 * 4))         # k and v: only 2 kv heads x 4
  scores = 2 * length * length * 4 * 4         # every query head attends: 4 heads
  mix = 2 * length * length * 4 * 4
  out = 2 * length * (4 * 4) * 16
  swiglu = 3 * (2 * length * 16 * 24)          # gate, up (16->24) and down (24->16)
  lm_head = 2 * length * 16 * 32               # tied or not, the same matmul
  expected = 2 * (q + kv + scores + mix + out + swiglu) + lm_head
  assert expected == 99840
  assert flops.decoder_flops({**TINY_LM, "tie_embeddings": tied}, length) == expected


# --- 3. The analytic model against the traced programs ---------------------


@pytest.mark.parametrize("tower", [
    dict(TINY_VIT, pool_type="tok"),
    dict(TINY_VIT, pool_type="gap", remat="full"),  # nested remat jaxprs
    dict(TINY_VIT, pool_type="map"),
    dict(TINY_VIT, pool_type="none", num_classes=5, posemb="sincos2d"),
    dict(TINY_VIT, stem="conv", width=32, mlp_dim=48, pool_type="gap"),
    dict(variant="mu/8", stem="conv", pool_type="tok", num_classes=None),
    dict(TINY_VIT, pool_type="tok", last_block_pooled_only=True, remat="full"),
], ids=["tok", "gap-remat", "map", "none-head", "convstem", "mu8-conv", "tok-last-pooled"])
def test_vit_matches_jaxpr(tower):
  image = jnp.zeros((2, 16, 16, 3))
  assert traced_flops(vit.ViT(**tower), image) == 2 * flops.vit_flops(tower, 16)


@pytest.mark.parametrize("lm", [
    TINY_LM,
    dict(TINY_LM, tie_embeddings=True, remat="full"),
    dict(TINY_LM, num_heads=2, num_kv_heads=1, head_dim=12),  # head_dim != width / heads
    dict(vocab_size=50, variant="mu"),
], ids=["untied", "tied-remat", "head_dim", "mu"])
def test_decoder_matches_jaxpr(lm):
  model, length = decoder.Decoder(**lm), 7
  x = jnp.zeros((3, length, model._config()["width"]))
  traced = traced_flops(model, x, positions=jnp.zeros((3, length), jnp.int32),
                        mask=decoder.causal_mask(length))
  assert traced == 3 * flops.decoder_flops(lm, length)


@pytest.mark.parametrize("tower", [
    dict(width=16, depth=2, num_heads=2, causal=True, pool="eos", num_classes=12),
    dict(variant="mu", pool="gap"),
    dict(width=16, depth=2, num_heads=2, causal=True, pool="eos", last_block_pooled_only=True),
])
def test_text_matches_jaxpr(tower):
  tokens = jnp.zeros((2, 9), jnp.int32)
  traced = traced_flops(text.TextTransformer(vocab_size=40, **tower), tokens)
  assert traced == 2 * flops.text_flops(tower, 9)


@pytest.mark.parametrize("kwargs, text_len", [
    (dict(variant="mu/2", num_classes=10), None),
    (dict(variant="mu/4", num_classes=None, text_dim=12, cross_attention=True,
          text_token_dim=20, learn_sigma=False), 5),
], ids=["class", "text-cross"])
def test_dit_matches_jaxpr(kwargs, text_len):
  model, b = dit.DiT(**kwargs), 2
  x, t = jnp.zeros((b, 8, 8, 3)), jnp.zeros((b,), jnp.int32)
  cond = ({"y": jnp.zeros((b,), jnp.int32)} if text_len is None else
          {"text_emb": jnp.zeros((b, 12)), "text_tokens": jnp.zeros((b, text_len, 20))})
  assert traced_flops(model, x, t, **cond) == b * flops.dit_flops(kwargs, (8, 8, 3), text_len)


def test_xla_cost_analysis_bounds_the_count():
  """XLA's count adds elementwise work to the same matmuls: never below ours."""
  model, image = vit.ViT(**TINY_VIT, pool_type="tok"), jax.ShapeDtypeStruct((2, 16, 16, 3),
                                                                           jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), image)  # Compiled, never run.
  cost = jax.jit(model.apply).lower(params, image).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert 2 * flops.vit_flops(dict(TINY_VIT, pool_type="tok"), 16) <= cost["flops"]


# --- 4. Real configs: the tasks' losses, built as the tasks build them ------


def reference_clip_config(last_block_pooled_only: bool = False):
  """Both towers width 192, depth 6, 3 heads, MLP 768; 64 px, patch 8; text 32."""
  config = clip_shapes.get_config()
  sizes = dict(variant=None, width=192, depth=6, mlp_dim=768, num_heads=3,
               last_block_pooled_only=last_block_pooled_only)
  config.model.image = dict(sizes, patch_size=(8, 8), stem="patch", pool_type="tok")
  config.model.text = dict(sizes, causal=True, pool="eos")
  config.input.tokenizer.max_len = 32
  return config


def clip_model(config):
  """TwoTowers as tasks/clip.py builds it (ids of a trained tokenizer)."""
  return two_towers.TwoTowers(
      image=config.model.image.to_dict(),
      text={**config.model.text.to_dict(), "vocab_size": config.input.tokenizer.vocab_size,
            "eos_id": 1, "pad_id": 0},
      out_dim=config.model.out_dim, temperature_init=config.model.temperature_init,
      bias_init=config.model.get("bias_init"))


@pytest.mark.parametrize("get_config", [
    clip_shapes.get_config, siglip_shapes.get_config, reference_clip_config,
    lambda: reference_clip_config(last_block_pooled_only=True),
], ids=["clip_shapes", "siglip_shapes", "reference", "reference-last-block-pooled"])
def test_clip_config_matches_jaxpr(get_config):
  config = get_config()
  model, b, size = clip_model(config), config.input.batch_size, config.input.image_size
  image = jnp.zeros((b, size, size, 3))
  tokens = jnp.zeros((b, config.input.tokenizer.max_len), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), image[:1], tokens[:1]))

  def loss(params, image, tokens):  # ContrastiveTask.loss_fn, dense loss.
    zimg, ztxt, aux = model.apply(params, image, tokens, train=True)
    if config.loss == "softmax":
      return losses.softmax_contrastive_loss(zimg, ztxt, aux["t"])[0]
    return losses.sigmoid_contrastive_loss(zimg, ztxt, aux["t"], aux["b"])[0]

  traced = flops.jaxpr_matmul_flops(loss, params, image, tokens)
  assert traced == flops.forward_flops(config, b)
  assert flops.train_step_flops(config) == 3 * traced


def test_reference_clip_number():
  # Per example: image 369,283,584 (65 tokens) + text 174,637,056 (32 tokens);
  # x 64, + the 64 x 64 x 128 logits; x 3 for training.
  assert flops.train_step_flops(reference_clip_config()) == 104_435_908_608
  # The last block on the pooled token alone: image 318,902,784 (its last
  # block 10,371,840 instead of 60,752,640: the K and V projections of all
  # 65 tokens, the rest for one), text 151,019,520 (5,480,448 instead of
  # 29,097,984).
  pooled = reference_clip_config(last_block_pooled_only=True)
  assert flops.train_step_flops(pooled) == 90_228_228_096


def dit_loss(model, config, condition_fn):
  """DiffusionTask._losses for a batch of images."""
  schedule = schedules.named_schedule(config.diffusion.beta_schedule,
                                      config.diffusion.num_timesteps)

  def loss(params, x0, t, noise, condition):
    def model_fn(x_t, timesteps):
      return model.apply(params["dit"], x_t, timesteps, **condition_fn(params, condition))
    return diffusion_losses.training_losses(
        schedule, model_fn, x0, t, noise, prediction=config.diffusion.prediction,
        learn_sigma=model.learn_sigma)["loss"].mean()
  return loss


@pytest.mark.parametrize("arg", ["", "cond=text,cross_attention=True"],
                         ids=["class", "text-cross"])
def test_dit_config_matches_jaxpr(arg):
  config = dit_shapes.get_config(arg)
  m, b, size = config.model, config.input.batch_size, config.input.image_size
  x0, t = jnp.zeros((b, size, size, 3)), jnp.zeros((b,), jnp.int32)
  if m.conditioning == "class":
    model = dit.DiT(variant=m.variant, num_classes=m.num_classes, learn_sigma=m.learn_sigma)
    condition, tower = jnp.zeros((b,), jnp.int32), None
    params = {"dit": jax.eval_shape(lambda: model.init(jax.random.key(0), x0, t, condition))}
    condition_fn = lambda params, labels: {"y": labels}
  else:  # The frozen text tower of the CLIP config the DiT config names.
    clip = clip_shapes.get_config()
    tower = two_towers.text_tower(
        {**clip.model.text.to_dict(), "vocab_size": clip.input.tokenizer.vocab_size,
         "last_block_pooled_only": False},
        clip.model.out_dim)
    condition = jnp.zeros((b, clip.input.tokenizer.max_len), jnp.int32)
    model = dit.DiT(variant=m.variant, num_classes=None, learn_sigma=m.learn_sigma,
                    text_dim=clip.model.out_dim, cross_attention=True,
                    text_token_dim=tower._config()["width"])

    def condition_fn(params, tokens):  # FrozenTextEncoder + _condition_kwargs.
      z, aux = tower.apply(jax.lax.stop_gradient(params["text"]), tokens)
      return {"text_emb": two_towers.l2_normalize(z), "text_tokens": aux["encoded"],
              "text_mask": tokens != 0}
    text_params = jax.eval_shape(lambda: tower.init(jax.random.key(0), condition))
    dit_params = jax.eval_shape(lambda text_params: model.init(
        jax.random.key(0), x0, t, **condition_fn({"text": text_params}, condition)),
        text_params)
    params = {"dit": dit_params, "text": text_params}
  loss = dit_loss(model, config, condition_fn)
  traced = flops.jaxpr_matmul_flops(loss, params, x0, t, jnp.zeros_like(x0), condition)
  assert traced == flops.forward_flops(config, b)


@pytest.mark.parametrize("arg", ["stage=tune,projector=conv", "stage=tune,projector=mlp",
                                 "stage=tune,projector=linear", "stage=lm,projector=conv",
                                 "stage=tune,stem_features=True",
                                 "stage=tune,projector=block,stem_features=True"])
def test_vlm_config_matches_jaxpr(arg):
  config = vlm_shapes.get_config(arg)
  stage = config.stage
  vision = config_lib.load_config_file(config.model.vision.config)
  b, size = config.input.batch_size, vision.input.image_size
  model = vlm.VisionLanguageModel(
      image=None if stage == "lm" else vision.model.image.to_dict(),
      lm={**config.model.lm.to_dict(), "vocab_size": config.input.tokenizer.vocab_size},
      projector_type=config.model.projector, vision_layer=config.model.vision_layer,
      stem_features=config.model.stem_features, causal=config.model.causal)
  images = None if stage == "lm" else jnp.zeros((b, size, size, 3))
  text_ids = jnp.zeros((b, config.input.max_len), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), images, text_ids[:, :-1],
                                             text_ids[:, :-1], text_ids[:, :-1]))

  def loss(params, images, text_ids):  # VisionLanguageTask.loss_fn.
    inputs = text_ids[:, :-1]
    logits = model.apply(params, images, inputs, inputs, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, text_ids[:, 1:]).mean()

  traced = flops.jaxpr_matmul_flops(loss, params, images, text_ids)
  assert traced == flops.forward_flops(config, b)


def test_classify_config_matches_jaxpr():
  config = shapes_classifier.get_config()
  b, size = config.input.batch_size, config.input.image_size
  model = classifier.ImageClassifier(image=config.model.image.to_dict(),
                                     heads=dict(config.model.heads))
  images = jnp.zeros((b, size, size, 3))
  assert traced_flops(model, images) == flops.forward_flops(config, b)


def test_unknown_task_is_named():
  config = clip_shapes.get_config()
  config.task = "segment"
  with pytest.raises(ValueError, match="segment"):
    flops.train_step_flops(config)
