"""Chat prompts: the GGUF's jinja2 chat template, rendered in a sandbox, plus the llama.cpp
fork's multi-turn cleanup (MODEL.md sections 2 and 6)."""
from __future__ import annotations

# MODEL.md section 2's ChatML form; the fallback for files without `tokenizer.chat_template`
# and the template generated vocabularies carry. The generation prompt opens a think block;
# `enable_thinking=false` closes it at once.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n<think>\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{ '</think>\\n' }}{%- endif -%}"
    "{%- endif -%}"
)
