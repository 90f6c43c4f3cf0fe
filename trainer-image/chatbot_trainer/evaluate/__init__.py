"""Evaluation: how well a model does on the held-out conversations.

Owns eval loss, assistant-token accuracy and perplexity (metrics) and the held-out questions
answered by the base and the fine-tuned model (samples).

May import: chatbot_trainer.data, chatbot_trainer.model, chatbot_trainer.train (the device
plan and the live progress board), errors, workspace. Never export, serve or steps.
"""
