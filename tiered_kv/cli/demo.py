"""``tiered-kv demo``: long-context, multi-turn serving with a tiered prefix cache, measured against recompute.

A small Llama-shaped model is built locally from a config with seeded random weights (nothing is downloaded).
Several users hold conversations over shared system prompts and long shared documents; each turn's prompt is the
whole conversation so far, so contexts grow to tens of thousands of tokens. Every prompt is served twice in the
same run: through :class:`~tiered_kv.integrations.transformers.TieredPrefixCache` (match, restore, compute the
suffix) and by a full prefill (recompute), and the first token's logits of both are compared.

The device and host tiers are sized to hold little more than one prompt, so the users' blocks are pushed down to
the disk tier and come back from it. The disk tier persists under ``--path``: a second run starts with every block
of the first on disk (after a restart, nothing is in memory) and shows prefixes coming back from disk.

Needs the ``serving`` extra (transformers, matplotlib): ``pip install 'tiered_kv[serving]'``.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import click
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import main

__all__ = [
    "DemoModelSpec",
    "DemoOptions",
    "DemoWorkloadSpec",
    "PRESETS",
    "Turn",
    "build_model",
    "build_workload",
    "demo",
    "run_demo",
]

#: Largest acceptable max |logit difference| between restore and recompute, per model dtype.
LOGIT_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


@dataclass(frozen=True, kw_only=True)
class DemoModelSpec:
    """A Llama-shaped decoder with grouped-query attention and seeded random weights."""

    layers: int = 4
    hidden: int = 512
    heads: int = 8
    kv_heads: int = 2
    intermediate: int = 1408
    vocab: int = 1024
    seed: int = 0
    dtype: str = "float32"

    def namespace(self) -> str:
        """The hash namespace: names the model (its shape and weights' seed), as a revision would."""
        return (
            f"demo-llama-L{self.layers}-H{self.hidden}-A{self.heads}-KV{self.kv_heads}-F{self.intermediate}"
            f"-V{self.vocab}-{self.dtype}-seed{self.seed}"
        )


@dataclass(frozen=True, kw_only=True)
class DemoWorkloadSpec:
    """Users, shared prefixes and conversation growth (sizes in tokens).

    User ``u`` talks over system prompt ``u % system_prompts`` and document ``u % documents``; each turn appends
    the assistant's previous reply (from the second turn on) and a new user message. Turns are served round-robin
    over users, so a returning user finds its prefix pushed down the tiers by the others.
    """

    users: int = 3
    turns: int = 3
    system_prompts: int = 2
    system_tokens: int = 1024
    documents: int = 2
    doc_tokens: int = 12288
    message_tokens: int = 1024
    reply_tokens: int = 256
    seed: int = 0


#: Named configurations: ``default`` (a few minutes on a 2-core CPU) and ``tiny`` (seconds: tests, CI).
PRESETS: dict[str, tuple[DemoModelSpec, DemoWorkloadSpec, int]] = {
    "default": (DemoModelSpec(), DemoWorkloadSpec(), 64),
    "tiny": (
        DemoModelSpec(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=256),
        DemoWorkloadSpec(users=2, turns=2, system_tokens=64, doc_tokens=256, message_tokens=48, reply_tokens=16),
        16,
    ),
}


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    """Everything one demo run needs. Tier sizes of 0 are derived from the workload."""

    path: Path = Path(".tiered_kv_demo")
    fresh: bool = False
    plot: Path | None = None
    json_path: Path | None = None
    recompute: bool = True
    page_size: int = 64
    device_blocks: int = 0
    host_blocks: int = 0
    disk_blocks: int = 0
    model: DemoModelSpec = field(default_factory=DemoModelSpec)
    workload: DemoWorkloadSpec = field(default_factory=DemoWorkloadSpec)

    @property
    def tier_path(self) -> Path:
        """The disk tier's directory."""
        return self.path / "disk"

    @property
    def plot_path(self) -> Path:
        """Where the TTFT plot goes (default ``PATH/ttft.png``)."""
        return self.plot if self.plot is not None else self.path / "ttft.png"


@dataclass(frozen=True)
class Turn:
    """One request: user ``user``'s turn ``turn`` (both from 0), with the whole conversation as its prompt."""

    index: int
    user: int
    turn: int
    tokens: list[int]


def build_workload(spec: DemoWorkloadSpec, vocab: int) -> list[Turn]:
    """The deterministic request sequence of ``spec`` (token ids in ``[0, vocab)``)."""
    rng = random.Random(spec.seed)

    def segment(n: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(n)]

    systems = [segment(spec.system_tokens) for _ in range(spec.system_prompts)]
    docs = [segment(spec.doc_tokens) for _ in range(spec.documents)]
    history = [systems[u % spec.system_prompts] + docs[u % spec.documents] for u in range(spec.users)]
    turns: list[Turn] = []
    for t in range(spec.turns):
        for u in range(spec.users):
            if t:
                history[u] += segment(spec.reply_tokens)  # the assistant's answer to the previous turn
            history[u] += segment(spec.message_tokens)
            turns.append(Turn(len(turns), u, t, list(history[u])))
    return turns


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
    )
    config = LlamaConfig(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    return model.to(getattr(torch, spec.dtype)).eval()


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _tier_sizes(options: DemoOptions, turns: list[Turn]) -> tuple[int, int, int]:
    page = options.page_size
    longest = max(math.ceil(len(t.tokens) / page) for t in turns)
    w = options.workload
    unique = (
        w.system_prompts * w.system_tokens
        + w.documents * w.doc_tokens
        + w.users * w.turns * (w.message_tokens + w.reply_tokens)
    )
    # The top tier must hold one whole prompt (a match is returned there), the host tier as much: together they
    # hold far less than the users' working set, so blocks travel to disk and back. (A host tier smaller than
    # the device tier makes the library's cleaner copy device blocks to host over and over; see the report.)
    device = options.device_blocks or longest + 2
    host = options.host_blocks or device
    disk = options.disk_blocks or 2 * math.ceil(unique / page) + 64
    return device, host, disk


def run_demo(options: DemoOptions, console: Console | None = None) -> dict[str, Any]:
    """Serve the workload, print per-turn figures and totals, write the plot (and JSON); returns the summary.

    Raises:
        click.ClickException: the disk tier under ``options.path`` holds another model's blocks (use ``fresh``),
            or another process has it open.
    """
    from ..config import DiskConfig, KvBlockManagerConfig, LayoutConfig
    from ..errors import DiskTierError, LayoutMismatchError
    from ..integrations.transformers import TieredPrefixCache, model_config_for
    from ..manager import KvBlockManager

    console = console or Console(soft_wrap=True)
    spec, page = options.model, options.page_size
    if options.fresh and options.tier_path.exists():
        shutil.rmtree(options.tier_path)
    options.path.mkdir(parents=True, exist_ok=True)

    turns = build_workload(options.workload, spec.vocab)
    device_blocks, host_blocks, disk_blocks = _tier_sizes(options, turns)
    t0 = time.perf_counter()
    model = build_model(spec)
    geometry = model_config_for(model.config, page_size=page, dtype=spec.dtype)
    params = sum(p.numel() for p in model.parameters())
    console.print(
        f"[bold]model[/] Llama-shaped, {spec.layers} layers, hidden {spec.hidden}, {spec.heads} heads / "
        f"{spec.kv_heads} KV heads, {params / 1e6:.1f} M params, {spec.dtype}, seed {spec.seed} "
        f"(built in {_fmt_s(time.perf_counter() - t0)}, {torch.get_num_threads()} threads)"
    )
    console.print(
        f"[bold]blocks[/] {page} tokens, {geometry.block_size_bytes / 2**10:.0f} KiB; tiers: device {device_blocks}, "
        f"host {host_blocks}, disk {disk_blocks} blocks ({options.tier_path})"
    )
    config = KvBlockManagerConfig(
        model=geometry,
        device=LayoutConfig(num_blocks=device_blocks),
        host=LayoutConfig(num_blocks=host_blocks),
        disk=DiskConfig(path=options.tier_path, num_blocks=disk_blocks),
        namespace=spec.namespace(),
        device_type="cpu",
    )
    try:
        bm = KvBlockManager(config)
    except LayoutMismatchError as exc:
        raise click.ClickException(f"{exc} -- the disk tier holds another model's blocks; rerun with --fresh") from exc
    except DiskTierError as exc:
        raise click.ClickException(str(exc)) from exc

    rows: list[dict[str, Any]] = []
    tol = LOGIT_TOLERANCE.get(spec.dtype, 1e-2)
    with bm:
        disk = bm.disk()
        assert disk is not None
        warm = len(disk)
        if warm:
            console.print(f"[bold green]disk tier warm[/]: {warm} blocks from earlier runs")
        else:
            console.print("[bold]disk tier cold[/]: empty (a second run will start warm)")
        w = options.workload
        console.print(
            f"[bold]workload[/] {w.users} users x {w.turns} turns; {w.system_prompts} system prompts of "
            f"{w.system_tokens:,}, {w.documents} documents of {w.doc_tokens:,} tokens; +{w.message_tokens:,} "
            f"per message, +{w.reply_tokens:,} per reply; prompts {len(turns[0].tokens):,} .. "
            f"{max(len(t.tokens) for t in turns):,} tokens"
        )
        cache = TieredPrefixCache(bm, model)
        with torch.inference_mode():  # warm the kernels up so that the first turn's timings are not skewed
            model(torch.zeros((1, 2 * page), dtype=torch.long), logits_to_keep=1)

        progress = Progress(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        with progress:
            task = progress.add_task("serving", total=len(turns))
            for turn in turns:
                n = len(turn.tokens)
                progress.update(task, description=f"user {turn.user} turn {turn.turn + 1}: {n:,} tokens")
                out, stats = cache.prefill(turn.tokens, logits_to_keep=1)
                logits = out.logits[0, -1].float()
                del out
                recompute_s = diff = None
                if options.recompute:
                    ids = torch.tensor([turn.tokens], dtype=torch.long)
                    with torch.inference_mode():
                        r0 = time.perf_counter()
                        ref = model(ids, logits_to_keep=1)
                        recompute_s = time.perf_counter() - r0
                    diff = float((ref.logits[0, -1].float() - logits).abs().max())
                    del ref
                row = {
                    "turn": turn.index + 1,
                    "user": turn.user,
                    "user_turn": turn.turn + 1,
                    "prompt_tokens": n,
                    "matched_tokens": stats.matched_tokens,
                    "device_tokens": stats.matched_by_tier["device"],
                    "host_tokens": stats.matched_by_tier["host"],
                    "disk_tokens": stats.matched_by_tier["disk"],
                    "computed_tokens": stats.computed_tokens,
                    "stored_blocks": stats.stored_blocks,
                    "ttft_s": stats.ttft_s,
                    "match_s": stats.match_s,
                    "restore_s": stats.restore_s,
                    "forward_s": stats.forward_s,
                    "store_s": stats.store_s,
                    "recompute_s": recompute_s,
                    "max_abs_logit_diff": diff,
                }
                rows.append(row)
                speed = f"x{recompute_s / stats.ttft_s:5.1f}" if recompute_s else ""
                eq = "" if diff is None else ("logits equal" if diff <= tol else f"[red]logits differ {diff:.2e}[/]")
                progress.console.print(
                    f"{turn.index + 1:3d} u{turn.user} t{turn.turn + 1}  {n:7,} tok  matched "
                    f"dev {row['device_tokens']:6,} host {row['host_tokens']:6,} disk {row['disk_tokens']:6,}  "
                    f"computed {stats.computed_tokens:6,}  TTFT {_fmt_s(stats.ttft_s):>8} vs recompute "
                    f"{_fmt_s(recompute_s) if recompute_s else '-':>8} {speed}  {eq}",
                    soft_wrap=True,
                )
                progress.advance(task)
        metrics = bm.metrics()
        # A graceful shutdown: demotion is write-back (on eviction), so push the memory tiers' blocks down to disk
        # for the next run to find.
        before = len(disk)
        for tier in ("device", "host"):
            bm.trigger_eviction("aggressive", tier=tier)
        bm.flush()
        console.print(f"shutdown: memory tiers written down, disk holds {len(disk)} blocks (+{len(disk) - before})")

    summary = _summarize(options, rows, metrics, warm, tol)
    _print_summary(console, summary)
    _plot(options.plot_path, rows, summary)
    console.print(f"plot: {options.plot_path}")
    if options.json_path is not None:
        options.json_path.parent.mkdir(parents=True, exist_ok=True)
        options.json_path.write_text(json.dumps(summary, indent=2))
        console.print(f"json: {options.json_path}")
    return summary


def _summarize(
    options: DemoOptions, rows: list[dict[str, Any]], metrics: dict[str, Any], warm: int, tol: float
) -> dict[str, Any]:
    prompt = sum(r["prompt_tokens"] for r in rows)
    matched = {t: sum(r[f"{t}_tokens"] for r in rows) for t in ("device", "host", "disk")}
    ttft = sum(r["ttft_s"] for r in rows)
    recompute = [r["recompute_s"] for r in rows if r["recompute_s"] is not None]
    diffs = [r["max_abs_logit_diff"] for r in rows if r["max_abs_logit_diff"] is not None]
    totals = {
        "turns": len(rows),
        "prompt_tokens": prompt,
        "matched_tokens": sum(matched.values()),
        "matched_by_tier": matched,
        "computed_tokens": sum(r["computed_tokens"] for r in rows),
        "token_hit_rate": sum(matched.values()) / prompt if prompt else 0.0,
        "hit_rate_by_tier": {t: v / prompt if prompt else 0.0 for t, v in matched.items()},
        "ttft_s": ttft,
        "recompute_s": sum(recompute) if recompute else None,
        "speedup": sum(recompute) / ttft if recompute and ttft else None,
        "max_abs_logit_diff": max(diffs) if diffs else None,
        "logits_equal": all(d <= tol for d in diffs) if diffs else None,
        "warm_disk_blocks_at_start": warm,
    }
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
        "model": asdict(options.model),
        "workload": asdict(options.workload),
        "page_size": options.page_size,
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
        table.add_row(
            f"matched from {tier}", f"{t['matched_by_tier'][tier]:,} ({t['hit_rate_by_tier'][tier]:.1%})"
        )
    table.add_row("computed tokens", f"{t['computed_tokens']:,}")
    table.add_row("token hit rate", f"{t['token_hit_rate']:.1%}")
    table.add_row("TTFT, tiered_kv (sum)", _fmt_s(t["ttft_s"]))
    if t["recompute_s"] is not None:
        table.add_row("TTFT, recompute (sum)", _fmt_s(t["recompute_s"]))
        table.add_row("speedup", f"x{t['speedup']:.1f}")
        verdict = "equal" if t["logits_equal"] else "DIFFER"
        table.add_row("max |logit diff|", f"{t['max_abs_logit_diff']:.2e} ({verdict})")
    for tier, m in summary["tiers"].items():
        table.add_row(f"{tier} tier hit rate", f"{m.get('hit_rate', 0.0):.1%} ({m.get('hits', 0)} hits)")
    off = summary["offload"]
    table.add_row(
        "offload",
        f"{off.get('demotions', 0)} demotions ({off.get('bytes_demoted', 0) / 2**20:.0f} MiB), "
        f"{off.get('promotions', 0)} promotions ({off.get('bytes_promoted', 0) / 2**20:.0f} MiB)",
    )
    console.print(table)


def _plot(path: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["turn"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=[3, 2])
    ax1.plot(x, [r["ttft_s"] for r in rows], "o-", label="tiered_kv (match + restore + suffix)")
    if any(r["recompute_s"] is not None for r in rows):
        ax1.plot(x, [r["recompute_s"] for r in rows], "s--", label="recompute (full prefill)")
    ax1.set_yscale("log")
    ax1.set_ylabel("TTFT (s)")
    m = summary["model"]
    ax1.set_title(f"TTFT per turn: Llama-shaped {m['layers']}L/{m['hidden']}H {m['dtype']}, CPU")
    ax1.legend()
    ax1.grid(True, which="both", alpha=0.3)
    bottom = [0] * len(rows)
    for key, label in (("device_tokens", "device"), ("host_tokens", "host"), ("disk_tokens", "disk"),
                       ("computed_tokens", "computed")):
        vals = [r[key] for r in rows]
        ax2.bar(x, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax2.set_ylabel("prompt tokens")
    ax2.set_xlabel("turn")
    ax2.set_xticks(x)
    ax2.legend(ncol=4, fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


@main.command("demo")
@click.option("--path", type=click.Path(file_okay=False, path_type=Path), default=Path(".tiered_kv_demo"),
              show_default=True, help="Directory of the demo's disk tier (persists between runs) and outputs.")
@click.option("--fresh", is_flag=True, help="Wipe the disk tier first (a cold start).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG of TTFT per turn [default: PATH/ttft.png].")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the per-turn records and totals as JSON.")
@click.option("--recompute/--no-recompute", default=True, show_default=True,
              help="Time a full prefill of every prompt as the baseline and compare logits.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="default", show_default=True,
              help="Sizes to start from; the options below override them.")
@click.option("--users", type=click.IntRange(min=1), default=None)
@click.option("--turns", type=click.IntRange(min=1), default=None, help="Turns per user.")
@click.option("--system-tokens", type=click.IntRange(min=0), default=None)
@click.option("--doc-tokens", type=click.IntRange(min=0), default=None)
@click.option("--message-tokens", type=click.IntRange(min=1), default=None)
@click.option("--reply-tokens", type=click.IntRange(min=0), default=None)
@click.option("--layers", type=click.IntRange(min=1), default=None)
@click.option("--hidden", type=click.IntRange(min=8), default=None)
@click.option("--page-size", type=click.IntRange(min=1), default=None)
@click.option("--device-blocks", type=click.IntRange(min=0), default=0, help="0: one prompt's worth.")
@click.option("--host-blocks", type=click.IntRange(min=0), default=0, help="0: as many as the device tier.")
@click.option("--disk-blocks", type=click.IntRange(min=0), default=0, help="0: twice the working set.")
@click.option("--seed", type=int, default=0, show_default=True, help="Weights and workload seed.")
def demo(
    path: Path,
    fresh: bool,
    plot: Path | None,
    json_path: Path | None,
    recompute: bool,
    preset: str,
    users: int | None,
    turns: int | None,
    system_tokens: int | None,
    doc_tokens: int | None,
    message_tokens: int | None,
    reply_tokens: int | None,
    layers: int | None,
    hidden: int | None,
    page_size: int | None,
    device_blocks: int,
    host_blocks: int,
    disk_blocks: int,
    seed: int,
) -> None:
    """Serve a multi-turn long-context workload with tiered_kv vs recompute; plot TTFT per turn.

    Run it twice: the second run finds the first run's blocks on disk. Exit 1 when restored logits differ.
    """
    try:
        import matplotlib  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        hint = f"the demo needs the serving extra: pip install 'tiered_kv[serving]' ({exc})"
        raise click.ClickException(hint) from exc
    model_spec, workload, preset_page = PRESETS[preset]
    hidden = _pick(hidden, model_spec.hidden)
    model_spec = replace(
        model_spec, layers=_pick(layers, model_spec.layers), hidden=hidden, seed=seed,
        intermediate=model_spec.intermediate * hidden // model_spec.hidden,
    )
    workload = replace(
        workload,
        users=_pick(users, workload.users),
        turns=_pick(turns, workload.turns),
        system_tokens=_pick(system_tokens, workload.system_tokens),
        doc_tokens=_pick(doc_tokens, workload.doc_tokens),
        message_tokens=_pick(message_tokens, workload.message_tokens),
        reply_tokens=_pick(reply_tokens, workload.reply_tokens),
        seed=seed,
    )
    options = DemoOptions(
        path=path, fresh=fresh, plot=plot, json_path=json_path, recompute=recompute,
        page_size=_pick(page_size, preset_page), device_blocks=device_blocks, host_blocks=host_blocks,
        disk_blocks=disk_blocks, model=model_spec, workload=workload,
    )
    summary = run_demo(options)
    if summary["totals"]["logits_equal"] is False:
        raise SystemExit(1)
