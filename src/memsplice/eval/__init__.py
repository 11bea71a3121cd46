"""Long-horizon memory evaluation: systems under test, tasks as data, metrics, the run loop and the report.

from memsplice.eval import EvalConfig, run_eval, write_report
results = run_eval(EvalConfig(task="passkey", systems=("none", "window", "latent")))
write_report(results, "runs/eval-passkey")
"""

from .harness import EvalConfig, run_eval
from .metrics import exact_match, normalize_answer, score_answer, token_f1
from .reader import Answer, AnswerCosts, GenerationSettings, PromptTemplate, Reader
from .report import summarise, write_report
from .systems import SYSTEMS, SystemArgs
from .tasks import TASKS, TaskArgs

__all__ = [
    "SYSTEMS",
    "TASKS",
    "Answer",
    "AnswerCosts",
    "EvalConfig",
    "GenerationSettings",
    "PromptTemplate",
    "Reader",
    "SystemArgs",
    "TaskArgs",
    "exact_match",
    "normalize_answer",
    "run_eval",
    "score_answer",
    "summarise",
    "token_f1",
    "write_report",
]
