"""AdaLoRA's importance scores and global rank allocation, run inside the optimizer step so it is right under ZeRO.

Why inside the step: with DeepSpeed, ``accelerator.backward`` runs the optimizer step and clears the gradients, so
scores taken "after ``optimizer.step()``" (where PEFT takes them) see no gradients, and a mask written to the model's
low-precision copy is overwritten from the fp32 master at the next step. Inside :meth:`AdapterAdamW.step` the tensors
are the fp32 master (whole parameters on one process, flat per-rank shards under ZeRO-1/2/3, DTensors under FSDP2,
worked on through their local rows) with their gradients still attached, and anything written there sticks.

Per optimizer step ``t`` (counted inside the optimizer, so gradient accumulation is handled), after the AdamW update:

1. element-wise, for every adapter element ``p`` with gradient ``g``, while ``t < T - t_final``:
   ``I = |p * g|``, ``I_avg <- b1 I_avg + (1 - b1) I``, ``U <- b2 U + (1 - b2) |I - I_avg|`` (kept as optimizer state
   of the tensor the optimizer sees, so it is sharded, checkpointed and resumed like ``exp_avg``);
2. at allocation steps (the budget schedule's, and once at ``t = T - t_final``): the score of triplet ``i`` of a
   matrix is ``s(E_i) + mean_j s(Q_ij) + mean_j s(P_ji)`` with ``s = I_avg * U``. Every rank adds up its own
   elements' contributions into one vector of ``3 * n * r`` partial sums (float64), one ``all_reduce`` makes them
   global, and every rank takes the same global top-``b`` over all ``n * r`` triplets. A triplet scoring ``<=`` the
   ``(n r - b)``-th smallest score is pruned (ties pruned together, as in PEFT);
3. every step: the pruned ``E_i`` are set to zero in the master, so a pruned triplet stays pruned until an
   allocation revives it (PEFT lets it regrow between allocations when ``delta_t > 1``; with ``delta_t = 1`` the
   two agree, which ``tests/adapters/test_allocator.py`` checks against PEFT).

The step count ``t`` is 1-based: ``t`` optimizer steps have been taken, including this one (PEFT's example loop
passes the 0-based count to ``update_and_allocate``, one step earlier).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import AdaLoRAConfig
from .layer import GatedLoRALinear
from ..engine import optimizer_fragments, stepped_values

SLOT_BLOCKS = ("E", "A", "B")  # slot blocks: E_i, row i of A (= Q), column i of B (= P)


@dataclass
class _Layout:
    """Where the adapter elements of one optimizer tensor (a parameter, or a ZeRO flat shard) belong."""

    slot: torch.Tensor  # int64, per element: block * n_triplets + triplet, or 3 * n_triplets for padding / others
    e_pos: torch.Tensor  # positions of E elements in the tensor
    e_slot: torch.Tensor  # their triplet index


class RankAllocator:
    """The AdaLoRA state machine for the ``adalora`` param group of :class:`sora_ds.adapters.optim.AdapterAdamW`."""

    def __init__(self, modules: list[tuple[str, GatedLoRALinear]], config: AdaLoRAConfig) -> None:
        if not modules:
            raise ValueError("RankAllocator needs at least one adapted module")
        self.modules = [m for _, m in modules]
        self.r = config.r
        self.schedule = config.budget(len(modules))
        self.beta1, self.beta2 = config.importance_beta1, config.importance_beta2
        self.n_triplets = len(modules) * self.r
        self.in_features = torch.tensor([m.in_features for m in self.modules], dtype=torch.float64).repeat_interleave(self.r)
        self.out_features = torch.tensor([m.out_features for m in self.modules], dtype=torch.float64).repeat_interleave(self.r)
        self.budget = self.schedule.initial_budget
        self.sharded = False
        self.pruned = torch.zeros(self.n_triplets, dtype=torch.bool)  # model order, module-major
        self._layouts: dict[int, _Layout] = {}
        self._slot_cache: dict[tuple[int, ...], torch.Tensor] = {}

    def parameters(self) -> list[torch.nn.Parameter]:
        """The param group: Q, P, E of every module, in model order."""
        return [p for m in self.modules for p in (m.lora_A, m.lora_B, m.gate)]

    # --- the step -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def after_update(self, optimizer: torch.optim.Optimizer, group: dict) -> None:
        """Called by the optimizer right after the AdamW update of ``group`` (every rank, same order)."""
        step = group["adalora_step"] = group.get("adalora_step", 0) + 1
        tensors = list(group["params"])
        layouts = [self._layout(t, tensors) for t in tensors]
        final_start = self.schedule.total_step - self.schedule.t_final
        if step < final_start:
            self._update_importance(optimizer, tensors)
        budget, mask_now = self.schedule(step)
        if (mask_now and step < final_start) or step == final_start:
            self._allocate(optimizer, tensors, layouts, budget)
        if step == final_start:
            for t in tensors:  # the mask is final: the scores are no longer needed (PEFT's reset_ipt)
                for key in ("ipt_avg", "ipt_unc"):
                    optimizer.state[t].pop(key, None)
        self.budget = budget if step > self.schedule.t_init else self.schedule.initial_budget
        for t in tensors:
            state = optimizer.state[t]
            pruned = state.get("adalora_pruned")
            if pruned is not None:
                if pruned.dtype != torch.bool:  # torch's load_state_dict casts state to the parameter's dtype
                    pruned = state["adalora_pruned"] = pruned.bool()
                stepped_values(t).masked_fill_(pruned, 0.0)

    def _update_importance(self, optimizer, tensors: list[torch.Tensor]) -> None:
        live = [t for t in tensors if t.grad is not None]
        if not live:
            return
        for t in live:  # kept as this rank's values (an FSDP2 DTensor's local rows), keyed by the stepped tensor
            state = optimizer.state[t]
            if "ipt_avg" not in state:
                state["ipt_avg"] = torch.zeros_like(stepped_values(t), memory_format=torch.preserve_format)
                state["ipt_unc"] = torch.zeros_like(stepped_values(t), memory_format=torch.preserve_format)
        avgs = [optimizer.state[t]["ipt_avg"] for t in live]
        uncs = [optimizer.state[t]["ipt_unc"] for t in live]
        ipt = torch._foreach_mul([stepped_values(t) for t in live], [stepped_values(t.grad) for t in live])
        torch._foreach_abs_(ipt)
        torch._foreach_lerp_(avgs, ipt, 1 - self.beta1)
        dev = torch._foreach_sub(ipt, avgs)
        torch._foreach_abs_(dev)
        torch._foreach_lerp_(uncs, dev, 1 - self.beta2)

    def triplet_scores(self, optimizer, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Global triplet scores, ``n_modules * r`` float64 (a collective when the adapter is sharded)."""
        n = self.n_triplets
        partial = torch.zeros(3 * n + 1, dtype=torch.float64, device=tensors[0].device)
        scored = [t for t in tensors if "ipt_avg" in optimizer.state[t]]
        if scored:
            # One batched multiply and one index_add over every element, whatever the number of tensors.
            element = torch._foreach_mul([optimizer.state[t]["ipt_avg"] for t in scored],
                                         [optimizer.state[t]["ipt_unc"] for t in scored])
            partial.index_add_(0, self._slots(scored), torch.cat([e.reshape(-1) for e in element]).double())
        if self.sharded and dist.is_initialized() and dist.get_world_size() > 1:
            partial = _all_reduce_sum(partial)
        partial = partial.cpu()
        return partial[:n] + partial[n : 2 * n] / self.in_features + partial[2 * n : 3 * n] / self.out_features

    def _allocate(self, optimizer, tensors, layouts, budget: int) -> None:
        scores = self.triplet_scores(optimizer, tensors)
        n_pruned = self.n_triplets - budget
        if n_pruned <= 0:
            pruned_slots = torch.zeros(self.n_triplets, dtype=torch.bool)
        else:
            threshold = torch.kthvalue(scores, n_pruned).values
            pruned_slots = scores <= threshold
        self.pruned = pruned_slots
        for t, layout in zip(tensors, layouts):
            if not len(layout.e_pos):  # no E element here (a Q or P on one process): nothing to mask
                continue
            pruned = torch.zeros(stepped_values(t).shape, dtype=torch.bool, device=t.device)
            pruned.view(-1)[layout.e_pos.to(t.device)] = pruned_slots[layout.e_slot].to(t.device)
            optimizer.state[t]["adalora_pruned"] = pruned

    # --- where each element lives ---------------------------------------------------------------------------------

    def _slots(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The slot indices of ``tensors``' elements, concatenated (cached per tensor list, on their device)."""
        key = tuple(id(t) for t in tensors)
        if key not in self._slot_cache:
            self._slot_cache[key] = torch.cat([self._layouts[id(t)].slot for t in tensors]).to(tensors[0].device)
        return self._slot_cache[key]

    def _layout(self, tensor: torch.Tensor, tensors: list[torch.Tensor]) -> _Layout:
        if id(tensor) not in self._layouts:
            self._build_layouts(tensors)
        return self._layouts[id(tensor)]

    def _build_layouts(self, tensors: list[torch.Tensor]) -> None:
        n, r = self.n_triplets, self.r
        slots = {id(t): torch.full((stepped_values(t).numel(),), 3 * n, dtype=torch.int64) for t in tensors}
        e_pos: dict[int, list[torch.Tensor]] = {id(t): [] for t in tensors}
        e_slot: dict[int, list[torch.Tensor]] = {id(t): [] for t in tensors}
        by_id = {id(t): t for t in tensors}
        for mi, module in enumerate(self.modules):
            for block, p in zip(SLOT_BLOCKS, (module.gate, module.lora_A, module.lora_B)):
                sharded, fragments = optimizer_fragments(p, by_id)
                self.sharded |= sharded
                for t, t_off, p_off, count in fragments:
                    k = torch.arange(p_off, p_off + count)
                    triplet = mi * r + (k if block == "E" else k // module.in_features if block == "A" else k % r)
                    slots[id(t)][t_off : t_off + count] = SLOT_BLOCKS.index(block) * n + triplet
                    if block == "E":
                        e_pos[id(t)].append(torch.arange(t_off, t_off + count))
                        e_slot[id(t)].append(triplet)
        for t in tensors:
            cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.int64)  # noqa: E731
            self._layouts[id(t)] = _Layout(slots[id(t)], cat(e_pos[id(t)]), cat(e_slot[id(t)]))


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    # NCCL only reduces device tensors; gloo takes CPU ones.
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        moved = t.cuda()
        dist.all_reduce(moved)
        return moved
    dist.all_reduce(t)
    return t

