"""The architecture table: where each model family keeps the modules an editor touches.

One entry per Hugging Face ``model_type``. Orientation of the edited weight is *declared*
(``conv1d``), never guessed from its shape: a square weight would be ambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedError


@dataclass(frozen=True)
class Architecture:
    """Module paths (dotted, relative to the top-level model) for one model family.

    Attributes:
        family: the ``model_type`` this entry serves.
        layers: the ``ModuleList`` of transformer blocks.
        mlp_down: the MLP down projection, relative to one block. Its input is the key
            ``k (d_k)``, its output the value ``v (d_v = d_model)``.
        attention: the self-attention module, relative to one block.
        final_norm: the norm before the LM head.
        lm_head: the output projection.
        embed: the token embedding.
        conv1d: True when the down projection is a GPT-2 style ``Conv1D`` whose weight is
            stored ``(d_in, d_out) = (d_k, d_v)``; False for ``nn.Linear`` ``(d_v, d_k)``.
        post_mlp_norm: a norm applied to the MLP output before it joins the residual stream
            (Gemma 2/3 ``post_feedforward_layernorm``), relative to one block, else None.
            When set, a residual-stream change is mapped back through it to a value target.
        target_lr: the Adam step of the value-target optimisation when a method's ``v_lr`` is
            left unset. Adam moves each coordinate of δ by about this much per step, so it must
            suit the size of the residual stream: 0.5 (MEMIT's GPT-J and AlphaEdit's GPT-2 XL
            value) where hidden coordinates are a few units (SmolLM2: rms 5.7 at layer 8);
            Gemma 3 scales its embeddings by √d_model (rms 171 at layer 6 of the 270M model),
            where 0.5 left p(target) at 0.54 and 2.0, chosen on the CounterFact val split,
            gives 95% efficacy (docs/TUNING.md).
    """

    family: str
    layers: str
    mlp_down: str
    attention: str
    final_norm: str
    lm_head: str
    embed: str
    conv1d: bool = False
    post_mlp_norm: str | None = None
    target_lr: float = 0.5


def _llama_like(family: str) -> Architecture:
    return Architecture(
        family=family, layers="model.layers", mlp_down="mlp.down_proj", attention="self_attn",
        final_norm="model.norm", lm_head="lm_head", embed="model.embed_tokens",
    )


ARCHITECTURES: dict[str, Architecture] = {
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    "qwen2": _llama_like("qwen2"),
    "gemma3_text": Architecture(
        family="gemma3_text", layers="model.layers", mlp_down="mlp.down_proj",
        attention="self_attn", final_norm="model.norm", lm_head="lm_head",
        embed="model.embed_tokens", post_mlp_norm="post_feedforward_layernorm", target_lr=2.0,
    ),
    "gemma3": Architecture(  # multimodal wrapper: the text model sits one level down
        family="gemma3", layers="model.language_model.layers", mlp_down="mlp.down_proj",
        attention="self_attn", final_norm="model.language_model.norm", lm_head="lm_head",
        embed="model.language_model.embed_tokens", post_mlp_norm="post_feedforward_layernorm",
        target_lr=2.0,
    ),
    "gpt2": Architecture(
        family="gpt2", layers="transformer.h", mlp_down="mlp.c_proj", attention="attn",
        final_norm="transformer.ln_f", lm_head="lm_head", embed="transformer.wte", conv1d=True,
    ),
    "gptj": Architecture(
        family="gptj", layers="transformer.h", mlp_down="mlp.fc_out", attention="attn",
        final_norm="transformer.ln_f", lm_head="lm_head", embed="transformer.wte",
    ),
}

# Edit layers of the official MEMIT/AlphaEdit/RLSEdit configurations, by model name
# (the part after the last "/", lower-cased). SmolLM2 and Gemma 3 were chosen by measurement:
# see docs/LAYERS.md for the sweep that picked them.
DEFAULT_LAYERS: dict[str, tuple[int, ...]] = {
    "meta-llama-3-8b": (4, 5, 6, 7, 8),
    "meta-llama-3-8b-instruct": (4, 5, 6, 7, 8),
    "llama-3-8b": (4, 5, 6, 7, 8),
    "qwen2.5-7b": (7, 8, 9, 10, 11),
    "qwen2.5-7b-instruct": (7, 8, 9, 10, 11),
    "gpt2-xl": (13, 14, 15, 16, 17),
    "gpt-j-6b": (3, 4, 5, 6, 7, 8),
}


def get_architecture(config) -> Architecture:
    """The table entry for a transformers config (by ``model_type``)."""
    model_type = getattr(config, "model_type", None)
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedError(
            f"model_type {model_type!r} is not in the architecture table (known: {known}); "
            "add an entry to rlsedit.model.arch.ARCHITECTURES"
        ) from None


def resolve(root, dotted: str):
    """The submodule at ``dotted`` below ``root`` (``"model.layers.3"`` style)."""
    module = root
    for part in dotted.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module
