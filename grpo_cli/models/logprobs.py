"""Per-token log-probs of completions through the model, and the key/value cache helpers the passes share.

``grouped_completion_logprobs`` runs each distinct prompt through the decoder once and its G
completions on the shared cache; the head and log-softmax are ``core.logprobs.token_logprobs``
(chunked, no [B, T, V] logits).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from grpo_cli.core.logprobs import token_logprobs
from grpo_cli.core.packing import completion_rows, pack_sequences


@functools.cache
def cache_arg() -> str:
    """The name of the key/value cache argument and output field of transformers' models.

    transformers 5 renamed ``past_key_values`` to ``cache`` (the old name still works, with a
    FutureWarning on every call); earlier releases know only ``past_key_values``.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def output_cache(out: Any) -> Any:
    """The key/value cache a forward with ``use_cache=True`` returned."""
    return getattr(out, cache_arg())


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: [B, S] -> [B, S] (0 at the first real token)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_len: int,
    temperature: float = 1.0,
    entropy: str | None = None,
) -> Any:
    """log pi(o_t | q, o_<t) for every completion token, without [B, T, V] logits.

    input_ids, attention_mask: [B, S], the left-padded prompt (``prompt_len`` columns) followed by
    the completion. Returns logps [B, S - prompt_len] float32; with ``entropy`` "metric" (detached) or
    "grad" (differentiable, for an entropy bonus) the pair (logps, entropy [B, S - prompt_len]) from
    the same pass (``core.logprobs.token_logprobs``).
    """
    decoder = model.get_decoder()
    hidden = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions(attention_mask),
        use_cache=False,
    ).last_hidden_state  # [B, S, H]
    # The hidden state at position t predicts token t + 1.
    hidden = hidden[:, prompt_len - 1 : -1]
    weight = model.get_output_embeddings().weight  # [V, H]
    return _head(hidden, weight, input_ids[:, prompt_len:], temperature, entropy)


def _head(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: str | None
) -> Any:
    if entropy not in (None, "metric", "grad"):
        raise ValueError(f"entropy={entropy!r}: expected None, 'metric' or 'grad'")
    return token_logprobs(
        hidden,
        weight,
        targets,
        temperature=temperature,
        return_entropy=entropy is not None,
        entropy_grad=entropy == "grad",
    )


def _shareable_cache(cache: Any, prompt_len: int) -> bool:
    """Whether the prompt pass left a plain per-layer key/value cache of all ``prompt_len`` columns."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return (
        isinstance(cache, DynamicCache)
        and all(type(layer) is DynamicLayer for layer in cache.layers)
        and cache.get_seq_length() == prompt_len
    )


def _prompt_index(
    prompt_ids: torch.Tensor, completion_ids: torch.Tensor, group_size: int | None, index: torch.Tensor | None
) -> torch.Tensor:
    """The prompt row [N] of every completion: ``index``, or completion i -> i // group_size."""
    if index is None:
        if group_size is None:
            raise ValueError("grouped_completion_logprobs: give group_size or prompt_index")
        index = torch.arange(prompt_ids.size(0), device=prompt_ids.device).repeat_interleave(group_size)
    index = index.to(prompt_ids.device)
    if index.numel() != completion_ids.size(0):
        raise ValueError(
            f"prompt_index covers {index.numel()} completions, completion_ids has {completion_ids.size(0)}"
        )
    return index


def grouped_completion_logprobs(
    model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    group_size: int | None = None,
    temperature: float = 1.0,
    prompt_index: torch.Tensor | None = None,
    entropy: str | None = None,
) -> Any:
    """``completion_logprobs`` with each distinct prompt run through the decoder once, not once per completion.

    prompt_ids, prompt_mask: [P, L] left-padded, one row per group; completion_ids, completion_mask:
    [N, T] right-padded, where completion i continues prompt ``prompt_index[i]`` (by default
    ``i // group_size``: N = P * G rows, group p is rows [p*G, (p+1)*G)). The prompt pass keeps its
    key/value cache, which is expanded to the N completions (differentiably: the gradients of all G
    completions flow into the one prompt pass) and attended to by the completion pass. Returns what
    ``completion_logprobs`` on the concatenated sequences returns, up to float rounding (with
    ``entropy``, the pair of log-probs and entropies).

    Falls back to the full-sequence path when the cache cannot be shared: gradient checkpointing in
    training mode (transformers drops the cache there), or a cache other than a plain DynamicCache.

    Nine arguments: the forward's tensors (model, prompts and their mask, completions and their mask)
    and its switches (G, temperature, the prompt index, entropy), called through ``Policy.run`` by every
    pass.
    """
    prompt_index = _prompt_index(prompt_ids, completion_ids, group_size, prompt_index)
    L = prompt_ids.size(1)
    decoder = model.get_decoder()

    def full_path():
        ids = torch.cat([prompt_ids[prompt_index], completion_ids], 1)
        mask = torch.cat([prompt_mask[prompt_index], completion_mask], 1)
        return completion_logprobs(model, ids, mask, L, temperature, entropy)

    if getattr(decoder, "gradient_checkpointing", False) and decoder.training:
        return full_path()
    prompt_pos = positions(prompt_mask)
    out = decoder(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_pos, use_cache=True)
    cache = output_cache(out)
    if not _shareable_cache(cache, L):
        return full_path()
    cache.batch_select_indices(prompt_index)  # [P, ...] -> [N, ...]; indexing, so differentiable
    T = completion_ids.size(1)
    steps = torch.arange(1, T + 1, device=prompt_pos.device)
    hidden = decoder(
        input_ids=completion_ids,
        attention_mask=torch.cat([prompt_mask[prompt_index], completion_mask], 1),
        position_ids=prompt_pos[prompt_index, -1:] + steps,
        use_cache=True,
        **{cache_arg(): cache},
    ).last_hidden_state  # [N, T, H]
    if cache.get_seq_length() != L + T:  # the completion pass did not attend to the prompt
        return full_path()
    # The prompt's last hidden state predicts the first completion token; completion t predicts t + 1.
    hidden = torch.cat([out.last_hidden_state[prompt_index, -1:], hidden[:, :-1]], 1)
    weight = model.get_output_embeddings().weight  # [V, H]
    return _head(hidden, weight, completion_ids, temperature, entropy)


# Attention implementations that take a prepared [B, 1, Q, K] mask; the others (flash-attention's
# variable-length kernels) find the sequences of a packed row from its restarting position ids.
MASKED_ATTENTION = ("sdpa", "eager")


def attention_implementation(model: Any) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def packed_layout(model: Any) -> str:
    """The packed layout ``packed_completion_logprobs`` uses for ``model``: "rows" (each prompt once,
    read from its key/value cache) or "sequences" (a copy of the prompt before every completion)."""
    return "rows" if attention_implementation(model) in MASKED_ATTENTION else "sequences"


def packed_completion_logprobs(
    model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    prompt_index: torch.Tensor,
    temperature: float = 1.0,
    entropy: str | None = None,
    layout: str | None = None,
) -> Any:
    """``grouped_completion_logprobs`` with the completions packed side by side, no padding between them.

    Shapes as ``grouped_completion_logprobs``: prompts [P, L] left-padded, completions [n, T]
    right-padded, completion i continuing prompt ``prompt_index[i]``. ``layout`` (None: by the model's
    attention implementation): "rows" for sdpa and eager, each prompt through the decoder once and the
    completions in rows as wide as the longest (``core.packing.completion_rows``), reading their
    prompts from its key/value cache through a prepared mask; "sequences" otherwise, one row of
    prompt + completion sequences with restarting position ids and no mask, which transformers turns
    into variable-length attention (``core.packing.pack_sequences``). Returns log-probs [n, T] float32
    (0 past each completion's end), with ``entropy`` the entropies [n, T] too; the head runs on the
    completions' tokens only.

    Nine arguments: the forward's tensors (model, prompts and their mask, completions and their mask,
    the prompt index) and its switches (temperature, entropy, layout), called through ``Policy.run`` as the
    padded variant is.
    """
    implementation = attention_implementation(model)
    layout = layout or packed_layout(model)
    weight = model.get_output_embeddings().weight  # [V, H]
    decoder = model.get_decoder()
    if layout == "sequences":
        seq = pack_sequences(prompt_ids, prompt_mask, completion_ids, completion_mask, prompt_index)
        hidden = decoder(
            input_ids=seq.input_ids[None], position_ids=seq.position_ids[None], use_cache=False
        ).last_hidden_state[0]  # [S, H]
        predictor, valid = seq.predictor, seq.valid
    else:
        hidden, predictor, valid = _row_hidden(
            decoder,
            prompt_ids,
            prompt_mask,
            completion_ids,
            completion_mask,
            prompt_index,
            implementation,
            weight.dtype,
        )
    out = _head(hidden[predictor[valid]][None], weight, completion_ids[valid][None], temperature, entropy)
    n, T = completion_ids.shape

    def unpack(values: torch.Tensor) -> torch.Tensor:  # [1, M] -> [n, T], zeros past each end
        full = values.new_zeros(n, T)
        full[valid] = values[0]
        return full

    return unpack(out) if entropy is None else (unpack(out[0]), unpack(out[1]))


def _row_hidden(
    decoder: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    prompt_index: torch.Tensor,
    implementation: str,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The "rows" layout: hidden states [P + R * W, H] (each prompt's last, then the rows'), and the
    predictor and valid maps of ``core.packing.completion_rows``."""
    rows = completion_rows(prompt_mask, completion_ids, completion_mask, prompt_index)
    out = decoder(
        input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions(prompt_mask), use_cache=True
    )
    cache = output_cache(out)
    if not _shareable_cache(cache, prompt_ids.size(1)):
        raise RuntimeError(
            "train.micro_batch_tokens: this model's key/value cache cannot be shared by packed rows"
        )
    for (
        layer
    ) in cache.layers:  # [P, h, L, d] -> [R, h, K * L, d]: each row's prompts; indexing, so differentiable
        layer.keys, layer.values = (_gather_prefix(t, rows.prefix_index) for t in (layer.keys, layer.values))
    mask = rows.allowed[:, None]  # [R, 1, W, K * L + W], True: attend
    if implementation == "eager":  # eager adds its mask to the scores
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )
    hidden = decoder(
        input_ids=rows.input_ids,
        attention_mask=mask,
        position_ids=rows.position_ids,
        use_cache=True,
        **{cache_arg(): cache},
    ).last_hidden_state  # [R, W, H]
    source = torch.cat([out.last_hidden_state[:, -1], hidden.flatten(0, 1)])  # [P + R * W, H]
    return source, rows.predictor, rows.valid


def _gather_prefix(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[P, h, L, d] key or value states -> [R, h, K * L, d], column c of row r from prompt column index[r, c]."""
    P, h, L, d = states.shape
    flat = states.transpose(1, 2).reshape(P * L, h, d)
    return flat[index].transpose(1, 2)
