"""Tiny randomly initialised backbones of each supported architecture (no downloads)."""

from __future__ import annotations

import torch
from torch import nn

ARCHITECTURES = ("t5", "bart", "gpt2", "llama")
VOCAB = 104
PAD = 0


def tiny_backbone(arch: str, seed: int = 0, **overrides) -> nn.Module:
    """A 2-layer model of ``arch`` built from a config (``overrides`` go into it), seeded, in eval mode, fp32."""
    import transformers as hf

    torch.manual_seed(seed)
    if arch == "t5":
        config = hf.T5Config(
            vocab_size=VOCAB,
            d_model=16,
            d_kv=4,
            d_ff=24,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=PAD,
            pad_token_id=PAD,
            eos_token_id=1,
            dropout_rate=0.0,
        )
        model = hf.T5ForConditionalGeneration(config)
    elif arch == "t5_gated":
        config = hf.T5Config(
            vocab_size=VOCAB,
            d_model=16,
            d_kv=4,
            d_ff=24,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            decoder_start_token_id=PAD,
            pad_token_id=PAD,
            eos_token_id=1,
            dropout_rate=0.0,
        )
        model = hf.T5ForConditionalGeneration(config)
    elif arch == "bart":
        config = hf.BartConfig(
            vocab_size=VOCAB,
            d_model=16,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=24,
            decoder_ffn_dim=24,
            max_position_embeddings=64,
            pad_token_id=PAD,
            bos_token_id=2,
            eos_token_id=1,
            decoder_start_token_id=2,
            forced_eos_token_id=None,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
        )
        model = hf.BartForConditionalGeneration(config)
    elif arch == "gpt2":
        config = hf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=16,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=2,
            eos_token_id=1,
            pad_token_id=PAD,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model = hf.GPT2LMHeadModel(config)
    elif arch == "llama":
        config = hf.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=2,
            eos_token_id=1,
            pad_token_id=PAD,
            **overrides,
        )
        model = hf.LlamaForCausalLM(config)
    else:
        raise ValueError(arch)
    model.generation_config.pad_token_id = PAD
    return model.eval()


def tiny_tokenizer():
    """A character-level fast tokenizer (ids < VOCAB) with pad/eos/bos/unk: no download needed."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<s>", "<unk>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {token: index for index, token in enumerate(specials + chars)}
    assert len(vocab) <= VOCAB
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )
