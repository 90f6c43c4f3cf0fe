"""Chat data: sources → conversations → token ids → packed micro-batches.

Owns reading files and hub data sets (readers), record formats (formats), cleaning,
de-duplication and the train/eval split (dataset), chat templates and what they can express
(chat_templates), tokenization with assistant-only labels (tokenization) and packing
(packing).

May import: chatbot_trainer.errors, chatbot_trainer.workspace, chatbot_api. Nothing else of
the trainer: every other package builds on this one. No torch at import time.
"""
