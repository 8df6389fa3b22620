"""How long dynamo's guard check takes per call of a model compiled by the kvcompile backend.

    python scripts/guard_time.py --layers 32

Before every call of a compiled model dynamo checks its guards (the inputs' shapes and dtypes, the
modules' attributes, the cache's layout), on the host. A decode step short enough on the device
(a small model) waits for that. This compiles a decode step of a random Llama with `--layers`
layers of tiny width on a K-channel plan's static cache (`kvcompile.cache_for`), without inductor
(the guards do not depend on it), with transformers' StaticCache and inductor beside it, and with
`guard_filter_fn=torch.compiler.skip_guard_on_all_nn_modules_unsafe`, torch's option that drops
the guards on the model's modules; it prints the profiler's "TorchDynamo Cache Lookup" time per
call of each, and checks that the filtered model's logits equal the unfiltered one's.
"""

import argparse
import statistics

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

import kvcompile
from kvcompile.benchmarks import throughput
from kvcompile.plan import ModelShape, Plan

PROMPT, STEPS = 16, 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    shape = ModelShape.from_config(config)
    plan = Plan.from_k_channels({layer: [list(range(8)), list(range(4, 12))] for layer in range(args.layers)},
                                model=shape)
    filtered = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    runs = {
        "kvcompile": _decode(model, kvcompile.cache_for(model, plan, batch_size=1, max_cache_len=PROMPT + STEPS),
                             backend="kvcompile", options={"inductor": False}),
        "kvcompile, modules unguarded": _decode(
            model, kvcompile.cache_for(model, plan, batch_size=1, max_cache_len=PROMPT + STEPS),
            backend="kvcompile", options={"inductor": False, **filtered}),
        "transformers StaticCache, inductor": _decode(
            model, StaticCache(config=config, max_cache_len=PROMPT + STEPS), backend="inductor", options={}),
    }
    for name, (lookup_us, _) in runs.items():
        print(f"{name}: {lookup_us:.0f} us a call checking guards ({args.layers} layers)")
    difference = (runs["kvcompile"][1] - runs["kvcompile, modules unguarded"][1]).abs().max().item()
    print(f"logits with and without the modules' guards differ by at most {difference:.2e}")


@torch.no_grad()
def _decode(model, cache, backend: str, options: dict) -> tuple[float, torch.Tensor]:
    """(median µs per decode call spent in dynamo's guard check, each step's last logits)."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, options=dict(options), fullgraph=True)
    pass_cache_position = throughput.takes_cache_position(model)

    def call(ids, positions):
        extra = {"cache_position": positions} if pass_cache_position else {}
        return compiled(ids, past_key_values=cache, position_ids=positions[None], **extra).logits[:, -1]

    logits = call(torch.randint(3, 200, (1, PROMPT), generator=torch.Generator().manual_seed(0)), torch.arange(PROMPT))
    steps, lookups = [logits], []
    for step in range(STEPS):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            logits = call(logits.argmax(-1, keepdim=True), torch.tensor([PROMPT + step]))
        steps.append(logits)
        if step > 1:  # the first decode calls compile
            lookups += [e.cpu_time_total for e in profile.key_averages() if e.key == "TorchDynamo Cache Lookup"]
    return statistics.median(lookups), torch.cat(steps)


if __name__ == "__main__":
    main()
