"""Run a sora-ds entry point that freezes right after the N-th call of a chosen function, so that a test can kill -9
it at exactly that point (a kill at a random moment would test a random thing).

    python tests/scripts/freeze_at.py MODULE:FUNCTION N READY_FILE recipe|cli ARGS...

``recipe`` runs the training recipe (default config: the CPU SoRA demo), ``cli`` the ``sora-ds`` command. When the
N-th call has returned, READY_FILE is written and the process sleeps until it is killed.
"""

import importlib
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    target, n, ready, entry, *args = sys.argv[1:]
    module_name, name = target.split(":")
    module = importlib.import_module(module_name)
    original, calls = getattr(module, name), [0]

    def frozen(*a, **k):
        result = original(*a, **k)
        calls[0] += 1
        if calls[0] == int(n):
            Path(ready).write_text("frozen")
            time.sleep(600)
        return result

    setattr(module, name, frozen)
    if entry == "recipe":
        from sora_ds.recipe.train import main as run

        run(args, REPO / "recipes" / "llama" / "tiny_sora_cpu.yaml")
    else:
        from sora_ds.recipe.cli import main as run

        sys.exit(run(args))


if __name__ == "__main__":
    main()
