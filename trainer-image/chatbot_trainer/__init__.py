"""The trainer of a ChatbotTraining: prepare, configure, train, evaluate and export.

Layers, lowest first (a package imports only from the packages before it):

    errors, workspace, params   failures with reasons, the shared workspace, the run's parameters
    data/       sources → conversations → token ids → packed micro-batches
    model/      base-model resolution and loading, the token loss, CPU kernels
    train/      the LoRA recipe, its execution modes, live progress
    evaluate/   eval metrics and sample answers
    export/     GGUF, K-quants, Modelfile
    serve/      local OpenAI-compatible server and terminal chat (GGUF files only)
    steps/      the five steps, each `run(ctx) -> dict` (the operator's Jobs run these)
    cli, pipeline, launch   command lines, the local runner, the torchrun wrapper
"""
