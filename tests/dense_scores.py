"""What the evaluation harness's dense row must equal: the unmodified HF model scored directly,
with its own forward and `generate`, none of kvcompile's programs or caches."""

import math

import torch

from kvcompile.evaluation import tasks
from kvcompile.evaluation.evaluate import EvalSettings
from kvcompile.evaluation.text import evaluation_text, token_windows


def perplexity(model, tokenizer, settings: EvalSettings, length: int) -> float:
    windows = token_windows(tokenizer, evaluation_text(), length=length, count=settings.ppl_windows, seed=settings.seed)
    with torch.no_grad():
        logits = model(windows.to(model.device)).logits[:, -settings.score_last - 1 : -1].float().cpu()
    targets = windows[:, -settings.score_last :]
    return math.exp(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).item())


def retrieval_hits(model, tokenizer, settings: EvalSettings, task: str, length: int) -> int:
    hits = 0
    for sample in tasks.make_samples(task, tokenizer, length, settings.samples, settings.seed):
        prompt = sample.prompt_ids.to(model.device)
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=sample.max_new_tokens,
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        hits += tasks.score(sample, tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True))
    return hits
