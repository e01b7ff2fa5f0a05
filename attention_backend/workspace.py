"""Process-wide pool of Prism scratch workspaces.

Attention layers run one after another, so every layer with the same head shape can share one
workspace. The exception is vLLM's dual-batch overlap (DBO), which builds one metadata builder
per micro-batch for the same layers and may run the micro-batches interleaved: each builder of
the same layer group therefore gets its own *lane*. Lane 0 is reserved while the model is being
built (from the first Prism impl's constructor), so its memory is part of what vLLM's memory
profiling sees; profiling itself skips attention and would not see a lazily allocated buffer.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch

__all__ = ["WorkspaceNeed", "WorkspacePool", "POOL"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkspaceNeed:
    """Worst case one Prism launch must fit (``PrismWorkspace.sizes_for`` arguments)."""

    max_num_batched_tokens: int
    max_model_len: int
    max_num_seqs: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    attend_dtype: Optional[torch.dtype] = None
    """Model dtype of the FA3 attend buffers (None: Triton attend step, no such buffers)."""
    block_size: int = 128
    """Prism block size (PrismConfig.block_size, through the layers' PrismParams)."""
    attend_layouts: tuple[str, ...] = ("head",)
    """FA3 attend layouts the buffers must serve (``AttendWorkspace``; unused without attend_dtype)."""

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.num_q_heads, self.num_kv_heads, self.head_dim, self.block_size)

    def covers(self, other: "WorkspaceNeed") -> bool:
        return (
            self.shape == other.shape
            and (other.attend_dtype is None or self.attend_dtype == other.attend_dtype)
            and set(other.attend_layouts) <= set(self.attend_layouts)
            and self.max_num_batched_tokens >= other.max_num_batched_tokens
            and self.max_model_len >= other.max_model_len
            and self.max_num_seqs >= other.max_num_seqs
        )

    def union(self, other: "WorkspaceNeed") -> "WorkspaceNeed":
        assert self.shape == other.shape
        return replace(
            self,
            max_num_batched_tokens=max(self.max_num_batched_tokens, other.max_num_batched_tokens),
            max_model_len=max(self.max_model_len, other.max_model_len),
            max_num_seqs=max(self.max_num_seqs, other.max_num_seqs),
            attend_dtype=self.attend_dtype or other.attend_dtype,
            attend_layouts=self.attend_layouts + tuple(x for x in other.attend_layouts if x not in self.attend_layouts),
        )


class WorkspacePool:
    def __init__(self) -> None:
        self._lanes: dict[tuple, tuple[WorkspaceNeed, Any]] = {}
        self._owners: dict[tuple, "weakref.WeakSet[Any]"] = {}

    def clear(self) -> None:
        self._lanes.clear()
        self._owners.clear()

    def get(
        self,
        device: torch.device,
        lane: int,
        need: WorkspaceNeed,
        allocate: Callable[[WorkspaceNeed, torch.device], Any],
    ) -> Any:
        """The workspace of ``lane`` for ``need``'s head shape on ``device``, allocated (or
        grown) when the one there does not cover ``need``."""
        device = torch.device(device)
        key = (str(device), lane, need.shape)
        have = self._lanes.get(key)
        if have is not None and have[0].covers(need):
            return have[1]
        if have is not None:
            need = have[0].union(need)
        ws = allocate(need, device)
        self._lanes[key] = (need, ws)
        logger.debug("prism: workspace lane %d on %s sized for %s", lane, device, need)
        return ws

    def lane_for(self, owner: Any, group_key: tuple) -> int:
        """A lane not used by another live owner of the same layer group (DBO micro-batches)."""
        owners = self._owners.setdefault(group_key, weakref.WeakSet())
        lane = len(owners)
        owners.add(owner)
        return lane


POOL = WorkspacePool()
