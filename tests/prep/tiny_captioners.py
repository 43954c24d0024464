"""Tiny random-weight captioning models saved like a user's local model folder (no downloads).

Each builder makes the tokenizer locally (a WordPiece vocabulary or a byte-level BPE trained in memory
with the `tokenizers` library), the image processor from its defaults with a small size, a tiny config
of the real model class, and calls `save_pretrained` into `folder`, which `load_captioner` then reads
through the same path a real local model takes. Their captions are gibberish; the plumbing is real.
"""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = ["a cat walks in a park, the camera pans slowly to the left",
          "a red dog runs on the street at night, handheld camera, soft light",
          "Describe the clip: subject, motion and camera movement."] * 8


def _byte_level_bpe(special: list[str], vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS, trainer)
    return bpe


def build_tiny_blip(folder: Path) -> Path:
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip import BlipImageProcessorPil

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted({w.strip(",.:") for s in CORPUS for w in s.split()})
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    config = BlipConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id, sep_token_id=tokenizer.sep_token_id,
                         eos_token_id=tokenizer.sep_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        projection_dim=32)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    with torch.no_grad():  # random weights end at once on [SEP]; push special tokens down so words come out
        special = [tokenizer.convert_tokens_to_ids(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")]
        model.text_decoder.cls.predictions.bias[special] = -20.0
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_blip2(folder: Path) -> Path:
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor,
                              PreTrainedTokenizerFast)
    from transformers.models.blip import BlipImageProcessorPil

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_byte_level_bpe(["<pad>", "</s>", "<unk>"]),
                                        bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    processor = Blip2Processor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, num_query_tokens=2)  # adds the <image> token
    vocab = len(tokenizer)
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        qformer_config=dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, encoder_hidden_size=32, max_position_embeddings=64),
        text_config=dict(model_type="opt", vocab_size=vocab, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                         num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        num_query_tokens=2, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]


def build_tiny_qwen2_5_vl(folder: Path) -> Path:
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_byte_level_bpe(QWEN_SPECIAL), eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 16})
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    return folder
