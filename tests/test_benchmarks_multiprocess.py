"""Embedding a split from two processes (jax.distributed over gloo on
127.0.0.1, 4 CPU devices each), the way a multi-host eval runs: the gathered
embeddings come back in split order and equal the model applied directly."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

pytestmark = pytest.mark.integration

WORKER = r'''
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
import numpy as np, tensorflow as tf
from multimodal.eval_suite import embedding, encoders
from multimodal.models import two_towers
from multimodal.parallel import sharding
model = two_towers.TwoTowers(image=dict(variant="mu/8"), text=dict(variant="mu", vocab_size=16),
                             out_dim=8)
images = np.random.default_rng(0).uniform(-1, 1, (13, 16, 16, 3)).astype(np.float32)
params = sharding.strip_boxes(model.init(jax.random.key(0), images[:1], np.zeros((1, 4), np.int32))["params"])
encoder = encoders.Encoder(model="m", pretrained="p", fingerprint="f", image_pp="value_range(-1, 1, -1, 1)",
                           tokenizer=None, max_len=4, module=model, params=params,
                           mesh=sharding.make_mesh({"data": -1}))
ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": np.arange(13)})
out, _ = embedding.embed_split(encoder, ds, batch_size=8, keys=("label",))
direct = model.apply({"params": params}, images, method=model.embed_image)[0]
np.savez(sys.argv[3], embedding=out["embedding"], label=out["label"], direct=np.asarray(direct),
         devices=jax.device_count())
'''


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_embed_in_split_order(tmp_path):
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen(
      [sys.executable, "-c", WORKER, str(port), str(i), str(tmp_path / f"{i}.npz")],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  for proc in procs:
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
  for i in range(2):
    out = np.load(tmp_path / f"{i}.npz")
    assert int(out["devices"]) == 8
    np.testing.assert_array_equal(out["label"], np.arange(13))
    np.testing.assert_allclose(out["embedding"], out["direct"], atol=1e-5)
