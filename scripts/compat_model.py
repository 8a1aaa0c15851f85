"""Build the compat tier's tiny random-weight chat model (run with .venv-compat's Python: it needs torch+transformers).

No model hub is reachable, so the model vLLM serves is made here: a byte-level BPE tokenizer trained on the
project's own task files and sample reviews (so the sentiment prompt fits a 2,048-token context with room to
spare), a chat template, `</s>` as eos, and a 2-layer Llama with random weights (seeded, so every build is the
same model). The weights are random on purpose: the tier checks how labelstream reads a real server, not what a
model knows. Usage: compat_model.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 2048
CONTEXT = 2048
SPECIAL = ["<s>", "</s>", "<pad>"]
# ChatML-like turns: every turn ends with the eos token, so a finished reply stops on `</s>` as Llama 2 does.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def corpus() -> list[str]:
    """Lines the tokenizer learns from: the task files, the sample reviews and the JSON the model must write."""
    lines: list[str] = []
    for path in sorted((ROOT / "configs").glob("*")):
        if path.suffix in {".toml", ".csv"}:
            lines.extend(path.read_text(encoding="utf-8").splitlines())
    lines += ['{"label": "positive"}', '{"label": "negative"}', '{"label": "neutral"}', "<|system|> <|user|>"]
    return [line for line in lines if line.strip()]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (any text encodes, so long or odd rows never hit an unknown token)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus() * 4, trainer=trainer)
    bos, eos, pad = SPECIAL
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, model_max_length=CONTEXT
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """Two layers, head size 64 (a size every CPU attention kernel takes), seeded random weights."""
    torch.manual_seed(19)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    return LlamaForCausalLM(config).eval()


def main(out: Path) -> None:
    """Write tokenizer, config and weights to `out` (vllm serve OUT --served-model-name tiny)."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(out)
    build_model(tokenizer).save_pretrained(out, safe_serialization=True)
    print(f"tiny model: {out} (vocab {len(tokenizer)}, context {CONTEXT})")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: compat_model.py OUT_DIR")
    main(Path(sys.argv[1]))
