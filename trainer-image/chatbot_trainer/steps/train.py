"""The train step: LoRA fine-tuning (see chatbot_trainer.train.recipe).

The recipe trains for ``params.training_steps`` at ``params.learning_rate``; the configure step
resolved both (epochs → steps, the base model's default learning rate), so the recipe gets the
settings with those values filled in.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from chatbot_trainer.workspace import StepContext


def resolved_context(ctx: StepContext) -> StepContext:
    """`ctx` with the training steps and learning rate that configure resolved."""
    configure = ctx.read_result("configure") if ctx.result_path("configure").is_file() else {}
    update = {key: configure[key] for key in ("training_steps", "learning_rate") if configure.get(key) is not None}
    if not update:
        return ctx
    return dataclasses.replace(ctx, params=ctx.params.model_copy(update=update))


def run(ctx: StepContext) -> dict[str, Any]:
    from chatbot_trainer.train.recipe import train

    resolved = resolved_context(ctx)
    result = train(resolved)
    learning_rate = resolved.params.learning_rate
    return {**result, "learning_rate": learning_rate,
            "summary": {**result.get("summary", {}), "learning_rate": learning_rate}}
