"""Export: a fine-tuned model as files llama.cpp and Ollama load.

Owns writing GGUF (gguf_writer), llama.cpp's K-quants (llama_quantize) and the Ollama
Modelfile (modelfile).

May import: chatbot_trainer.data, chatbot_trainer.model, errors, workspace. Never train,
evaluate, serve or steps.
"""
