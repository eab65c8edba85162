"""Tests for dpoflow.core.batching: tokenization convention, truncation, length grouping, collation layout."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from dpoflow.core.batching import (
    EncodedPair,
    PairBatch,
    collate_pairs,
    collate_sequences,
    encode_completion,
    encode_pair,
    encode_prompt,
    length_grouped_batches,
    split_pairs,
)

PAD, EOS, START, SEP = 0, 2, 3, 4


class CharTokenizer:
    """Minimal stand-in: one id per character (ord), a fixed chat format, eos = 2. Returns a list, like mlx-lm."""

    eos_token_id = EOS

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        ids = []
        for m in messages:
            ids += [START] + self.encode(m["role"]) + [SEP] + self.encode(m["content"]) + [EOS]
        if add_generation_prompt:
            ids += [START] + self.encode("assistant") + [SEP]
        return ids


def make_hf_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["hello world what is two plus two", "the answer is four"] * 10, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>")
    hf.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return hf


PAIR = {"prompt": [{"role": "user", "content": "what is two plus two"}], "chosen": "four", "rejected": "five!"}


def test_convention_with_real_tokenizers():
    """HF tokenizer (transformers 5 returns a BatchEncoding) and mlx-lm's wrapper give the same ids."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    hf = make_hf_tokenizer()
    expected_prompt = hf.apply_chat_template(PAIR["prompt"], add_generation_prompt=True, tokenize=True)["input_ids"]
    for tok in (hf, TokenizerWrapper(hf)):
        enc = encode_pair(tok, PAIR, max_len=512)
        assert enc.prompt_ids == list(expected_prompt)
        assert enc.chosen_ids == hf.encode("four", add_special_tokens=False) + [hf.eos_token_id]
        assert enc.rejected_ids[-1] == hf.eos_token_id
        assert not enc.truncated
    assert encode_prompt(hf, PAIR["prompt"]) == list(expected_prompt)


def test_encode_pair_char_tokenizer():
    tok = CharTokenizer()
    enc = encode_pair(tok, PAIR, max_len=1000)
    assert enc.prompt_ids == tok.apply_chat_template(PAIR["prompt"], add_generation_prompt=True)
    assert enc.chosen_ids == [ord(c) for c in "four"] + [EOS]
    assert enc.rejected_ids == [ord(c) for c in "five!"] + [EOS]
    assert enc.max_length == len(enc.prompt_ids) + 6


def test_truncation_cuts_prompt_from_left_and_keeps_completions():
    tok = CharTokenizer()
    full = encode_pair(tok, PAIR, max_len=1000)
    enc = encode_pair(tok, PAIR, max_len=20)
    assert enc.truncated
    assert enc.chosen_ids == full.chosen_ids and enc.rejected_ids == full.rejected_ids
    assert enc.prompt_ids == full.prompt_ids[-(20 - 6) :]  # the end (generation prompt) survives
    assert enc.max_length == 20


def test_truncation_of_overlong_completion():
    tok = CharTokenizer()
    pair = dict(PAIR, chosen="x" * 50)
    enc = encode_pair(tok, pair, max_len=10)
    assert enc.truncated
    assert len(enc.prompt_ids) == 1
    assert len(enc.chosen_ids) == 9 and enc.chosen_ids[-1] != EOS  # cut from the right
    assert enc.rejected_ids == [ord(c) for c in "five!"] + [EOS]
    assert enc.max_length <= 10


def test_missing_eos_is_an_error():
    class NoEos(CharTokenizer):
        eos_token_id = None

    with pytest.raises(ValueError, match="eos"):
        encode_completion(NoEos(), "hi")


def test_length_grouped_batches_properties():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=1037).tolist()
    bs = 8
    batches = length_grouped_batches(lengths, bs, seed=3, epoch=0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # each index exactly once
    assert sum(len(b) < bs for b in batches) <= 1
    assert all(isinstance(i, int) for i in flat)
    assert batches == length_grouped_batches(lengths, bs, seed=3, epoch=0)  # deterministic
    assert batches != length_grouped_batches(lengths, bs, seed=3, epoch=1)
    assert batches != length_grouped_batches(lengths, bs, seed=4, epoch=0)
    # grouping: padding waste far below that of random batches
    arr = np.asarray(lengths)

    def waste(bs_list):
        return sum(arr[b].max() * len(b) - arr[b].sum() for b in bs_list)

    random_batches = [list(range(i, min(i + bs, len(arr)))) for i in range(0, len(arr), bs)]
    assert waste(batches) < 0.2 * waste(random_batches)


def test_length_grouped_batches_small_inputs():
    assert length_grouped_batches([], 4, 0, 0) == []
    assert sorted(sum(length_grouped_batches([3, 1, 2], 4, 0, 0), [])) == [0, 1, 2]


def test_collate_pairs_layout():
    pairs = [
        EncodedPair([10, 11, 12], [20, 21, EOS], [30, EOS]),
        EncodedPair([13, 14], [22, 23, 24, 25, EOS], [31, 32, EOS]),
    ]
    batch = collate_pairs(pairs, pad_id=PAD)
    assert isinstance(batch, PairBatch) and batch.n_pairs == 2
    inputs, targets, mask = (np.asarray(a) for a in (batch.input_ids, batch.targets, batch.loss_mask))
    assert inputs.shape == (4, 8) and inputs.dtype == np.int32 and targets.dtype == np.int32
    assert mask.dtype == np.float32
    # rows: chosen 0, chosen 1, rejected 0, rejected 1
    seqs = [[10, 11, 12, 20, 21, EOS], [13, 14, 22, 23, 24, 25, EOS], [10, 11, 12, 30, EOS], [13, 14, 31, 32, EOS]]
    prompt_lens = [3, 2, 3, 2]
    for i, (seq, lp) in enumerate(zip(seqs, prompt_lens)):
        L = len(seq)
        assert inputs[i, :L].tolist() == seq and (inputs[i, L:] == PAD).all()
        assert targets[i, : L - 1].tolist() == seq[1:] and (targets[i, L - 1 :] == PAD).all()
        expected_mask = np.zeros(8, np.float32)
        expected_mask[lp - 1 : L - 1] = 1
        assert mask[i].tolist() == expected_mask.tolist()
        assert targets[i][mask[i] == 1].tolist() == seq[lp:]  # exactly the completion tokens
    assert (targets[:, :-1][inputs[:, 1:] != PAD] == inputs[:, 1:][inputs[:, 1:] != PAD]).all()
    r, t = np.nonzero(mask)
    assert batch.positions.tolist() == (r * 8 + t).tolist()
    assert batch.rows.tolist() == r.tolist()
    assert batch.target_ids.tolist() == targets[r, t].tolist()
    assert batch.completion_lengths.tolist() == [3, 5, 2, 3] == mask.sum(1).astype(int).tolist()
    assert batch.n_tokens == sum(len(s) for s in seqs)
    assert batch.last_index.tolist() == [len(s) - 1 for s in seqs]
    chosen, rejected = split_pairs(np.arange(4), 2)
    assert chosen.tolist() == [0, 1] and rejected.tolist() == [2, 3]


def test_collate_pads_to_multiple_of_8():
    b = collate_sequences([[1] * 8], [[2] * 1], pad_id=PAD)
    assert b.seq_len == 16
    b = collate_sequences([[1] * 7], [[2] * 1], pad_id=PAD)
    assert b.seq_len == 8


def test_select_rows():
    pairs = [EncodedPair([10, 11], [20, EOS], [30, 31, EOS]), EncodedPair([12], [21, 22, 23, EOS], [EOS])]
    batch = collate_pairs(pairs, pad_id=PAD)
    sub = batch.select_rows([1, 2])
    assert np.asarray(sub.input_ids).tolist() == np.asarray(batch.input_ids)[[1, 2]].tolist()
    assert sub.completion_lengths.tolist() == [4, 3]
    assert sub.target_ids.tolist() == [21, 22, 23, EOS, 30, 31, EOS]
    assert sub.rows.tolist() == [0] * 4 + [1] * 3


def test_collate_rejects_empty_prompt_or_completion():
    with pytest.raises(ValueError, match="empty prompt"):
        collate_sequences([[]], [[1, EOS]], pad_id=PAD)
    with pytest.raises(ValueError, match="empty completion"):
        collate_sequences([[1]], [[]], pad_id=PAD)
