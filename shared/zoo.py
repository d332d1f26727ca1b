"""The model zoo: trained course models, built from seeded recipes and cached on disk.

Later weeks stand on trained models (week 3's Shakespeare model is week 4's base, week 6
fine-tunes it, week 7 quantises it), yet the course downloads nothing and every notebook
must run alone on a fresh clone. So a zoo entry is a *recipe* - data, model config, training
config, seed - and `load(name)` returns the trained model: from the cache if it is there,
otherwise it trains it (a couple of minutes on a laptop CPU), caches it and returns it.

    model, tok = load("shakespeare-char")     # (GPT in eval mode, CharTokenizer)

The cache entry of a recipe is a folder named after it and a hash of its JSON::

    <cache>/shakespeare-char-3f2a9c1b7d4e/
        model.safetensors   the weights (safetensors: no pickle, loads lazily)
        config.json         GPTConfig, the recipe, metrics (val loss, train seconds, ...)
        tokenizer.json      the tokenizer (`shared.tokenizers.Tokenizer.load`)

Changing any field of a recipe (except its description) changes the hash, so the next
`load` builds a new entry instead of returning a stale model. `<cache>` is
`$LLM_COURSE_CACHE/zoo` if that variable is set, else `$XDG_CACHE_HOME/llm-course/zoo`,
else `~/.cache/llm-course/zoo`.

Two notebooks run in parallel (CI runs two at a time) must not both train the same entry:
a file lock per entry (`filelock`) lets the first one build while the second waits and
then loads. The build writes into a temporary folder and renames it into place, so a
reader never sees a half-written entry, and a crash leaves no entry at all.

Data sets a recipe names (`data`): "shakespeare-char" (the plays, characters), "tinyworld"
(the tiny world's pretraining mixture, `shared.tinyworld.tokenizer()` ids; `tinyworld()` is
the world) and
"tinyworld-chat" (every train example of the world as packed SFT rows, the loss on the
replies only) and "tinyworld-agent" (`shared.agent`'s ReAct traces, name drills and a replay of
the other tasks, packed the same way). A recipe with `init_from` fine-tunes another
recipe's trained model; a chat model's metrics add its exact-match accuracy per task family on
the test split, the agent's its accuracy per task kind in the ReAct loop with the world's tools.

Command line:  `python -m shared.zoo list`,  `python -m shared.zoo build [NAME ...] [--force]`.

Left out: a code version in the hash (a change to `shared.model` or `shared.train` keeps the
old entries; run `build --force` or clear the cache), pruning old entries, downloads.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock
from safetensors.torch import load_model, save_model

from shared.agent import accuracy_by_kind, agent_tasks, model_policy, name_drill_tasks, run_agent
from shared.chat import evaluate, masked_loss, pack_chats
from shared.chat import make_get_batch as chat_get_batch
from shared.data import shakespeare_text, train_val_split
from shared.evaluation import mean_loss
from shared.model import GPT, GPTConfig
from shared.structured import world_tools
from shared.tinyworld import World, make_world
from shared.tinyworld import tokenizer as tinyworld_tokenizer
from shared.tokenizers import CharTokenizer, Tokenizer
from shared.train import TrainConfig, make_get_batch, train
from shared.utils import library_versions, seed_everything

FILES = ("model.safetensors", "config.json", "tokenizer.json")

EVAL_PER_FAMILY = 50  # test examples per task family in a chat model's metrics

# TrainConfig fields a recipe may not set: the zoo owns them.
_ZOO_OWNED = ("seed", "device", "checkpoint_path", "progress")


# --------------------------------------------------------------------------------------
# Data sets a recipe can name
# --------------------------------------------------------------------------------------


@functools.cache
def _shakespeare_char() -> tuple[Tokenizer, torch.Tensor, torch.Tensor]:
    """Characters of the complete plays: (CharTokenizer, train ids, val ids), 90/10 split."""
    text = shakespeare_text()
    tok = CharTokenizer.train(text)
    ids = torch.tensor(tok.encode(text), dtype=torch.long)  # (4.8M,)
    train_ids, val_ids = train_val_split(ids, 0.1)
    return tok, train_ids, val_ids


@functools.cache
def tinyworld() -> World:
    """The zoo's tiny world: `make_world(seed=0)` with the default sizes."""
    return make_world(seed=0)


@functools.cache
def _tinyworld_corpus() -> tuple[Tokenizer, torch.Tensor, torch.Tensor]:
    """The world's pretraining mixture (no held-out person) as token ids: 95/5 split.

    Each person's biographies in one text (`by_person`) and the train arithmetic and string
    problems as plain "Q: ... A: ..." text (`skill_copies=1`), shuffled with a fixed seed
    and separated by blank lines."""
    tok = tinyworld_tokenizer()
    docs = tinyworld().pretraining_documents(by_person=True, skill_copies=1)
    random.Random(0).shuffle(docs)
    ids = torch.tensor(tok.encode("\n\n".join(docs) + "\n"), dtype=torch.long)
    train_ids, val_ids = train_val_split(ids, 0.05)
    return tok, train_ids, val_ids


@functools.cache
def _tinyworld_chat(block_size: int):
    """Every train / val example of the world as packed SFT rows (`shared.chat.pack_chats`):
    (tokenizer, (inputs, targets) train, (inputs, targets) val), targets -100 off replies."""
    tok, world = tinyworld_tokenizer(), tinyworld()
    rows = [pack_chats([ex.messages() for ex in world.examples(split)], tok, block_size)
            for split in ("train", "val")]
    return tok, rows[0], rows[1]


AGENT_REPLAY = 0.3  # of the world's other train examples, mixed into the agent's rows


@functools.cache
def _tinyworld_agent(block_size: int):
    """The agent's SFT rows (`shared.agent`): the ReAct traces of the train tasks, name
    drills from six other worlds, and AGENT_REPLAY of every other train example of the
    world (not its tool_use traces: one tool format), so the chat skills stay."""
    tok, world = tinyworld_tokenizer(), tinyworld()
    rows = []
    for split in ("train", "val"):
        convs = [t.messages() for t in agent_tasks(world, split)]
        if split == "train":
            convs += [t.messages() for t in name_drill_tasks(world)]
        other = [ex.messages() for ex in world.examples(split) if ex.family != "tool_use"]
        random.Random(0).shuffle(other)
        rows.append(pack_chats(convs + other[:int(AGENT_REPLAY * len(other))], tok, block_size))
    return tok, rows[0], rows[1]


# name -> (loader, whether it takes block_size: packed rows rather than one token stream)
DATASETS = {"shakespeare-char": (_shakespeare_char, False),
            "tinyworld": (_tinyworld_corpus, False),
            "tinyworld-chat": (_tinyworld_chat, True),
            "tinyworld-agent": (_tinyworld_agent, True)}


def dataset(name: str, block_size: int | None = None):
    """(tokenizer, train, val) of a data set the recipes can name.

    A token stream (shakespeare-char, tinyworld) gives 1-D tensors of ids; packed chat rows
    (tinyworld-chat, which needs the block_size) give (inputs, targets) pairs.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {sorted(DATASETS)}")
    loader, packed = DATASETS[name]
    if not packed:
        return loader()
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"data set {name!r} is packed into rows: give block_size, "
                         f"got {block_size!r}")
    return loader(block_size)


# --------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """How to build one zoo model, deterministically from its fields.

    model: GPTConfig fields; vocab_size is taken from the data set's tokenizer.
    train: TrainConfig fields, except seed, device, checkpoint_path and progress (the zoo's).
    init_from: the name of a registered recipe whose trained weights (and GPTConfig) this
    one starts from - fine-tuning; `model` must then be empty. Its hash enters this one's,
    so rebuilding the parent with another recipe rebuilds the child.
    """

    name: str
    description: str
    model: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    data: str = "shakespeare-char"
    seed: int = 1337
    init_from: str | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ValueError(f"Recipe.name must be a non-empty string without '/', "
                             f"got {self.name!r}")
        if self.data not in DATASETS:
            raise ValueError(f"Recipe.data must be one of {sorted(DATASETS)}, got {self.data!r}")
        owned = sorted(set(self.train) & set(_ZOO_OWNED))
        if owned:
            raise ValueError(f"Recipe.train may not set {owned}: the zoo sets them")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"Recipe.seed must be an int >= 0, got {self.seed!r}")
        if self.init_from is not None:
            if self.init_from not in RECIPES:
                raise ValueError(f"Recipe.init_from must name a registered recipe, got "
                                 f"{self.init_from!r}; known: {sorted(RECIPES)}")
            if self.model:
                raise ValueError("Recipe.model must be empty with init_from: the model is "
                                 f"{self.init_from!r}'s")
        # Fail at registration, not minutes into a build: both configs must validate.
        GPTConfig(**{"vocab_size": 256, **self.model})
        TrainConfig(**self.train)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @property
    def hash(self) -> str:
        """12 hex digits of the SHA-256 of everything that shapes the model.

        The description is left out: rewording it should not retrain anything.
        """
        fields = dataclasses.asdict(self)
        del fields["description"]
        if self.init_from is not None:  # the parent's whole recipe, not just its name
            fields["init_from"] = get_recipe(self.init_from).hash
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe, replace: bool = False) -> Recipe:
    """Add a recipe to the zoo (replace=True to redefine a name, e.g. in a notebook)."""
    if recipe.name in RECIPES and not replace:
        raise ValueError(f"a recipe named {recipe.name!r} exists; pass replace=True")
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown zoo model {name!r}; known: {sorted(RECIPES)}")
    return RECIPES[name]


# The course's character-level Shakespeare model (weeks 3, 4, 6, 7). nanoGPT's laptop recipe
# (4 layers, 4 heads, width 128, context 64, batch 12, lr 1e-3) reaches 1.89 nats/char, or
# 1.77 when given the same ~100 s of 2 CPU threads; this one reaches 1.64 (bench/zoo_recipe.py
# has the table). The difference is what weeks 2 and 3 teach: the Llama-style block (RoPE
# alone: 1.73; with RMSNorm and SwiGLU: 1.66) and a tuned peak learning rate (2e-3, with 100
# warmup steps and a cosine to 1e-4). What did not help at this budget: a longer context
# (128, 256), a batch of 8 or 16, a wider (192) or deeper (6) model, lr 3e-3 - each costs
# steps or tokens that it does not pay back. Dropout is 0: 100 s is under half an epoch.
register(Recipe(
    name="shakespeare-char",
    description="character-level GPT on the complete plays (Llama-style block, ~100 s CPU)",
    model=dict(block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False,
               norm="rmsnorm", mlp="swiglu", positions="rope", tie_weights=True),
    train=dict(max_steps=2600, batch_size=12, lr=2e-3, min_lr=1e-4, warmup_steps=100,
               weight_decay=0.1, beta2=0.99, grad_clip=1.0, eval_interval=2600, eval_steps=2),
))


# The tiny world's models (weeks 4-8), on `shared.tinyworld.tokenizer()` ids. What limits
# them is the budget of <= 3 CPU minutes each: every probe (2-4 layers x 64-128, 1-3k steps,
# with and without copy drills and reading exercises in pretraining) learned the chat format,
# refusals and some string tasks, but rarely to read a fact out of its context - the skill
# that forms last. tinyworld-sft scores ~0.13 mean exact match on the test tasks; the entry's
# metrics hold the per-family numbers. Llama-style blocks as for Shakespeare.
_TINYWORLD_BLOCK = dict(dropout=0.0, bias=False, norm="rmsnorm", mlp="swiglu",
                        positions="rope", tie_weights=True)


def _tinyworld_pretraining(name: str, description: str, n_layer: int, n_embd: int,
                           steps: int) -> Recipe:
    """A model pretrained on the "tinyworld" mixture: only depth, width and steps differ."""
    return Recipe(
        name=name, description=description, data="tinyworld",
        model=dict(block_size=256, n_layer=n_layer, n_head=4, n_embd=n_embd, **_TINYWORLD_BLOCK),
        train=dict(max_steps=steps, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=100,
                   weight_decay=0.1, beta2=0.99, grad_clip=1.0, eval_interval=steps,
                   eval_steps=4),
    )


register(_tinyworld_pretraining(
    "tinyworld-base", "the tiny world's pretraining mixture: biographies grouped by person, "
    "plain arithmetic and string problems (4 layers x 128, ~150 s CPU)", 4, 128, 900))
register(_tinyworld_pretraining(
    "tinyworld-small", "a 2-layer x 64 model on the same mixture as tinyworld-base: the draft "
    "model and distillation student of later weeks (~60 s CPU)", 2, 64, 1500))


def _tinyworld_finetuning(name: str, description: str, data: str, init_from: str,
                          steps: int) -> Recipe:
    """A chat fine-tune of another tiny-world model on packed rows: only data and steps differ."""
    return Recipe(
        name=name, description=description, data=data, init_from=init_from,
        train=dict(max_steps=steps, batch_size=8, lr=1e-3, min_lr=1e-4, warmup_steps=50,
                   weight_decay=0.1, beta2=0.99, grad_clip=1.0, eval_interval=steps,
                   eval_steps=4),
    )


register(_tinyworld_finetuning(
    "tinyworld-sft", "tinyworld-base instruction-tuned on every train example of the world "
    "(chat template, loss on the replies only, ~150 s CPU)", "tinyworld-chat", "tinyworld-base",
    900))
# The agent of week 8 (shared.agent): tinyworld-sft taught the ReAct format on tool traces.
# tinyworld-sft already emits bracket calls (the world's tool_use traces) but copies neither
# the operands nor the tool's result (tool_use 0.0). What it takes: many traces (calculator
# copying is learned first: 1.0 after 800 steps), and name drills - lookups about the people
# of six other worlds - because names are spelled character by character and the model must
# copy names it never saw. Lookup accuracy on the held-out people: 0.32 without drills, 0.70
# with three worlds' drills (and 6,000 conversions drawn), 0.98 with six (4,500 conversions,
# 1,600 steps). The mixture trades skills: more conversions lift convert (0.55 -> 0.97 -> 0.74
# in the same three runs) at the expense of names. Unit names ("m", "mm", "mi") and the order
# of "How many B is N A?" are the last to be copied reliably.
register(_tinyworld_finetuning(
    "tinyworld-agent", "tinyworld-sft fine-tuned on ReAct tool traces (calculator, lookup, unit "
    "conversion, two-step tasks) and name drills (~170 s CPU)", "tinyworld-agent",
    "tinyworld-sft", 1600))

# --------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where entries live: $LLM_COURSE_CACHE/zoo, $XDG_CACHE_HOME/llm-course/zoo or
    ~/.cache/llm-course/zoo (read at every call, so a test can point it elsewhere)."""
    if os.environ.get("LLM_COURSE_CACHE"):
        root = Path(os.environ["LLM_COURSE_CACHE"])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llm-course"
    return root.expanduser() / "zoo"


def entry_dir(name: str) -> Path:
    """The cache folder of a recipe (whether or not it is built yet)."""
    recipe = get_recipe(name)
    return cache_dir() / f"{recipe.name}-{recipe.hash}"


def is_built(name: str) -> bool:
    folder = entry_dir(name)
    return all((folder / f).is_file() for f in FILES)


# --------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------


def val_loss(model: GPT, val_ids: torch.Tensor, block_size: int | None = None,
             batch_tokens: int = 16384) -> float:
    """Mean next-token loss over the *whole* validation split, in nats per token.

    `shared.evaluation.mean_loss` does the work (non-overlapping windows of block_size + 1
    tokens, every one scored once): no sampling noise, the same number on every run.
    """
    return mean_loss(model, val_ids, block_size, batch_tokens)


def train_recipe(recipe: Recipe, device: str | torch.device = "cpu",
                 progress: bool = True) -> tuple[GPT, Tokenizer, dict]:
    """Train a recipe from scratch (no cache): (model in eval mode, tokenizer, metrics)."""
    seed_everything(recipe.seed)  # the initial weights
    if recipe.init_from is not None:
        model, _ = load(recipe.init_from, progress=progress)
        config = model.config
        tok, train_data, val_data = dataset(recipe.data, config.block_size)
    else:
        block_size = GPTConfig(**{"vocab_size": 256, **recipe.model}).block_size
        tok, train_data, val_data = dataset(recipe.data, block_size)
        config = GPTConfig(**{"vocab_size": tok.vocab_size, **recipe.model})
        model = GPT(config)
    if tok.vocab_size != config.vocab_size:
        raise ValueError(f"data set {recipe.data!r} has {tok.vocab_size} tokens, the model "
                         f"{config.vocab_size}")
    packed = isinstance(train_data, tuple)
    get_batch = chat_get_batch(train_data, val_data) if packed else \
        make_get_batch(train_data, val_data, config.block_size)
    tcfg = TrainConfig(**recipe.train, seed=recipe.seed, device=str(device), progress=progress)
    t0 = time.perf_counter()
    train(model.to(device).train(), get_batch, tcfg)
    train_seconds = time.perf_counter() - t0
    model.eval()
    if packed:  # the loss on the reply tokens of the val split
        loss, n_val = masked_loss(model, *val_data), int((val_data[1] != -100).sum())
    else:
        loss, n_val = val_loss(model, val_data), len(val_data)
    metrics = dict(
        val_loss=round(loss, 4),
        val_tokens=n_val,
        train_seconds=round(train_seconds, 2),
        steps=tcfg.max_steps,
        tokens_seen=tcfg.max_steps * tcfg.batch_size * config.block_size,
        params=model.num_params(non_embedding=False),
        torch_threads=torch.get_num_threads(),
        device=str(device),
        torch=torch.__version__,
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    if recipe.data == "tinyworld-chat":  # what the model is for: answers, per task family
        acc = evaluate(model, tok, tinyworld(), "test", per_family=EVAL_PER_FAMILY)["accuracy"]
        metrics["test_accuracy"] = {k: round(v, 4) for k, v in acc.items()}
    if recipe.data == "tinyworld-agent":  # the ReAct loop with the world's tools, per kind
        tasks = agent_tasks(tinyworld(), "test")
        runs = run_agent(model_policy(model, tok), [t.question for t in tasks],
                         world_tools(tinyworld()))
        acc = accuracy_by_kind(tasks, [r.answer for r in runs])
        metrics["agent_test_accuracy"] = {k: round(v, 4) for k, v in acc.items()}
    return model, tok, metrics


def _write_entry(folder: Path, recipe: Recipe, model: GPT, tok: Tokenizer, metrics: dict):
    save_model(model, str(folder / "model.safetensors"))  # handles the tied wte / lm_head
    tok.save(folder / "tokenizer.json")
    meta = dict(gpt_config=model.config.to_dict(), recipe=dataclasses.asdict(recipe),
                recipe_hash=recipe.hash, metrics=metrics,
                versions=library_versions(("torch", "numpy", "safetensors")))
    (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def save(recipe: Recipe, model: GPT, tok: Tokenizer, metrics: dict) -> Path:
    """Write a trained model into the cache as the entry of `recipe`; its folder.

    `build` calls this after training; call it yourself to put a model you trained another
    way (a notebook's own run) into the zoo, so that `load(recipe.name)` finds it - register
    the recipe first. Everything goes into a temporary sibling folder that is then renamed
    into place: readers (who check `is_built` without the lock) see no entry or a complete
    one, and an existing entry is replaced. The model is moved to the CPU.
    """
    folder = entry_dir(recipe.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        _write_entry(tmp, recipe, model.cpu(), tok, metrics)
        if folder.exists():  # a rebuild: move the old entry aside, then delete it
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.rename(folder, old)
            shutil.rmtree(old)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def build(name: str, device: str | torch.device = "cpu", force: bool = False,
          progress: bool = True) -> Path:
    """Make sure the entry of `name` is in the cache (training it if needed); its folder.

    Safe to call from several processes at once: one trains, the others wait for the lock
    and find the entry built. force=True rebuilds an existing entry.
    """
    recipe = get_recipe(name)
    folder = entry_dir(name)
    if is_built(name) and not force:
        return folder  # the common case takes no lock
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if is_built(name) and not force:  # built by another process while we waited
            return folder
        if progress:
            print(f"zoo: training {name!r} (recipe {recipe.hash}) into {folder}", flush=True)
        model, tok, metrics = train_recipe(recipe, device=device, progress=progress)
        save(recipe, model, tok, metrics)
        if progress:
            print(f"zoo: {name!r} val loss {metrics['val_loss']:.4f} after "
                  f"{metrics['train_seconds']:.0f} s of training", flush=True)
    return folder


def metadata(name: str) -> dict:
    """The config.json of a built entry: gpt_config, recipe, metrics, versions."""
    folder = entry_dir(name)
    if not is_built(name):
        raise ValueError(f"zoo model {name!r} is not built yet (load() or build() builds it)")
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def load(name: str, device: str | torch.device = "cpu",
         progress: bool = True) -> tuple[GPT, Tokenizer]:
    """(model in eval mode on `device`, tokenizer) of a zoo entry; builds it if missing."""
    folder = build(name, device=device, progress=progress)
    meta = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model = GPT(GPTConfig.from_dict(meta["gpt_config"]))
    load_model(model, str(folder / "model.safetensors"), device=str(device))
    tok = Tokenizer.load(folder / "tokenizer.json")
    return model.to(device).eval(), tok


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.zoo", description=__doc__.split(
        "\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the registered recipes and whether each is built")
    b = sub.add_parser("build", help="build recipes (all by default) into the cache")
    b.add_argument("names", nargs="*", help="recipe names (default: all)")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    print(f"cache: {cache_dir()}")
    if args.command == "list":
        for name, recipe in RECIPES.items():
            state = "built" if is_built(name) else "not built"
            print(f"{name:24s} {recipe.hash}  {state:9s}  {recipe.description}")
        return 0
    for name in args.names or list(RECIPES):
        get_recipe(name)  # unknown names fail before anything trains
    for name in args.names or list(RECIPES):
        was_built = is_built(name)
        # A progress bar at a terminal; in a log (CI) only the summary lines.
        build(name, device=args.device, force=args.force, progress=sys.stderr.isatty())
        m = metadata(name)["metrics"]
        how = "cached" if was_built and not args.force else "built"
        print(f"{name:24s} {how:6s}  val loss {m['val_loss']:.4f}  "
              f"train {m['train_seconds']:.1f} s  ({m['steps']} steps, "
              f"{m['torch_threads']} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
