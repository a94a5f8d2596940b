"""A small pretrained model directory the tests write themselves: a BPE tokenizer trained on a text and a GPT-2
(another architecture than our Llama) of matching vocabulary, saved as `save_pretrained` saves them."""

from __future__ import annotations

from pathlib import Path

import torch


def write_pretrained(folder: Path, text: str, vocab: int = 400, seed: int = 0, positions: int = 64) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=positions, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        GPT2LMHeadModel(config).save_pretrained(folder)
    return folder
