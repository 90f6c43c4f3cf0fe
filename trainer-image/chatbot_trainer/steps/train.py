"""The train step: LoRA fine-tuning (see chatbot_trainer.train.recipe)."""

from __future__ import annotations

from typing import Any

from chatbot_trainer.workspace import StepContext


def run(ctx: StepContext) -> dict[str, Any]:
    from chatbot_trainer.train.recipe import train

    return train(ctx)
