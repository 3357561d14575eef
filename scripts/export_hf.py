"""
Export a checkpoint to a folder that transformers loads: config.json, model.safetensors and the tokenizer files.

    python -m scripts.export_hf -i sft --out nanochat-d20-hf
    python -c "from transformers import AutoModelForCausalLM, AutoTokenizer; AutoModelForCausalLM.from_pretrained('nanochat-d20-hf')"

transformers (5.x) has a `nanochat` model type: rotary, QK-norm, relu², the logit softcap, an untied head and GQA. It
has no value embeddings, smear, backout, per-layer scalars, sliding windows, QK sharpening or Mamba layers, so only a
model trained with `base_train --hf-compatible` (and finetuned from one) exports; any other is refused, naming what
it uses. The tokenizer becomes a `tokenizers` byte-level BPE with the same ids, and a chat template that renders
conversations as nanochat does.
"""

import json
import os

import torch

from nanochat.common import Flags, UserError, print_result, run_cli
from nanochat.gpt import mixer_kinds

# nanochat's conversation format as a Jinja template: a system message joins the first user message, as in
# RustBPETokenizer.render_conversation; tool calls and outputs are not rendered (plain text content only)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n\n' %}"
    "{% elif message['role'] == 'user' %}<|user_start|>{{ ns.system + message['content'] }}<|user_end|>{% set ns.system = '' %}"
    "{% else %}<|assistant_start|>{{ message['content'] }}<|assistant_end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant_start|>{% endif %}"
)


def unsupported_features(model):
    """What the model uses that transformers' NanoChat lacks, by what its weights and config actually do."""
    config = model.config
    found = []
    if any(kind != "A" for kind in mixer_kinds(config)):
        found.append(f"Mamba or sparse attention layers (--mixer-pattern={config.mixer_pattern})")
    if config.engram_layers or config.mhc_streams:
        found.append("Engram or mHC (--engram-layers, --mhc-streams)")
    if any(w is not None and w < config.sequence_len for w in model.windows):
        found.append(f"sliding windows (--window-pattern={config.window_pattern})")
    if len(model.value_embeds):
        found.append("value embeddings")
    if not config.hf_compatible:
        found.append("QK sharpening (x1.2)")
    if model.smear_lambda.item() != 0:
        found.append("smear")
    if model.backout_lambda.item() != 0:
        found.append("backout")
    if not (torch.all(model.resid_lambdas == 1) and torch.all(model.x0_lambdas == 0)):
        found.append("per-layer residual scalars")
    return found


def hf_config(model, tokenizer):
    c = model.config
    special = tokenizer.encode_special
    return {
        "architectures": ["NanoChatForCausalLM"], "model_type": "nanochat",
        "vocab_size": c.vocab_size, "hidden_size": c.n_embd, "intermediate_size": 4 * c.n_embd,
        "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head,
        "max_position_embeddings": c.sequence_len, "hidden_act": "relu2",
        "rms_norm_eps": torch.finfo(torch.float32).eps,  # F.rms_norm's default for fp32
        "rope_parameters": {"rope_theta": float(c.rotary_base), "rope_type": "default"},  # GPT._rotary_tables' base
        "final_logit_softcapping": 15.0, "tie_word_embeddings": False, "attention_bias": False,
        "bos_token_id": special("<|bos|>"), "eos_token_id": [special("<|assistant_end|>"), special("<|bos|>")],
        # not BOS: generate() would take every BOS in a prompt for padding and mask it out; an end token it does not
        "pad_token_id": special("<|assistant_end|>"),
    }


def hf_state_dict(model, dtype):
    """Our weights under transformers' names; the padded vocabulary rows of the embedding and head are cut off."""
    vocab = model.config.vocab_size
    out = {"model.embed_tokens.weight": model.transformer.wte.weight[:vocab], "lm_head.weight": model.lm_head.weight[:vocab]}
    for i, block in enumerate(model.transformer.h):
        attn, mlp, prefix = block.mixer, block.mlp, f"model.layers.{i}."
        out[prefix + "self_attn.q_proj.weight"] = attn.c_q.weight
        out[prefix + "self_attn.k_proj.weight"] = attn.c_k.weight
        out[prefix + "self_attn.v_proj.weight"] = attn.c_v.weight
        out[prefix + "self_attn.o_proj.weight"] = attn.c_proj.weight
        out[prefix + "mlp.fc1.weight"] = mlp.c_fc.weight
        out[prefix + "mlp.fc2.weight"] = mlp.c_proj.weight
    return {k: v.detach().to(dtype).contiguous() for k, v in out.items()}


def byte_level_alphabet():
    """GPT-2's map from bytes to printable characters, which byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def bpe_merges(ranks):
    """
    The merge list tiktoken's ranks imply: a token of rank r is the merge of the two pieces that byte-pair encoding
    with only the ranks below r leaves of its bytes. In rank order, so merge priority equals tiktoken's.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pair_ranks = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
            best = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[best] >= rank:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) != 2:
            raise UserError(f"the tokenizer's token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens: "
                            "it did not come from byte-pair training and cannot be exported")
        merges.append(tuple(parts))
    return merges


def hf_tokenizer(tokenizer):
    """A `tokenizers` byte-level BPE that gives the same ids as our tiktoken encoding, special tokens included."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    enc = tokenizer.enc
    chars = byte_level_alphabet()
    spell = lambda piece: "".join(chars[b] for b in piece)
    ranks = enc._mergeable_ranks
    bpe = models.BPE(vocab={spell(t): r for t, r in ranks.items()},
                     merges=[(spell(a), spell(b)) for a, b in bpe_merges(ranks)], ignore_merges=True)
    hf = Tokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(enc._pat_str), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    names = sorted(tokenizer.get_special_tokens(), key=tokenizer.encode_special)  # in id order, FIM tokens included
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in names])
    for name in names:
        assert hf.token_to_id(name) == tokenizer.encode_special(name), f"{name} would get another id"
    return hf


def export(model, tokenizer, out, dtype=torch.float32):
    """Write the transformers folder; returns the files written."""
    from safetensors.torch import save_file
    found = unsupported_features(model)
    if found:
        raise UserError(f"this model uses what transformers' NanoChat model lacks: {', '.join(found)}; only models trained "
                        "with python -m scripts.base_train --hf-compatible (and finetuned from one) export")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:  # a file by that name, or no permission
        raise UserError(f"--out={out} cannot be a folder to write to ({e.strerror}): pick another path") from None
    config = {**hf_config(model, tokenizer), "dtype": str(dtype).removeprefix("torch.")}
    files = {
        "config.json": config,
        "generation_config.json": {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
        "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>",
                                  "eos_token": "<|assistant_end|>", "pad_token": "<|assistant_end|>",
                                  "model_max_length": model.config.sequence_len, "chat_template": CHAT_TEMPLATE},
    }
    for name, content in files.items():
        with open(os.path.join(out, name), "w") as f:
            json.dump(content, f, indent=2)
    save_file(hf_state_dict(model, dtype), os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    hf_tokenizer(tokenizer).save(os.path.join(out, "tokenizer.json"))
    return sorted([*files, "model.safetensors", "tokenizer.json"])


def main(argv=None):
    p = Flags(description="Export a checkpoint for transformers (AutoModelForCausalLM / AutoTokenizer).")
    p.add_argument("-i", "--source", default="sft", help="base|mid|sft|rl")
    p.add_argument("-g", "--model-tag", default=None, help="checkpoint folder (default: the largest d<N>)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--out", required=True, help="the folder to write (created if missing; files in it are replaced)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights' dtype in the export")
    args = p.parse_args(argv)
    from nanochat.checkpoint_manager import load_model
    model, tokenizer, meta = load_model(args.source, "cpu", torch.float32, model_tag=args.model_tag, step=args.step)
    files = export(model, tokenizer, args.out, getattr(torch, args.dtype))
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in files)
    print(f"wrote {', '.join(files)} to {args.out} ({size / 2**20:.1f} MiB)")
    c = model.config
    params = 2 * c.vocab_size * c.n_embd + sum(p.numel() for p in model.transformer.h.parameters())
    print_result("export_hf", out=os.path.abspath(args.out), source=args.source, step=meta["step"], files=files, bytes=size,
                 dtype=args.dtype, params=params)


if __name__ == "__main__":
    run_cli(main)
