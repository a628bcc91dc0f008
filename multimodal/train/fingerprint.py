"""Layout-independent checksums of a tree of arrays, computed on device.

Each element's bits are mixed with its flat index and summed in uint32
(wrapping): a sum mod 2**32 is the same in any order, so the checksum of the
same values is bit-for-bit the same on any mesh, sharding or device count,
also for arrays that no process holds whole, and only a few bytes per array
come to the host. checkpoint.py records them at save time and checks them
at restore.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Two lanes of 32 bits each: 64 bits per array.
_SEEDS = (0x243F6A88, 0x85A308D3)
_INDEX_MULTIPLIER = 0x9E3779B1


def _fmix32(h):
  """murmur3's 32-bit finalizer: a bijection of uint32 (jnp or np arrays)."""
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _as_uint32_bits(x):
  """The bits of every element as uint32: 32-bit types as they are, 8 and 16
  bit types zero-extended, 64-bit types as two uint32 (a trailing dim of 2),
  complex as (real, imag), PRNG keys as their key data."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
  if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 8:
    x = x.astype(jnp.float32)  # Exact for the 4-bit floats.
  elif jnp.issubdtype(x.dtype, jnp.integer) and jnp.iinfo(x.dtype).bits < 8:
    x = x.astype(jnp.int8)
  size = jnp.dtype(x.dtype).itemsize
  if size in (4, 8):
    return lax.bitcast_convert_type(x, jnp.uint32)
  return lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(
      jnp.uint32)


def _flat_index(shape):
  """Each element's row-major flat index (mod 2**32), built from iotas so it
  is computed shard by shard without any resharding."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.uint32, shape, dim) * np.uint32(
        stride % 2**32)
    stride *= shape[dim]
  return index


def _lanes(x):
  """uint32[2]: for each lane, the wrapping sum over elements of
  fmix32(bits ^ fmix32(index * 0x9E3779B1 + seed)). A sum mod 2**32 is the
  same in any order, so on any mesh; fmix32 being a bijection, changing any
  single element always changes both lanes."""
  bits = _as_uint32_bits(x)
  index = _flat_index(bits.shape)
  return jnp.stack([
      jnp.sum(_fmix32(bits ^ _fmix32(index * np.uint32(_INDEX_MULTIPLIER)
                                     + np.uint32(seed))), dtype=jnp.uint32)
      for seed in _SEEDS])


def _is_finite(x):
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.all(jnp.isfinite(x))
  return jnp.array(True)


def _summaries(leaves):
  return (jnp.stack([_lanes(x) for x in leaves]),
          jnp.stack([_is_finite(x) for x in leaves]))


@functools.lru_cache(maxsize=None)
def _summarizer(out_sharding):
  # One jitted function per output sharding, so each state structure
  # compiles once.
  if out_sharding is None:
    return jax.jit(_summaries)
  return jax.jit(_summaries, out_shardings=(out_sharding, out_sharding))


def _key_str(key) -> str:
  for attr in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey, ...
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _as_array(x):
  """`x` if it is an array leaf (Python numbers become numpy scalars), else None."""
  if isinstance(x, (bool, int, float, complex)):
    x = np.asarray(x)
  dtype = getattr(x, "dtype", None)
  if dtype is None or not hasattr(x, "shape"):
    return None
  if (jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
      or jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_)):
    return x
  return None


def named_leaves(tree) -> list[tuple[str, object]]:
  """[(path, leaf)] of the array leaves (others, e.g. strings, are left out),
  paths "/"-joined like optim.param_paths ("params/img/.../kernel",
  "opt_state/1/0/mu/...")."""
  flat = [(path, _as_array(x)) for path, x in jax.tree_util.tree_leaves_with_path(tree)]
  flat = [(path, x) for path, x in flat if x is not None]
  names = ["/".join(_key_str(k) for k in path) for path, _ in flat]
  if len(set(names)) != len(names):  # Keys holding "/": unambiguous paths.
    names = [jax.tree_util.keystr(path) for path, _ in flat]
  return list(zip(names, (x for _, x in flat)))


def map_named(fn, tree):
  """jax.tree.map of fn(path, leaf) over the array leaves, with the paths of
  named_leaves; other leaves are kept as they are."""
  names = iter(name for name, _ in named_leaves(tree))
  return jax.tree.map(
      lambda x: fn(next(names), x) if _as_array(x) is not None else x, tree)


def dtype_str(dtype) -> str:
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return str(dtype)
  return str(jax.dtypes.canonicalize_dtype(dtype))


def summarize(tree) -> tuple[dict[str, str], list[str]]:
  """({path: 16 hex digits}, [paths of floating leaves not all finite]).

  Runs under jit where the arrays are, a group of leaves per device set; only
  two uint32 and a bool per leaf come to the host.
  """
  leaves = named_leaves(tree)
  if not leaves:
    return {}, []
  groups: dict = {}
  for i, (_, x) in enumerate(leaves):
    devices = (tuple(sorted(d.id for d in x.sharding.device_set))
               if isinstance(x, jax.Array) else None)
    groups.setdefault(devices, []).append(i)
  sums = [None] * len(leaves)
  finite = [True] * len(leaves)
  for indices in groups.values():
    arrays = [leaves[i][1] for i in indices]
    out_sharding = None
    first = arrays[0]
    if (jax.process_count() > 1 and isinstance(first, jax.Array)
        and isinstance(first.sharding, jax.sharding.NamedSharding)):
      # Replicated, so that every process holds the (tiny) results.
      out_sharding = jax.sharding.NamedSharding(
          first.sharding.mesh, jax.sharding.PartitionSpec())
    lanes, ok = _summarizer(out_sharding)(arrays)
    lanes, ok = (np.asarray(a if a.is_fully_addressable else a.addressable_data(0))
                 for a in (lanes, ok))
    for j, i in enumerate(indices):
      sums[i] = f"{int(lanes[j, 0]):08x}{int(lanes[j, 1]):08x}"
      finite[i] = bool(ok[j])
  names = [name for name, _ in leaves]
  return (dict(zip(names, sums)),
          [name for name, f in zip(names, finite) if not f])


def fingerprint(tree) -> dict[str, str]:
  """{leaf path: 64-bit checksum as 16 hex digits} of every array leaf.

  Layout-independent: the checksum mixes each element's bits with its flat
  index and sums in uint32 (wrapping), so it is bit-for-bit the same for the
  same values on any mesh, sharding or device count, also for arrays no
  process holds whole. Computed on device under jit.
  """
  return summarize(tree)[0]


def nonfinite_paths(tree) -> list[str]:
  """The paths of the floating leaves holding a NaN or an inf."""
  return summarize(tree)[1]
