"""Training data: JSON records read with their file and line (:mod:`.records`), chat records and their rendering to
supervised tokens (:mod:`.chat`), packing several examples per row (:mod:`.packing`), batches and the resumable
sampler (:mod:`.batches`), the offline byte tokenizer (:mod:`.tokenizer`) and the shipped demo data (``assets/``).
Imports nothing else from sora_ds.
"""
