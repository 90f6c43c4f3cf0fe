"""Models: which base model a run uses, how it is loaded, and the layers and loss it trains with.

Owns resolving `modelType` (presets, hub ids, paths, GGUF files, offline copies: base_models,
packaged_models, gguf_import, pretokenizers), loading tokenizers, base and fine-tuned models
(loading), the token loss shared by training and evaluation (loss), and the CPU kernels and
layer transforms used in training (cpu_blas, lora_fused, lora_dropout, compilation).

May import: chatbot_trainer.data, errors, workspace. Never train, evaluate, export, serve or
steps.
"""
