"""Declarative description of where the attention heads of an architecture live, and the adapter registry.

An :class:`ArchitectureAdapter` is pure data: dotted attribute paths, a q/k/v layout and a few flags. It is
the ONE place that says which rows and columns of the projections belong to which head: its
:meth:`~ArchitectureAdapter.geometry` returns a :class:`HeadGeometry` for a layer's current heads, and surgery
(:mod:`cahp.surgery`), masking, the magnitude scorer and the FLOP accounting read that instead of working it
out themselves. Signature collectors read the adapter to hook attention maps. Adding an architecture means
writing one small file that calls :func:`register_adapter`.

Paths are relative: ``layers`` to ``model.base_model`` (so ``BertModel`` and
``BertForSequenceClassification`` share an adapter), every other path to one transformer layer.
Head numbers are always the ORIGINAL ones of the unpruned model; ``config.num_attention_heads`` and
``config.num_key_value_heads`` are never changed by surgery, the pruned structure is recorded next to them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from cahp.adapters.geometry import (
    PROJECTION_KINDS,
    QKV_LAYOUTS,
    GeometryError,
    HeadGeometry,
    ProjectionKind,
    QkvLayout,
)
from cahp.errors import UnsupportedArchitectureError


def hidden_size_over_heads(config: PretrainedConfig) -> int:
    """Head size of most models: ``hidden_size // num_attention_heads``."""
    return config.hidden_size // config.num_attention_heads


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Where one family keeps its attention, and what surgery must update when heads go.

    Attributes:
        family: short name used in messages, e.g. ``"bert"``.
        layers: dotted path from ``model.base_model`` to the ``nn.ModuleList`` of transformer layers.
        attention: path inside a layer to the module whose forward returns ``(output, probs, ...)``; with
            ``attn_implementation="eager"`` element ``[1]`` is the attention probabilities
            ``[batch, heads, query_len, key_len]``.
        query, key, value: paths inside a layer to the input projections; with a fused ``qkv_layout`` all
            three name the same module.
        output: path inside a layer to the output projection, whose INPUT is the per-head context
            ``[..., heads * head_dim]``.
        head_dim: ``config -> head size``.
        num_kv_heads_key: config attribute with the number of key-value heads (grouped-query attention);
            ``None`` when every query head has its own key and value.
        qkv_layout: which projection rows are whose (:mod:`cahp.adapters.geometry`): ``"separate"`` modules,
            one ``"fused"`` ``[q | k | v]`` module (GPT-2 ``c_attn``), or one module ``"fused_per_head"``
            with rows ``[head, (q, k, v), head_dim]`` (GPT-NeoX ``query_key_value``).
        transposed: weights are stored ``[in, out]`` (GPT-2 ``Conv1D``), not ``nn.Linear``'s ``[out, in]``.
        head_count_attrs: attributes of the attention module holding its number of query heads.
        width_attrs: attributes of the attention module holding ``query heads * head_dim``.
        kv_groups_attr: attribute of the attention module holding query heads per key-value head.
        per_head_argument: ``(name, position)`` of a forward argument of the attention module shaped
            ``[batch, heads, query_len, key_len]`` that is computed once for the ORIGINAL heads and shared by
            all layers (MPNet's relative position bias); a pruned layer gets its own slice of it.
        probs_need_output_attentions: the attention module returns the probabilities only when called
            with ``output_attentions=True`` (MPNet): run the model with ``output_attentions=True``.
        cache_arguments: names under which the layer passes the generation cache to the attention module
            (a layer without heads still has to record its empty keys and values there).
    """

    family: str
    layers: str
    attention: str
    query: str
    key: str
    value: str
    output: str
    head_dim: Callable[[PretrainedConfig], int] = hidden_size_over_heads
    num_kv_heads_key: str | None = None
    qkv_layout: QkvLayout = "separate"
    transposed: bool = False
    head_count_attrs: tuple[str, ...] = ()
    width_attrs: tuple[str, ...] = ()
    kv_groups_attr: str | None = None
    per_head_argument: tuple[str, int] | None = None
    probs_need_output_attentions: bool = False
    cache_arguments: tuple[str, ...] = ("cache", "past_key_values")

    def __post_init__(self) -> None:
        if self.qkv_layout not in QKV_LAYOUTS:
            raise GeometryError(
                f"adapter {self.family!r}: qkv_layout must be one of {QKV_LAYOUTS}, got {self.qkv_layout!r}"
            )
        if self.qkv_layout != "separate" and len({self.query, self.key, self.value}) != 1:
            raise GeometryError(
                f"adapter {self.family!r}: qkv_layout {self.qkv_layout!r} means one fused projection, so query, key "
                f"and value must name the same module; got {self.query!r}, {self.key!r}, {self.value!r}"
            )

    # ---- model-level facts -------------------------------------------------------------------------------

    def layer_modules(self, model: PreTrainedModel) -> list[nn.Module]:
        """The transformer layers, in order."""
        return list(cast(nn.ModuleList, model.base_model.get_submodule(self.layers)))

    def num_layers(self, model: PreTrainedModel) -> int:
        """Number of transformer layers."""
        return len(self.layer_modules(model))

    def num_heads(self, model_or_config: PreTrainedModel | PretrainedConfig) -> int:
        """ORIGINAL number of query heads per layer (unchanged by pruning)."""
        return int(_config_of(model_or_config).num_attention_heads)

    def num_kv_heads(self, model_or_config: PreTrainedModel | PretrainedConfig) -> int:
        """ORIGINAL number of key-value heads per layer (equals :meth:`num_heads` without GQA)."""
        config = _config_of(model_or_config)
        if self.num_kv_heads_key is None:
            return self.num_heads(config)
        return int(getattr(config, self.num_kv_heads_key, None) or self.num_heads(config))

    def head_size(self, model_or_config: PreTrainedModel | PretrainedConfig) -> int:
        """Size of one head's query/key/value vector."""
        return int(self.head_dim(_config_of(model_or_config)))

    def uses_gqa(self, model_or_config: PreTrainedModel | PretrainedConfig) -> bool:
        """Whether several query heads share one key-value head."""
        return self.num_kv_heads(model_or_config) != self.num_heads(model_or_config)

    def output_inside_attention(self) -> bool:
        """Whether the attention module applies the output projection itself (GPT-2, Llama, ViT, ...)."""
        return self.output.startswith(self.attention + ".")

    # ---- head geometry -----------------------------------------------------------------------------------

    def geometry(
        self,
        model_or_config: PreTrainedModel | PretrainedConfig,
        query_heads: int | None = None,
        kv_heads: int | None = None,
    ) -> HeadGeometry:
        """Which rows/columns of a layer's projections belong to which head, for a layer that has
        ``query_heads`` / ``kv_heads`` heads NOW (default: the original counts; for a pruned model use
        :func:`cahp.surgery.layer_geometries`, which reads the pruning record)."""
        return HeadGeometry(
            layout=self.qkv_layout,
            query_heads=self.num_heads(model_or_config) if query_heads is None else query_heads,
            kv_heads=self.num_kv_heads(model_or_config) if kv_heads is None else kv_heads,
            head_dim=self.head_size(model_or_config),
            transposed=self.transposed,
        )

    def input_projections(self) -> dict[str, tuple[ProjectionKind, ...]]:
        """Each distinct q/k/v projection path of a layer, with the kinds whose rows it holds
        (``{"attn.c_attn": ("query", "key", "value")}`` for a fused layout)."""
        paths: dict[str, tuple[ProjectionKind, ...]] = {}
        for kind, path in zip(PROJECTION_KINDS, (self.query, self.key, self.value), strict=True):
            paths[path] = (*paths.get(path, ()), kind)
        return paths

    def attention_projections(self, layer: nn.Module) -> list[nn.Module]:
        """The distinct q/k/v/o projection modules of one layer (a fused q/k/v projection once)."""
        return [layer.get_submodule(path) for path in (*self.input_projections(), self.output)]

    # ---- modules -----------------------------------------------------------------------------------------

    def attention_modules(self, model: PreTrainedModel) -> list[nn.Module]:
        """One attention module per layer; output ``[1]`` is the probabilities ``[batch, heads, q, k]``."""
        return [layer.get_submodule(self.attention) for layer in self.layer_modules(model)]

    def output_projections(self, model: PreTrainedModel) -> list[nn.Module]:
        """One output projection per layer; its input is the context ``[..., heads * head_dim]``."""
        return [layer.get_submodule(self.output) for layer in self.layer_modules(model)]


def _config_of(model_or_config: PreTrainedModel | PretrainedConfig) -> PretrainedConfig:
    return model_or_config if isinstance(model_or_config, PretrainedConfig) else model_or_config.config


_REGISTRY: dict[str, ArchitectureAdapter] = {}


def register_adapter(model_types: str | Iterable[str], adapter: ArchitectureAdapter) -> ArchitectureAdapter:
    """Register ``adapter`` for one or more ``config.model_type`` values (later registrations win).

    Third parties call this for their own architectures; returns ``adapter`` so it can be used inline.
    """
    names = [model_types] if isinstance(model_types, str) else list(model_types)
    if not names:
        raise ValueError("register_adapter needs at least one model_type")
    for name in names:
        _REGISTRY[name] = adapter
    return adapter


def supported_model_types() -> list[str]:
    """Every ``model_type`` with a registered adapter, sorted."""
    return sorted(_REGISTRY)


def get_adapter(model_or_config: PreTrainedModel | PretrainedConfig | str) -> ArchitectureAdapter:
    """The adapter for a model, a config or a ``model_type`` string.

    Raises:
        UnsupportedArchitectureError: no adapter is registered for the model type.
    """
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)  # a model, or already a config
        model_type = getattr(config, "model_type", None) or type(model_or_config).__name__
    adapter = _REGISTRY.get(model_type)
    if adapter is None:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} has no adapter; supported: {', '.join(supported_model_types())}. "
            "Describe it with an ArchitectureAdapter and call cahp.adapters.register_adapter()."
        )
    return adapter


def attention_modules(model: PreTrainedModel) -> list[nn.Module]:
    """One attention module per layer, in order; with ``attn_implementation="eager"`` its output ``[1]`` is
    the attention probabilities ``[batch, heads, query_len, key_len]`` (MPNet: also pass
    ``output_attentions=True``). Heads are the layer's CURRENT (kept) heads, in original order."""
    return get_adapter(model).attention_modules(model)


def output_projections(model: PreTrainedModel) -> list[nn.Module]:
    """One output projection per layer, in order; its input is the context ``[..., heads * head_dim]``."""
    return get_adapter(model).output_projections(model)


def num_layers(model: PreTrainedModel) -> int:
    """Number of transformer layers."""
    return get_adapter(model).num_layers(model)


def num_heads(model_or_config: PreTrainedModel | PretrainedConfig) -> int:
    """ORIGINAL number of query heads per layer."""
    return get_adapter(model_or_config).num_heads(model_or_config)


def num_kv_heads(model_or_config: PreTrainedModel | PretrainedConfig) -> int:
    """ORIGINAL number of key-value heads per layer."""
    return get_adapter(model_or_config).num_kv_heads(model_or_config)
