"""`./launch.sh test` keeps the tests that share conftest's `trained_clip` on
one pytest-xdist worker (--dist loadgroup), so that the CLIP is trained once
per suite rather than once per worker. The grouping works by a suffix that
xdist appends to each grouped test's node id; pytest 9.2 drops it without a
word (pytest-dev/pytest-xdist#1386), which pyproject.toml's pin avoids and
this test would catch."""
import pytest

from conftest import TRAINED_CLIP_GROUP

pytestmark = pytest.mark.unit


@pytest.mark.xdist_group(TRAINED_CLIP_GROUP)
def test_grouped_tests_carry_their_group_in_the_node_id(request):
  # xdist sets `loadgroup` on its workers' options (their own `dist` is "no").
  if not getattr(request.config.option, "loadgroup", False):
    pytest.skip("grouping applies under --dist loadgroup (./launch.sh test)")
  assert request.node.nodeid.endswith(f"@{TRAINED_CLIP_GROUP}"), (
      f"{request.node.nodeid}: pytest-xdist's loadgroup no longer marks grouped "
      "tests, so each worker would train `trained_clip` itself; pin a pytest "
      "that keeps xdist's node-id suffix (see pyproject.toml).")
