"""Head geometry: which output rows of the q/k/v projections and which input columns of the output projection
belong to each head of one layer.

Every layout keeps one head's vector in ``head_dim`` consecutive features, in head order; only where the
blocks of the three projections sit differs (``p`` = a head's position among the layer's CURRENT heads,
``d`` in ``[0, head_dim)``, ``Q``/``KV`` = the layer's current query / key-value head counts):

========================  =====================================  ===========================================
``qkv_layout``            projection outputs                      rows of position ``p``
========================  =====================================  ===========================================
``"separate"``            three modules (BERT, Llama, ViT, ...)   ``p*head_dim + d`` in its own module
``"fused"``               one module ``[q | k | v]`` (GPT-2       q: ``p*head_dim + d``; k: ``Q*head_dim + p*head_dim
                          ``c_attn``); with GQA the k and v       + d``; v: ``(Q + KV)*head_dim + p*head_dim + d``
                          blocks are ``KV*head_dim`` wide
``"fused_per_head"``      one module ``[head, (q, k, v), d]``     ``p*3*head_dim + part*head_dim + d``, part 0/1/2
                          (GPT-NeoX ``query_key_value``)          for q/k/v (needs ``Q == KV``)
========================  =====================================  ===========================================

The output projection's input is always the context ``[..., Q * head_dim]``: position ``p`` owns columns
``p*head_dim + d``. Query position ``p`` reads key-value position ``p // (Q // KV)``.

Because each layout lists heads in order, keeping a subset of heads means keeping the union of their rows
in ascending order: the result is the same layout for the smaller counts (see :meth:`HeadGeometry.kept_rows`).
Weights of ``nn.Linear`` are ``[out, in]``; ``transposed`` ones (GPT-2 ``Conv1D``) are ``[in, out]``:
:attr:`HeadGeometry.out_axis` / :attr:`HeadGeometry.in_axis` say which weight axis the indices address.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from cahp.errors import CahpError

QkvLayout = Literal["separate", "fused", "fused_per_head"]
ProjectionKind = Literal["query", "key", "value"]

QKV_LAYOUTS: tuple[str, ...] = get_args(QkvLayout)
PROJECTION_KINDS: tuple[ProjectionKind, ...] = ("query", "key", "value")


class GeometryError(CahpError):
    """A head geometry that cannot exist (inconsistent head counts, or a head position out of range)."""


@dataclass(frozen=True)
class HeadGeometry:
    """Rows and columns of one layer's CURRENT heads.

    Attributes:
        layout: how q, k and v are laid out (module docs).
        query_heads: query heads the layer has now (after any pruning).
        kv_heads: key-value heads the layer has now (equal to ``query_heads`` without GQA).
        head_dim: size of one head's query/key/value vector.
        transposed: weights are ``[in, out]`` (``Conv1D``) instead of ``[out, in]`` (``nn.Linear``).
    """

    layout: QkvLayout
    query_heads: int
    kv_heads: int
    head_dim: int
    transposed: bool = False

    def __post_init__(self) -> None:
        if self.layout not in QKV_LAYOUTS:
            raise GeometryError(f"qkv_layout must be one of {QKV_LAYOUTS}, got {self.layout!r}")
        if self.head_dim <= 0 or self.query_heads < 0 or self.kv_heads < 0:
            raise GeometryError(
                f"head counts must be >= 0 and head_dim > 0, got query_heads={self.query_heads}, "
                f"kv_heads={self.kv_heads}, head_dim={self.head_dim}"
            )
        if (self.query_heads == 0) != (self.kv_heads == 0) or (self.kv_heads and self.query_heads % self.kv_heads):
            raise GeometryError(
                f"{self.query_heads} query heads cannot share {self.kv_heads} key-value heads evenly; every "
                "key-value head needs the same, non-zero number of query heads"
            )
        if self.layout == "fused_per_head" and self.query_heads != self.kv_heads:
            raise GeometryError(
                f"qkv_layout 'fused_per_head' interleaves q, k and v of each head, so it needs as many key-value "
                f"heads as query heads; got {self.query_heads} and {self.kv_heads}. Use 'fused' for a [q | k | v] "
                "projection with grouped-query attention"
            )

    # ---- axes and widths ---------------------------------------------------------------------------------

    @property
    def out_axis(self) -> int:
        """Weight axis of the output features (the rows of :meth:`rows`)."""
        return 1 if self.transposed else 0

    @property
    def in_axis(self) -> int:
        """Weight axis of the input features (the columns of :meth:`output_columns`)."""
        return 0 if self.transposed else 1

    @property
    def query_group_size(self) -> int:
        """Query heads per key-value head (1 without GQA, 0 for a layer without heads)."""
        return self.query_heads // self.kv_heads if self.kv_heads else 0

    def heads_of(self, kind: ProjectionKind) -> int:
        """Number of current heads whose rows ``kind`` holds (query heads, or key-value heads)."""
        _check_kind(kind)
        return self.query_heads if kind == "query" else self.kv_heads

    @property
    def fused(self) -> bool:
        """Whether q, k and v are one projection module."""
        return self.layout != "separate"

    # ---- indices -----------------------------------------------------------------------------------------

    def rows(
        self, kind: ProjectionKind, positions: Sequence[int] | None = None, device: torch.device | None = None
    ) -> torch.Tensor:
        """Output rows of the projection module of ``kind`` that belong to the heads at ``positions``.

        Args:
            kind: ``"query"`` (positions among the query heads) or ``"key"`` / ``"value"`` (positions among the
                key-value heads).
            positions: current positions (``0..heads_of(kind) - 1``; all heads when ``None``), in any order.
            device: where to build the index.

        Returns:
            ``[len(positions) * head_dim]`` long tensor, head-major: the rows of ``positions[i]`` are entries
            ``i*head_dim : (i+1)*head_dim``; so ``weight.index_select(out_axis, rows).unflatten(out_axis,
            (len(positions), head_dim))`` gives one slice per head.
        """
        count = self.heads_of(kind)
        heads = self._positions(positions, count, kind, device)
        part = PROJECTION_KINDS.index(kind)
        if self.layout == "fused_per_head":
            starts = heads * (3 * self.head_dim) + part * self.head_dim
        else:
            offset = 0
            if self.layout == "fused":
                offset = (0, self.query_heads, self.query_heads + self.kv_heads)[part] * self.head_dim
            starts = offset + heads * self.head_dim
        return _spread(starts, self.head_dim)

    def output_columns(
        self, positions: Sequence[int] | None = None, device: torch.device | None = None
    ) -> torch.Tensor:
        """Input columns of the output projection owned by the query heads at ``positions`` (all when ``None``).

        Returns:
            ``[len(positions) * head_dim]`` long tensor, head-major like :meth:`rows`.
        """
        heads = self._positions(positions, self.query_heads, "query", device)
        return _spread(heads * self.head_dim, self.head_dim)

    def kv_positions(self, query_positions: Sequence[int] | None = None) -> list[int]:
        """The key-value position each query position reads (``p // query_group_size``)."""
        positions = range(self.query_heads) if query_positions is None else query_positions
        self._positions(positions, self.query_heads, "query", None)
        return [int(p) // self.query_group_size for p in positions]

    def kept_rows(
        self,
        kinds: Sequence[ProjectionKind],
        query_positions: Sequence[int],
        kv_positions: Sequence[int],
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """Rows of ONE projection module (holding ``kinds``) to keep when the layer keeps the given heads.

        The kept rows, ascending, lay the smaller projection out in the same ``qkv_layout`` for the new counts.

        Args:
            kinds: the kinds this module holds: one for a separate projection, all three for a fused one.
            query_positions, kv_positions: CURRENT positions of the query / key-value heads to keep.

        Returns:
            ``[rows kept]`` long tensor, ascending.
        """
        parts = [self.rows(kind, query_positions if kind == "query" else kv_positions, device) for kind in kinds]
        return torch.cat(parts).sort().values if parts else torch.zeros(0, dtype=torch.long, device=device)

    def _positions(
        self, positions: Sequence[int] | None, count: int, kind: str, device: torch.device | None
    ) -> torch.Tensor:
        """Positions as a long tensor on ``device``, checked in Python (``device`` may be ``meta``)."""
        if positions is None:
            return torch.arange(count, dtype=torch.long, device=device)
        values = [int(p) for p in positions]
        if any(not 0 <= p < count for p in values):
            raise GeometryError(
                f"{kind} head positions {values} are out of range: this layer has {count} {kind} heads now "
                f"(positions 0..{count - 1}, counted among the CURRENT heads)"
            )
        return torch.tensor(values, dtype=torch.long, device=device)


def _check_kind(kind: str) -> None:
    if kind not in PROJECTION_KINDS:
        raise GeometryError(f"projection kind must be one of {PROJECTION_KINDS}, got {kind!r}")


def _spread(starts: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[n]`` block starts -> ``[n * head_dim]`` indices ``start + d``, block after block."""
    within = torch.arange(head_dim, dtype=torch.long, device=starts.device)
    return (starts[:, None] + within[None, :]).reshape(-1)
