"""Memory that keeps learning from its own interaction traces: Algorithm 1 with replay, EWC and privacy options."""

from .buffer import FallbackQueue, Interaction, InteractionBuffer, ReplayReservoir, corrupt_spans
from .consolidation import WriteConsolidation, ensure_consolidation
from .ewc import ElasticAnchor
from .guard import GuardEvent, SkillGuard, default_guard, ensure_guard
from .loop import OnlineConfig, OnlineLearner, StepResult, UpdateStats
from .privacy import PrivacyAccountant, PrivacyConfig, private_gradients
from .rehearsal import (
    RehearsalItem,
    RehearsalSet,
    default_rehearsal,
    ensure_rehearsal,
    rehearsal_from_synthetic,
)

__all__ = [
    "ElasticAnchor",
    "FallbackQueue",
    "GuardEvent",
    "Interaction",
    "InteractionBuffer",
    "OnlineConfig",
    "OnlineLearner",
    "PrivacyAccountant",
    "PrivacyConfig",
    "RehearsalItem",
    "RehearsalSet",
    "ReplayReservoir",
    "SkillGuard",
    "StepResult",
    "UpdateStats",
    "WriteConsolidation",
    "corrupt_spans",
    "default_guard",
    "default_rehearsal",
    "ensure_consolidation",
    "ensure_guard",
    "ensure_rehearsal",
    "private_gradients",
    "rehearsal_from_synthetic",
]
