"""The vision-language model: PaliGemma's text layout and masks, the loss on
answer tokens only, frozen towers bit-identical through training, the
stages chaining through cached runs, and (slow) a tiny run through the
command line whose VQA beats a blind model, with the `ask` and `caption`
commands."""
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf

from conftest import E2E_WORLD, ROOT, TINY_WORLD, TRAINED_CLIP_GROUP, full_optimisation_env
from multimodal.config import config_lib
from multimodal.data import preprocess, shapes_world
from multimodal.models import decoder, vlm as vlm_model
from multimodal.models.vit import ConvStem
from multimodal.tasks import trained_runs, vlm
from multimodal.train import optim, trainer


def vlm_config(data_dir, clip_workdir, stage, steps, **overrides):
  config = config_lib.load_config_file(
      f"configs/vlm_shapes.py:stage={stage},steps={steps},res=32,batch=16,vision_layer=-1")
  with config.unlocked():
    config.input.data_dir = data_dir
    config.input.shapes_world = dict(TINY_WORLD)
    config.model.vision.workdir = clip_workdir
    config.log_steps = 1
    for stage_run, name in ((config.init.lm, "lm"), (config.init.run, "align")):
      stage_run.config = (
          f"configs/vlm_shapes.py:stage={name},steps=3,res=32,batch=16,vision_layer=-1")
    for evaluator in config.evals.values():
      evaluator.batch_size = 64
    for key, value in overrides.items():
      config[key] = value
  return config


@pytest.fixture(scope="module")
def align_task(data_dir, clip_workdir):
  return vlm.VisionLanguageTask(vlm_config(data_dir, clip_workdir, "align", 3))


@pytest.mark.unit
def test_text_layout_and_masks(align_task):
  tok = align_task.tokenizer
  pp = preprocess.build("vlm_text(max_len=24)", tokenizer=tok)
  out = pp({"prompt": tf.constant("what colour is the circle?"), "answer": tf.constant("red")})
  prompt = [int(i) for i in tok.encode(["what colour is the circle?"], 24)[0] if i > tok.eos_id]
  answer = [int(i) for i in tok.encode(["red"], 24)[0] if i > tok.eos_id] + [tok.eos_id]
  n_p, n = len(prompt), len(prompt) + len(answer)
  text = out["text"].numpy()
  np.testing.assert_array_equal(text[:n], prompt + answer)
  np.testing.assert_array_equal(text[n:], tok.pad_id)
  want_ar = np.r_[np.zeros(n_p), np.ones(n - n_p), np.zeros(24 - n)]
  np.testing.assert_array_equal(out["mask_ar"].numpy(), want_ar)
  np.testing.assert_array_equal(out["mask_loss"].numpy(), want_ar)  # Answer + EOS only.
  np.testing.assert_array_equal(out["input_mask"].numpy(), np.r_[np.ones(n), np.zeros(24 - n)])


@pytest.mark.unit
def test_dialogue_layout_later_turns_are_causal_and_left_out_when_they_do_not_fit(
    align_task):
  """1-D prompt and answer: q1 a1 EOS q2 a2 EOS ..., the first prompt the only
  prefix, every answer and its EOS a target; a turn that does not fit whole
  is left out."""
  tok = align_task.tokenizer
  turns = [("what colour is the circle?", "red"), ("is there a blue square?", "no"),
           ("how many objects are there?", "two")]
  ids = lambda s: [int(i) for i in tok.encode([s], 48)[0] if i > tok.eos_id]
  (q1, a1), (q2, a2), (q3, a3) = [(ids(q), ids(a) + [tok.eos_id]) for q, a in turns]
  two_turns = len(q1 + a1 + q2 + a2)
  max_len = two_turns + len(q3 + a3) - 1  # The third turn misses by one token.
  out = preprocess.build(f"vlm_text(max_len={max_len})", tokenizer=tok)(
      {"prompt": tf.constant([q for q, _ in turns]),
       "answer": tf.constant([a for _, a in turns])})
  pad = max_len - two_turns
  np.testing.assert_array_equal(out["text"].numpy(), q1 + a1 + q2 + a2 + [tok.pad_id] * pad)
  np.testing.assert_array_equal(
      out["mask_ar"].numpy(), [0] * len(q1) + [1] * len(a1 + q2 + a2) + [0] * pad)
  np.testing.assert_array_equal(
      out["mask_loss"].numpy(),
      [0] * len(q1) + [1] * len(a1) + [0] * len(q2) + [1] * len(a2) + [0] * pad)
  np.testing.assert_array_equal(out["input_mask"].numpy(), [1] * two_turns + [0] * pad)


@pytest.mark.unit
def test_vlm_task_asks_several_of_an_images_questions_or_its_caption():
  example = {"questions": tf.constant([f"q{i}?" for i in range(5)]),
             "answers": tf.constant([f"a{i}" for i in range(5)]),
             "captions": tf.constant(["a red circle.", "one red circle."]),
             preprocess.SEED_KEY: tf.constant([0, 7], tf.int64)}
  asked = set()
  for seed in range(20):
    example[preprocess.SEED_KEY] = tf.constant([0, seed], tf.int64)
    out = preprocess.build('vlm_task(mode="vqa", questions=3)')(example)
    prompts = [p.decode() for p in out["prompt"].numpy()]
    answers = [a.decode() for a in out["answer"].numpy()]
    assert len(set(prompts)) == 3
    assert answers == [f"a{p[1]}" for p in prompts]  # Each answer with its question.
    asked.add(tuple(prompts))
  assert len(asked) > 1  # The choice and order are random.
  out = preprocess.build('vlm_task(mode="mix", p_caption=1.0, questions=3)')(example)
  assert out["prompt"].numpy().tolist() == [b"caption"]
  assert out["answer"].numpy()[0].decode() in ("a red circle.", "one red circle.")


@pytest.mark.unit
def test_image_and_prompt_are_prefix_answer_is_causal(align_task):
  """Two image tokens, a two-token prompt, a two-token answer, one pad."""
  model = align_task.model
  mask_ar = jnp.array([[0, 0, 1, 1, 0]])
  input_mask = jnp.array([[1, 1, 1, 1, 0]])
  full_ar, full_input = model.full_masks(2, mask_ar, input_mask)
  got = np.asarray(decoder.make_attention_mask(full_ar, full_input))[0].astype(int)
  prefix = [1, 1, 1, 1, 0, 0, 0]
  want = np.array([prefix] * 4 + [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0],
                                  [0] * 7])
  np.testing.assert_array_equal(got[:6], want[:6])  # The pad's own row is unused.
  causal = model.clone(causal=True)
  full_ar, full_input = causal.full_masks(2, mask_ar, input_mask)
  got = np.asarray(decoder.make_attention_mask(full_ar, full_input))[0].astype(int)
  np.testing.assert_array_equal(got[:6, :6], np.tril(np.ones((6, 6), int)))


@pytest.mark.unit
def test_loss_counts_answer_tokens_only(align_task):
  params = jax.tree.map(lambda x: x.value, align_task.init(jax.random.key(0)),
                        is_leaf=lambda x: hasattr(x, "value"))
  tok = align_task.tokenizer
  pp = preprocess.build("vlm_text(max_len=48)", tokenizer=tok)
  rows = [pp({"prompt": tf.constant(p), "answer": tf.constant(a)})
          for p, a in (("what colour is the circle?", "red"), ("caption", "a red circle."))]
  batch = {k: jnp.stack([r[k].numpy() for r in rows])
           for k in ("text", "mask_ar", "mask_loss", "input_mask")}
  batch["image"] = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)),
                               jnp.float32)
  loss, _ = align_task.loss_fn(params, batch, None)
  logits = align_task.model.apply({"params": params}, batch["image"], batch["text"][:, :-1],
                                  batch["mask_ar"][:, :-1], batch["input_mask"][:, :-1])
  ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, batch["text"][:, 1:]))
  weights = np.asarray(batch["mask_loss"][:, 1:])
  assert weights.sum() == sum(int(r["mask_loss"].numpy().sum()) for r in rows)
  # Each example weighs the same: the mean over its own answer tokens, so the
  # one-word answer counts as much as the caption.
  per_example = (ce * weights).sum(1) / weights.sum(1)
  assert weights.sum(1)[0] != weights.sum(1)[1]
  assert float(loss) == pytest.approx(per_example.mean(), rel=1e-6)
  # Prompt positions carry real (and large) errors that the loss leaves out.
  prompt_ce = ce[(weights == 0) & (np.asarray(batch["input_mask"][:, 1:]) == 1)]
  assert prompt_ce.size and abs(prompt_ce.mean() - float(loss)) > 1e-3


@pytest.mark.unit
def test_conv_projector_against_numpy():
  """projector="conv": token (r, c) mixes the 3x3 patches around it (zero
  padding at the border), as a numpy reference computes it, then GELU and
  the second Dense."""
  rng = np.random.default_rng(0)
  side, channels, width = 4, 5, 6
  tokens = rng.normal(size=(2, side * side, channels)).astype(np.float32)
  projector = vlm_model.Projector("conv", width)
  params = projector.init(jax.random.key(0), tokens)["params"]
  params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32),
                        nn.unbox(params))
  got = projector.apply({"params": params}, tokens)

  kernel, bias = np.asarray(params["Conv_0"]["kernel"]), np.asarray(params["Conv_0"]["bias"])
  grid = np.pad(tokens.reshape(2, side, side, channels), ((0, 0), (1, 1), (1, 1), (0, 0)))
  hidden = np.zeros((2, side, side, width), np.float32) + bias
  for dy in range(3):
    for dx in range(3):
      hidden += grid[:, dy:dy + side, dx:dx + side] @ kernel[dy, dx]
  hidden = np.asarray(jax.nn.gelu(hidden.reshape(2, side * side, width), approximate=False))
  want = hidden @ np.asarray(params["Dense_1"]["kernel"]) + np.asarray(params["Dense_1"]["bias"])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

  with pytest.raises(ValueError, match="square patch grid"):
    projector.apply({"params": params}, tokens[:, :12])


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["mlp", "block"])
def test_only_the_block_projector_lets_image_tokens_see_each_other(kind):
  """Changing the features of the last patch changes only its own token
  through "mlp" (token by token), every token through "block" (attention)."""
  features = jax.random.normal(jax.random.key(0), (1, 16, 24))
  projector = vlm_model.Projector(kind, 32)
  params = projector.init(jax.random.key(1), features)
  before = projector.apply(params, features)
  after = projector.apply(params, features.at[0, -1].add(1.0))
  changed = np.abs(np.asarray(after - before)).max(axis=-1)[0] > 1e-6
  assert before.shape == (1, 16, 32) and changed[-1]
  assert changed[:-1].all() if kind == "block" else not changed[:-1].any()


@pytest.mark.unit
def test_stem_features_sit_beside_the_final_ones():
  """stem_features=True: the projector reads [tokens entering the first
  block, final tokens]. With the stem half of its first kernel zeroed it is
  the model without them; the stem half alone sees the ViT's patch
  embedding plus position embedding, before any attention."""
  from configs import clip_shapes
  image = clip_shapes.get_config("res=32").model.image.to_dict()
  lm = dict(variant="mu", vocab_size=32)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  with_stem = vlm_model.VisionLanguageModel(image=image, lm=lm, stem_features=True)
  without = vlm_model.VisionLanguageModel(image=image, lm=lm)
  tokens = jnp.zeros((2, 4), jnp.int32)
  params = nn.unbox(with_stem.init(jax.random.key(0), images, tokens, tokens,
                                   jnp.ones_like(tokens))["params"])
  kernel = params["projector"]["Dense_0"]["kernel"]
  width = kernel.shape[0] // 2
  assert kernel.shape[0] == 2 * without.bind({"params": params}).img._config()["width"]

  def embed(model, kernel):
    p = {**params, "projector": {**params["projector"],
                                 "Dense_0": {**params["projector"]["Dense_0"], "kernel": kernel}}}
    return np.asarray(model.apply({"params": p}, images, method="embed_image"))
  np.testing.assert_allclose(embed(with_stem, kernel.at[:width].set(0)),
                             embed(without, kernel[width:]), rtol=1e-5, atol=1e-5)

  _, aux = with_stem.bind({"params": params}).img(images)
  stem = ConvStem(width, (8, 8)).apply({"params": params["img"]["conv_stem"]}, images)
  np.testing.assert_allclose(aux["embedded"], stem.reshape(2, -1, width)
                             + params["img"]["pos_embedding"], rtol=1e-5, atol=1e-5)
  stem_only = embed(with_stem, kernel.at[width:].set(0))
  dense_0 = params["projector"]["Dense_0"]
  hidden = np.asarray(aux["embedded"]) @ np.asarray(kernel[:width]) + np.asarray(dense_0["bias"])
  dense_1 = params["projector"]["Dense_1"]
  want = (np.asarray(jax.nn.gelu(hidden, approximate=False)) @ np.asarray(dense_1["kernel"])
          + np.asarray(dense_1["bias"]))
  np.testing.assert_allclose(stem_only, want, rtol=1e-4, atol=1e-4)
  assert not np.allclose(aux["embedded"], aux["encoded"], atol=1e-2)


@pytest.mark.unit
def test_image_positions_sequence_or_shared():
  """RoPE positions of [2 image tokens; 3 text tokens, 1 pad]: in raster
  order, or every image token at 0 and the text from 1; a pad repeats its
  predecessor's position."""
  from configs import clip_shapes
  image = clip_shapes.get_config("res=32").model.image.to_dict()
  full_input = jnp.array([[1, 1, 1, 1, 1, 0]])
  got = {mode: vlm_model.VisionLanguageModel(
      image=image, lm=dict(variant="mu", vocab_size=32), image_positions=mode).positions(
          2, full_input).tolist() for mode in vlm_model.IMAGE_POSITIONS}
  assert got == {"sequence": [[0, 1, 2, 3, 4, 4]], "shared": [[0, 0, 1, 2, 3, 3]]}


@pytest.mark.unit
@pytest.mark.parametrize("image_positions", vlm_model.IMAGE_POSITIONS)
def test_cached_generation_equals_greedy_reruns_of_the_whole_model(image_positions):
  """The task's jitted generation (prefill into a KV cache, then one token a
  step) gives, for right-padded prompts of different lengths, the tokens of
  re-running the uncached model on the growing text, each row alone."""
  from configs import clip_shapes
  image = clip_shapes.get_config("res=32").model.image.to_dict()
  model = vlm_model.VisionLanguageModel(image=image, lm=dict(variant="mu", vocab_size=32),
                                        image_positions=image_positions)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  prompt = jnp.array([[3, 4, 5, 0], [6, 7, 0, 0]], jnp.int32)
  prompt_mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), images, prompt, prompt,
                               prompt_mask)["params"])
  task = object.__new__(vlm.VisionLanguageTask)  # Only its generation, no data.
  task.model, task.decoder = model, decoder.Decoder(**model.lm)
  task.tokenizer = type("Ids", (), {"eos_id": 31, "pad_id": 0})()
  generated = np.asarray(task.generate_fn(5)(params, images, prompt, prompt_mask,
                                             jax.random.key(0)))
  # One fixed-length buffer (the valid tokens, then pads): one compilation.
  size = prompt.shape[1] + 5
  apply = jax.jit(lambda image, tokens, mask_ar, valid: model.apply(
      {"params": params}, image, tokens, mask_ar, valid))
  for row in range(2):
    text = list(np.asarray(prompt[row, :int(prompt_mask[row].sum())]))
    prompt_len = len(text)
    for _ in range(5):
      n = len(text)
      tokens = jnp.array([text + [0] * (size - n)], jnp.int32)
      mask_ar = (jnp.arange(size) >= prompt_len).astype(jnp.int32)[None]
      valid = (jnp.arange(size) < n).astype(jnp.int32)[None]
      logits = apply(images[row:row + 1], tokens, mask_ar, valid)
      text.append(int(jnp.argmax(logits[0, n - 1])))
    want = text[prompt_len:]
    if 31 in want:  # After EOS a row emits pads.
      want = want[:want.index(31) + 1] + [0] * (4 - want.index(31))
    assert generated[row].tolist() == want


@pytest.mark.unit
def test_align_trains_only_the_projector(data_dir, clip_workdir, tmp_path):
  """Stage align starts from the CLIP run's vision tower and the lm stage's
  LM (both trained on first use), freezes both: after training they are
  bit-identical to their sources, and only the projector moved."""
  config = vlm_config(data_dir, clip_workdir, "align", 3)
  task = vlm.VisionLanguageTask(config)
  start = {what: tree for what, tree in task.pretrained_params()}
  assert len(start) == 2
  trainer.train(task, config, str(tmp_path / "align"))
  after = trained_runs.eval_params(str(tmp_path / "align"), type(task))
  vision, lm = start.values()
  for path, value in optim.param_paths(vision).items():
    np.testing.assert_array_equal(optim.param_paths(after)[path], value, err_msg=path)
  for path, value in optim.param_paths(lm).items():
    np.testing.assert_array_equal(optim.param_paths(after)[path], value, err_msg=path)
  init = jax.tree.map(lambda x: x.value, task.init(jax.random.key(config.seed)),
                      is_leaf=lambda x: hasattr(x, "value"))
  moved = [p for p, v in optim.param_paths(after).items() if p.startswith("projector/")
           and not np.array_equal(v, optim.param_paths(init)[p])]
  assert moved


@pytest.mark.unit
def test_a_finished_run_does_not_need_its_vision_run_at_hand(data_dir, trainings_asked):
  """ask, caption and eval build a finished run's task: the tower's
  architecture comes from the vision run's config, not from a trained run
  (its weights are in the VLM's checkpoint). Only training asks for the run."""
  config = vlm_config(data_dir, None, "tune", 3)
  config.model.vision.config = "configs/clip_shapes.py:res=32"
  task = vlm.VisionLanguageTask(config)
  assert trainings_asked == []
  want = config_lib.load_config_file("configs/clip_shapes.py:res=32").model.image.to_dict()
  assert {k: task.model.image[k] for k in want} == want and task.image_size == 32
  assert task.vision_workdir == "/cached/clip"
  assert trainings_asked == ["configs/clip_shapes.py:res=32"]


@pytest.mark.quality
@pytest.mark.xdist_group(TRAINED_CLIP_GROUP)
def test_tiny_vlm_through_the_command_line(data_dir, trained_clip, tmp_path):
  """All stages through `run` (the earlier ones trained on first use) on the
  vision tower of conftest's CLI-trained CLIP: VQA answers colour and count
  questions far more often right than a model that ignores the image; then
  the `ask` and `caption` commands."""
  clip_workdir, _ = trained_clip
  workdir = tmp_path / "vlm"
  small = "res=64,batch=32,vision_layer=-1"
  args = [sys.executable, "-m", "experiments.train",
          f"configs/vlm_shapes.py:stage=tune,steps=600,{small}", f"--workdir={workdir}",
          f"--config.input.data_dir={data_dir}", f"--config.model.vision.workdir={clip_workdir}",
          f"--config.init.lm.config=configs/vlm_shapes.py:stage=lm,steps=300,{small}",
          f"--config.init.run.config=configs/vlm_shapes.py:stage=align,steps=300,{small}",
          *[f"--config.input.shapes_world.{k}={v}" for k, v in E2E_WORLD.items()]]
  run = subprocess.run(args, cwd=ROOT, env=full_optimisation_env(),
                       capture_output=True, text=True, timeout=1500)
  assert run.returncode == 0, run.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())["metrics"]
  # A model that ignores the image names a colour right 1 time in 8, and
  # counts 1, 2 or 3 objects right about 1 time in 3 (it got 0.51 and 0.97).
  assert results["vqa_test/accuracy_colour"] > 3 / 8, results
  assert results["vqa_test/accuracy_count"] > 0.7, results

  image_dir = tmp_path / "images"
  image_dir.mkdir()
  for i in range(3):
    ex = shapes_world.generate_example(0, "test", i, E2E_WORLD["image_size"])
    (image_dir / f"{i}.png").write_bytes(shapes_world.png_bytes(ex["image"]))
  ask = subprocess.run([sys.executable, "-m", "experiments.ask", f"--workdir={workdir}",
                        f"--image={image_dir}", "how many objects are there?"],
                       cwd=ROOT, env=full_optimisation_env(),
                       capture_output=True, text=True, timeout=600)
  assert ask.returncode == 0, ask.stderr[-3000:]
  lines = ask.stdout.strip().splitlines()
  assert len(lines) == 3 and all(line.startswith(str(image_dir)) for line in lines)
  assert all(line.rsplit(": ", 1)[1] in shapes_world.NUMBER_WORDS for line in lines), lines
  caption = subprocess.run([sys.executable, "-m", "experiments.caption", f"--workdir={workdir}",
                            f"--image={image_dir / '0.png'}"],
                           cwd=ROOT, env=full_optimisation_env(),
                           capture_output=True, text=True, timeout=600)
  assert caption.returncode == 0, caption.stderr[-3000:]
  assert caption.stdout.startswith(f"{image_dir / '0.png'}: ") and len(caption.stdout) > 20
  # A file that is not an image: one clear line, no traceback.
  (image_dir / "bad.png").write_bytes(b"not an image")
  bad = subprocess.run([sys.executable, "-m", "experiments.caption", f"--workdir={workdir}",
                        f"--image={image_dir / 'bad.png'}"],
                       cwd=ROOT, env=full_optimisation_env(),
                       capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert "bad.png" in bad.stderr.strip().splitlines()[-1]


# =========================================== the LM from a Hugging Face Llama


@pytest.fixture(scope="module")
def hf_llama_dir(tmp_path_factory):
  """A tiny random LlamaForCausalLM whose BPE tokenizer knows the world's words."""
  hf_models = pytest.importorskip("hf_models")
  rng = np.random.default_rng(0)
  texts = []
  for i in range(200):
    objects = shapes_world._sample_objects(rng, "train")
    questions, answers = shapes_world.make_questions(objects, rng)
    texts += shapes_world.make_captions(objects, rng) + questions + answers
  directory = tmp_path_factory.mktemp("llama")
  model = hf_models.save_tiny_llama(str(directory), texts)
  return str(directory), model


@pytest.mark.unit
def test_hf_llama_tokenizer_in_the_vlm_layout(hf_llama_dir):
  """The Llama family lays out ids as transformers' tokenizer does (BOS
  first); the VLM text keeps the prompt's BOS and no other."""
  transformers = pytest.importorskip("transformers")
  from multimodal.importers import hf_tokenizer
  directory, _ = hf_llama_dir
  tok = hf_tokenizer.load_hf_tokenizer(directory)
  assert tok.family == "llama" and tok.pad_id == tok.eos_id
  reference = transformers.AutoTokenizer.from_pretrained(directory)
  prompt, answer = "what colour is the circle?", "red"
  want = reference(prompt)["input_ids"]
  assert want[0] == tok.bos_id
  got = tok.encode([prompt], 32)[0]
  np.testing.assert_array_equal(got[:len(want) + 1], want + [tok.eos_id])
  out = preprocess.build("vlm_text(max_len=32)", tokenizer=tok)(
      {"prompt": tf.constant(prompt), "answer": tf.constant(answer)})
  text, mask_ar = out["text"].numpy(), out["mask_ar"].numpy()
  answer_ids = reference(answer, add_special_tokens=False)["input_ids"]
  n = len(want)
  np.testing.assert_array_equal(text[:n + len(answer_ids) + 1], want + answer_ids + [tok.eos_id])
  assert list(text).count(tok.bos_id) == 1 and mask_ar[:n].sum() == 0 and mask_ar[n] == 1
  assert tok.decode_batch(text[None, n:])[0] == answer


@pytest.mark.unit
def test_tune_from_hf_llama(data_dir, clip_workdir, hf_llama_dir):
  """--config.init.from_hf=DIR: the LM takes the checkpoint's architecture
  and tokenizer; the tune stage starts from an align run (trained on first
  use, from the HF weights, not from an "lm" stage) whose frozen LM is
  exactly the imported one, and whose logits match transformers'."""
  torch = pytest.importorskip("torch")
  from multimodal.importers import hf_llama
  directory, reference = hf_llama_dir
  config = vlm_config(data_dir, clip_workdir, "tune", 2)
  with config.unlocked():
    config.init.from_hf = directory
    config.init.lm.config = None  # Must not be needed.
  task = vlm.VisionLanguageTask(config)
  kwargs, imported = hf_llama.load_hf_llama(directory)
  assert task.lm_kwargs == kwargs
  assert task.tokenizer.vocab_size == reference.config.vocab_size
  (what, aligned), = task.pretrained_params()
  assert "aligned model" in what
  for path, value in optim.param_paths(imported).items():
    np.testing.assert_array_equal(optim.param_paths(aligned["llm"])[path], value, err_msg=path)
  ids, _ = task.prompt_tokens(["is there a red circle?", "how many objects are there?"])
  valid = ids != task.tokenizer.pad_id
  lm = decoder.Decoder(**kwargs)
  x = lm.apply({"params": aligned["llm"]}, jnp.asarray(ids), method="embed")
  positions = jnp.cumsum(valid, -1) - 1
  ours, _ = lm.apply({"params": aligned["llm"]}, x, positions=positions,
                     mask=decoder.make_attention_mask(jnp.ones_like(ids), valid))
  with torch.no_grad():
    want = reference(torch.from_numpy(ids.astype(np.int64)),
                     attention_mask=torch.from_numpy(valid.astype(np.int64))).logits.numpy()
  err = np.abs(np.asarray(ours) - want)[valid].max() / np.abs(want[valid]).max()
  assert err < 1e-4, err
