"""Weights for scripted models: Llama weights whose greedy decoding replays fixed token scripts.

Pure numpy; :func:`helper_tools.tiny_models.build_scripted_model` builds the tokenizer, then
calls :func:`scripted_weights` with token ids.

**Bigram table.** Every block leaves the residual stream alone, so the final hidden state
at a position is its token's embedding, RMS-normalised to ``sqrt(d) * unit(embedding)``.
Each token that a script continues from (a *source*) gets a unit embedding ``e``, and
the lm_head row of its successor is ``e * PEAK / sqrt(d)``: the successor's logit is
``PEAK`` and every other row's is lower (Cauchy-Schwarz; exactly 0 while the sources
fit in orthonormal directions, which a branch requires: there both scripts end in EOS,
and EOS's row is the sum of two).

**Branch.** A second script can take over from the start token once a marker token is
anywhere in the context. Two residual dimensions are set aside: ``M`` (only the marker's
embedding is non-zero there) and ``A`` (only the start token's is). Layer 0 then:

* attention: q and k are zero, so all scores are equal and each position averages the
  values of every position up to it; v reads ``M`` and o writes the average back to
  ``M``. After attention ``M`` holds ``FLAG * markers / positions``: exactly 0 without
  a marker, at least ``FLAG / max_positions`` with one, and never more than ``FLAG``.
* MLP, ``down(silu(gate x) * up x)``: one hidden unit, gate reading ``M`` with a large
  gain, up reading ``A``, down writing ``DOWN * s``, where ``s`` is a direction of its
  own (a *virtual source*) whose lm_head successor is the second script's first token. ``silu(0) = 0``
  makes the unit exactly 0 without a marker, and up is exactly 0 at every token but
  the start token. With a marker, at the start token, it adds a vector hundreds of
  times longer than the rest of the state, so after the final RMSNorm the state is
  about ``sqrt(d) * s`` and the bigram table goes on with the second script.

All three RMSNorms have unit weights. The input norm makes the marker's value the same
whatever its embedding's scale; the post-attention norm scales ``M`` by about
``sqrt(d / 2)`` at the start token; the final norm turns the MLP's long vector into a
unit direction. The small ``FLAG`` keeps that final norm from shrinking the second
script's logits (``M`` has no lm_head weight), and the gate's gain grows with
``max_positions`` so that one marker in a full context still drives silu well past its
knee (argument >= 8). Nothing saturates, so the MLP output ranges over a factor of
``max_positions``: float32 and bfloat16 hold it, float16 does not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PEAK = 30.0  # the logit of the right successor
FLAG = 0.1  # the M coordinate after attention when every position so far is a marker
DOWN = 50.0  # MLP output scale at the start token, once a marker is in context

__all__ = ["PEAK", "LlamaShape", "scripted_weights"]


@dataclass(frozen=True, slots=True)
class LlamaShape:
    """The sizes of an ``mlx_lm.models.llama.Model`` that the weights are for."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_positions: int


def _source_directions(count: int, dims: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` unit vectors in ``dims`` dimensions: orthonormal when they fit, else random."""
    if count <= dims:
        q, _ = np.linalg.qr(rng.standard_normal((dims, count)))
        vecs = q.T
    else:
        vecs = rng.standard_normal((count, dims))
    units: np.ndarray = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    return units.astype(np.float32)


def scripted_weights(
    shape: LlamaShape,
    script: Sequence[int],
    branch: tuple[int, Sequence[int]] | None = None,
    *,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Parameters (``tree_flatten`` names) that make greedy decoding replay token scripts.

    ``script`` is ``[start, t1, ..., tn, eos]``: after ``start`` the model emits
    ``t1 ... tn eos``. ``branch`` is ``(marker, [u1, ..., um, eos])``: once ``marker`` is
    in the context, the model emits ``u1 ... um eos`` after ``start`` instead. Source tokens
    (every script token but the last of each) must all differ, and the marker may be none
    of them. The result sets the embeddings, the lm_head, the final norm, layer 0's
    attention and MLP when there is a branch, and zeroes every block's output projections.
    """
    d = shape.hidden_size
    sources: list[int | None] = list(script[:-1])  # None: the branch's virtual source
    successors = list(script[1:])
    if branch is not None:
        marker, second = branch
        sources += [None, *second[:-1]]
        successors += list(second)
        if marker in sources:
            raise ValueError("the marker token may not be a script token")
    real = [s for s in sources if s is not None]
    if len(set(real)) != len(real):
        raise ValueError(f"script tokens repeat: {sources}")
    content = d if branch is None else d - 2  # branch: M = d - 1 and A = d - 2 are set aside
    if branch is not None and len(sources) > content:
        raise ValueError(f"{len(sources)} script pieces need hidden_size >= {len(sources) + 2}")

    rng = np.random.default_rng(seed)
    emb = np.zeros((shape.vocab_size, d), np.float32)
    emb[:, :content] = rng.standard_normal((shape.vocab_size, content))
    states = np.zeros((len(sources), d), np.float32)  # the embedding of each source
    states[:, :content] = _source_directions(len(sources), content, rng)
    if branch is not None:
        states[0, d - 2] = 1.0  # the start token's A coordinate
        emb[branch[0]] = 0.0
        emb[branch[0], d - 1] = 1.0  # the marker is pure M
    for i, token in enumerate(sources):
        if token is not None:
            emb[token] = states[i]
    head = np.zeros((shape.vocab_size, d), np.float32)
    # Both scripts end in EOS: its row is the sum of two orthogonal rows, right for either source.
    np.add.at(head, successors, states / np.linalg.norm(states, axis=1, keepdims=True) * (PEAK / math.sqrt(d)))

    weights = {
        "model.embed_tokens.weight": emb,
        "model.norm.weight": np.ones(d, np.float32),
        "lm_head.weight": head,
    }
    head_dim = d // shape.num_heads
    for i in range(shape.num_layers):
        weights[f"model.layers.{i}.self_attn.o_proj.weight"] = np.zeros((d, shape.num_heads * head_dim), np.float32)
        weights[f"model.layers.{i}.mlp.down_proj.weight"] = np.zeros((d, shape.intermediate_size), np.float32)
    if branch is not None:
        virtual = len(script) - 1
        weights.update(_branch_layer(shape, states[virtual, :content]))
    return weights


def _branch_layer(shape: LlamaShape, target: np.ndarray) -> dict[str, np.ndarray]:
    """Layer 0's attention and MLP for a branch; ``target`` is the virtual source's direction."""
    d, inner = shape.hidden_size, shape.intermediate_size
    flag, start = d - 1, d - 2
    head_dim = d // shape.num_heads
    p = "model.layers.0."
    w = {
        p + "input_layernorm.weight": np.ones(d, np.float32),
        p + "post_attention_layernorm.weight": np.ones(d, np.float32),
        p + "self_attn.q_proj.weight": np.zeros((shape.num_heads * head_dim, d), np.float32),
        p + "self_attn.k_proj.weight": np.zeros((shape.num_kv_heads * head_dim, d), np.float32),
        p + "self_attn.v_proj.weight": np.zeros((shape.num_kv_heads * head_dim, d), np.float32),
        p + "self_attn.o_proj.weight": np.zeros((d, shape.num_heads * head_dim), np.float32),
        p + "mlp.gate_proj.weight": np.zeros((inner, d), np.float32),
        p + "mlp.up_proj.weight": np.zeros((inner, d), np.float32),
        p + "mlp.down_proj.weight": np.zeros((d, inner), np.float32),
    }
    # The marker's normed input is sqrt(d) in M: v (kv head 0, dim 0) copies it, o (query head 0,
    # which reads kv head 0) scales the average to FLAG * markers / positions in M.
    w[p + "self_attn.v_proj.weight"][0, flag] = 1.0
    w[p + "self_attn.o_proj.weight"][flag, 0] = FLAG / math.sqrt(d)
    # At the start token the state is (unit direction, A=1, M=f), f <= FLAG: normed, M is
    # sqrt(d) * f / sqrt(2 + f^2). One marker in a full context gives f = FLAG / max_positions;
    # scale the least M that can give to a silu argument of 8.
    least = math.sqrt(d) * FLAG / shape.max_positions / math.sqrt(2 + FLAG**2)
    w[p + "mlp.gate_proj.weight"][0, flag] = 8.0 / least
    w[p + "mlp.up_proj.weight"][0, start] = 1.0
    w[p + "mlp.down_proj.weight"][: len(target), 0] = target * DOWN
    return w
