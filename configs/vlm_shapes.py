r"""A small vision-language model on the shapes world, in LLaVA's stages.

  ./launch.sh run configs/vlm_shapes.py                # all stages (the others on first use)
  ./launch.sh run configs/vlm_shapes.py:stage=align    # one stage
  ./launch.sh run configs/vlm_shapes.py:projector=linear,causal=True
  ./launch.sh run configs/vlm_shapes.py:projector=block,stem_features=True  # attending
  ./launch.sh run configs/vlm_shapes.py:questions=6       # an image's questions as one dialogue
  ./launch.sh run configs/vlm_shapes.py --config.init.from_hf=DIR   # a HF Llama as the LM

stage=lm: the decoder learns the world's text; stage=align: only the
projector trains, between the frozen vision tower of a CLIP run
(configs/clip_shapes.py:variant=nano/32,res=96, trained on first use; tower=
and res= pick another) and the frozen LM; stage=tune
(the default): projector and LM learn VQA and captioning. Each stage starts
from the previous one's run, trained on first use and cached in
<data_dir>/trained_runs/ (`config.init.*.workdir` points at runs of your own).
"""
from ml_collections import config_dict

from configs import clip_shapes
from multimodal.config import config_lib

STEPS = {"lm": 1500, "align": 600, "tune": 5000}
MAX_LEN = 48  # Prompt + answer tokens; the longest caption fits.
MAX_PROMPT_LEN = 16  # Questions and the caption prompt.


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, stage="tune", steps=0, batch=64, lm="mu",
                             projector="mlp", causal=False, vision_layer=-4,
                             stem_features=False, image_positions="sequence", questions=1,
                             p_caption=0.3, lr=0.0, res=96, tower="nano/32")
  c = config_dict.ConfigDict()
  c.task = "vlm"
  c.stage = arg.stage
  c.seed = 0

  c.total_steps = config_dict.placeholder(int)
  c.total_epochs = config_dict.placeholder(float)
  c.total_examples = config_dict.placeholder(int)
  c.total_steps = arg.steps or STEPS.get(arg.stage, 1000)

  c.input = config_dict.ConfigDict()
  c.input.data = "shapes_world"
  c.input.data_dir = config_dict.placeholder(str)
  c.input.shapes_world = dict(clip_shapes.SHAPES_WORLD)
  c.input.split = "train"
  c.input.batch_size = arg.batch
  c.input.shuffle_buffer = 10_000
  # Training records whose pp fails (an undecodable image, an empty caption)
  # are skipped; the run stops when more than this fraction of those read
  # were (pipeline.StreamTracker.check).
  c.input.max_skipped_fraction = 0.01
  c.input.tokenizer = dict(model=config_dict.placeholder(str), vocab_size=256)
  c.input.max_len = MAX_LEN
  c.input.max_prompt_len = MAX_PROMPT_LEN
  res = arg.res  # The vision run's input size.
  image_pp = f"decode|resize({res})|value_range(-1,1)"
  mode = {"lm": "mix", "align": "caption", "tune": "mix"}[arg.stage]
  p_caption = 0.5 if arg.stage == "lm" else arg.p_caption
  # questions > 1: that many of an image's questions in one text, a dialogue.
  questions = f", questions={arg.questions}" if arg.stage == "tune" and arg.questions > 1 else ""
  text_pp = (f'|vlm_task(mode="{mode}", p_caption={p_caption}{questions})'
             f"|vlm_text(max_len={MAX_LEN})")
  keys = '"text", "mask_ar", "mask_loss", "input_mask"'
  c.input.pp = (image_pp + text_pp + f'|keep("image", {keys})' if arg.stage != "lm"
                else text_pp[1:] + f"|keep({keys})")

  c.model = config_dict.ConfigDict()
  # The vision tower: a CLIP/SigLIP run (its `image` config and weights).
  # A 32 px patch at res 96 makes one token per cell of the world's 3x3 grid,
  # so a token sees one object. Of its 4 blocks, the first one's features
  # (vision_layer=-4) taught the VLM more than the last one's (VQA 0.835 vs
  # 0.814 at 3000 tune steps; docs/families/vlm.md).
  c.model.vision = dict(workdir=config_dict.placeholder(str),
                        config=f"configs/clip_shapes.py:variant={arg.tower},res={arg.res}")
  c.model.lm = dict(variant=arg.lm, tie_embeddings=False)
  c.model.projector = arg.projector
  c.model.vision_layer = arg.vision_layer
  c.model.stem_features = arg.stem_features
  # "shared": every image token at RoPE position 0 (models/vlm.py); on the
  # shapes world it lost position questions (docs/families/vlm.md).
  c.model.image_positions = arg.image_positions
  c.model.causal = arg.causal
  # Where each stage starts: the runs of the previous stages.
  c.init = config_dict.ConfigDict()
  # The earlier stages share this config's args (but stage, steps, lr, and
  # questions, which only stage tune reads) and its model.vision (passed on
  # by the task); the text-only lm stage only the args it reads, so that one
  # LM serves every vision setting.
  same = ",".join(f"{k}={v}" for k, v in arg.items()
                  if k not in ("stage", "steps", "lr", "questions"))
  c.init.lm = dict(workdir=config_dict.placeholder(str),
                   config=f"configs/vlm_shapes.py:stage=lm,lm={arg.lm},batch={arg.batch}")
  c.init.run = dict(workdir=config_dict.placeholder(str),
                    config=f"configs/vlm_shapes.py:stage=align,{same}")
  # A local Hugging Face LlamaForCausalLM directory (config.json, safetensors,
  # tokenizer.json): its architecture, weights and tokenizer replace model.lm,
  # the "lm" stage and the world's tokenizer.
  c.init.from_hf = config_dict.placeholder(str)

  c.compute_dtype = "float32"
  # Memory for time: microbatches per step (accumulate.py) and which block
  # activations the backward pass recomputes (layers.REMAT_POLICIES).
  c.grad_accum_steps = 1
  c.grad_accum_unroll = False
  c.remat = "none"
  c.lr = arg.lr or {"lm": 3e-3, "align": 3e-3, "tune": 1e-3}[arg.stage]
  c.wd = 1e-4
  c.wd_mask = r".*/kernel"
  c.grad_clip_norm = 1.0
  c.schedule = dict(warmup_steps=100, decay_type="cosine", min_lr_ratio=0.0)
  c.ema_decay = config_dict.placeholder(float)
  # Frozen: the vision tower always; in "align" the LM too.
  c.freeze = config_dict.placeholder(str)
  c.freeze = {"lm": None, "align": "img/.*|llm/.*", "tune": "img/.*"}[arg.stage]
  c.lr_mults = ()

  c.mesh = dict(data=-1, fsdp=1, tensor=1)  # e.g. --config.mesh.fsdp=8
  c.log_steps = 50
  c.ckpt_steps = 500
  c.keep_ckpts = 1
  c.eval_every = 0

  c.evals = config_dict.ConfigDict()
  if arg.stage != "lm":
    # num_objects splits the accuracy by the objects in the scene.
    eval_keys = '"image", "prompt", "answer", "question", "num_objects"'
    for split in ("test", "test_novel") if arg.stage == "tune" else ():
      c.evals[f"vqa_{split}"] = dict(
          type="vqa", split=split, max_new_tokens=4, batch_size=256,
          pp=image_pp + '|vlm_task(mode="vqa")|copy("prompt", "question")'
          f"|keep({eval_keys})")
    c.evals.captioning = dict(
        type="captioning", split="test", max_new_tokens=MAX_LEN - 2, batch_size=256,
        pp=image_pp + '|vlm_task(mode="caption")|object_attributes()'
        '|keep("image", "prompt", "captions", "colours", "shapes")')
  return c
