"""A preallocated slot KV cache: `slots` sequences × `context` positions per layer, written in place.

A request takes a free slot, writes its keys/values at its own positions and leaves the slot when it
ends; nothing is concatenated, padded or `index_select`ed when batches change. It plugs into any
transformers model that calls `cache.update(key, value, layer_idx)` (the `Cache` interface), the model
receiving a 4D additive mask that lets each query see only its own slot's positions up to itself.

Each forward is described by a `StepPlan`: which slots its batch rows are (`rows`), where each row's new
tokens go (`write`, one position per query; padding queries write to the scratch position `context`,
which no mask ever exposes) and how many positions attention reads (`width`). Tensors are allocated on
the first `update`, on the device and in the dtype of the keys the model produces, so the cache
follows the model wherever it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass
class StepPlan:
    rows: slice | torch.Tensor  # slots of the batch rows: a slice (decode) or slot indices (prefill)
    slots: torch.Tensor  # [n] slot index of each row (for writing)
    write: torch.Tensor  # [n, q] cache position of each query; `context` (scratch) for padding
    width: int  # attention reads positions [0, width)


class SlotLayer(CacheLayerMixin):
    """One layer's keys/values: [slots, kv_heads, context + 1, head_dim]; the last position is scratch."""

    is_sliding = False

    def __init__(self, owner: SlotKVCache) -> None:
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        shape = (self.owner.slots, key_states.shape[1], self.owner.context + 1, key_states.shape[-1])
        self.keys = torch.zeros(shape, dtype=key_states.dtype, device=key_states.device)
        vshape = (*shape[:3], value_states.shape[-1])
        self.values = torch.zeros(vshape, dtype=value_states.dtype, device=value_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        plan = self.owner.plan
        heads = torch.arange(key_states.shape[1], device=key_states.device)
        index = (plan.slots[:, None, None], heads[None, :, None], plan.write[:, None, :])  # → [n, H, q]
        self.keys.index_put_(index, key_states)
        self.values.index_put_(index, value_states)
        return self.keys[plan.rows, :, : plan.width], self.values[plan.rows, :, : plan.width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.plan.width, 0

    def get_seq_length(self) -> int:
        return self.owner.plan.width

    def get_max_length(self) -> int:
        return self.owner.context


class SlotKVCache(Cache):
    """`slots` × `context` keys/values per layer; the engine sets `plan` before every forward."""

    def __init__(self, num_layers: int, slots: int, context: int) -> None:
        self.slots, self.context = slots, context
        self.plan: StepPlan | None = None
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])

    @property
    def scratch(self) -> int:
        return self.context


def slot_mask(query_pos: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [n, 1, q, width]: query at position p sees its slot's positions 0..p (p < 0: only 0).

    A slot holds only its own sequence's tokens at positions below the one being computed, so "key
    position ≤ query position" is exactly "this sequence's own past"; positions past a sequence's
    length hold stale values that the mask never exposes.
    """
    keys = torch.arange(width, device=query_pos.device)
    visible = keys[None, None, None, :] <= query_pos.clamp(min=0)[:, None, :, None]
    return torch.zeros(visible.shape, dtype=dtype, device=query_pos.device).masked_fill_(
        ~visible, torch.finfo(dtype).min
    )
