"""Training: the LoRA fine-tuning recipe, the ways it runs, and what it reports while it runs.

Owns the recipe (recipe), the node's device, precision and micro-batch plan (hardware), the
execution modes (one process; micro-batches side by side on a CPU's cores: cpu_workers;
several processes with DDP or FSDP: distributed), the live progress served to the operator
(progress_server), the per-window reporting (monitor) and the loss picture (curves).

May import: chatbot_trainer.data, chatbot_trainer.model, errors, workspace. Never evaluate,
export, serve or steps.
"""
