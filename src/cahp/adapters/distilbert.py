"""DistilBERT: ``layer.attention`` holds ``q_lin``/``k_lin``/``v_lin``/``out_lin`` and returns
``(output, probs)`` after applying ``out_lin`` itself."""

from __future__ import annotations

from cahp.adapters.base import ArchitectureAdapter, register_adapter

DISTILBERT = register_adapter(
    "distilbert",
    ArchitectureAdapter(
        family="distilbert",
        layers="transformer.layer",
        attention="attention",
        query="attention.q_lin",
        key="attention.k_lin",
        value="attention.v_lin",
        output="attention.out_lin",
        head_count_attrs=("n_heads",),
    ),
)
