r"""The shapes-world CLIP of clip_shapes.py trained with SigLIP's sigmoid loss.

  ./launch.sh run configs/siglip_shapes.py
"""
from configs import clip_shapes


def get_config(arg=None):
  arg = f"loss=sigmoid,{arg}" if arg else "loss=sigmoid"
  return clip_shapes.get_config(arg)
