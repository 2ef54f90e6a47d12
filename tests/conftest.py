"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.netlab import NodeLab, netlab_unavailable_reason


@pytest.fixture
def netlab() -> Iterator[NodeLab]:
    """A fresh node lab with pods ``pod1``..``pod3`` and one external client ``ext``.

    Skips (not fails) where labs cannot be built: not root, or no usable ``ip netns``.
    """
    reason = netlab_unavailable_reason()
    if reason is not None:
        pytest.skip(f"netlab unavailable: {reason}")
    with NodeLab() as lab:
        for name in ("pod1", "pod2", "pod3"):
            lab.add_pod(name)
        lab.add_client("ext")
        yield lab
