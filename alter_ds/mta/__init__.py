"""Mixture-of-Task-Adapters: expert banks, routers, the block, injection and the model wrapper."""

from alter_ds.mta.block import MTABlock, RoutingContext
from alter_ds.mta.experts import ExpertBank
from alter_ds.mta.inject import InjectionError, inject_mta
from alter_ds.mta.model import MTAModel, build_layout, build_model
from alter_ds.mta.routers import ExpertLayout, Router, build_router, mixture_entropy, temperature_at

__all__ = [
    "ExpertBank",
    "ExpertLayout",
    "InjectionError",
    "MTABlock",
    "MTAModel",
    "Router",
    "RoutingContext",
    "build_layout",
    "build_model",
    "build_router",
    "inject_mta",
    "mixture_entropy",
    "temperature_at",
]
