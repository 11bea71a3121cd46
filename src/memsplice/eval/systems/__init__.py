"""Systems under test, one module per family, registered by name in the order reports list them."""

from . import context, retrieval, latent  # noqa: F401,I001  (importing registers the systems, in this order)
from .base import SYSTEM_HELP, SYSTEMS, FeedCosts, Runtime, System, SystemArgs, build_system, register_system

__all__ = [
    "SYSTEMS",
    "SYSTEM_HELP",
    "FeedCosts",
    "Runtime",
    "System",
    "SystemArgs",
    "build_system",
    "register_system",
]
