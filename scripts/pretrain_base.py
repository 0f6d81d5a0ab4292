"""Make the demo's shipped text and pretrain the small base model that ``peftjax demo`` adapts.

The shipped base was made with this command (8 minutes on 2 busy CPU cores; the command,
seed, steps and losses are also recorded in ``peftjax/data/demo_base.json``)::

    python scripts/pretrain_base.py --seed 0 --steps 800 --seq 64

It does two things, both deterministic for a given ``--seed``:

1. writes the text under ``peftjax/data/`` (no downloads: every line comes from the word lists
   and templates below, plus the hand-written ``tiny_corpus.txt``):

   - ``corpus_train.txt`` / ``corpus_heldout.txt``: general prose (the pretraining corpus);
   - ``verse_train.txt`` / ``verse_heldout.txt``: style 1, a fixed verse form (four-line
     stanzas that open with "O ...");
   - ``sums_train.txt`` / ``sums_heldout.txt``: style 2, a task: one correct sum a line
     (``12+7=19``).

2. pretrains `peftjax.demo.Model` (a char-level Llama-style decoder, hidden 128, 4 layers) on
   ``corpus_train.txt`` only and writes ``peftjax/data/demo_base.safetensors`` (float32, keys
   are the linen module paths, ``model.layers_0.self_attn.q_proj.kernel``...) and
   ``peftjax/data/demo_base.json``: the model config, the tokenizer's vocabulary, the seed,
   steps, batch, the exact command, the final and held-out losses and the sha256 of the weights
   file and of every text file.

``--text-only`` writes the text and stops (the weights and their JSON are left as they are).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "peftjax" / "data"

# ------------------------------------------------------------------------------------ text

NOUNS = (
    "river stone lamp room baker oven street clock map garden oak bridge boat harbour "
    "window door letter book teacher child road hill field farmer horse cart bell tower "
    "market shop candle kettle table chair winter summer morning evening storm cloud "
    "mountain valley forest path wall roof ship sailor island lighthouse village city "
    "friend brother sister mother father neighbour stranger traveller song story"
).split()
ADJS = (
    "small large old young quiet loud bright dark warm cold patient careful heavy light "
    "narrow wide green grey golden tired busy gentle steady simple strange early late"
).split()
VERBS_PAST = (
    "opened closed carried watched crossed followed mended painted counted found lost "
    "visited remembered answered passed built cleaned filled lifted noticed pulled pushed"
).split()
VERBS_INTR = (
    "waited slept laughed listened walked rested worked wandered returned stayed sang "
    "whispered hurried paused"
).split()
ADVS = "slowly quickly quietly carefully again alone together early late gladly".split()
PREPS = "near behind beside under over across along into through past toward".split()
NAMES = (
    "Anna Tom Mira Jonas Clara Ben Ada Leo Nora Paul Ruth Hugo Elsa Ivan Lena Otto Rosa Sam"
).split()
TOWNS = "Ashford Brindle Calder Dunmore Elmsworth Fairhaven Glenrock Holloway".split()
TIMES = [
    "at dawn",
    "at noon",
    "at dusk",
    "at night",
    "in the rain",
    "in the snow",
    "in spring",
    "in autumn",
]
SAYINGS = (
    "Nothing is late that is done with care",
    "A road is only long when you walk it alone",
    "Every door was once a tree",
    "The kettle sings before it boils",
    "Ask the river, it has seen everything",
    "A good map is drawn by someone who walked",
    "Small lamps still make a circle of light",
    "Count twice and carry once",
)
# the verse form's own words (stanzas share the prose's nouns, not its shape)
VERSE_VERBS = "sleeps wakes sings burns turns waits shines falls grows calls".split()
VERSE_ENDS = "bright and slow|cold and still|far from home|old and true|deep and wide".split("|")


def _pl(noun: str) -> str:
    if noun.endswith(("ch", "sh", "s", "x")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    if noun in ("child",):
        return "children"
    if noun.endswith("f"):
        return noun[:-1] + "ves"
    return noun + "s"


def _sentence(r: np.random.Generator) -> str:
    c = lambda xs: xs[int(r.integers(len(xs)))]
    n, n2, a, name = c(NOUNS), c(NOUNS), c(ADJS), c(NAMES)
    k = int(r.integers(9))
    if k == 0:
        return f"The {a} {n} {c(VERBS_PAST)} the {n2} {c(TIMES)}."
    if k == 1:
        return f"{name} {c(VERBS_PAST)} the {n} and {c(VERBS_INTR)} {c(ADVS)}."
    if k == 2:
        year = int(r.integers(1700, 1990))
        return f"In {year}, the people of {c(TOWNS)} {c(VERBS_PAST)} a {a} {n}."
    if k == 3:
        return f"When the {n} {c(VERBS_INTR)}, {name} {c(VERBS_PAST)} the {n2} {c(PREPS)} it."
    if k == 4:
        num = int(r.integers(2, 40))
        return f"There were {num} {_pl(n)} {c(PREPS)} the {n2}, and each of them was {a}."
    if k == 5:
        return f'"{c(SAYINGS)}," said {name}.'
    if k == 6:
        x, y = int(r.integers(1, 50)), int(r.integers(1, 50))
        return f"{name} counted {x} {_pl(n)}, then {y} more, and wrote {x} + {y} = {x + y}."
    if k == 7:
        return f"The {n} was {a}, but the {n2} {c(PREPS)} it was {c(ADJS)}."
    return f"{name} {c(VERBS_INTR)} {c(PREPS)} the {a} {n} {c(TIMES)}, and no one minded."


def general_corpus(r: np.random.Generator, paragraphs: int) -> str:
    paras = []
    for _ in range(paragraphs):
        paras.append(" ".join(_sentence(r) for _ in range(int(r.integers(3, 7)))))
    return "\n\n".join(paras) + "\n"


def verse(r: np.random.Generator, stanzas: int) -> str:
    """Four-line stanzas of one fixed form."""
    c = lambda xs: xs[int(r.integers(len(xs)))]
    out = []
    for _ in range(stanzas):
        out.append(
            f"O {c(ADJS)} {c(NOUNS)} {c(TIMES)},\n"
            f"the {c(NOUNS)} {c(VERSE_VERBS)} and the {c(NOUNS)} {c(VERSE_VERBS)};\n"
            f"I {c(VERBS_PAST)} your {c(NOUNS)} {c(PREPS)} the {c(NOUNS)},\n"
            f"and all the {_pl(c(NOUNS))} are {c(VERSE_ENDS)}.\n"
        )
    return "\n".join(out)


def sums(r: np.random.Generator, lines: int) -> str:
    """One correct sum a line: ``a+b=c`` with ``a, b`` in 0..99."""
    ab = r.integers(0, 100, (lines, 2))
    return "".join(f"{a}+{b}={a + b}\n" for a, b in ab)


def make_text(seed: int) -> dict[str, str]:
    """``{file name: text}`` of the six text files (the same for the same ``seed``)."""
    r = np.random.default_rng(seed)
    hand = (DATA / "tiny_corpus.txt").read_text("utf-8")
    return {
        "corpus_train.txt": hand + "\n" + general_corpus(r, 420),
        "corpus_heldout.txt": general_corpus(r, 40),
        "verse_train.txt": verse(r, 220),
        "verse_heldout.txt": verse(r, 30),
        "sums_train.txt": sums(r, 2400),
        "sums_heldout.txt": sums(r, 300),
    }


def write_text(seed: int) -> dict[str, str]:
    """Write the six text files under ``peftjax/data/``; returns ``{file name: text}``."""
    files = make_text(seed)
    for name, text in files.items():
        (DATA / name).write_text(text, "utf-8")
    return files


# ------------------------------------------------------------------------------------ training


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="seed of the text and of the weights")
    p.add_argument("--steps", type=int, default=800, help="training steps")
    p.add_argument("--batch", type=int, default=32, help="sequences per step")
    p.add_argument("--seq", type=int, default=64, help="characters per sequence")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    p.add_argument("--text-only", action="store_true", help="write the text files and stop")
    args = p.parse_args(argv)
    files = write_text(args.seed)
    print("wrote " + ", ".join(f"{n} ({len(t):,} chars)" for n, t in files.items()))
    if args.text_only:
        return 0

    import jax
    import jax.numpy as jnp
    import optax
    from safetensors.numpy import save_file

    sys.path.insert(0, str(ROOT))
    from peftjax.demo import CharTokenizer, Model, batches, flatten_params

    vocab_text = "".join(files.values())
    tok = CharTokenizer(vocab_text)
    train = tok.encode(files["corpus_train.txt"])
    held = tok.encode(files["corpus_heldout.txt"])
    config = {"vocab": len(tok.chars), "hidden": 128, "layers": 4, "heads": 4, "inter": 256}
    model = Model(config["vocab"])
    params = model.init(jax.random.key(args.seed), jnp.zeros((1, args.seq), jnp.int32))
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, 50, args.steps, args.lr / 10)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    state = opt.init(params)

    def loss_fn(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

    @jax.jit
    def step(p, s, x, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    it = batches(train, args.batch, args.seq, args.seed)
    t0 = time.perf_counter()
    recent = []
    for i in range(1, args.steps + 1):
        x, y = next(it)
        params, state, loss = step(params, state, x, y)
        if i % 50 == 0 or i == args.steps:
            recent.append(float(loss))
            dt = time.perf_counter() - t0
            print(f"step {i:5d}/{args.steps}  loss {float(loss):.3f}  {dt:.0f} s", flush=True)
    ev = jax.jit(loss_fn)
    hx, hy = next(batches(held, 64, args.seq, args.seed + 1))
    held_loss = float(ev(params, hx, hy))
    print(f"held-out loss {held_loss:.3f}")

    weights = DATA / "demo_base.safetensors"
    save_file(flatten_params(params), weights, {"format": "flax"})
    weights.chmod(0o644)  # package data: readable by all (safetensors writes 0600)
    meta = {
        "model": config,
        "vocab": tok.chars,
        "seed": args.seed,
        "steps": args.steps,
        "batch": args.batch,
        "seq": args.seq,
        "lr": args.lr,
        "command": "python scripts/pretrain_base.py "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "final_train_loss": recent[-1],
        "heldout_loss": held_loss,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "jax_version": jax.__version__,
        "sha256": {weights.name: sha256(weights), **{n: sha256(DATA / n) for n in files}},
    }
    (DATA / "demo_base.json").write_text(json.dumps(meta, indent=1) + "\n", "utf-8")
    print(f"wrote {weights} ({weights.stat().st_size:,} bytes) and demo_base.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
