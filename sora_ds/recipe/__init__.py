"""Running a fine-tune: the recipe config (:mod:`.config`), the base model and accelerator (:mod:`.model`), the
training loop in phases (:mod:`.train`), checkpoints (:mod:`.checkpoint`), the run summary (:mod:`.summary`), the
``sora-ds`` command (:mod:`.cli`) and the Hugging Face Trainer mixin (:mod:`.hf_trainer`). The top layer: it may
import every other layer; nothing imports it.
"""
