"""Make a real training run go NaN at a chosen optimiser step, from the test side only.

`install(step)` wraps the trainers' metrics callback (`loop.training.toolkit.metrics_callback_class`)
so that, just before optimiser step `step`, every trainable weight is filled with NaN; the next
logged loss is then NaN and the production NaN path stops the run. For a trainer child, `child_env`
gives the environment that installs it there at start-up (through a `sitecustomize` module).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def install(step: int) -> None:
    from loop.training import toolkit

    make = toolkit.metrics_callback_class

    def with_nan():
        base = make()

        class NaNAt(base):
            def on_step_begin(self, args, state, control, model=None, **kwargs):
                if state.global_step + 1 == step and model is not None:
                    import torch

                    with torch.no_grad():
                        for p in model.parameters():
                            if p.requires_grad:
                                p.fill_(float("nan"))

        return NaNAt

    toolkit.metrics_callback_class = with_nan


def child_env(tmp: Path, step: int) -> dict[str, str]:
    """Environment for a trainer child that installs the NaN at `step` when Python starts."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "sitecustomize.py").write_text(f"import tests.nan_injection as n\nn.install({step})\n")
    path = os.pathsep.join(filter(None, [str(tmp), str(REPO), os.environ.get("PYTHONPATH", "")]))
    return {"PYTHONPATH": path}
