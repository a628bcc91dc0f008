"""Shared by the weight-import parity tests: the relative-error bar against a
PyTorch reference, and perturbing the reference so that no zero- or
one-initialised layer can hide a mapping bug."""
import numpy as np

TOL = 1e-4  # Max relative error, float32.


def rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def assert_parity(ours, ref, what):
  """||ours - ref|| / ||ref|| <= TOL, and every element within TOL * max|ref|."""
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
  err = rel_err(ours, ref)
  print(f"{what}: relative error {err:.2e}")
  assert err <= TOL, (what, err)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL * np.abs(ref).max(), err_msg=what)


def perturb_(module, scale=0.05, seed=0):
  """Adds N(0, scale) noise to every parameter of a torch module, in place."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(scale * torch.randn(p.shape, generator=gen))
