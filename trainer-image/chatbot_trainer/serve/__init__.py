"""Serving an exported GGUF file locally: an OpenAI-compatible server (server: the command;
app: the ASGI app; protocol: the request forms; slots: parallel slots and the queue) and a
terminal chat (chat), both on llama-cpp-python.

May import: chatbot_trainer.errors. Reads only GGUF files: no torch, nothing of training.
"""
