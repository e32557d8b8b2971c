"""Reference tokenizers written for the tests, independent of cutegpt's loader.

SentencePiece LLaMA vocabularies: the `sentencepiece` library itself on tokenizer.model, with the
special and added tokens split out of the text first and every stretch between them encoded alone
(dummy prefix included), as the original LLaMA tokenizer, llama.cpp and transformers 4 do.
"""

from __future__ import annotations

import json
import re
from pathlib import Path


class SentencePieceReference:
    def __init__(self, folder: Path, extra: dict[str, int] | None = None):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        self.bos, self.eos = self.sp.bos_id(), self.sp.eos_id()
        self.tokens = {self.sp.id_to_piece(self.bos): self.bos, self.sp.id_to_piece(self.eos): self.eos}
        added = folder / "added_tokens.json"
        if added.is_file():
            self.tokens.update(json.loads(added.read_text(encoding="utf-8")))
        tj = folder / "tokenizer.json"
        if tj.is_file():
            self.tokens.update({t["content"]: t["id"] for t in json.loads(tj.read_text(encoding="utf-8"))["added_tokens"]
                                if t["id"] >= self.sp.get_piece_size()})
        self.tokens.update(extra or {})
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(self.tokens, key=len, reverse=True)) + ")")

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [self.bos] if add_bos else []
        for chunk in self._split.split(text):
            if chunk in self.tokens:
                ids.append(self.tokens[chunk])
            elif chunk:
                ids += self.sp.encode(chunk)
        return ids
