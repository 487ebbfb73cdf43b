"""``blasst demo``: BLASST on a real model, on CPU, in a few minutes.

SmolLM2-135M-Instruct reads a long essay prompt with a needle ("the secret passphrase is ...")
and answers greedily twice: with its own dense attention, and with BLASST (prefill and decode).
Prints both answers and a per-layer sparsity table; writes skip-map PNGs, the maps (.npz) and one
HTML page to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List

import torch

if TYPE_CHECKING:
    from .skipmaps import SkipMaps

__all__ = ["DEFAULT_LENGTH", "DEFAULT_SCALE_FACTOR", "DemoResult", "add_subcommand", "run_demo"]

#: Prompt tokens (template, needle and question included).
DEFAULT_LENGTH = 2048
#: λ·L. Measured on the 2048-token needle prompt (λ = 1/4): SmolLM2 skips 50% of the visited
#: prefill tiles (72% in decode) and still finds the needle at depths 0.1, 0.5 and 0.9.
#: (256: 43% / 67%, also found; 1024: 60% prefill.)
DEFAULT_SCALE_FACTOR = 512.0
DEFAULT_NEW_TOKENS = 20


@dataclass
class DemoResult:
    """What :func:`run_demo` measured and wrote.

    Attributes:
        prompt_tokens: prompt length; scale_factor: λ·L used for prefill and decode.
        dense_answer, blasst_answer: greedy answers; dense_found, blasst_found: needle retrieved?
        prefill_sparsity, decode_sparsity: float32 ``(num_layers, num_heads)`` skipped / visited.
        skip_maps: the BLASST prefill's :class:`~blasst_sglang.skipmaps.SkipMaps`.
        files: what was written (HTML page first); seconds: wall time of the whole run.
    """

    prompt_tokens: int
    scale_factor: float
    dense_answer: str
    blasst_answer: str
    dense_found: bool
    blasst_found: bool
    prefill_sparsity: torch.Tensor
    decode_sparsity: torch.Tensor
    skip_maps: "SkipMaps"
    files: List[Path] = field(default_factory=list)
    seconds: float = 0.0

    def layer_table(self) -> List[Dict[str, object]]:
        """One row per layer: mean/min/max prefill sparsity over heads, and decode sparsity."""
        rows = []
        for layer, (pre, dec) in enumerate(zip(self.prefill_sparsity, self.decode_sparsity)):
            rows.append({
                "layer": layer, "prefill": float(pre.mean()), "min head": float(pre.min()),
                "max head": float(pre.max()), "decode": float(dec.nanmean()),
            })
        return rows


@contextlib.contextmanager
def _layer_progress(model, total: int, desc: str, enabled: bool):
    """A tqdm bar that advances once per attention-layer call of ``model``."""
    from tqdm.auto import tqdm

    from .hf_attention import attention_modules

    bar = tqdm(total=total, desc=desc, unit="layer", disable=not enabled, leave=True)

    def advance(*_) -> None:  # a forward hook's non-None return would replace the module's output
        bar.update(1)

    hooks = [m.register_forward_hook(advance) for m in attention_modules(model)]
    try:
        yield bar
    finally:
        for h in hooks:
            h.remove()
        bar.close()


def _generate(model, ids: torch.Tensor, max_new_tokens: int, tokenizer) -> str:
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def _layers_to_plot(layer_sparsity: torch.Tensor) -> List[int]:
    """The least, median and most sparse layers (distinct, in layer order)."""
    order = torch.argsort(layer_sparsity).tolist()
    return sorted({order[0], order[len(order) // 2], order[-1]})


def run_demo(
    length: int = DEFAULT_LENGTH,
    scale_factor: float = DEFAULT_SCALE_FACTOR,
    out_dir: Path | str = "blasst_demo",
    max_new_tokens: int = DEFAULT_NEW_TOKENS,
    depth: float = 0.5,
    block_m: int = 64,
    block_n: int = 64,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Run the demo (see the module doc) and return what it measured.

    Args:
        length: prompt tokens; scale_factor: λ·L (> 0); out_dir: where files go;
        max_new_tokens: greedy tokens per answer; depth: needle position (0 = start, 1 = end);
        block_m, block_n: prefill tile sizes; progress: show tqdm bars; log: where lines go.
    """
    if not scale_factor or scale_factor < 0:
        raise ValueError(f"scale_factor must be > 0 for the demo (λ = scale_factor / length), got {scale_factor!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    from .hf_attention import BlasstSettings, blasst_attention
    from .model import load_smollm2
    from .plotting import plot_layer_maps, plot_sparsity_heatmap, save_html
    from .skipmaps import SkipMaps
    from .text import Needle, needle_prompt_ids

    start = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tok = load_smollm2()
    needle = Needle()
    ids = needle_prompt_ids(tok, length, needle, depth)
    n, layers = ids.shape[1], model.config.num_hidden_layers
    log(f"prompt: {n} tokens of Paul Graham essays, needle at {depth:.0%} depth; "
        f"scale factor {scale_factor:g} -> λ = {scale_factor / n:.3g}, ln λ = {torch.log(torch.tensor(scale_factor / n)):.2f}")

    with _layer_progress(model, layers * max_new_tokens, "dense answer ", progress):
        dense = _generate(model, ids, max_new_tokens, tok)
    settings = BlasstSettings(
        scale_factor=scale_factor, decode_scale_factor=scale_factor, block_m=block_m, block_n=block_n, record=True
    )
    with _layer_progress(model, layers * max_new_tokens, "BLASST answer", progress), blasst_attention(model, settings) as rec:
        sparse = _generate(model, ids, max_new_tokens, tok)

    maps = SkipMaps.from_recording(rec, ids[0], block_m, block_n, torch.full((layers, rec.num_heads), float(scale_factor)))
    result = DemoResult(
        n, float(scale_factor), dense, sparse, needle.found(dense), needle.found(sparse),
        rec.sparsity("prefill"), rec.sparsity("decode"), maps,
    )
    mark = {True: "needle found", False: "needle NOT found"}
    log(f"dense answer : {dense!r}  [{mark[result.dense_found]}]")
    log(f"BLASST answer: {sparse!r}  [{mark[result.blasst_found]}]")
    table = result.layer_table()
    log("layer  prefill sparsity (min-max head)  decode sparsity")
    for row in table:
        log(f"{row['layer']:5d}  {row['prefill']:6.1%}  ({row['min head']:4.0%}-{row['max head']:4.0%})"
            f"             {row['decode']:6.1%}")
    decode_all = float(result.decode_sparsity.nanmean())
    log(f"all layers: prefill {maps.overall_sparsity():.1%} of visited tiles skipped, decode {decode_all:.1%}")
    best = int(torch.argmax(maps.layer_sparsity()))
    log(maps.to_string(best, int(torch.argmax(maps.sparsity()[best])), limit=40))

    figures = {"prefill sparsity per layer and head": plot_sparsity_heatmap(result.prefill_sparsity)}
    for layer in _layers_to_plot(maps.layer_sparsity()):
        figures[f"layer {layer} skip maps"] = plot_layer_maps(maps, layer)
    pngs = []
    for heading, fig in figures.items():
        path = out_dir / (heading.replace(" ", "_") + ".png")
        fig.savefig(path, dpi=110)
        pngs.append(path)
    result.seconds = time.time() - start
    notes = [
        f"SmolLM2-135M-Instruct, {n}-token prompt, needle at {depth:.0%} depth, threshold scale factor "
        f"{scale_factor:g} (λ = {scale_factor / n:.3g}), tiles {block_m}x{block_n}, CPU reference.",
        f"question: {needle.question}",
        f"dense answer:  {dense}  [{mark[result.dense_found]}]",
        f"BLASST answer: {sparse}  [{mark[result.blasst_found]}]",
        f"prefill sparsity {maps.overall_sparsity():.1%}, decode sparsity {decode_all:.1%}; run took {result.seconds:.0f} s.",
    ]
    html = save_html(out_dir / "index.html", figures, {"sparsity per layer": table}, title="BLASST demo", notes=notes)
    result.files = [html, maps.save(out_dir / "skip_maps.npz"), *pngs]
    log(f"wrote {html} (+ {len(pngs)} PNGs, skip_maps.npz) in {result.seconds:.0f} s")
    return result


def _run(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    run_demo(
        length=args.length, scale_factor=args.scale_factor, out_dir=args.out, max_new_tokens=args.max_new_tokens,
        depth=args.depth, progress=not args.no_progress,
    )
    return 0


def add_subcommand(subparsers) -> None:
    """Register ``blasst demo`` (see :mod:`blasst_sglang.cli`)."""
    p = subparsers.add_parser("demo", help="dense vs BLASST answers on a long needle prompt (CPU, real model)",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("--length", type=int, default=DEFAULT_LENGTH, help="prompt tokens (default %(default)s)")
    p.add_argument("--scale-factor", type=float, default=DEFAULT_SCALE_FACTOR,
                   help="threshold scale factor λ·L (default %(default)s)")
    p.add_argument("--out", type=Path, default=Path("blasst_demo"), help="output folder (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_NEW_TOKENS, help="answer tokens (default %(default)s)")
    p.add_argument("--depth", type=float, default=0.5, help="needle depth in [0, 1] (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default %(default)s: the reference's many small ops run fastest on one "
                        "thread, and several threads slow down badly on a busy machine)")
    p.set_defaults(run=_run)
