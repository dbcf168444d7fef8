#!/usr/bin/env python
"""Write sora_ds/data/assets/tiny_chat.jsonl, the built-in synthetic chat dataset.

The data is meant to be learnable by a 2-layer, hidden-64 Llama trained from
scratch at byte level in a few hundred steps, so it mixes
  * a small fixed fact table (colors, animal sounds, opposites), each fact
    asked in three phrasings (memorisation), and
  * copy-style transforms of 16 short words (upper-case, repeat, first and
    last letter).
The number of distinct question -> answer mappings is kept small (~150) on
purpose: 200 steps of batch 16 see each one ~20 times, enough for the
response loss to fall from ~5.6 to ~0.6 with full fine-tuning.  Answers are
short; every rendered conversation stays well under 128 tokens.

Pure Python with a fixed seed: re-running reproduces the file byte for byte.

    python scripts/make_tiny_chat.py [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 1234
N_TRANSFORM_EXAMPLES = 400
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "sora_ds" / "data" / "assets" / "tiny_chat.jsonl"

# relation -> (question phrasings, {subject: answer}).  Answers come from a
# small shared vocabulary so the model learns their spelling quickly and only
# has to memorise which one goes with which subject.
FACTS = {
    "color": (
        ["color of {}?", "what color is {}?", "{} is what color?"],
        {"banana": "yellow", "lemon": "yellow", "grass": "green", "leaf": "green",
         "sky": "blue", "sea": "blue", "snow": "white", "milk": "white",
         "coal": "black", "night": "black", "blood": "red", "cherry": "red"},
    ),
    "sound": (
        ["sound of a {}?", "what does a {} say?", "a {} says?"],
        {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack",
         "sheep": "baa", "owl": "hoot", "lion": "roar", "snake": "hiss"},
    ),
    "opposite": (
        ["opposite of {}?", "what is the opposite of {}?", "{} is the opposite of?"],
        {"hot": "cold", "cold": "hot", "up": "down", "down": "up", "big": "small",
         "small": "big", "yes": "no", "no": "yes", "day": "night", "wet": "dry"},
    ),
}

# Copy-style tasks use a short fixed word list.
WORDS = "cat dog sun box red map hat cup pen egg fox bee ant pig ice owl".split()

# name -> (prompt template, answer function)
TRANSFORMS = {
    "upper": ("upper: {}", str.upper),
    "repeat": ("repeat: {}", lambda w: f"{w} {w}"),
    "first": ("first letter of {}?", lambda w: w[0]),
    "last": ("last letter of {}?", lambda w: w[-1]),
}

SYSTEM_PROMPTS = ["Be brief.", "Keep it short."]


def _chat(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def fact_examples() -> list[list[dict]]:
    """Every fact in every phrasing, twice (facts are the memorised part)."""
    out = []
    for phrasings, table in FACTS.values():
        for subject, answer in table.items():
            for p in phrasings:
                q = p.format(subject)
                out.append(_chat(q[0].upper() + q[1:], answer))
    return out * 3


def transform_examples(rng: random.Random, n: int) -> list[list[dict]]:
    names = sorted(TRANSFORMS)
    out = []
    for _ in range(n):
        template, fn = TRANSFORMS[rng.choice(names)]
        word = rng.choice(WORDS)
        out.append(_chat(template.format(word), fn(word)))
    return out


def decorate(rng: random.Random, convs: list[list[dict]]) -> list[list[dict]]:
    """Give some examples a system prompt and fold some pairs into two-turn
    chats, so the data also exercises system and multi-assistant masking."""
    out, i = [], 0
    while i < len(convs):
        roll = rng.random()
        if roll < 0.1 and i + 1 < len(convs):
            out.append(convs[i] + convs[i + 1])
            i += 2
            continue
        if roll < 0.2:
            out.append([{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] + convs[i])
        else:
            out.append(convs[i])
        i += 1
    return out


def build() -> list[dict]:
    rng = random.Random(SEED)
    convs = fact_examples() + transform_examples(rng, N_TRANSFORM_EXAMPLES)
    rng.shuffle(convs)
    return [{"messages": m} for m in decorate(rng, convs)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=True) + "\n" for r in build()]
    # Binary write: identical bytes on every platform (no newline translation).
    args.out.write_bytes("".join(lines).encode("utf-8"))
    print(f"wrote {len(lines)} examples to {args.out}")


if __name__ == "__main__":
    main()
