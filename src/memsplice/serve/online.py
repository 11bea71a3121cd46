"""Building the online learner the server's `OnlineWorker` drives, from `memsplice.online`.

The worker needs an object with `update(samples, replay) -> metrics` and `state_dict()` (see
`worker.OnlineLearner`), training on its own copy of the memory weights so that serving never waits for it.
"""

from __future__ import annotations

import importlib.util


def build_online_learner(memory, config):
    """The online learner for `memory`, or a clear error when this build has no online learning loop."""
    if importlib.util.find_spec("memsplice.online") is None:
        raise ValueError(
            "--online-learning needs memsplice.online (the online learning loop), which this build "
            "of memsplice does not include; serve without --online-learning"
        )
    raise NotImplementedError(
        "memsplice.online is present but the server does not drive it yet; serve without --online-learning"
    )
