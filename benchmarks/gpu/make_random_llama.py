"""Write a Llama model with random weights at Llama-3-8B's widths, for timing on a GPU.

The lent GPU machine holds no model weights and reaches no hub, so the stream's speed at real
sizes is measured on random weights: the work per step (matrix shapes, layers run, tokens) is
the real model's; the edits' quality is not a property of this model and is not reported.

    python benchmarks/gpu/make_random_llama.py --tokenizer DIR --out DIR [--layers 32]

``--tokenizer`` is a directory with ``tokenizer.json`` / ``tokenizer_config.json`` (SmolLM2's
from the rlsedit model cache). The vocabulary of the config stays Llama 3's 128,256 so the
LM head costs what it costs there; the tokenizer only ever produces ids below its own size.
Weights are stored in float16 (half the disk); rlsedit loads them as float32.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, help="directory holding tokenizer.json and tokenizer_config.json")
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    tok = Path(args.tokenizer)
    import json
    tok_config = json.loads((tok / "tokenizer_config.json").read_text())
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(torch.float16)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tok / name).is_file():
            shutil.copy(tok / name, out / name)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {args.layers} layers, d_model {args.hidden}, d_k {args.intermediate}, "
          f"vocab {args.vocab}, {n / 1e9:.2f} B parameters (tokenizer: {tok_config.get('tokenizer_class')})")


if __name__ == "__main__":
    main()
