"""Runtime: `transform(model, plan)` and the module it returns.

The transformed model holds two programs compiled from one capture (pipeline.IN_PLACE): `prefill`
(no past: dense attention under the prompt's padding mask, returns the compressed cache's tokens)
and `decode` (writes its tokens into the cache's buffers and attends over them up to each row's
count). It is a transformers `PreTrainedModel`: called like the causal LM it was made from
(`attention_mask` included, left or right padding), it generates through transformers' own
`generate` (greedy, sampling, beams, logits processors, stopping criteria, streamers) and
`pipeline("text-generation")`, on its compressed cache (cache.py), which keeps each row's real
tokens only, moves window tokens to the pruned middle between calls, and grows by doubling.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

import kvcompile.kernels  # noqa: F401  (registers the ops the programs call)
from kvcompile.passes.projections import REPLACED_PARAMETERS_KEY

from .cache import CompressedKVCache
from .capture import CACHE_NAME, program_for
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


class TransformedModel(PreTrainedModel, GenerationMixin):
    """A transformers causal LM whose KV cache follows a plan (see `transform`): called like the
    model it was made from, and generating through transformers' own `generate` and pipelines."""

    # the programs were captured from the user's model under its attention implementation; this
    # model runs no attention of transformers' own, so it accepts whatever the config names
    _supports_sdpa = _supports_flash_attn = _supports_flex_attn = _supports_attention_backend = True

    def __init__(self, model: torch.nn.Module, plan: Plan, shape: ModelShape, program: torch.fx.GraphModule | None = None,
                 cuda_graphs: bool | None = None, compile_decode: bool = True):
        super().__init__(copy.deepcopy(model.config))  # transformers' model setup writes to its config
        self.generation_config = copy.deepcopy(getattr(model, "generation_config", None))
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
                           "model (model.to(...)) and call kvcompile.transform on it again; a pipeline moves its model to "
                           "cuda:0 on a CUDA machine unless given device=tm.device")

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
        return_dict: bool | None = None,
        **unused,
    ) -> CausalLMOutputWithPast:
        """Logits of `input_ids` (B, S) and, with `use_cache`, the cache extended by them. The cache
        comes as `past_key_values` or as `cache` (the name newer transformers releases use).

        Without a cache (or with an empty one) this is a prefill: `attention_mask` (B, S), 1 for
        real tokens, 0 for padding (either side), positions counted over real tokens as transformers
        does; each row keeps its real tokens. With a cache the call continues each row by its real
        tokens of `input_ids`: `attention_mask` (B, P + S) may pad the last S anywhere (rows continuing
        by different numbers of tokens; a padding position's logits mean nothing). `max_cache_len`:
        slots to allocate per row at the prefill (default: grown by doubling when needed). A
        right-padded prompt's padding positions carry their row's last real logits, so every row's
        last logits predict its next token. `return_dict=False` gives the output as a tuple.
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
            logits, cache = self._prefill_call(input_ids, attention_mask, max_cache_len, past_key_values)
        else:
            logits, cache = self._decode_call(input_ids, attention_mask, past_key_values)
        out = CausalLMOutputWithPast(logits=logits, **{CACHE_NAME: cache if use_cache else None})
        return out if return_dict is not False else out.to_tuple()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length) -> None:
        """transformers' `generate` runs on a CompressedKVCache: the caller's, or a new one whose
        prefill allocates the whole generation's slots at once."""
        cache = model_kwargs.get(CACHE_NAME)
        if cache is not None:
            if not isinstance(cache, CompressedKVCache):
                raise TypeError(f"{CACHE_NAME} must be a CompressedKVCache this model returned, got {type(cache).__name__}")
            cache._is_user_defined = True  # transformers' mark: the cache outlives generate
            return
        if generation_config.cache_implementation is not None:
            raise ValueError(f"cache_implementation={generation_config.cache_implementation!r}: a transformed model "
                             "keeps its plan's compressed cache (leave cache_implementation unset)")
        if generation_config.use_cache is not False:
            model_kwargs[CACHE_NAME] = CompressedKVCache(self.plan, self.shape)
            model_kwargs["max_cache_len"] = max_cache_length

    def _prefill_call(self, input_ids, attention_mask, max_cache_len, cache):
        batch, seq = input_ids.shape
        valid = self._padding_mask(attention_mask, batch, seq)
        positions, mask = prompt_positions_and_mask(valid)
        logits, present = call_program(self.prefill_program, input_ids, positions, self.empty_cache(batch),
                                       {PREFILL_MASK: mask})
        cache = cache if cache is not None else CompressedKVCache(self.plan, self.shape)
        cache.check_written_by(self.plan, self.shape)
        padded = not bool(valid.all())
        cache.write_prompt(present, valid if padded else None, max_cache_len)
        if padded and not bool(valid[:, -1].all()):
            logits = carry_last_real_logits(logits, valid)
        return logits, cache

    def _decode_call(self, input_ids, attention_mask, cache: CompressedKVCache):
        cache.check_written_by(self.plan, self.shape)
        batch, seq = input_ids.shape
        if cache.batch_size != batch:
            raise ValueError(f"input_ids has batch {batch}, the cache holds batch {cache.batch_size}")
        padding = continuation_of(attention_mask, cache, seq)
        inputs = cache.prepare_call(seq, padding.real)
        positions = continuation_positions(cache.lengths, seq, padding.real)
        if self._graphed_decode is not None and seq == 1:
            logits = self._graphed_decode(input_ids, positions, cache.buffers, inputs)
        else:
            logits, _ = call_program(self.decode_program, padding.left_padded(input_ids), positions, cache.buffers,
                                     inputs)
            logits = padding.in_call_order(logits)
        cache.advance(seq, padding.real)
        return logits, cache

    def _padding_mask(self, attention_mask, batch: int, seq: int) -> torch.Tensor:
        return padding_mask(attention_mask, batch, seq, self._device)

    @torch.no_grad()
    def encode_dense_cache(self, keys: list[torch.Tensor], values: list[torch.Tensor],
                           max_cache_len: int | None = None) -> CompressedKVCache:
        """The cache this model's prefill writes, from a dense prefill's per-layer K/V (B, Hkv, T, D),
        e.g. the layers of a transformers DynamicCache. For plans that neither merge heads nor update projections, on models
        without sliding-window layers."""
        if self.plan.merges:
            raise ValueError("this plan merges KV heads: its cache is not a function of the dense model's K/V")
        if self.plan.updates:
            raise ValueError(f"this plan updates the attention projections of layers {sorted(self.plan.updates)} "
                             "(healing): its cache is not a function of the dense model's K/V")
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


class Continuation(NamedTuple):
    """How a call continuing a cache is padded. `real` (B,): each row's real tokens (None: all).
    `order` (B, S): the call's tokens reordered so that each row's padding comes first and its real
    tokens follow in order (None: already so). The decode programs take left-padded calls (a row's
    real tokens last, where the attention rule lets query i see slots up to count - S + i); any
    other padding is run in `order` and its logits put back."""

    real: torch.Tensor | None
    order: torch.Tensor | None

    def left_padded(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids if self.order is None else input_ids.gather(1, self.order.to(input_ids.device))

    def in_call_order(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (B, S, V) of the left-padded call, each at its token's place in the call."""
        if self.order is None:
            return logits
        back = self.order.argsort(1).to(logits.device)
        return logits.gather(1, back[..., None].expand_as(logits))


def continuation_of(attention_mask, cache: CompressedKVCache, seq: int) -> Continuation:
    """How a call of `seq` tokens continuing `cache` is padded, from the last `seq` columns of a
    transformers `attention_mask` (B, P + S), anywhere in a row; a row's padding may not outnumber
    the tokens it holds (its padding queries would see none)."""
    if attention_mask is None:
        return Continuation(None, None)
    attention_mask = torch.as_tensor(attention_mask)
    batch = cache.batch_size
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < seq:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}: a call continuing a cache takes "
                         f"(batch, past + new) = ({batch}, P + {seq}), the last {seq} columns marking input_ids")
    call = attention_mask[:, -seq:].to(cache.lengths.device).bool()
    if bool(call.all()):
        return Continuation(None, None)
    real = call.sum(1)
    short = cache.lengths + real < seq
    if bool(short.any()):
        row = int(short.nonzero()[0])
        raise ValueError(f"row {row} holds {cache.row_lengths[row]} tokens and continues by {int(real[row])} real of "
                         f"{seq}: a row's padding in a call continuing a cache may not outnumber the tokens it holds")
    after_padding = call[:, :-1] & ~call[:, 1:]  # a real token followed by padding
    order = torch.argsort(call.int(), dim=1, stable=True) if bool(after_padding.any()) else None
    return Continuation(real, order)


def continuation_positions(lengths: torch.Tensor, seq: int, real: torch.Tensor | None) -> torch.Tensor:
    """`position_ids` (B, S) of a call continuing rows of `lengths` tokens by the last `real` (B,)
    of its `seq` (None: all): each row's real tokens continue its positions; its padding's are
    never seen (clamped at 0)."""
    positions = lengths[:, None] + torch.arange(seq, device=lengths.device)
    return positions if real is None else (positions - (seq - real)[:, None]).clamp(min=0)


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


def carry_last_real_logits(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Prompt logits (B, S, V) where each padding position after a real token holds that row's last
    real token's logits: right-padded rows then end on their next-token prediction, as generate
    reads it at position -1 (the padding positions' own logits predict from padding)."""
    index = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    last_real = torch.where(valid, index, -1).cummax(1).values
    index = torch.where(last_real >= 0, last_real, index)  # left padding keeps its own rows
    return logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))


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
