"""BERT and its same-shaped relatives: RoBERTa, XLM-RoBERTa, ELECTRA (MiniLM checkpoints are BERT).

``layer.attention.self`` holds ``query``/``key``/``value`` and returns ``(context, probs)``;
``layer.attention.output.dense`` projects the context back. The forward reshapes with
``view(*input_shape, -1, head_size)``, so only the weights (and the informative counters) need slicing.
"""

from __future__ import annotations

from cahp.adapters.base import ArchitectureAdapter, register_adapter

BERT = register_adapter(
    ("bert", "roberta", "xlm-roberta", "electra"),
    ArchitectureAdapter(
        family="bert",
        layers="encoder.layer",
        attention="attention.self",
        query="attention.self.query",
        key="attention.self.key",
        value="attention.self.value",
        output="attention.output.dense",
        head_count_attrs=("num_attention_heads",),
        width_attrs=("all_head_size",),
    ),
)
