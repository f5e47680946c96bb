"""Tiny random models built from configs (no downloads), one per supported family, with padded inputs.

Every model has 3 layers of 4 query heads (Llama-style models: 2 key-value heads, groups {0,1} and {2,3}),
a sequence-classification head with 3 labels, and runs in fp32 eval mode. GPT-NeoX's rotary embedding covers
half of each head, so a wrong slice of its interleaved ``query_key_value`` shows in the logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    Gemma3TextConfig,
    Gemma3TextForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPTNeoXConfig,
    GPTNeoXForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForSequenceClassification,
    MPNetConfig,
    MPNetForSequenceClassification,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    ViTConfig,
    ViTForImageClassification,
)

HIDDEN, LAYERS, HEADS, KV_HEADS, LABELS, VOCAB = 32, 3, 4, 2, 3, 99
BATCH, SEQ = 2, 7


@dataclass(frozen=True)
class TinySpec:
    """How to build one tiny model and a pruning plan that fits its attention."""

    family: str
    build: Callable[[str], PreTrainedModel]
    is_image: bool = False
    pad_token_id: int = 0
    gqa: bool = False


INIT_STD = 0.2  # larger than the usual 0.02 so that removing a head visibly changes the logits


def _common_text() -> dict:
    return {"vocab_size": VOCAB, "num_labels": LABELS, "initializer_range": INIT_STD}


def _bert(attn: str) -> PreTrainedModel:
    config = BertConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=37,
        max_position_embeddings=64,
        **_common_text(),
    )
    return BertForSequenceClassification._from_config(config, attn_implementation=attn)


def _roberta(attn: str) -> PreTrainedModel:
    config = RobertaConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=37,
        max_position_embeddings=64,
        pad_token_id=1,
        **_common_text(),
    )
    return RobertaForSequenceClassification._from_config(config, attn_implementation=attn)


def _distilbert(attn: str) -> PreTrainedModel:
    config = DistilBertConfig(
        dim=HIDDEN,
        n_layers=LAYERS,
        n_heads=HEADS,
        hidden_dim=37,
        max_position_embeddings=64,
        **_common_text(),
    )
    return DistilBertForSequenceClassification._from_config(config, attn_implementation=attn)


def _mpnet(attn: str) -> PreTrainedModel:
    config = MPNetConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=37,
        max_position_embeddings=64,
        pad_token_id=1,
        **_common_text(),
    )
    model = MPNetForSequenceClassification._from_config(config, attn_implementation=attn)
    with torch.no_grad():  # the bias starts at zero-ish; make it matter so a wrong slice is visible
        model.mpnet.encoder.relative_attention_bias.weight.normal_(0.0, 1.0)
    return model


def _vit(attn: str) -> PreTrainedModel:
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=37,
        num_labels=LABELS,
        initializer_range=INIT_STD,
    )
    return ViTForImageClassification._from_config(config, attn_implementation=attn)


def _gpt2(attn: str) -> PreTrainedModel:
    config = GPT2Config(
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_positions=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **_common_text(),
    )
    return GPT2ForSequenceClassification._from_config(config, attn_implementation=attn)


def _gpt_neox(attn: str) -> PreTrainedModel:
    config = GPTNeoXConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=37,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **_common_text(),
    )
    return GPTNeoXForSequenceClassification._from_config(config, attn_implementation=attn)


def _llama_like(config_cls: type, model_cls: type, **extra: object) -> Callable[[str], PreTrainedModel]:
    def build(attn: str) -> PreTrainedModel:
        config = config_cls(
            hidden_size=HIDDEN,
            intermediate_size=37,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            max_position_embeddings=64,
            pad_token_id=0,
            **extra,
            **_common_text(),
        )
        return model_cls._from_config(config, attn_implementation=attn)

    return build


#: Gemma 3's own parts: QK-norm, a sliding window shorter than the inputs on the first and last layer, the scale
#: from ``query_pre_attn_scalar`` (head size 8 with 4 heads of a 32-wide model).
GEMMA3: dict[str, object] = {
    "head_dim": HIDDEN // HEADS,
    "query_pre_attn_scalar": HIDDEN // HEADS,
    "sliding_window": 3,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
}

SPECS: dict[str, TinySpec] = {
    spec.family: spec
    for spec in [
        TinySpec("bert", _bert),
        TinySpec("roberta", _roberta, pad_token_id=1),
        TinySpec("distilbert", _distilbert),
        TinySpec("mpnet", _mpnet, pad_token_id=1),
        TinySpec("vit", _vit, is_image=True),
        TinySpec("gpt2", _gpt2),
        TinySpec("gpt_neox", _gpt_neox),
        TinySpec("llama", _llama_like(LlamaConfig, LlamaForSequenceClassification, attention_bias=True), gqa=True),
        TinySpec("mistral", _llama_like(MistralConfig, MistralForSequenceClassification), gqa=True),
        TinySpec("qwen2", _llama_like(Qwen2Config, Qwen2ForSequenceClassification), gqa=True),
        TinySpec("gemma3_text", _llama_like(Gemma3TextConfig, Gemma3TextForSequenceClassification, **GEMMA3), gqa=True),
    ]
}
FAMILIES = list(SPECS)

# Uneven plans with one layer losing every head; GQA plans remove whole groups ({0,1} or {2,3}).
PLANS: dict[bool, dict[int, list[int]]] = {
    False: {0: [1], 1: [0, 1, 2, 3], 2: [0, 2, 3]},
    True: {0: [2, 3], 1: [0, 1, 2, 3]},
}


def build_model(family: str, attn_implementation: str = "eager", seed: int = 0) -> PreTrainedModel:
    """A freshly initialised tiny model in eval mode (biases randomised so bias slicing errors show)."""
    torch.manual_seed(seed)
    model = SPECS[family].build(attn_implementation).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.1)
    return model


def make_inputs(family: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """A batch of 2; for text the second row is right-padded (2 pad tokens) with a matching attention mask."""
    generator = torch.Generator().manual_seed(seed)
    spec = SPECS[family]
    if spec.is_image:
        return {"pixel_values": torch.randn(BATCH, 3, 16, 16, generator=generator)}
    input_ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=generator)
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    attention_mask[1, -2:] = 0
    input_ids[1, -2:] = spec.pad_token_id
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def plan_for(family: str) -> dict[int, list[int]]:
    """Heads to remove per layer (original numbers) that every mode of the family accepts."""
    return PLANS[SPECS[family].gqa]
