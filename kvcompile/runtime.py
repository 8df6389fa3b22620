"""Runtime: `transform(model, plan)` and the module it returns.

The transformed model holds two programs compiled from one capture (pipeline.IN_PLACE): `prefill`
(no past: dense attention under the prompt's padding mask, returns the compressed cache's tokens)
and `decode` (writes its tokens into the cache's buffers and attends over them up to each row's
count). It is called like a Hugging Face causal LM (`attention_mask` included, left or right
padding) and generates like one. The cache (cache.py) keeps each row's real tokens only, moves
window tokens to the pruned middle between calls, and grows by doubling.
"""

from __future__ import annotations

import copy

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

import kvcompile.kernels  # noqa: F401  (registers the ops the programs call)
from kvcompile.passes.merge_kv_heads import REPLACED_PARAMETERS_KEY

from .cache import CompressedKVCache
from .capture import program_for
from .graphs import GraphedDecode
from .pipeline import IN_PLACE, compile_programs
from .plan import ModelShape, Plan
from .program import PREFILL_MASK, call_program, empty_entries, signature_of


def transform(model: torch.nn.Module, plan: Plan, *, program: torch.fx.GraphModule | None = None,
              cuda_graphs: bool | None = None, compile_decode: bool = True) -> "TransformedModel":
    """Compile `model` (a transformers causal LM in eval mode) so its KV cache follows `plan`.

    The plan is validated before anything is traced; the user's model is neither modified nor
    copied (the programs share its parameters). `program`, from `kvcompile.capture(model)`, saves
    tracing the model again when it is compiled for several plans. `cuda_graphs`: replay one-token
    decode steps from CUDA graphs (graphs.py); by default on when the model is on a CUDA device.
    `compile_decode`: what the graphs replay is the decode program compiled by inductor (its
    elementwise ops fused); False captures the program as it is: no compile time at the first
    step, slower steps. Without CUDA graphs it has no effect.
    """
    shape = checked_model_shape(model, plan)
    return TransformedModel(model, plan, shape, program, cuda_graphs, compile_decode)


def checked_model_shape(model: torch.nn.Module, plan: Plan) -> ModelShape:
    """The model's shape, once `model` is a loaded transformers model in eval mode and `plan` fits
    it; else the error saying what does not (the one check of everything that applies a plan)."""
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a kvcompile.Plan, got {type(plan).__name__}")
    if getattr(model, "config", None) is None:
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if model.training:
        raise ValueError("model is in training mode; call model.eval() first (dropout would change attention)")
    devices = {param.device.type for param in model.parameters()}
    if "meta" in devices:
        raise ValueError("model has parameters on the meta device (no weights loaded): load its weights first")
    shape = ModelShape.from_config(model.config)
    plan.validate(shape)
    return shape


class TransformedModel(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, plan: Plan, shape: ModelShape, program: torch.fx.GraphModule | None = None,
                 cuda_graphs: bool | None = None, compile_decode: bool = True):
        super().__init__()
        self.config = model.config
        self.generation_config = getattr(model, "generation_config", None)
        self.plan = plan
        self.shape = shape
        self.captured = program_for(model, program, shape)  # for other pipelines (the ONNX export's)
        programs = compile_programs(self.captured, plan, IN_PLACE)
        self.prefill_program, self.decode_program = programs.prefill, programs.decode
        self.cache_encoder = programs.cache_encoder
        param = next(model.parameters())
        self._device, self._dtype = param.device, param.dtype
        if cuda_graphs and self._device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device; it is on {self._device}")
        use_graphs = self._device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._graphed_decode = GraphedDecode(self.decode_program, compile=compile_decode) if use_graphs else None
        self._source = [model]  # kept out of the module tree: its parameters are already the programs'

    def __repr__(self) -> str:
        return (f"TransformedModel({type(self._source[0]).__name__}, {self.plan!r}, {self._dtype} on {self._device}, "
                f"cuda_graphs={self._graphed_decode is not None})")

    def _apply(self, fn, recurse=True):
        # .to(), .half(), .cuda() ... would convert the user's model's own parameters, which the
        # programs share, and leave the programs' constants and this model's dtype behind
        raise RuntimeError("a transformed model shares its model's parameters and cannot be converted: convert the "
                           "model (model.to(...)) and call kvcompile.transform on it again")

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        past_key_values: CompressedKVCache | None = None,
        use_cache: bool = True,
        attention_mask: torch.Tensor | None = None,
        max_cache_len: int | None = None,
        cache: CompressedKVCache | None = None,
        **unused,
    ) -> CausalLMOutputWithPast:
        """Logits of `input_ids` (B, S) and, with `use_cache`, the cache extended by them. The cache
        comes as `past_key_values` or as `cache` (the name newer transformers releases use).

        Without a cache (or with an empty one) this is a prefill: `attention_mask` (B, S), 1 for
        real tokens, 0 for padding (either side), positions counted over real tokens as transformers
        does; each row keeps its real tokens. With a cache the call continues every row by all of
        `input_ids`: a given `attention_mask` (B, P + S) must mark them all real. `max_cache_len`:
        slots to allocate per row at the prefill (default: grown by doubling when needed).
        """
        if unused:
            raise TypeError(f"unsupported arguments: {', '.join(sorted(unused))}")
        if cache is not None:
            if past_key_values is not None:
                raise TypeError("pass the cache as past_key_values or as cache, not both")
            past_key_values = cache
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be (batch, seq) with batch, seq >= 1, got shape {tuple(input_ids.shape)}")
        param = next(self._source[0].parameters())
        if (param.dtype, param.device) != (self._dtype, self._device):
            raise RuntimeError(f"the model was transformed in {self._dtype} on {self._device} and is now in {param.dtype} "
                               f"on {param.device}: transform it again after .to()/.half()")
        if past_key_values is not None and not isinstance(past_key_values, CompressedKVCache):
            raise TypeError(
                f"past_key_values must be the CompressedKVCache this model returned, got {type(past_key_values).__name__}"
            )
        input_ids = input_ids.to(self._device)
        if past_key_values is None or past_key_values.length == 0:
            logits, cache = self._prefill(input_ids, attention_mask, max_cache_len, past_key_values)
        else:
            logits, cache = self._decode(input_ids, attention_mask, past_key_values)
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache if use_cache else None)

    def _prefill(self, input_ids, attention_mask, max_cache_len, cache):
        batch, seq = input_ids.shape
        valid = self._padding_mask(attention_mask, batch, seq)
        positions, mask = prompt_positions_and_mask(valid)
        logits, present = call_program(self.prefill_program, input_ids, positions, self.empty_cache(batch),
                                       {PREFILL_MASK: mask})
        cache = cache if cache is not None else CompressedKVCache(self.plan, self.shape)
        cache.check_written_by(self.plan, self.shape)
        cache.write_prompt(present, None if bool(valid.all()) else valid, max_cache_len)
        return logits, cache

    def _decode(self, input_ids, attention_mask, cache: CompressedKVCache):
        cache.check_written_by(self.plan, self.shape)
        batch, seq = input_ids.shape
        if cache.batch_size != batch:
            raise ValueError(f"input_ids has batch {batch}, the cache holds batch {cache.batch_size}")
        if attention_mask is not None and not bool(attention_mask[:, -seq:].all()):
            raise NotImplementedError(
                "padding among the tokens of a call that continues a cache is not supported: every row continues by "
                "all of input_ids (pad prompts, not continuations)"
            )
        inputs = cache.prepare_call(seq)
        positions = cache.lengths[:, None] + torch.arange(seq, device=self._device)
        if self._graphed_decode is not None and seq == 1:
            logits = self._graphed_decode(input_ids, positions, cache.buffers, inputs)
        else:
            logits, _ = call_program(self.decode_program, input_ids, positions, cache.buffers, inputs)
        cache.advance(seq)
        return logits, cache

    def _padding_mask(self, attention_mask, batch: int, seq: int) -> torch.Tensor:
        return padding_mask(attention_mask, batch, seq, self._device)

    @torch.no_grad()
    def encode_dense_cache(self, keys: list[torch.Tensor], values: list[torch.Tensor],
                           max_cache_len: int | None = None) -> CompressedKVCache:
        """The cache this model's prefill writes, from a dense prefill's per-layer K/V (B, Hkv, T, D),
        e.g. the layers of a transformers DynamicCache. For plans that do not merge heads, on models
        without sliding-window layers."""
        if self.plan.merges:
            raise ValueError("this plan merges KV heads: its cache is not a function of the dense model's K/V")
        if self.cache_encoder is None:
            raise ValueError("this model has sliding-window layers, whose dense cache holds only their window: the "
                             "compressed cache comes from this model's own prefill")
        entries = dict(zip(signature_of(self.cache_encoder).cache_outputs, self.cache_encoder(*keys, *values)))
        cache = CompressedKVCache(self.plan, self.shape)
        cache.write_prompt(entries, None, max_cache_len)
        return cache

    def empty_cache(self, batch: int) -> dict[str, torch.Tensor]:
        """The prefill program's past: every entry it reads, holding no tokens."""
        entries = signature_of(self.prefill_program).cache_inputs
        return empty_entries(entries, self.plan, self.shape, batch, self._dtype, self._device)

    def save_pretrained(self, path) -> None:
        """Write a plain transformers checkpoint of a model whose plan only folds weights.

        That is a plan of KV-head merges with one head per group in "commute" (or "none") mode, in
        every layer alike, and no channel pruning: the result is an ordinary GQA model with fewer
        `num_key_value_heads`, loadable without kvcompile.
        """
        plan, source = self.plan, self._source[0]
        reasons = []
        if plan.k_channels:
            reasons.append("it prunes K channels, which a transformers model cannot express")
        if sorted(plan.merges) != list(range(self.shape.num_layers)):
            reasons.append("it does not merge every layer (the checkpoint has one KV-head count for all)")
        for layer, merge in plan.merges.items():
            if merge.rope == "post" or merge.heads_per_group != 1:
                reasons.append(f"layer {layer} merges with rope={merge.rope!r}, {merge.heads_per_group} heads per group "
                               "(only rope='commute' or no RoPE, one head per group, fold into weights)")
        if len({len(merge.groups) for merge in plan.merges.values()}) > 1:
            reasons.append("layers merge into different numbers of KV heads")
        if reasons:
            raise ValueError("cannot save as a plain checkpoint: " + "; ".join(reasons))
        config = copy.deepcopy(source.config)
        config.num_key_value_heads = len(next(iter(plan.merges.values())).groups)
        state = source.state_dict()
        state.update(self.decode_program.meta[REPLACED_PARAMETERS_KEY])
        with torch.device("meta"):
            merged = type(source)(config)
        merged.load_state_dict(state, strict=True, assign=True)
        merged.generation_config = copy.deepcopy(source.generation_config)
        merged.save_pretrained(path)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        generator: torch.Generator | None = None,
        **unused,
    ) -> torch.Tensor:
        """Greedy or sampled continuation; returns prompt and new tokens, (B, S + new).

        `attention_mask` marks a padded batch's real tokens (`generate(**tokenizer(prompts,
        padding=True, return_tensors="pt"))`); each row continues from its own last real token,
        so left and right padding give the same tokens. Rows that emit an EOS token keep emitting
        it (as padding) until every row is done.
        """
        if unused:
            raise TypeError(f"unsupported arguments: {', '.join(sorted(unused))}")
        if do_sample:  # before the prefill: a bad setting fails at once, not after the prompt's work
            _check_sampling(temperature, top_k, top_p)
        eos = torch.tensor(eos_token_ids(eos_token_id, self.generation_config), device=self._device)
        tokens = input_ids.to(self._device)
        batch, seq = tokens.shape
        out = self(tokens, attention_mask=attention_mask, use_cache=True, max_cache_len=seq + max_new_tokens)
        valid = None if attention_mask is None else attention_mask.to(self._device).bool()
        logits = out.logits[torch.arange(batch, device=self._device), last_real_index(valid, batch, seq, self._device)]
        done = torch.zeros(batch, dtype=torch.bool, device=self._device)
        for step in range(max_new_tokens):
            logits = logits.float()
            if do_sample:
                next_token = _sample(logits, temperature, top_k, top_p, generator)
            else:
                next_token = logits.argmax(-1)
            if eos.numel():
                next_token = torch.where(done, eos[0].to(next_token.dtype), next_token)
                done |= torch.isin(next_token, eos)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            out = self(next_token[:, None], past_key_values=out.past_key_values, use_cache=True)
            logits = out.logits[:, -1, :]
        return tokens


def padding_mask(attention_mask, batch: int, seq: int, device) -> torch.Tensor:
    """A prompt's real tokens (B, S) bool from a transformers `attention_mask` (None: all real);
    ValueError unless it has the prompt's shape and every row a real token."""
    if attention_mask is None:
        return torch.ones(batch, seq, dtype=torch.bool, device=device)
    if tuple(attention_mask.shape) != (batch, seq):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {(batch, seq)}")
    valid = attention_mask.to(device).bool()
    if not bool(valid.any(1).all()):
        raise ValueError("attention_mask has a row without tokens (all zeros)")
    return valid


def prompt_positions_and_mask(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefill's `position_ids` (B, S) and `prefill_mask` (B, 1, S, S) for a prompt whose real
    tokens are `valid` (B, S) bool: positions counted over real tokens as transformers does, each
    real token attending to the real tokens up to it."""
    seq, device = valid.shape[1], valid.device
    positions = (valid.long().cumsum(1) - 1).masked_fill(~valid, 1)  # transformers' positions under padding
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    # a padding query attends to itself alone: its row stays finite and nothing reads it
    mask = (causal & valid[:, None, :]) | torch.eye(seq, dtype=torch.bool, device=device)
    return positions, mask[:, None]


def last_real_index(valid: torch.Tensor | None, batch: int, seq: int, device) -> torch.Tensor:
    """Each row's last real prompt token (B,) (right padding ends rows early); `valid` None: no padding."""
    if valid is None:
        return torch.full((batch,), seq - 1, device=device)
    return torch.where(valid, torch.arange(seq, device=device), -1).amax(1)


def eos_token_ids(eos_token_id: int | list[int] | None, generation_config=None) -> list[int]:
    """The EOS ids generation stops at: `eos_token_id` if given, else the generation config's."""
    if eos_token_id is None and generation_config is not None:
        eos_token_id = generation_config.eos_token_id
    return [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def _check_sampling(temperature, top_k, top_p) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: no top-k filtering), got {top_k}")
    if top_p is not None and not 0 <= top_p <= 1:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")


def _sample(logits, temperature, top_k, top_p, generator) -> torch.Tensor:
    logits = logits / temperature
    if top_k:  # 0 or None: no top-k filtering, as in transformers
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop_sorted[..., 0] = False  # top_p = 0 would drop it too: the most likely token stays
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
