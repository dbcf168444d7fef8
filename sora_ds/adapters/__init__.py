"""The adapter maths, independent of how training is launched: the gated low-rank layer shared by SoRA and AdaLoRA
(:mod:`.layer`), their configs (:mod:`.config`), putting layers into a model (:mod:`.inject`), the proximal gate
step (:mod:`.prox`), the optimizer that runs it (:mod:`.optim`), the sparsity schedule (:mod:`.schedule`), AdaLoRA's
budget and importance-based allocator (:mod:`.budget`, :mod:`.allocator`) and orthogonality penalty
(:mod:`.orthogonal`), removing dead ranks (:mod:`.compact`) and the PEFT LoRA export (:mod:`.export`).

Imports only :mod:`sora_ds.engine` (for sharded or quantized weights) from the rest of sora_ds.
"""
