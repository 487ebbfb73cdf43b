"""Skip maps of one prompt: which (query block, key tile) tiles BLASST skipped, per layer and head.

    maps = capture_skip_maps(model, tokenizer, "long text ...", scale_factor=8.0)
    maps.sparsity()             # (num_layers, num_heads) skipped / visited
    print(maps.to_string(3, 0)) # like FlexAttention's BlockMask.to_string()
    maps.save("maps.npz"); SkipMaps.load("maps.npz")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from blasst_kernels import TileState

from .hf_attention import BlasstSettings, LayerScaleFactor, Recording, blasst_attention, layer_scale_factors

__all__ = ["SkipMaps", "capture_skip_maps", "TILE_CHARS"]

#: Two characters per tile in :meth:`SkipMaps.to_string`.
TILE_CHARS = {"computed": "██", "diagonal": "▓▓", "skipped": "░░", "unvisited": "  "}


@dataclass
class SkipMaps:
    """Prefill skip maps of one sequence (no cached prefix).

    Attributes:
        maps: int8 ``(num_layers, num_heads, NQ, T)`` :class:`~blasst_kernels.TileState` values,
            ``NQ = ceil(seq_len / block_m)`` query blocks, ``T = ceil(seq_len / block_n)`` key tiles.
        seq_len: tokens in the prompt.
        block_m, block_n: tile sizes.
        scale_factor: float64 ``(num_layers, num_heads)`` threshold scale factors (0 = dense).
        input_ids: int64 ``(seq_len,)`` the prompt.
    """

    maps: torch.Tensor
    seq_len: int
    block_m: int
    block_n: int
    scale_factor: torch.Tensor
    input_ids: torch.Tensor

    def __post_init__(self):
        if self.maps.dim() != 4 or self.maps.dtype != torch.int8:
            raise ValueError(f"maps must be int8 (layers, heads, NQ, T), got {self.maps.dtype} {tuple(self.maps.shape)}")
        expected = (-(-self.seq_len // self.block_m), -(-self.seq_len // self.block_n))
        if tuple(self.maps.shape[2:]) != expected:
            raise ValueError(f"maps have (NQ, T) = {tuple(self.maps.shape[2:])}, expected {expected} for seq_len {self.seq_len}")

    @property
    def num_layers(self) -> int:
        return self.maps.shape[0]

    @property
    def num_heads(self) -> int:
        return self.maps.shape[1]

    @classmethod
    def from_recording(
        cls, rec: Recording, input_ids: torch.Tensor, block_m: int, block_n: int, scale_factor: torch.Tensor
    ) -> "SkipMaps":
        """The first prefill call of every layer in ``rec`` (a whole-prompt prefill)."""
        missing = [layer for layer in range(rec.num_layers) if not rec.prefill.get(layer)]
        if missing:
            raise ValueError(f"recording has no prefill map for layers {missing}: run a forward pass with record=True")
        maps = torch.stack([rec.prefill[layer][0] for layer in range(rec.num_layers)])
        return cls(maps, int(input_ids.numel()), block_m, block_n, scale_factor, input_ids.reshape(-1).long().cpu())

    def diagonal(self) -> torch.Tensor:
        """bool ``(NQ, T)``: tiles that overlap the causal diagonal (never skipped)."""
        rows = torch.arange(self.maps.shape[2])[:, None] * self.block_m
        starts = torch.arange(self.maps.shape[3])[None, :] * self.block_n
        return (starts + self.block_n - 1 > rows) & (starts < rows + self.block_m)

    def counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(skipped, visited)`` int64 ``(num_layers, num_heads)`` tile counts."""
        skipped = (self.maps == int(TileState.SKIPPED)).sum((-2, -1))
        visited = (self.maps != int(TileState.UNVISITED)).sum((-2, -1))
        return skipped, visited

    def sparsity(self) -> torch.Tensor:
        """float32 ``(num_layers, num_heads)``: skipped over visited tiles."""
        skipped, visited = self.counts()
        return skipped.float() / visited.clamp(min=1).float()

    def layer_sparsity(self) -> torch.Tensor:
        """float32 ``(num_layers,)``: skipped over visited tiles of all heads of a layer."""
        skipped, visited = self.counts()
        return skipped.sum(1).float() / visited.sum(1).clamp(min=1).float()

    def overall_sparsity(self) -> float:
        """Skipped over visited tiles of the whole model."""
        skipped, visited = self.counts()
        return float(skipped.sum()) / max(int(visited.sum()), 1)

    def _check_index(self, layer: int, head: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        if not 0 <= head < self.num_heads:
            raise ValueError(f"head must be in [0, {self.num_heads}), got {head}")

    def to_string(self, layer: int, head: int, limit: int = 64) -> str:
        """Text picture of one head's map, one row per query block, two characters per key tile
        (see :data:`TILE_CHARS`); at most ``limit`` rows and columns, then ``…``."""
        self._check_index(layer, head)
        state, diag = self.maps[layer, head], self.diagonal()
        skipped, visited = int((state == int(TileState.SKIPPED)).sum()), int((state != int(TileState.UNVISITED)).sum())
        lines = [
            f"layer {layer} head {head}: {skipped}/{visited} visited tiles skipped ({skipped / max(visited, 1):.1%}); "
            f"{TILE_CHARS['computed']} computed {TILE_CHARS['diagonal']} diagonal {TILE_CHARS['skipped']} skipped"
        ]
        for r in range(min(state.shape[0], limit)):
            cells = []
            for t in range(min(state.shape[1], limit)):
                s = int(state[r, t])
                if s == int(TileState.SKIPPED):
                    cells.append(TILE_CHARS["skipped"])
                elif s == int(TileState.COMPUTED):
                    cells.append(TILE_CHARS["diagonal" if diag[r, t] else "computed"])
                else:
                    cells.append(TILE_CHARS["unvisited"])
            lines.append(("".join(cells) + (" …" if state.shape[1] > limit else "")).rstrip())
        if state.shape[0] > limit:
            lines.append("…")
        return "\n".join(lines)

    def save(self, path: Union[str, Path]) -> Path:
        """Write a compressed ``.npz`` (no pickles); returns its path."""
        path = Path(path)
        np.savez_compressed(
            path, maps=self.maps.numpy(), seq_len=self.seq_len, block_m=self.block_m, block_n=self.block_n,
            scale_factor=self.scale_factor.numpy(), input_ids=self.input_ids.numpy(),
        )
        return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")

    @classmethod
    def load(cls, path: Union[str, Path]) -> "SkipMaps":
        """Read a file written by :meth:`save`."""
        with np.load(Path(path), allow_pickle=False) as data:
            return cls(
                torch.from_numpy(data["maps"]), int(data["seq_len"]), int(data["block_m"]), int(data["block_n"]),
                torch.from_numpy(data["scale_factor"]), torch.from_numpy(data["input_ids"]),
            )


def _factor_table(scale_factor: LayerScaleFactor, num_layers: int, num_heads: int) -> torch.Tensor:
    """Any accepted scale factor as a float64 ``(num_layers, num_heads)`` table (0 = dense)."""
    rows = layer_scale_factors(scale_factor, num_layers, num_heads, "scale_factor")
    return torch.stack([
        torch.zeros(num_heads, dtype=torch.float64) if f is None else f.expand(num_heads) for f in rows
    ])


def capture_skip_maps(
    model,
    tokenizer,
    text_or_ids: Union[str, Sequence[int], torch.Tensor],
    scale_factor: LayerScaleFactor,
    block_m: int = 64,
    block_n: int = 64,
) -> SkipMaps:
    """Run one prefill of ``text_or_ids`` with BLASST and return its skip maps.

    Args:
        model, tokenizer: a transformers causal LM (AttentionInterface-based) and its tokenizer.
        text_or_ids: raw text (tokenized as is, no chat template) or token ids ``(n,)``/``(1, n)``.
        scale_factor: as :attr:`BlasstSettings.scale_factor`.
        block_m, block_n: tile sizes.
    """
    if isinstance(text_or_ids, str):
        ids = torch.tensor([tokenizer(text_or_ids)["input_ids"]], dtype=torch.long)
    else:
        ids = torch.as_tensor(text_or_ids, dtype=torch.long).reshape(1, -1)
    if ids.numel() == 0:
        raise ValueError("text_or_ids is empty")
    config = model.config.get_text_config()
    table = _factor_table(scale_factor, config.num_hidden_layers, config.num_attention_heads)
    settings = BlasstSettings(scale_factor=scale_factor, block_m=block_m, block_n=block_n, record=True)
    device = next(model.parameters()).device
    with torch.no_grad(), blasst_attention(model, settings) as rec:
        model(ids.to(device), use_cache=False)
    return SkipMaps.from_recording(rec, ids[0], block_m, block_n, table)
