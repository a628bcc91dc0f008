"""Importing Hugging Face CLIPModel / SiglipModel weights into TwoTowers (and
exporting CLIP back): numerical parity with transformers on random weights,
clear errors for what cannot be represented, and the tokenizer layout.

The reference models are tiny transformers models with random weights (no
network), every parameter perturbed so that no zero/one-initialised layer can
hide a mapping bug, saved with save_pretrained and read back through our
importer as a downloaded checkpoint would be.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.unit

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from conftest import assert_logically_partitioned  # noqa: E402
from hf_models import CONFIGS, make_hf, train_bpe  # noqa: E402
from parity import TOL, assert_parity, rel_err  # noqa: E402
from multimodal.importers import hf_clip, hf_tokenizer, safetensors_io as io  # noqa: E402
from multimodal.importers.safetensors_io import WeightImportError  # noqa: E402
from multimodal.models import two_towers  # noqa: E402


def text_inputs(name, rng):
  """(ids, attention_mask) rows with the pooled token at different places.

  CLIP: [bos] + words + [eos] + pads, 12 of 16 positions (the tower slices
  its position table); legacy eos=2 rows mark the "eos" with the largest
  id, which is what HF's argmax finds. SigLIP: padded to all 16 positions
  with pad = eos, as its processor does; pooling reads the last (a pad)."""
  model_type, cfg = CONFIGS[name]
  text = cfg["text_config"]
  length = 12 if model_type == "clip" else text["max_position_embeddings"]
  eos, pad = text["eos_token_id"], text["pad_token_id"]
  marker = text["vocab_size"] - 1 if eos == hf_clip.LEGACY_EOS_ID else eos
  ids = np.full((4, length), pad, np.int64)
  mask = np.zeros((4, length), np.int64)
  for row, n_words in enumerate((1, 4, length - 3, 0)):
    words = list(rng.randint(5, text["vocab_size"] - 1, n_words))
    seq = ([text["bos_token_id"]] if model_type == "clip" else []) + words + [marker]
    ids[row, :len(seq)] = seq
    mask[row, :len(seq)] = 1
  return ids, mask


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
  """(name, hf model, saved directory, images NCHW, ids, mask)."""
  name = request.param
  model = make_hf(name)
  directory = str(tmp_path_factory.mktemp(name))
  model.save_pretrained(directory)
  rng = np.random.RandomState(1)
  size = CONFIGS[name][1]["vision_config"]["image_size"]
  images = rng.randn(3, 3, size, size).astype(np.float32)
  ids, mask = text_inputs(name, rng)
  return name, model, directory, images, ids, mask


def hf_outputs(name, model, images, ids, mask):
  """Unnormalised image/text features and logits_per_image, as HF computes
  them. CLIP gets the attention mask its processor returns; SigLIP none
  (big_vision's training computation; see hf_clip's docstring)."""
  kw = {"attention_mask": torch.from_numpy(mask)} if CONFIGS[name][0] == "clip" else {}
  with torch.no_grad():
    x, t = torch.from_numpy(images), torch.from_numpy(ids)
    zimg = model.get_image_features(pixel_values=x).pooler_output.numpy()
    ztxt = model.get_text_features(input_ids=t, **kw).pooler_output.numpy()
    logits = model(input_ids=t, pixel_values=x, **kw).logits_per_image.numpy()
  return zimg, ztxt, logits


def our_outputs(kwargs, params, images, ids):
  """(raw image features, raw text features, zimg, ztxt, logits) of TwoTowers."""
  model = two_towers.TwoTowers(**kwargs)

  def run(p, x, t):
    raw_img = model.apply({"params": p}, x, method=lambda m, a: m.img(a)[0])
    raw_txt = model.apply({"params": p}, t, method=lambda m, a: m.txt(a)[0])
    zimg, ztxt, aux = model.apply({"params": p}, x, t)
    logits = zimg @ ztxt.T * aux["t"] + aux.get("b", 0.0)
    return raw_img, raw_txt, zimg, ztxt, logits

  return jax.jit(run)(params, images.transpose(0, 2, 3, 1), jnp.asarray(ids, jnp.int32))


def our_logits(kwargs, params, images, ids):
  """Just TwoTowers' logits (one tower pass each: half our_outputs' compile)."""
  model = two_towers.TwoTowers(**kwargs)

  def run(p, x, t):
    zimg, ztxt, aux = model.apply({"params": p}, x, t)
    return zimg @ ztxt.T * aux["t"] + aux.get("b", 0.0)

  return jax.jit(run)(params, images.transpose(0, 2, 3, 1), jnp.asarray(ids, jnp.int32))


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ====================================================================== parity


def test_parity(case):
  name, model, directory, images, ids, mask = case
  kwargs, params = hf_clip.load_hf_clip(directory)
  assert all(v.dtype == np.float32 for v in jax.tree.leaves(params))
  ref_img, ref_txt, ref_logits = hf_outputs(name, model, images, ids, mask)
  raw_img, raw_txt, zimg, ztxt, logits = our_outputs(kwargs, params, images, ids)
  assert_parity(raw_img, ref_img, f"{name} image features")
  assert_parity(raw_txt, ref_txt, f"{name} text features")
  assert_parity(zimg, unit(ref_img), f"{name} image embedding")
  assert_parity(ztxt, unit(ref_txt), f"{name} text embedding")
  assert_parity(logits, ref_logits, f"{name} logits_per_image")


def test_parity_is_sensitive_to_mapping_details(case):
  """Not vacuous: the HF details the importer gets right each move the
  logits by far more than the tolerance when changed -- except exact vs tanh
  GELU, which differ by < 5e-4 anywhere and so only just fail parity."""
  name, model, directory, images, ids, mask = case
  kwargs, params = hf_clip.load_hf_clip(directory)
  _, _, ref = hf_outputs(name, model, images, ids, mask)
  image, text = kwargs["image"], kwargs["text"]
  swap = "quick_gelu" if image["mlp_activation"] == "gelu_tanh" else "gelu_tanh"
  changed = {"activation": dict(kwargs, image=dict(image, mlp_activation=swap),
                                text=dict(text, mlp_activation=swap))}
  if CONFIGS[name][0] == "clip":
    changed["pooling"] = dict(kwargs, text=dict(text, pool="last"))
    changed["pre_norm"] = dict(kwargs, image=dict(image, pre_norm=False))
  else:
    changed["causal"] = dict(kwargs, text=dict(text, causal=True))
  for what, kw in changed.items():
    if what == "pre_norm":
      p = dict(params, img={k: v for k, v in params["img"].items() if k != "norm_pre"})
    else:
      p = params
    err = rel_err(our_logits(kw, p, images, ids), ref)
    print(f"{name} with {what} changed: relative error {err:.2e}")
    exact_vs_tanh = what == "activation" and image["mlp_activation"] == "gelu"
    assert err > (2 if exact_vs_tanh else 100) * TOL, (name, what, err)
  if CONFIGS[name][0] == "siglip":  # q and k swapped inside the packed in_proj.
    attn = params["img"]["MAPHead_0"]["MultiHeadDotProductAttention_0"]
    swapped = jax.tree.map(lambda a: a, params)
    head = swapped["img"]["MAPHead_0"]["MultiHeadDotProductAttention_0"]
    head["query_kernel"], head["key_kernel"] = attn["key_kernel"], attn["query_kernel"]
    assert rel_err(our_logits(kwargs, swapped, images, ids), ref) > 100 * TOL


def test_imported_kwargs_and_partitioning(case):
  """The kwargs say what each HF model computes, and our init from them is
  fully logically partitioned with exactly the imported tree's shapes."""
  name, _, directory, images, _, _ = case
  kwargs, params = hf_clip.load_hf_clip(directory)
  model_type, cfg = CONFIGS[name]
  image, text = kwargs["image"], kwargs["text"]
  assert text["pad_id"] is None and text["max_len"] == 16
  if model_type == "clip":
    assert image["pool_type"] == "tok" and image["pre_norm"] and not image["patch_bias"]
    assert not image["head_bias"] and not text["head_bias"] and text["causal"]
    legacy = cfg["text_config"]["eos_token_id"] == hf_clip.LEGACY_EOS_ID
    assert text["pool"] == ("argmax" if legacy else "eos")
    assert kwargs["bias_init"] is None and kwargs["out_dim"] == cfg["projection_dim"]
    assert "b" not in params
  else:
    assert image["pool_type"] == "map" and image["projection"] is False
    assert "head" not in params["img"] and "bias" in params["txt"]["head"]
    assert (text["pool"], text["causal"]) == ("last", False)
    assert kwargs["bias_init"] is not None and params["b"].shape == ()
  size = cfg["vision_config"]["image_size"]
  assert hf_clip.image_shape(json.load(open(f"{directory}/config.json"))) == (size, size, 3)
  model = two_towers.TwoTowers(**kwargs)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), images.transpose(0, 2, 3, 1)[:1],
                         jnp.zeros((1, text["max_len"]), jnp.int32))["params"]
  assert_logically_partitioned(boxed)
  io.check_tree(params, boxed)


# ====================================================================== export


@pytest.mark.parametrize("name", ["clip_quick_gelu", "clip_gelu_legacy_eos"])
def test_clip_export_roundtrip(name, tmp_path):
  """Import -> export -> transformers loads it with no missing, unexpected or
  mis-shaped keys and the exact original tensors; re-import gives the same
  kwargs and arrays."""
  model = make_hf(name)
  model.save_pretrained(str(tmp_path / "hf"))
  kwargs, params = hf_clip.load_hf_clip(str(tmp_path / "hf"))
  out = str(tmp_path / "export")
  hf_clip.export_clip(kwargs, params, out,
                      bos_token_id=CONFIGS[name][1]["text_config"]["bos_token_id"])
  loaded, info = transformers.CLIPModel.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info.get("mismatched_keys"), info
  want = model.state_dict()
  got = loaded.state_dict()
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k].numpy(), want[k].numpy(), err_msg=k)
  kwargs2, params2 = hf_clip.load_hf_clip(out)
  assert kwargs2 == kwargs
  flat, flat2 = io.flatten(params), io.flatten(params2)
  assert flat.keys() == flat2.keys()
  for k in flat:
    np.testing.assert_array_equal(flat2[k], flat[k], err_msg=k)


def test_export_of_our_own_model(tmp_path):
  """A model of ours (variant names, pad masking, boxed device arrays) in
  CLIP's shape exports to an HF CLIPModel computing the same logits: with
  pad_id != eos_id our pad mask and HF's unmasked causal attention agree
  at the EOS. What HF CLIP cannot compute is refused, naming the field."""
  kwargs = dict(
      image=dict(variant="mu/8", pool_type="tok", pre_norm=True, patch_bias=False,
                 head_bias=False, mlp_activation="quick_gelu", norm_eps=1e-5),
      text=dict(variant="mu", vocab_size=50, causal=True, pool="eos", eos_id=1, pad_id=0,
                max_len=8, head_bias=False),
      out_dim=16, temperature_init=20.0)
  model = two_towers.TwoTowers(**kwargs)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)),
                          jnp.zeros((1, 8), jnp.int32))["params"]
  assert_logically_partitioned(shapes)
  rng = np.random.RandomState(0)
  boxed = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype), shapes)
  cfg = hf_clip.export_clip(kwargs, boxed, str(tmp_path / "ok"))
  assert cfg["vision_config"]["image_size"] == 16 and cfg["text_config"]["vocab_size"] == 50
  hf = transformers.CLIPModel.from_pretrained(str(tmp_path / "ok")).eval()
  images = rng.randn(2, 3, 16, 16).astype(np.float32)
  ids = np.asarray([[5, 9, 1, 0, 0, 0], [7, 1, 0, 0, 0, 0], [3, 4, 8, 6, 2, 1]])
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(ids),
             pixel_values=torch.from_numpy(images)).logits_per_image.numpy()
  assert_parity(our_logits(kwargs, boxed, images, ids), ref, "exported model logits")
  for tower, field, value in (("image", "pool_type", "map"), ("image", "pre_norm", False),
                              ("text", "causal", False), ("text", "pool", "last"),
                              ("text", "head_bias", True), ("image", "projection", False)):
    bad = dict(kwargs, **{tower: dict(kwargs[tower], **{field: value})})
    with pytest.raises(WeightImportError, match=f"{field}"):
      hf_clip.clip_config(bad, boxed)
  siglip = hf_clip.two_towers_kwargs_from_config(
      {"model_type": "siglip", **CONFIGS["siglip_map"][1]})
  with pytest.raises(WeightImportError, match="bias_init"):
    hf_clip.clip_config(siglip, boxed)
  with pytest.raises(WeightImportError, match="pad_id equals eos_id"):
    hf_clip.clip_config(dict(kwargs, text=dict(kwargs["text"], pad_id=1)), boxed)


# ====================================================================== errors


def _cfg(kind, changes):
  """CONFIGS' first config of model type ``kind`` with top-level /
  "text_config.x" / "vision_config.x" fields changed."""
  name = next(n for n, (t, _) in CONFIGS.items() if t == kind)
  cfg = json.loads(json.dumps({"model_type": kind, **CONFIGS[name][1]}))
  for key, value in changes.items():
    *parent, leaf = key.split(".")
    (cfg[parent[0]] if parent else cfg)[leaf] = value
  return cfg


@pytest.mark.parametrize("model_type,field,value", [
    ("clip", "model_type", "clip_vision_model"),
    ("clip", "vision_config.hidden_act", "relu"),
    ("clip", "text_config.eos_token_id", [3, 4]),
    ("clip", "vision_config.image_size", [32, 24]),
    ("clip", "vision_config.num_attention_heads", 3),
    ("clip", "text_config.layer_norm_eps", 0),
    ("clip", "projection_dim", 0),
    ("siglip", "vision_config.vision_use_head", False),
    ("siglip", "text_config.projection_size", 48),
    ("siglip", "text_config.projection_size", None),  # = the text width 48, not 32.
])
def test_unsupported_config_names_the_field(model_type, field, value):
  with pytest.raises(WeightImportError, match=f"field {field}="):
    hf_clip.two_towers_kwargs_from_config(_cfg(model_type, {field: value}))


def test_config_defaults_and_legacy_dicts():
  """Missing fields take transformers' defaults (ViT-B/32 CLIP); old configs'
  text_config_dict overrides text_config as in transformers."""
  kwargs = hf_clip.two_towers_kwargs_from_config({"model_type": "clip"})
  assert kwargs["image"]["patch_size"] == (32, 32) and kwargs["image"]["width"] == 768
  assert kwargs["image"]["mlp_activation"] == "quick_gelu"
  assert kwargs["image"]["norm_eps"] == 1e-5 and kwargs["out_dim"] == 512
  assert kwargs["text"]["max_len"] == 77 and kwargs["text"]["eos_id"] == 49407
  assert kwargs["temperature_init"] == pytest.approx(1 / 0.07, rel=1e-4)
  old = hf_clip.two_towers_kwargs_from_config(
      {"model_type": "clip", "text_config": {"eos_token_id": 5},
       "text_config_dict": {"eos_token_id": 2}})
  assert old["text"]["pool"] == "argmax"
  siglip = hf_clip.two_towers_kwargs_from_config({"model_type": "siglip"})
  assert siglip["image"]["mlp_activation"] == "gelu_tanh" and siglip["out_dim"] == 768
  assert siglip["text"]["norm_eps"] == 1e-6 and siglip["text"]["max_len"] == 64


def test_checkpoint_errors(case):
  name, _, directory, _, _, _ = case
  cfg, state = io.read_model_dir(directory)
  key = "text_model.final_layer_norm.weight"
  with pytest.raises(WeightImportError, match=f"no tensor '{key}'"):
    hf_clip.convert({k: v for k, v in state.items() if k != key}, cfg)
  with pytest.raises(WeightImportError, match="not mapped.*extra.weight"):
    hf_clip.convert({**state, "extra.weight": np.zeros(3)}, cfg)
  # Old checkpoints' position_ids buffers are not an error.
  hf_clip.convert({**state, "vision_model.embeddings.position_ids": np.arange(3)}, cfg)
  wider = json.loads(json.dumps(cfg))
  wider["vision_config"]["intermediate_size"] = 72
  with pytest.raises(WeightImportError, match="mis-shaped"):
    hf_clip.convert(state, wider)


def test_unprojected_tower_width_must_be_out_dim():
  image = dict(variant="mu/8", pool_type="map", projection=False)
  text = dict(vocab_size=20, variant="mu")
  with pytest.raises(ValueError, match="image tower has projection=False.*out_dim=16"):
    jax.eval_shape(two_towers.TwoTowers(image=image, text=text, out_dim=16).init,
                   jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 4), jnp.int32))
  tower = two_towers.text_tower(dict(text, projection=False), out_dim=64)
  assert tower.num_classes is None


# ====================================================================== tokenizer

TEXTS = ["a red circle", "The blue square on the left of a red circle",
         "a red circle on the right of the blue square of a blue circle on the left", ""]


def test_clip_tokenizer_matches_transformers(tmp_path):
  """transformers' own CLIPTokenizer (its RobertaProcessing bos/eos rule)
  with padding="max_length" and truncation, saved and read back by us."""
  bpe = json.loads(train_bpe(["<|startoftext|>", "<|endoftext|>"], True).to_str())
  vocab, merges = bpe["model"]["vocab"], bpe["model"]["merges"]
  merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
  hf = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
  hf.save_pretrained(str(tmp_path))
  ours = hf_tokenizer.load_hf_tokenizer(str(tmp_path))
  assert (ours.family, ours.eos_id, ours.pad_id, ours.bos_id) == ("clip", 1, 1, 0)
  for max_len in (6, 12):
    want = hf(TEXTS, padding="max_length", truncation=True, max_length=max_len)["input_ids"]
    got = ours.encode(TEXTS, max_len)
    assert got.dtype == np.int32 and got.shape == (len(TEXTS), max_len)
    np.testing.assert_array_equal(got, np.asarray(want), err_msg=f"max_len={max_len}")
  assert ours.decode(ours.encode("a red circle", 12)[0]) == "a red circle"


def test_siglip_tokenizer_layout(tmp_path):
  """SigLIP: tokens + eos, pad (= eos) to max_len, content truncated first;
  the same as transformers' fast tokenizer with SigLIP's "$A </s>" template."""
  from tokenizers import processors
  tok = train_bpe(["<pad>", "</s>", "<unk>"], False)
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "SiglipTokenizer", "eos_token": "</s>", "pad_token": "</s>",
       "unk_token": "<unk>"}))
  ours = hf_tokenizer.load_hf_tokenizer(str(tmp_path))
  eos = tok.token_to_id("</s>")
  assert (ours.family, ours.eos_id, ours.pad_id) == ("siglip", eos, eos)
  tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[
      ("</s>", eos)])
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>",
                                            pad_token="</s>", unk_token="<unk>")
  for max_len in (5, 16):
    got = ours.encode(TEXTS, max_len)
    want = hf(TEXTS, padding="max_length", truncation=True, max_length=max_len)["input_ids"]
    np.testing.assert_array_equal(got, np.asarray(want), err_msg=f"max_len={max_len}")
    for row, text in zip(got, TEXTS):  # The documented rule, spelled out.
      ids = tok.encode(text, add_special_tokens=False).ids[:max_len - 1] + [eos]
      np.testing.assert_array_equal(row, ids + [eos] * (max_len - len(ids)))


def test_tokenizer_errors(tmp_path):
  with pytest.raises(WeightImportError, match="tokenizer.json does not exist.*spiece.model"):
    (tmp_path / "spiece.model").write_bytes(b"")
    hf_tokenizer.load_hf_tokenizer(str(tmp_path))
  train_bpe(["<pad>", "</s>"], False).save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(WeightImportError, match="pass family="):
    hf_tokenizer.load_hf_tokenizer(str(tmp_path))
  with pytest.raises(WeightImportError, match="bos_token '<\\|startoftext\\|>' is not in"):
    hf_tokenizer.load_hf_tokenizer(str(tmp_path), family="clip")
  assert hf_tokenizer.load_hf_tokenizer(str(tmp_path), family="siglip").eos_id == 1
