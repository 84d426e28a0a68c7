"""One architecture's name map: rules from an original module to its diffusers part(s)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ...errors import AdapterError


def _pattern(template: str) -> re.Pattern[str]:
    """`double_blocks.{}.img_attn.qkv` → a full-match regex whose one group is the block index."""
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


@dataclass(frozen=True)
class Rule:
    """An original module and the diffusers modules it is, in order (one, or the parts of a fused projection).

    `ratios` are the parts' output widths relative to each other (q, k, v, mlp of Flux's `linear1`: 1, 1, 1, 4);
    `swap_halves`: B's two row halves are exchanged between the layouts (the final AdaLN's shift/scale order);
    `swap_two_halves`: only where the module's output is twice its input (SD3's last joint block, whose context
    AdaLN has only a shift and a scale).
    """

    original: str
    parts: tuple[str, ...]
    ratios: tuple[int, ...] = ()
    swap_halves: bool = False
    swap_two_halves: bool = False
    _original_re: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _parts_re: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_original_re", _pattern(self.original))
        object.__setattr__(self, "_parts_re", tuple(_pattern(p) for p in self.parts))

    def swaps(self, out_features: int, in_features: int) -> bool:
        """Whether B's row halves are exchanged between the layouts for a module of this shape."""
        return self.swap_halves or (self.swap_two_halves and out_features == 2 * in_features)

    def original_name(self, index: str) -> str:
        return self.original.replace("{}", index)

    def diffusers_names(self, index: str) -> list[str]:
        return [p.replace("{}", index) for p in self.parts]

    def match_original(self, name: str) -> str | None:
        """The block index ('' for a module outside the blocks) if `name` is this rule's original module."""
        match = self._original_re.match(name)
        return None if match is None else (match.group(1) if match.groups() else "")

    def match_part(self, name: str) -> tuple[str, int] | None:
        """(block index, part number) if `name` is one of this rule's diffusers modules."""
        for number, pattern in enumerate(self._parts_re):
            match = pattern.match(name)
            if match is not None:
                return (match.group(1) if match.groups() else ""), number
        return None

    def sizes(self, *, out_features: int | None = None, known: dict[int, int] | None = None) -> list[int]:
        """Each part's rows: from the fused module's width, or from the widths of the parts present."""
        ratios = self.ratios or (1,) * len(self.parts)
        if out_features is not None:
            unit, rest = divmod(out_features, sum(ratios))
            if rest:
                raise AdapterError(
                    f"module {self.original.replace('{}', 'N')!r}: {out_features} rows do not split as {ratios}",
                    hint="the adapter is not for this architecture's widths; 'loractl inspect' shows what it is",
                )
        else:
            number, width = next(iter((known or {}).items()))
            unit = width // ratios[number]
        return [unit * r for r in ratios]


@dataclass(frozen=True)
class Arch:
    """A diffusion transformer: its name, its rules, and the names that say which layout an adapter is in.

    `original_marks` / `diffusers_marks` match module paths (relative to `transformer.`) only that layout of
    this architecture has; `widths` (and `max_blocks`) tell it from another architecture with the same
    diffusers names (Flux.1's double blocks are named as SD3's joint blocks and Qwen-Image's blocks: 3072 wide,
    at most 19 of them; SD3 1536 or 2432 wide); `blocks` names each kind of numbered block in both layouts,
    for `inspect`. `checkpoint_rules` rename what only the model's own checkpoint names otherwise (LTX-Video's
    `patchify_proj`, Z-Image's fused `attention.qkv`): its LoRA files keep diffusers' names, which diffusers'
    readers take, so adapters are not renamed by them; a base is. Where the architecture's own diffusers LoRA
    reader takes such names (Z-Image's `attention.out`), `adapters_split_checkpoint_names`: an adapter in them
    converts to diffusers' names (written in the original layout, it keeps them).
    """

    name: str
    rules: tuple[Rule, ...]
    original_marks: re.Pattern[str]
    diffusers_marks: re.Pattern[str]
    blocks: dict[str, tuple[str, str]]  # what → (original prefix, diffusers prefix)
    width_marks: re.Pattern[str] | None = None  # group 1: the block index
    widths: tuple[int, ...] = ()
    max_blocks: int = 0  # of the blocks `width_marks` names (0: no limit)
    text_encoders: dict[str, str] = field(default_factory=dict)  # pipeline component → what it is
    kohya_text_encoders: dict[str, str] = field(default_factory=dict)  # pipeline component → sd-scripts prefix
    no_alpha: re.Pattern[str] | None = None  # original-layout modules whose `.alpha` diffusers' reader refuses
    original_leaves: tuple[str, str] = ("lora_down.weight", "lora_up.weight")  # A, B in `diffusion_model.` files
    checkpoint_rules: tuple[Rule, ...] = ()
    adapters_split_checkpoint_names: bool = False  # an adapter in the checkpoint's names converts to diffusers'
    alike: tuple[str, ...] = ()  # architectures with rules for the same names (HunyuanVideo's blocks are Flux.1's)

    def is_original(self, names: dict[str, int]) -> bool:
        return any(self.original_marks.match(n) for n in names)

    def is_diffusers(self, names: dict[str, int]) -> bool:
        """Whether the modules (path → input width) are this architecture's in diffusers' names."""
        if any(self.diffusers_marks.match(n) for n in names):
            return True
        marks = self.width_marks
        if marks is None:
            return False
        found = {n: (m, w) for n, w in names.items() if (m := marks.match(n))}
        limit = self.max_blocks or 1 << 30
        return bool(found) and all(w in self.widths and int(m.group(1)) < limit for m, w in found.values())

    def match_original(self, name: str) -> tuple[Rule, str] | None:
        for rule in self.rules:
            index = rule.match_original(name)
            if index is not None:
                return rule, index
        return None

    def match_diffusers(self, name: str) -> tuple[Rule, str, int] | None:
        for rule in self.rules:
            found = rule.match_part(name)
            if found is not None:
                return rule, found[0], found[1]
        return None

    def match_checkpoint(self, name: str) -> tuple[Rule, str] | None:
        """`match_original` for a tensor (its stem) of the model's own checkpoint: the checkpoint's renames too."""
        for rule in self.rules + self.checkpoint_rules:
            index = rule.match_original(name)
            if index is not None:
                return rule, index
        return None

    def renamed_in_checkpoint(self, name: str) -> bool:
        """Whether diffusers' module `name` has another name (or is rows of a fused one) in the model's checkpoint."""
        return any(rule.match_part(name) is not None for rule in self.rules + self.checkpoint_rules)

    @property
    def shares_names(self) -> bool:
        """Whether a checkpoint's tensor no rule names is named as in diffusers (no adapter rules: one vocabulary)."""
        return not self.rules

    def from_kohya(self, name: str) -> str:
        """The module a kohya name resolved to, where the vocabulary's reading is another architecture's (`_` that
        stood for `_`, as HunyuanVideo's `img_attn_qkv`, read as Flux.1's `img_attn.qkv`)."""
        return name

    def block_counts(self, names: list[str] | dict[str, int]) -> dict[str, int]:
        """How many blocks of each kind the modules adapt (either layout)."""
        out = {}
        for what, prefixes in self.blocks.items():
            found = {n.split(".")[1] for n in names for p in prefixes if n.startswith(p + ".")}
            if found:
                out[what] = len(found)
        return out
