"""Tiny random checkpoints shaped like real model families, built locally in seconds.

    .venv/bin/python -c "from tspin_ray.models.families import save_family; from tspin_ray.config.schema import \
TinyModelSpec; print(save_family('runs/tiny-llama3', TinyModelSpec(family='llama3')))"

Each family ships what its real checkpoints ship, so every path is tested against the things that
differ between them (docs/concepts.md, "Real checkpoints"): the tokenizer kind (trained here by `tokenizers` on
the built-in tasks' text), the special tokens, the real chat template, the generation config's EOS
list, pad or no pad, tied embeddings and GQA. `tokenizer_class` is the one the real family names, so
`AutoTokenizer` rebuilds our tokenizer exactly as it rebuilds theirs (transformers 5 reconstructs a
`LlamaTokenizer` from vocab and merges with its own pre-tokenizer and decoder).

- zephyr: MistralForCausalLM, SentencePiece-style BPE (Metaspace, byte fallback: a newline is <0x0A>),
  BOS `<s>` added by the post-processor, no pad, Zephyr's template, EOS `</s>`.
- llama3: LlamaForCausalLM, tied embeddings, GQA, byte-level BPE with Llama-3's split regex, the header
  template that writes `{{ bos_token }}` (and a post-processor that would add it again), end of turn
  `<|eot_id|>` while `eos_token` is `<|end_of_text|>` (Meta-Llama-3-8B-Instruct as released), no pad.
- qwen2: Qwen2ForCausalLM, tied embeddings, GQA, byte-level BPE, ChatML with Qwen2.5's default system
  prompt, pad `<|endoftext|>`, EOS `<|im_end|>`, no BOS.
The character model (`char`, models/tiny.py) stays the fastest fixture.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast

from tspin_ray.config.schema import TinyModelSpec
from tspin_ray.data.tasks import TASKS

# Chat templates as the real checkpoints publish them (tokenizer_config.json), verbatim.
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 "
    "== 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt "
    "%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more "
    "functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> "
    "XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n"
    "    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name "
    "and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    "\\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]"
    "['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if "
    "(message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == "
    "\"assistant\" and not message.tool_calls) %}\n        {{- '<|im_start|>' + message.role + '\\n' + "
    "message.content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n        {{- "
    "'<|im_start|>' + message.role }}\n        {%- if message.content %}\n            {{- '\\n' + message.content "
    "}}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call."
    "function is defined %}\n                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n            {{- '\", "
    "\"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n        {%- "
    "if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n            {{- '<|im_start|>user' "
    "}}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n        {{- "
    "'\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if "
    "add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)

# Llama-3's pre-tokenizer split (digits in runs of up to 3); Qwen2 splits every digit.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class Family:
    """What a real family ships, minus the size: architecture, special tokens, template, EOS list."""
    architecture: str  # a transformers config class name
    tokenizer_class: str  # as the real tokenizer_config.json names it
    chat_template: str
    bos: str | None
    eos: str  # tokenizer.eos_token
    pad: str | None
    generation_eos: tuple[str, ...]  # generation_config.json eos_token_id, in that order
    specials: tuple[str, ...]  # added special tokens (appended after the trained vocabulary)
    tied: bool
    rope_theta: float


FAMILIES: dict[str, Family] = {
    "zephyr": Family("MistralConfig", "LlamaTokenizer", ZEPHYR_TEMPLATE, "<s>", "</s>", None, ("</s>",),
                     (), tied=False, rope_theta=10000.0),
    "llama3": Family("LlamaConfig", "PreTrainedTokenizerFast", LLAMA3_TEMPLATE, "<|begin_of_text|>",
                     "<|end_of_text|>", None, ("<|end_of_text|>", "<|eot_id|>"),
                     ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eot_id|>"), tied=True, rope_theta=500000.0),
    "qwen2": Family("Qwen2Config", "Qwen2Tokenizer", QWEN2_TEMPLATE, None, "<|im_end|>", "<|endoftext|>",
                    ("<|im_end|>", "<|endoftext|>"), ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                    tied=True, rope_theta=1000000.0),
}


CORPUS_TASKS = ("addition", "multiplication", "sorting")


def corpus(rows_per_task: int = 400, newlines: bool = True) -> list[str]:
    """Local training text for the tokenizers: the built-in tasks' prompts and answers plus plain prose.
    `newlines=False` for SentencePiece-style vocabularies, which keep a newline as the byte token <0x0A>
    (Llama-2, Mistral); byte-level ones learn "\n\n" as one token (Llama-3's 'ĊĊ')."""

    prose = ("The quick brown fox jumps over the lazy dog. You are a helpful assistant; answer the question "
             "with the number only. What is the sum, the product or the sorted list? Sort these letters: "
             "<|system|> <|user|> <|assistant|> system user assistant tools function call response")
    lines = [prose + ("\n\n" if newlines else " ")] * 20
    for name in CORPUS_TASKS:  # fixed: a new built-in task must not change the families' vocabularies
        for row in TASKS[name].make(rows_per_task, 0):
            lines += [row["prompt"], row["response"], f"{row['prompt']} {row['response']}"]
    return lines


def _sentencepiece_bpe(fam: Family, vocab_size: int) -> Tokenizer:
    """Llama-2 / Mistral layout: <unk> <s> </s>, the 256 byte tokens, then the learned pieces."""
    meta = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = meta
    learner.train_from_iterator(corpus(newlines=False), trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {"<unk>": 0, fam.bos: 1, fam.eos: 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = meta
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", fam.bos, fam.eos])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{fam.bos}:0 $A:0", pair=f"{fam.bos}:0 $A:0 {fam.bos}:1 $B:1", special_tokens=[(fam.bos, 1)])
    return tok


def _byte_level_bpe(fam: Family, vocab_size: int, split: str) -> Tokenizer:
    """GPT-2 style byte-level BPE (Llama-3, Qwen2): regex split, bytes as printable characters."""
    tok = Tokenizer(models.BPE())
    if fam.architecture == "Qwen2Config":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(list(fam.specials))
    steps = [processors.ByteLevel(trim_offsets=False)]
    if fam.bos is not None:  # Llama-3's tokenizer.json adds BOS itself, although its template writes one
        bos_id = tok.token_to_id(fam.bos)
        steps.append(processors.TemplateProcessing(
            single=f"{fam.bos}:0 $A:0", pair=f"{fam.bos}:0 $A:0 {fam.bos}:1 $B:1", special_tokens=[(fam.bos, bos_id)]))
    tok.post_processor = processors.Sequence(steps)
    return tok


def build_family_tokenizer(name: str, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    fam = FAMILIES[name]
    if name == "zephyr":
        backend = _sentencepiece_bpe(fam, vocab_size)
    else:
        backend = _byte_level_bpe(fam, vocab_size, LLAMA3_SPLIT if name == "llama3" else QWEN2_SPLIT)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=fam.bos, eos_token=fam.eos,
                                  pad_token=fam.pad, unk_token="<unk>" if name == "zephyr" else None,
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = fam.chat_template
    return tok


def _model_config(name: str, spec: TinyModelSpec, tok: PreTrainedTokenizerFast):
    import transformers

    fam = FAMILIES[name]
    ids = {t: tok.convert_tokens_to_ids(t) for t in fam.generation_eos}
    eos = [ids[t] for t in fam.generation_eos]
    kwargs = dict(
        vocab_size=len(tok), hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=max(1, spec.num_heads // 2),  # GQA
        intermediate_size=spec.intermediate_size, max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=fam.tied, rope_theta=fam.rope_theta, dtype="float32",
        bos_token_id=tok.bos_token_id, eos_token_id=eos if len(eos) > 1 else eos[0], pad_token_id=tok.pad_token_id)
    return getattr(transformers, fam.architecture)(**kwargs), eos


def save_family(out_dir: str | Path, spec: TinyModelSpec, weights: bool = True) -> Path:
    """Write tokenizer, random model (safetensors), generation_config.json and tokenizer_class to out_dir
    (`weights=False`: all but the model)."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_family_tokenizer(spec.family)
    tok.model_max_length = spec.max_position_embeddings
    config, eos = _model_config(spec.family, spec, tok)
    generation = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    if weights:
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config)
        model.generation_config = generation
        model.save_pretrained(out, safe_serialization=True)
    else:
        config.save_pretrained(out)
        generation.save_pretrained(out)
    tok.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["tokenizer_class"] = FAMILIES[spec.family].tokenizer_class
    if spec.family == "zephyr":
        tok_cfg.update(add_bos_token=True, add_eos_token=False, legacy=False)
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False))
    return out
