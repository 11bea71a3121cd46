"""Offline memory formation: training the encoder, gate and injection projections against a frozen reasoner.

    from memsplice.train import FormationRecipe, TrainConfig
    recipe = FormationRecipe(TrainConfig.from_yaml("configs/formation-smollm2.yaml"))
    recipe.setup(); recipe.train(); recipe.cleanup()

Modules: config (run arguments), data (passages by step), objectives (one function per loss), fused_attention
(the training attention kernel), evaluate (held-out fidelity), state (checkpoints), distributed (DDP), flops (MFU),
plots (metrics log and curves), loop (the recipe).
"""

from .config import DataArgs, ObjectiveArgs, OptimArgs, RunArgs, TrainConfig
from .evaluate import Fidelity, reconstruction_fidelity
from .loop import FormationRecipe, learning_rate
from .state import TrainState, latest_checkpoint

__all__ = [
    "DataArgs",
    "Fidelity",
    "FormationRecipe",
    "ObjectiveArgs",
    "OptimArgs",
    "RunArgs",
    "TrainConfig",
    "TrainState",
    "latest_checkpoint",
    "learning_rate",
    "reconstruction_fidelity",
]
