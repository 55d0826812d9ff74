"""Kernels behind the MTA module: the grouped adapter op and its implementations."""

from alter_ds.ops.grouped_adapter import (
    ACTIVATIONS,
    apply_activation,
    grouped_adapter,
    grouped_adapter_loop,
    grouped_adapter_reference,
    is_gated,
)

__all__ = [
    "ACTIVATIONS",
    "apply_activation",
    "grouped_adapter",
    "grouped_adapter_loop",
    "grouped_adapter_reference",
    "is_gated",
]
