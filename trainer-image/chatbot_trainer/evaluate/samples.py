"""Held-out questions answered by the base and the fine-tuned model, for people to compare.

Metrics say how much a model improved; a few answers side by side say whether it got better in
the way the data meant. The questions are those of evaluate/answers.py (the last user turn of a
held-out conversation, with the turns before it); the samples are a deterministic choice of
them; the reference is the data's own answer. Answers are greedy, so the same model gives the
same text on every run.

`generate_answers` uses transformers (the evaluate step, on the merged model and on the base);
`gguf_answers` uses llama.cpp on an exported file (the export step, where llama-cpp-python is
installed), the way the model will be served.
"""

from __future__ import annotations

from typing import Any, Sequence

from chatbot_trainer.data.chat_templates import TEMPLATE_VARIABLES

MAX_NEW_TOKENS = 64  # the example data's answers are 20-45 tokens
BATCH_SIZE = 16  # questions answered side by side


def sample_questions(questions: Sequence[dict[str, Any]], count: int, seed: int) -> list[dict[str, Any]]:
    """A deterministic choice of up to `count` of `questions` (answers.held_out_questions),
    in their order."""
    import numpy as np

    if not questions or count <= 0:
        return []
    chosen = np.random.default_rng([seed, 7]).choice(len(questions), size=min(count, len(questions)), replace=False)
    return [questions[int(i)] for i in sorted(chosen)]


def generate_answers(model, tokenizer, questions: Sequence[dict[str, Any]],
                     max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = BATCH_SIZE) -> list[str]:
    """Greedy answers from a transformers model, in left-padded batches of prompts of similar
    length, each answer stopping at the model's end-of-turn token (or after max_new_tokens)."""
    import torch

    if not questions:
        return []
    device = next(model.parameters()).device
    # rendered as in training (the same fixed date for templates that print one)
    prompts = [tokenizer.apply_chat_template(q["messages"], add_generation_prompt=True, tokenize=True,
                                             return_dict=True, **TEMPLATE_VARIABLES)["input_ids"]
               for q in questions]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    was_training, threads = model.training, torch.get_num_threads()
    model.eval()
    if device.type == "cpu":
        # One thread: decoding runs many small products, where threads mostly wait for each other;
        # on a busy 2-core machine 8 questions took 21.8 s on one thread and 168.8 s on two.
        torch.set_num_threads(1)
    try:
        for start in range(0, len(order), max(1, batch_size)):
            chunk = order[start:start + max(1, batch_size)]
            width = max(len(prompts[i]) for i in chunk)
            input_ids = torch.tensor([[pad] * (width - len(prompts[i])) + list(prompts[i]) for i in chunk],
                                     device=device)
            attention = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk],
                                     device=device)
            with torch.no_grad():
                out = model.generate(input_ids, attention_mask=attention, do_sample=False,
                                     max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=pad, use_cache=True)
            for i, row in zip(chunk, out):
                answers[i] = tokenizer.decode(row[width:], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
        torch.set_num_threads(threads)
    return answers


def gguf_answers(path: str, questions: Sequence[dict[str, Any]], max_new_tokens: int = MAX_NEW_TOKENS,
                 n_ctx: int = 2048) -> list[str] | None:
    """Greedy answers from a GGUF file with llama.cpp (its embedded chat template), or None
    when llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, verbose=False, seed=0)
    try:
        return [
            llm.create_chat_completion(question["messages"], temperature=0.0, max_tokens=max_new_tokens)[
                "choices"][0]["message"]["content"].strip()
            for question in questions
        ]
    finally:
        llm.close()


def side_by_side(questions: Sequence[dict[str, Any]], **answers: Sequence[str] | None) -> list[dict[str, Any]]:
    """One record per question: the question, the reference and each model's answer."""
    rows = []
    for i, question in enumerate(questions):
        row = {"question": question["messages"][-1]["content"], "reference": question["reference"]}
        for name, texts in answers.items():
            if texts is not None:
                row[name] = texts[i]
        rows.append(row)
    return rows
