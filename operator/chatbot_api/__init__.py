"""The ChatbotTraining API: spec and status models shared by the operator and the trainer.

This package imports only pydantic and the standard library, so that the operator image
never needs torch and the trainer image never needs kopf.
"""

from chatbot_api.spec import (
    GROUP,
    KIND,
    PLURAL,
    STEPS,
    VERSION,
    ChatbotTrainingSpec,
    TrainingParams,
)
from chatbot_api.status import ChatbotTrainingStatus

__all__ = [
    "GROUP",
    "KIND",
    "PLURAL",
    "STEPS",
    "VERSION",
    "ChatbotTrainingSpec",
    "ChatbotTrainingStatus",
    "TrainingParams",
]
