"""LLaVA's own conversation templates and its prompt tokenisation, for reproducing runs of the official code.

The official LLaVA / AIR scripts do not use a Hugging Face chat template: they build the prompt with a
`Conversation` of LLaVA's `llava/conversation.py` (AIR's CHAIR run: "vicuna_v1", whose system prompt puts 35
tokens before the image in LLaVA-1.5) and tokenise it with `tokenizer_image_token`: the text is split at each
"<image>", every chunk is tokenised on its own (so it gets its own BOS and a fresh SentencePiece prefix space),
the BOS of every chunk after the first is dropped, and one image placeholder is put between chunks (the model
expands it to the image's feature tokens). This module re-states those definitions (written from them, not
copied); `CONV_TEMPLATES` has every template name LLaVA's `conv_templates` defines.

For one user turn "<image>\n{q}" and an open assistant turn (what the evaluation scripts build), with system S
and roles (U, A):
  single   (sep "###"):             S###U: <image>\n{q}###A:
  two      (sep " ", sep2 "</s>"):  S U: <image>\n{q} A:
  mpt      (sep "<|im_end|>"):      S<|im_end|>U<image>\n{q}<|im_end|>A   (roles carry their own markers)
  llama_2  (sep "<s>"):             [INST] <<SYS>>\nS\n<</SYS>>\n\n<image>\n{q} [/INST]   (no <<SYS>> block when S is "")
  plain    (sep "\n"):              S<image>\n{q}\n   (no roles)
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

IMAGE_PLACEHOLDER = "<image>"  # LLaVA's DEFAULT_IMAGE_TOKEN, the split marker of tokenizer_image_token
STYLES = ("single", "two", "mpt", "plain", "llama_2")


@dataclasses.dataclass(frozen=True)
class Conversation:
  """One LLaVA conversation template (the fields of LLaVA's `Conversation` that shape a prompt)."""

  system: str
  roles: tuple[str, str]
  style: str
  sep: str = "###"
  sep2: str | None = None
  version: str = "Unknown"

  def prompt(self, question: str, image: bool = True) -> str:
    """The text of LLaVA's `get_prompt` for [(user, "<image>\\n" + question), (assistant, None)].

    This is the evaluation scripts' path (the user message is a plain string with the image marker in front);
    the demo's (message, image) tuple path, which re-places the marker and adds the mmtag exchange, is not used
    by any evaluation and is not reproduced.
    """
    user, assistant = self.roles
    return self._render([(user, f"{IMAGE_PLACEHOLDER}\n{question}" if image else question), (assistant, None)])

  def _render(self, turns: Sequence[tuple[str, str | None]]) -> str:
    if self.style == "single":
      out = self.system + self.sep
      for role, msg in turns:
        out += f"{role}: {msg}{self.sep}" if msg else f"{role}:"
      return out
    if self.style == "two":
      seps = (self.sep, self.sep2)
      out = self.system + seps[0]
      for k, (role, msg) in enumerate(turns):
        out += f"{role}: {msg}{seps[k % 2]}" if msg else f"{role}:"
      return out
    if self.style == "mpt":
      out = self.system + self.sep
      for role, msg in turns:
        out += f"{role}{msg}{self.sep}" if msg else role
      return out
    if self.style == "plain":
      seps = (self.sep, self.sep2)
      out = self.system
      for k, (_, msg) in enumerate(turns):
        if msg:
          out += msg + seps[k % 2]
      return out
    if self.style == "llama_2":
      out = ""
      for k, (_, msg) in enumerate(turns):
        if not msg:
          continue
        if k == 0 and self.system:
          msg = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{msg}"
        out += self.sep + f"[INST] {msg} [/INST]" if k % 2 == 0 else f" {msg} {self.sep2}"
      # LLaVA removes leading separator characters with str.lstrip(sep) (a character set, not a prefix)
      return out.lstrip(self.sep) if self.sep else out
    raise ValueError(f"unknown conversation style {self.style!r}; expected one of {STYLES}")


_HUMAN_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
_USER_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_MMTAG_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant is able to understand the visual content that the user provides, and assist the "
                 "user with a variety of tasks using natural language."
                 "The visual content will be provided with the following format: <Image>visual content</Image>.")
_LLAMA2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information.")
_LLAVA_LLAMA2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                        "content that the user provides, and assist the user with a variety of tasks using natural "
                        "language.")
_MPT_SYSTEM = ("<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
               "The assistant gives helpful and honest answers.")
_IM_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")

VICUNA_V0 = Conversation(_HUMAN_SYSTEM, ("Human", "Assistant"), "single", "###")
VICUNA_V1 = Conversation(_USER_SYSTEM, ("USER", "ASSISTANT"), "two", " ", "</s>", "v1")
LLAMA_2 = Conversation(_LLAMA2_SYSTEM, ("USER", "ASSISTANT"), "llama_2", "<s>", "</s>", "llama_v2")
LLAVA_LLAMA_2 = Conversation(_LLAVA_LLAMA2_SYSTEM, ("USER", "ASSISTANT"), "llama_2", "<s>", "</s>", "llama_v2")
MISTRAL_INSTRUCT = Conversation("", ("USER", "ASSISTANT"), "llama_2", "", "</s>", "llama_v2")
MPT = Conversation(_MPT_SYSTEM, _IM_ROLES, "mpt", "<|im_end|>", None, "mpt")
CHATML_DIRECT = Conversation("<|im_start|>system\nAnswer the questions.", _IM_ROLES, "mpt", "<|im_end|>", None, "mpt")
LLAVA_PLAIN = Conversation("", ("", ""), "plain", "\n")
LLAVA_V0 = Conversation(_HUMAN_SYSTEM, ("Human", "Assistant"), "single", "###")
LLAVA_V0_MMTAG = Conversation(_MMTAG_SYSTEM, ("Human", "Assistant"), "single", "###", None, "v0_mmtag")
LLAVA_V1 = Conversation(_HUMAN_SYSTEM, ("USER", "ASSISTANT"), "two", " ", "</s>", "v1")
LLAVA_V1_MMTAG = Conversation(_MMTAG_SYSTEM, ("USER", "ASSISTANT"), "two", " ", "</s>", "v1_mmtag")

# The names of LLaVA's conv_templates.
CONV_TEMPLATES: dict[str, Conversation] = {
    "default": VICUNA_V0, "v0": VICUNA_V0, "v1": VICUNA_V1, "vicuna_v1": VICUNA_V1, "llama_2": LLAMA_2,
    "mistral_instruct": MISTRAL_INSTRUCT, "chatml_direct": CHATML_DIRECT, "mistral_direct": CHATML_DIRECT,
    "plain": LLAVA_PLAIN, "v0_plain": LLAVA_PLAIN, "llava_v0": LLAVA_V0, "v0_mmtag": LLAVA_V0_MMTAG,
    "llava_v1": LLAVA_V1, "v1_mmtag": LLAVA_V1_MMTAG, "llava_llama_2": LLAVA_LLAMA_2, "mpt": MPT,
}


def get_template(name: str) -> Conversation:
  """The template of a LLaVA conv-mode name; an error lists the names."""
  if name not in CONV_TEMPLATES:
    raise ValueError(f"unknown LLaVA conversation template {name!r}; expected one of {sorted(CONV_TEMPLATES)}")
  return CONV_TEMPLATES[name]


def tokenize_with_image(text: str, tokenizer, image_token_id: int, num_image_tokens: int) -> list[int]:
  """LLaVA's `tokenizer_image_token`, with each placeholder expanded to the image's feature tokens.

  Every chunk between "<image>" markers is tokenised on its own (special tokens added, as the official code
  calls the tokenizer); when the first chunk starts with BOS, one BOS is kept and the first token of every chunk
  is dropped (LLaVA's `offset`). Each marker becomes `num_image_tokens` copies of `image_token_id` (the Hugging
  Face layout of the single placeholder the official model expands).
  """
  chunks = [list(tokenizer(chunk).input_ids) for chunk in text.split(IMAGE_PLACEHOLDER)]
  bos = tokenizer.bos_token_id
  offset = 1 if chunks and chunks[0] and bos is not None and chunks[0][0] == bos else 0
  ids = [bos] if offset else []
  for k, chunk in enumerate(chunks):
    if k:
      ids.extend([image_token_id] * num_image_tokens)
    ids.extend(chunk[offset:])
  return ids
