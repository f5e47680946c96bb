"""What each attention head does, measured batch by batch from hooks: sinks, special-token heads, entropy,
output norms, adjacent-layer divergence, and (with classes) CAHP's separability.

Every statistic is computed per example over its *informative rows*: the real query positions that see at
least two real keys (in an encoder every real query of an example of two or more tokens; in a causal map every
real query after the first real one). Padded queries and keys never count, whichever side pads, so the
statistics of an example do not depend on how much padding its batch adds. A head's value is the mean over
examples of the per-example mean over rows; examples without informative rows are skipped.

Per head (maps ``[batch, heads, query, key]``, real keys only):

* **sink score**: attention to the first REAL token (after any left padding), mean over the informative rows;
  a head is a sink when it exceeds :data:`SINK_EPSILON` (Gu et al. 2024, "When Attention Sink Emerges in
  Language Models": epsilon 0.3).
* **special-token share**: attention mass on the special tokens present among the real tokens ([CLS], [SEP],
  BOS, EOS: the tokenizer's special ids); a head is a special-token head above
  :data:`SPECIAL_TOKEN_HEAD_SHARE`.
* **entropy**: Shannon entropy of the row divided by ``log`` of the number of keys the row sees (0 = one key,
  1 = uniform over the visible keys).
* **output norm**: Euclidean norm of the head's slice of the context vector that enters the output projection
  (columns from the adapter's geometry), mean over real tokens; a head is dormant when its norm is below
  :data:`DORMANT_RELATIVE_NORM` times the mean norm of its layer's heads.

Per pair of adjacent layers ``(l - 1, l)``: Kullback-Leibler ``KL(P_l || P_{l-1})`` and Jensen-Shannon
divergence (natural log, so JS lies in ``[0, ln 2]``) between the rows of their maps, at layer level (maps
averaged over heads) and per head against every head of the previous layer; a head's *best match* is the
previous-layer head of lowest mean JS divergence. KL adds :data:`DIVERGENCE_EPSILON` inside its logarithms
(a key the previous map gives zero mass would make it infinite).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from cahp.adapters import get_adapter
from cahp.errors import CahpError
from cahp.runtime import model_device
from cahp.scoring.base import HeadScorer
from cahp.signatures.resize import DEFAULT_SIZE, resize_attention_maps
from cahp.signatures.stats import StreamingMoments

if TYPE_CHECKING:
    from cahp.calibration import Calibration

#: A head whose mean attention to the first real token exceeds this is an attention sink (Gu et al. 2024).
SINK_EPSILON = 0.3
#: A head that puts more than this share of its attention on special tokens is a special-token head.
SPECIAL_TOKEN_HEAD_SHARE = 0.5
#: A head whose mean output norm is below this fraction of its layer's mean head norm is dormant.
DORMANT_RELATIVE_NORM = 0.1
#: Added to both distributions inside the logarithms of the KL divergence.
DIVERGENCE_EPSILON = 1e-10


# ---- statistics of one batch of maps (pure tensor functions) -------------------------------------------------


def informative_rows(attention_mask: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Which query rows count, and how many keys each row sees.

    Args:
        attention_mask: ``[batch, L]``, nonzero = real token (real tokens contiguous in a causal model).
        causal: the maps are causal (a query sees the real keys up to itself).

    Returns:
        ``rows`` ``[batch, L]`` bool (real queries seeing at least two real keys) and ``visible`` ``[batch, L]``
        float64 (real keys each query sees; meaningful on ``rows`` only).
    """
    real = attention_mask != 0
    if causal:
        visible = real.to(torch.float64).cumsum(-1)
    else:
        visible = real.sum(-1, keepdim=True).to(torch.float64).expand(real.shape)
    return real & (visible >= 2), visible


def _clean(maps: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``[batch, heads, L, L]`` float64 maps with zeros outside informative rows x real keys (padded rows may
    hold NaN in eager attention: they are replaced, not multiplied)."""
    keep = rows[:, None, :, None] & (attention_mask != 0)[:, None, None, :]
    return torch.where(keep, maps.to(torch.float64), 0.0)


def _row_mean(values: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example mean over informative rows of ``values`` ``[batch, heads, L]`` -> ``[batch, heads]``, and
    ``[batch]`` bool: the example has informative rows."""
    count = rows.sum(-1)
    weights = rows.to(torch.float64) / count.clamp(min=1).to(torch.float64)[:, None]
    return (values * weights[:, None, :]).sum(-1), count > 0


def _check_maps(maps: torch.Tensor, attention_mask: torch.Tensor) -> None:
    if maps.ndim != 4 or maps.shape[-1] != maps.shape[-2]:
        raise CahpError(f"attention maps must be [batch, heads, L, L], got shape {tuple(maps.shape)}")
    if tuple(attention_mask.shape) != (maps.shape[0], maps.shape[-1]):
        raise CahpError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match the maps "
            f"[batch={maps.shape[0]}, L={maps.shape[-1]}]"
        )


def first_real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[batch]`` position of each example's first real token (after any left padding)."""
    return (attention_mask != 0).to(torch.int8).argmax(-1)


def first_token_attention(
    maps: torch.Tensor, attention_mask: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sink score per example: mean over informative rows of the attention to the first real token.

    Args:
        maps: ``[batch, heads, L, L]`` attention probabilities.
        attention_mask: ``[batch, L]``, nonzero = real token.
        causal: the maps are causal.

    Returns:
        ``[batch, heads]`` float64 scores and ``[batch]`` bool (the example has informative rows).
    """
    _check_maps(maps, attention_mask)
    rows, _ = informative_rows(attention_mask, causal)
    clean = _clean(maps, attention_mask, rows)
    first = first_real_positions(attention_mask)
    to_first = clean[torch.arange(clean.shape[0], device=clean.device), :, :, first]  # [batch, heads, L]
    return _row_mean(to_first, rows)


def special_token_share(
    maps: torch.Tensor, attention_mask: torch.Tensor, special_mask: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Share of attention on special tokens per example: mean over informative rows of the mass on real keys
    that are special tokens.

    Args:
        maps: ``[batch, heads, L, L]``.
        attention_mask: ``[batch, L]``, nonzero = real token.
        special_mask: ``[batch, L]`` bool, True at special tokens (padding is ignored even when marked).
        causal: the maps are causal.

    Returns:
        ``[batch, heads]`` float64 shares in ``[0, 1]`` and ``[batch]`` bool (the example has informative rows).
    """
    _check_maps(maps, attention_mask)
    rows, _ = informative_rows(attention_mask, causal)
    clean = _clean(maps, attention_mask, rows)
    special = (special_mask.to(clean.device) & (attention_mask != 0)).to(torch.float64)
    on_special = torch.einsum("bhqk,bk->bhq", clean, special)
    return _row_mean(on_special, rows)


def normalized_entropy(
    maps: torch.Tensor, attention_mask: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention entropy per example: mean over informative rows of ``H(row) / log(visible keys)``.

    Returns:
        ``[batch, heads]`` float64 in ``[0, 1]`` and ``[batch]`` bool (the example has informative rows).
    """
    _check_maps(maps, attention_mask)
    rows, visible = informative_rows(attention_mask, causal)
    clean = _clean(maps, attention_mask, rows)
    entropy = -torch.special.xlogy(clean, clean).sum(-1)  # [batch, heads, L]
    return _row_mean(entropy / torch.log(visible.clamp(min=2.0))[:, None, :], rows)


def map_divergences(
    current: torch.Tensor, previous: torch.Tensor, attention_mask: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KL and JS divergence between every head of one layer and every head of the previous one, per example.

    ``kl[b, h, g]`` is the mean over informative rows of ``KL(current[b, h] || previous[b, g])`` (natural log,
    :data:`DIVERGENCE_EPSILON` inside the logs), ``js[b, h, g]`` the Jensen-Shannon divergence (natural log,
    in ``[0, ln 2]``). For layer-level divergences pass the head-averaged maps (``maps.mean(1, keepdim=True)``).

    Args:
        current: ``[batch, heads, L, L]`` maps of layer ``l``.
        previous: ``[batch, heads_previous, L, L]`` maps of layer ``l - 1``.
        attention_mask: ``[batch, L]``.
        causal: the maps are causal.

    Returns:
        ``kl`` and ``js`` ``[batch, heads, heads_previous]`` float64, and ``[batch]`` bool (the example has
        informative rows).
    """
    _check_maps(current, attention_mask)
    _check_maps(previous, attention_mask)
    rows, _ = informative_rows(attention_mask, causal)
    p = _clean(current, attention_mask, rows)
    q = _clean(previous, attention_mask, rows)
    count = rows.sum(-1).clamp(min=1).to(torch.float64)  # [batch]
    self_term = torch.special.xlogy(p, p + DIVERGENCE_EPSILON).sum((-2, -1))  # [batch, heads]
    cross_term = torch.einsum("bhqk,bgqk->bhg", p, torch.log(q + DIVERGENCE_EPSILON))
    kl = ((self_term[:, :, None] - cross_term) / count[:, None, None]).clamp(min=0.0)
    negative_entropy_p = torch.special.xlogy(p, p).sum((-2, -1))  # [batch, heads]
    negative_entropy_q = torch.special.xlogy(q, q).sum((-2, -1))  # [batch, heads_previous]
    js = torch.empty_like(kl)
    for g in range(q.shape[1]):
        middle = 0.5 * (p + q[:, g : g + 1])
        negative_entropy_middle = torch.special.xlogy(middle, middle).sum((-2, -1))  # [batch, heads]
        js[:, :, g] = 0.5 * (negative_entropy_p + negative_entropy_q[:, g : g + 1]) - negative_entropy_middle
    js = (js / count[:, None, None]).clamp(min=0.0)
    return kl, js, rows.any(-1)


def head_output_norms(
    context: torch.Tensor, attention_mask: torch.Tensor, columns: torch.Tensor, heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over real tokens of the norm of each head's slice of the context entering the output projection.

    Args:
        context: ``[batch, L, width]`` input of the output projection.
        attention_mask: ``[batch, L]``, nonzero = real token.
        columns: ``[heads * head_dim]`` the heads' columns, head-major (:meth:`HeadGeometry.output_columns`).
        heads: number of heads.

    Returns:
        ``[batch, heads]`` float64 norms and ``[batch]`` bool (the example has real tokens).
    """
    if context.ndim != 3 or tuple(context.shape[:2]) != tuple(attention_mask.shape):
        raise CahpError(
            f"the output projection's input {tuple(context.shape)} is not [batch, L, width] for the attention "
            f"mask {tuple(attention_mask.shape)}"
        )
    per_head = context.index_select(-1, columns.to(context.device)).unflatten(-1, (heads, -1))  # [b, L, h, d]
    norms = torch.linalg.vector_norm(per_head.to(torch.float64), dim=-1).transpose(1, 2)  # [b, h, L]
    return _row_mean(norms, attention_mask != 0)


def is_causal_map(maps: torch.Tensor, attention_mask: torch.Tensor, tolerance: float = 1e-12) -> bool | None:
    """Whether the maps give no attention to later real keys: ``None`` when no example has two real tokens."""
    real = attention_mask != 0
    later = torch.ones(maps.shape[-1], maps.shape[-1], dtype=torch.bool, device=maps.device).triu(1)
    pairs = real[:, :, None] & real[:, None, :] & later  # [batch, q, k]
    if not bool(pairs.any()):
        return None
    return bool(torch.where(pairs[:, None], maps.abs(), 0.0).amax() <= tolerance)


# ---- accumulation over batches --------------------------------------------------------------------------------


class HeadStatistics:
    """Streaming sums of the per-example head statistics of a whole model (merge-able across processes).

    Args:
        layers: transformer layers.
        heads: query heads per layer.

    Attributes (sums over examples; ``*_examples`` count the examples that entered each sum):
        sink_, special_, entropy_, norm_: ``[layers, heads]``.
        head_kl_, head_js_: ``[layers - 1, heads, heads]`` (layer ``l`` head ``h`` vs layer ``l - 1`` head ``g``).
        layer_kl_, layer_js_: ``[layers - 1]``.
    """

    def __init__(self, layers: int, heads: int) -> None:
        self.layers = layers
        self.heads = heads
        pairs = max(layers - 1, 0)
        self.sink_ = torch.zeros(layers, heads, dtype=torch.float64)
        self.special_ = torch.zeros_like(self.sink_)
        self.entropy_ = torch.zeros_like(self.sink_)
        self.norm_ = torch.zeros_like(self.sink_)
        self.head_kl_ = torch.zeros(pairs, heads, heads, dtype=torch.float64)
        self.head_js_ = torch.zeros_like(self.head_kl_)
        self.layer_kl_ = torch.zeros(pairs, dtype=torch.float64)
        self.layer_js_ = torch.zeros_like(self.layer_kl_)
        self.map_examples_ = torch.zeros(layers, dtype=torch.int64)
        self.pair_examples_ = torch.zeros(pairs, dtype=torch.int64)
        self.norm_examples_ = torch.zeros(layers, dtype=torch.int64)

    def add_layer_maps(
        self,
        layer: int,
        maps: torch.Tensor,
        attention_mask: torch.Tensor,
        special_mask: torch.Tensor,
        causal: bool,
        previous: torch.Tensor | None = None,
    ) -> HeadStatistics:
        """Fold one layer's maps ``[batch, heads, L, L]`` of one batch (and, for ``layer > 0``, the previous
        layer's maps of the same batch) into the sums; returns self."""
        sink, valid = first_token_attention(maps, attention_mask, causal)
        special, _ = special_token_share(maps, attention_mask, special_mask, causal)
        entropy, _ = normalized_entropy(maps, attention_mask, causal)
        self.sink_[layer] += sink[valid].sum(0).cpu()
        self.special_[layer] += special[valid].sum(0).cpu()
        self.entropy_[layer] += entropy[valid].sum(0).cpu()
        self.map_examples_[layer] += int(valid.sum())
        if layer > 0 and previous is not None:
            kl, js, valid = map_divergences(maps, previous, attention_mask, causal)
            self.head_kl_[layer - 1] += kl[valid].sum(0).cpu()
            self.head_js_[layer - 1] += js[valid].sum(0).cpu()
            layer_kl, layer_js, _ = map_divergences(
                maps.mean(1, keepdim=True), previous.mean(1, keepdim=True), attention_mask, causal
            )
            self.layer_kl_[layer - 1] += layer_kl[valid].sum().cpu()
            self.layer_js_[layer - 1] += layer_js[valid].sum().cpu()
            self.pair_examples_[layer - 1] += int(valid.sum())
        return self

    def add_layer_norms(self, layer: int, norms: torch.Tensor, valid: torch.Tensor) -> HeadStatistics:
        """Fold one layer's ``[batch, heads]`` output norms (``valid`` ``[batch]``) into the sums; returns self."""
        self.norm_[layer] += norms[valid].sum(0).cpu()
        self.norm_examples_[layer] += int(valid.sum())
        return self

    def reduced(self) -> HeadStatistics:
        """The sums over every process of a data-parallel run (``self`` in a single process)."""
        from cahp.distributed import all_reduce_sum, is_distributed

        if not is_distributed():
            return self
        total = HeadStatistics(self.layers, self.heads)
        for name, value in vars(self).items():
            if name.endswith("_"):
                setattr(total, name, all_reduce_sum(value))
        return total

    def merge(self, other: HeadStatistics) -> HeadStatistics:
        """Add another accumulator of the same grid (e.g. another process's); returns self."""
        if (other.layers, other.heads) != (self.layers, self.heads):
            raise CahpError(
                f"cannot merge head statistics of {other.layers}x{other.heads} heads into {self.layers}x{self.heads}"
            )
        for name, value in vars(other).items():
            if name.endswith("_"):
                getattr(self, name).add_(value)
        return self


def _mean(total: torch.Tensor, count: torch.Tensor) -> np.ndarray:
    """``total / count`` per leading index, NaN where nothing was counted."""
    shape = (-1,) + (1,) * (total.ndim - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total.numpy() / count.numpy().reshape(shape).astype(np.float64)
    mean[count.numpy() == 0] = np.nan
    return mean


# ---- the result -----------------------------------------------------------------------------------------------


@dataclass
class HeadAnalysis:
    """Per-head and per-layer-pair statistics of one model on one calibration set.

    Attributes:
        causal: the maps were causal.
        examples: calibration examples that entered the statistics.
        sink_score, special_token_share, entropy, output_norm: ``[layers, heads]`` means.
        separability: ``[layers, heads]`` mean Jeffries-Matusita separability of the signatures over class
            pairs and features (CAHP's profiles, averaged), or ``None`` without classes.
        head_kl, head_js: ``[layers - 1, heads, heads_previous]`` mean divergences of layer ``l`` head ``h`` from
            layer ``l - 1`` head ``g``.
        layer_kl, layer_js: ``[layers - 1]`` divergences of the head-averaged maps.
        special_token_ids: the token ids counted as special.
    """

    causal: bool
    examples: int
    sink_score: np.ndarray
    special_token_share: np.ndarray
    entropy: np.ndarray
    output_norm: np.ndarray
    head_kl: np.ndarray
    head_js: np.ndarray
    layer_kl: np.ndarray
    layer_js: np.ndarray
    special_token_ids: list[int]
    separability: np.ndarray | None = None

    @property
    def grid(self) -> tuple[int, int]:
        """``(layers, heads)``."""
        return self.sink_score.shape

    @property
    def is_sink(self) -> np.ndarray:
        """``[layers, heads]`` bool: sink score above :data:`SINK_EPSILON`."""
        return self.sink_score > SINK_EPSILON

    @property
    def is_special_token_head(self) -> np.ndarray:
        """``[layers, heads]`` bool: special-token share above :data:`SPECIAL_TOKEN_HEAD_SHARE`."""
        return self.special_token_share > SPECIAL_TOKEN_HEAD_SHARE

    @property
    def is_dormant(self) -> np.ndarray:
        """``[layers, heads]`` bool: output norm below :data:`DORMANT_RELATIVE_NORM` x its layer's mean."""
        layer_mean = self.output_norm.mean(axis=1, keepdims=True)
        return self.output_norm < DORMANT_RELATIVE_NORM * layer_mean

    @property
    def best_match(self) -> np.ndarray:
        """``[layers, heads]`` int: the previous-layer head of lowest JS divergence (-1 in layer 0)."""
        layers, heads = self.grid
        match = np.full((layers, heads), -1, dtype=np.int64)
        if layers > 1:
            match[1:] = np.nanargmin(np.nan_to_num(self.head_js, nan=np.inf), axis=-1)
        return match

    def best_match_divergence(self, kind: str = "js") -> np.ndarray:
        """``[layers, heads]`` divergence (``"js"`` or ``"kl"``) from the best-matched head (NaN in layer 0)."""
        table = {"js": self.head_js, "kl": self.head_kl}[kind]
        layers, heads = self.grid
        values = np.full((layers, heads), np.nan)
        if layers > 1:
            values[1:] = np.take_along_axis(table, self.best_match[1:, :, None], axis=-1)[..., 0]
        return values

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready ``analysis`` object (schema: ``docs/analysis.md``); NaN becomes ``null``."""
        layers, heads = self.grid
        return {
            "grid": {"layers": layers, "heads": heads},
            "causal": self.causal,
            "examples": self.examples,
            "special_token_ids": list(self.special_token_ids),
            "thresholds": {
                "sink_epsilon": SINK_EPSILON,
                "special_token_head_share": SPECIAL_TOKEN_HEAD_SHARE,
                "dormant_relative_norm": DORMANT_RELATIVE_NORM,
                "divergence_epsilon": DIVERGENCE_EPSILON,
            },
            "heads": {
                "sink_score": _json(self.sink_score),
                "is_sink": self.is_sink.tolist(),
                "special_token_share": _json(self.special_token_share),
                "is_special_token_head": self.is_special_token_head.tolist(),
                "entropy": _json(self.entropy),
                "output_norm": _json(self.output_norm),
                "is_dormant": self.is_dormant.tolist(),
                "separability": None if self.separability is None else _json(self.separability),
                "best_match_previous_layer": self.best_match.tolist(),
                "best_match_js": _json(self.best_match_divergence("js")),
                "best_match_kl": _json(self.best_match_divergence("kl")),
            },
            "adjacent_layers": [
                {
                    "layers": [pair, pair + 1],
                    "kl": _json(self.layer_kl[pair]),
                    "js": _json(self.layer_js[pair]),
                    "head_js": _json(self.head_js[pair]),
                    "head_kl": _json(self.head_kl[pair]),
                }
                for pair in range(layers - 1)
            ],
            "summary": {
                "sink_heads": _head_list(self.is_sink),
                "special_token_heads": _head_list(self.is_special_token_head),
                "dormant_heads": _head_list(self.is_dormant),
            },
        }


def _json(values: Any) -> Any:
    """Floats (nested lists) with NaN as ``None``, rounded to 6 significant digits."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 0:
        return None if np.isnan(array) else float(f"{float(array):.6g}")
    return [_json(item) for item in array]


def _head_list(flags: np.ndarray) -> list[list[int]]:
    """``[[layer, head], ...]`` where ``flags`` ``[layers, heads]`` is True."""
    return [[int(layer), int(head)] for layer, head in np.argwhere(flags)]


# ---- the calibration sweep ------------------------------------------------------------------------------------


def analyze_heads(
    model: PreTrainedModel,
    calibration: Calibration,
    *,
    batch_size: int | None = None,
    special_token_ids: Iterable[int] | None = None,
    separability: bool = True,
    signature_size: int = DEFAULT_SIZE,
    progress: bool = False,
) -> HeadAnalysis:
    """Run the calibration set through ``model`` once and measure every head (module docs).

    Args:
        model: an unpruned model with a registered adapter (left as given: weights, modes, attention backend).
        calibration: the examples; with two or more classes present, separability is measured too.
        batch_size: examples per forward (``None``: the calibration's); batches are sorted by length.
        special_token_ids: ids counted as special tokens (``None``: ``calibration.tokenizer.all_special_ids``).
        separability: measure CAHP's mean JM separability when the calibration has classes.
        signature_size: side of the resized maps of the separability signatures.
        progress: show a progress bar.

    Raises:
        CahpError: a pruned model, or a model that returns no attention maps.
    """
    from cahp.distributed import merge_moments
    from cahp.scoring.base import preserved_model
    from cahp.scoring.separability import separability_profiles
    from cahp.signatures.collector import eager_attention
    from cahp.surgery import is_pruned

    if is_pruned(model):
        raise CahpError("head analysis needs an unpruned model (every layer with all its heads); analyse it first")
    adapter = get_adapter(model)
    layers, heads = adapter.num_layers(model), adapter.num_heads(model)
    columns = adapter.geometry(model).output_columns()
    if special_token_ids is None:
        special_token_ids = getattr(calibration.tokenizer, "all_special_ids", None) or []
    special_ids = sorted({int(token) for token in special_token_ids})
    groups = _groups_if_classes(calibration) if separability else None
    moments = StreamingMoments(calibration.num_groups) if groups is not None else None
    statistics = HeadStatistics(layers, heads)
    device = model_device(model)
    state: dict[str, Any] = {"causal": None, "previous": None, "signatures": [None] * layers}

    def masks(length: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        mask = state.get("mask")
        if mask is None:  # no attention mask (images): every position is real
            mask = torch.ones(batch, length, dtype=torch.long, device=device)
        special = state.get("special")
        return mask, special if special is not None else torch.zeros_like(mask, dtype=torch.bool)

    def attention_hook(layer: int) -> Callable[[torch.nn.Module, Any, Any], None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            maps = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if maps is None:
                raise CahpError(f"layer {layer} returned no attention probabilities: eager attention is needed")
            if maps.shape[1] != heads:
                raise CahpError("head analysis needs an unpruned model (every layer with all its heads)")
            mask, special = masks(maps.shape[-1], maps.shape[0])
            if state["causal"] is None:
                state["causal"] = is_causal_map(maps, mask)
            causal = bool(state["causal"])
            maps = maps.detach().float()
            statistics.add_layer_maps(layer, maps, mask, special, causal, state["previous"] if layer else None)
            state["previous"] = maps
            if moments is not None:
                state["signatures"][layer] = resize_attention_maps(maps, mask, signature_size)

        return hook

    def output_hook(layer: int) -> Callable[[torch.nn.Module, Any], None]:
        def hook(module: torch.nn.Module, args: Any) -> None:
            context = args[0]
            mask, _ = masks(context.shape[1], context.shape[0])
            norms, valid = head_output_norms(context.detach(), mask, columns, heads)
            statistics.add_layer_norms(layer, norms, valid)

        return hook

    attention = adapter.attention_modules(model)
    outputs = adapter.output_projections(model)
    handles = [module.register_forward_hook(attention_hook(i)) for i, module in enumerate(attention)]
    handles += [module.register_forward_pre_hook(output_hook(i)) for i, module in enumerate(outputs)]
    extra = {"output_attentions": True} if adapter.probs_need_output_attentions else {}
    try:
        with preserved_model(model), eager_attention(model), torch.inference_mode():
            bar = tqdm(
                total=calibration.local_num_batches(batch_size), desc="analysis", disable=not progress, leave=False
            )
            for indices, batch in calibration.indexed_batches(batch_size, sort_by_length=True):
                mask = batch.get("attention_mask")
                state["mask"] = mask.to(device) if mask is not None else None
                ids = batch.get("input_ids")
                state["special"] = (
                    torch.isin(ids, torch.tensor(special_ids, dtype=ids.dtype)).to(device) if ids is not None else None
                )
                state["previous"] = None
                calibration.forward(model, batch, **extra)
                if moments is not None and groups is not None:
                    stacked = torch.cat(state["signatures"], dim=1)  # [batch, layers * heads, size * size]
                    moments.add_batch(stacked.cpu(), torch.as_tensor(groups[indices], dtype=torch.long))
                bar.update()
            bar.close()
    finally:
        for handle in handles:
            handle.remove()
    statistics = statistics.reduced()
    if moments is not None:
        moments = merge_moments(moments)
    if int(statistics.map_examples_.min()) == 0:
        raise CahpError(
            "no calibration example has two or more real tokens, so no head statistic can be measured: "
            "give longer examples"
        )
    mean_separability = None
    if moments is not None:
        profiles = separability_profiles(moments.mean_, moments.variance(ddof=1), "jm", counts=moments.count_)
        mean_separability = profiles.mean(axis=1).reshape(layers, heads)
    return HeadAnalysis(
        causal=_causal_everywhere(state["causal"]),
        examples=int(statistics.map_examples_[0]),
        sink_score=_mean(statistics.sink_, statistics.map_examples_),
        special_token_share=_mean(statistics.special_, statistics.map_examples_),
        entropy=_mean(statistics.entropy_, statistics.map_examples_),
        output_norm=_mean(statistics.norm_, statistics.norm_examples_),
        head_kl=_mean(statistics.head_kl_, statistics.pair_examples_),
        head_js=_mean(statistics.head_js_, statistics.pair_examples_),
        layer_kl=_mean(statistics.layer_kl_, statistics.pair_examples_),
        layer_js=_mean(statistics.layer_js_, statistics.pair_examples_),
        special_token_ids=special_ids,
        separability=mean_separability,
    )


def _causal_everywhere(causal: bool | None) -> bool:
    """Whether the maps were causal, agreed over the processes of a data-parallel run (a process that saw no
    batch has ``None``)."""
    from cahp.distributed import all_reduce_sum

    votes = all_reduce_sum(torch.tensor([causal is True, causal is False], dtype=torch.int64))
    return bool(votes[0] > 0 and votes[1] == 0)


def _groups_if_classes(calibration: Calibration) -> np.ndarray | None:
    """``[examples]`` classes when at least two are present (separability is measured), else ``None``."""
    if calibration.num_groups < 2:
        return None
    groups = np.asarray(calibration.groups())
    return groups if len(np.unique(groups)) >= 2 else None


class AnalysisScorer(HeadScorer):
    """Base of the scorers that rank heads by what :func:`analyze_heads` measures (``sink``, ``redundancy``): one
    streaming pass over a seeded subset of the calibration set, then :meth:`_from_analysis`.

    Args:
        batch_size: examples per forward.
        max_examples: at most this many examples (seeded subset); default 512.
        seed: picks the subset (only when the calibration set is larger than ``max_examples``).

    Learned state: ``scores_`` and ``analysis_`` (the :class:`HeadAnalysis`).
    """

    def __init__(self, *, batch_size: int = 32, max_examples: int | None = 512, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.batch_size = batch_size
        self.max_examples = max_examples

    def _score(self, model: PreTrainedModel, calibration: Calibration) -> np.ndarray:
        examples = calibration.subset(self.max_examples, self.seed)
        self.analysis_ = analyze_heads(model, examples, batch_size=self.batch_size, separability=False)
        return self._from_analysis(self.analysis_)

    def _from_analysis(self, analysis: HeadAnalysis) -> np.ndarray:
        """``[layers, heads]`` scores (higher = keep) from the analysis."""
        raise NotImplementedError
