"""What each consumer would refuse or silently drop in an adapter (`validate --target`).

A file that loads without an error can still do less than it says: llama.cpp skips the norms in
a GGUF LoRA, diffusers ignores keys that do not start with a pipeline component and its kohya
reader loses per-module alphas; other things the consumer refuses outright (a lora_B bias in
llama.cpp's converter and mlx-lm, a conv module). Each rule is a finding with a code and the way
out. The llama.cpp, mlx-lm and diffusers rules are each shown by the real package in a test
(docs/validate.md names it), against the versions in docs/formats.md; so is every vLLM rule but conv.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .findings import Finding, error, warning
from .info import AdapterInfo, ModuleInfo

TARGETS = ("peft", "llamacpp", "mlx", "diffusers", "kohya", "vllm")
VLLM_DEFAULT_MAX_RANK = 16  # vLLM's --max-lora-rank default
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the only values its --max-lora-rank takes
PIPELINE_COMPONENTS = ("unet.", "text_encoder.", "text_encoder_2.", "text_encoder_3.", "transformer.", "prior.")

_Rule = Callable[[AdapterInfo, Path | None], list[Finding]]
_NO_GGUF_NAME = "llama.cpp's graph has no such tensor for this architecture; merge it into the base (loractl merge)"
_NO_COMPONENT = (
    "not under a pipeline component (unet., text_encoder., transformer., ...): diffusers ignores it; "
    "prefix the module paths with their component"
)
_LANGUAGE_MODEL = (
    "a language model's module (transformers' transformer.h.N…), not a diffusion pipeline's: diffusers has no "
    "component for it; keep the adapter in peft for transformers"
)
_PEFT_LAYOUT = (
    "a PEFT file's keys start with base_model.model., not with the component: diffusers' load_lora_weights "
    "loads none of them; convert with 'loractl convert --to diffusers'"
)


def target_findings(info: AdapterInfo, target: str, base: Path | None = None) -> list[Finding]:
    """Findings for what `target` would refuse or drop in the adapter `info` describes."""
    return [f for rule in _RULES[target] for f in rule(info, base)]


def _modules(info: AdapterInfo, test: Callable[[ModuleInfo], bool]) -> list[str]:
    return sorted(name for name, m in info.modules.items() if test(m))


def _each(test: Callable[[ModuleInfo], bool], finding: Callable[[str], Finding]) -> _Rule:
    """One finding (made by `finding` from the module name) per module for which `test` holds."""

    def rule(info: AdapterInfo, base: Path | None) -> list[Finding]:
        return [finding(name) for name in _modules(info, test)]

    return rule


def _dora(consumer: str, how: str) -> _Rule:
    message = f"{consumer} has no DoRA ({how}); merge it into the base (loractl merge) or retrain without DoRA"
    return _each(lambda m: m.dora, lambda name: error("dora-dropped", message, name))


def _conv(consumer: str, how: str) -> _Rule:
    message = f"{consumer} has no conv LoRA ({how}); merge the conv modules into the base (loractl merge)"
    return _each(lambda m: m.kind == "conv", lambda name: error("conv-unsupported", message, name))


def _bias(consumer: str, how: str) -> _Rule:
    message = f"{consumer} has no lora_B bias ({how}); merge it into the base (loractl merge)"
    return _each(lambda m: m.bias, lambda name: error("bias-dropped", message, name))


def _embedding(consumer: str) -> _Rule:
    message = f"{consumer} has no embedding LoRA; merge it into the base (loractl merge)"
    return _each(lambda m: m.kind == "embedding", lambda name: error("embedding-unsupported", message, name))


def _full_tensors(consumer: str, how: str, keep: Callable[[str], bool] = lambda _: False) -> _Rule:
    """`keep(key)`: a tensor, by its key in the file, that the consumer takes or rightly ignores."""

    def rule(info: AdapterInfo, base: Path | None) -> list[Finding]:
        dropped = sorted(k for k, t in info.full_tensors.items() if not keep(t.key))
        if not dropped:
            return []
        return [
            error(
                "full-tensors-dropped",
                f"{consumer} loads only LoRA factors: {len(dropped)} full tensors (modules_to_save, heads, norms, "
                f"e.g. {dropped[0]!r}) {how}; merge the adapter into the base (loractl merge) and serve that",
            )
        ]

    return rule


def _one_alpha_file(info: AdapterInfo, base: Path | None) -> list[Finding]:
    """convert_lora_to_gguf.py writes the config's one lora_alpha: alpha_pattern/rank_pattern scales are lost."""
    scales = {(m.alpha, m.scale_rule) for m in info.modules.values()}
    if info.format != "peft" or len(scales) <= 1:
        return []
    return [
        warning(
            "per-module-alpha",
            "llama.cpp's convert_lora_to_gguf.py keeps one lora_alpha: modules with another alpha (alpha_pattern, "
            "rsLoRA) would get the wrong scale; convert with 'loractl convert --to gguf', which folds them into B",
        )
    ]


def _gguf_names(info: AdapterInfo, base: Path | None) -> list[Finding]:
    """Modules that have no tensor in llama.cpp's graph for the base's architecture (needs --base)."""
    if base is None or info.format == "gguf":
        return []
    from .formats.gguf import names as gguf_names
    from .io.config_json import read_config

    config = read_config(base)
    if config is None:
        return []
    tmap = gguf_names.name_map(gguf_names.arch_from_config(config), gguf_names.block_count(list(info.modules), config))
    return [
        error("unknown-module", _NO_GGUF_NAME, name)
        for name in sorted(info.modules)
        if gguf_names.to_gguf(tmap, name) is None
    ]


def _kohya_alphas(info: AdapterInfo, base: Path | None) -> list[Finding]:
    """diffusers' kohya converter mangles alpha_pattern keys: only the first alpha survives."""
    alphas = {m.alpha for m in info.modules.values()}
    if info.format != "kohya" or len(alphas) <= 1 or _transformer(info):
        return []  # its Flux reader bakes each module's alpha into A and B
    return [
        warning(
            "kohya-per-module-alpha",
            f"diffusers' kohya reader loses per-module alphas ({len(alphas)} different ones here): those modules "
            "run at another scale; convert with 'loractl convert --to diffusers', whose metadata keeps each alpha",
        )
    ]


def _pipeline_component(info: AdapterInfo, base: Path | None) -> list[Finding]:
    """load_lora_weights takes only keys that start with a pipeline component: it loads nothing from others."""
    if info.format in ("kohya", "original"):
        return []  # kohya prefixes name the component; the original layout: `_transformer_dropped`
    unprefixed = _unprefixed_keys(info) if info.format == "diffusers" else []
    return unprefixed + [f for name in sorted(info.modules) for f in _component_findings(name, info.format)]


def _component_findings(name: str, format: str) -> list[Finding]:
    """A pipeline module in a PEFT file: convert it; a language model's `transformer.h.N`: no pipeline at all."""
    from .formats.diffusers import pipeline_module

    if pipeline_module(name):
        return [error("unknown-module", _PEFT_LAYOUT, name)] if format == "peft" else []
    return [error("unknown-module", _LANGUAGE_MODEL if name.startswith(PIPELINE_COMPONENTS) else _NO_COMPONENT, name)]


def _unprefixed_keys(info: AdapterInfo) -> list[Finding]:
    """loractl reads old attn-procs keys (no `unet.`) as the UNet's; diffusers loads nothing from them."""
    from .io.safetensors_header import read_header

    keys = sorted(k for k in read_header(info.files[0]).tensors if not k.startswith(PIPELINE_COMPONENTS))
    if not keys:
        return []
    return [
        error(
            "unknown-module",
            f"{len(keys)} keys start with no pipeline component (e.g. {keys[0]!r}): diffusers loads nothing from "
            "them; convert with 'loractl convert --to diffusers', which writes the unet. prefix",
        )
    ]


def _transformer(info: AdapterInfo) -> dict[str, Any] | None:
    from .formats import architecture

    return architecture({n: m.in_features for n, m in info.modules.items()})


# diffusers 0.42's Flux.1 reader of kohya / ComfyUI files names these without `transformer.`: load_lora_weights
# then leaves them out (`_convert_kohya_flux_lora_to_diffusers`; shown in tests/test_interop_flux.py)
_FLUX_OUTSIDE_BLOCKS = re.compile(r"^transformer\.(img_in|txt_in|time_in|vector_in|guidance_in|final_layer)\.?")


def _transformer_dropped(info: AdapterInfo, base: Path | None) -> list[Finding]:
    """What diffusers' Flux.1 reader of kohya and original-layout files does not load (diffusers 0.42)."""
    arch = _transformer(info)
    if arch is None or arch["name"] != "Flux.1" or info.format not in ("kohya", "original"):
        return []
    if any(_BFL_NORM.match(t.key) for t in info.full_tensors.values()):
        return _bfl_control(info)
    how = "convert with 'loractl convert --to diffusers', which diffusers loads whole"
    leaves = {k.rpartition(".")[0].rpartition(".")[2] for m in info.modules.values() for k in m.keys.values()}
    if info.format == "original" and "lora_A" in leaves:
        message = f"diffusers reads Flux.1's original-layout files only with lora_down/lora_up keys: it loads none of this file's lora_A/lora_B modules; {how}"  # fmt: skip
        return [error("unknown-module", message)]
    out = [error("unknown-module", f"diffusers' Flux.1 reader of {info.format} files leaves this module out (it "
                 f"names it without 'transformer.'); {how}", name)
           for name in sorted(info.modules) if _FLUX_OUTSIDE_BLOCKS.match(name)]  # fmt: skip
    t5 = sorted(n for n in info.modules if n.startswith("text_encoder_2."))
    if t5:
        message = f"diffusers' Flux.1 reader drops T5 LoRA modules ({len(t5)}, e.g. {t5[0]!r}): diffusers has no way to load them"  # fmt: skip
        out.append(warning("unknown-module", message))
    return out


# BFL's control LoRAs: diffusers reads them (`_convert_bfl_flux_control_lora_to_diffusers`) by these qk-norm scales,
# which it loads into the transformer, and takes every module of Flux.1's 19 double and 38 single blocks or nothing
_BFL_NORM = re.compile(r"^(double_blocks\.\d+\.(img|txt)_attn|single_blocks\.\d+)\.norm\.(query|key)_norm\.scale$")
_BFL_DOUBLE = ("img_mod.lin", "txt_mod.lin", "img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj",
               "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2")  # fmt: skip
_BFL_SINGLE = ("modulation.lin", "linear1", "linear2")
_BFL_OUTSIDE = ("time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer", "txt_in",
                "img_in", "final_layer.linear", "final_layer.adaLN_modulation.1")  # fmt: skip


def _bfl_norm(key: str) -> bool:
    return _BFL_NORM.match(key) is not None


def _bfl_control(info: AdapterInfo) -> list[Finding]:
    """A BFL control LoRA: diffusers refuses one without every module; it misreads the final AdaLN (A's halves)."""
    names = [f"double_blocks.{i}.{m}" for i in range(19) for m in _BFL_DOUBLE]
    names += [f"single_blocks.{i}.{m}" for i in range(38) for m in _BFL_SINGLE] + list(_BFL_OUTSIDE)
    missing = [n for n in names if f"transformer.{n}" not in info.modules]
    if missing:
        message = f"diffusers' reader of BFL control LoRAs takes only files with every module of Flux.1's 19 double and 38 single blocks and its embedders: it refuses this one, which lacks {missing[0]} ({len(missing)} in all); convert with 'loractl convert --to diffusers', whose file diffusers loads whole, norm scales included"  # fmt: skip
        return [error("unknown-module", message)]
    name = "transformer.final_layer.adaLN_modulation.1"
    message = "diffusers' reader of BFL control LoRAs swaps the halves of this module's A as well as its B's: not the adapter's ΔW; convert with 'loractl convert --to diffusers', whose file holds the norm scales too"  # fmt: skip
    return [error("swapped-halves", message, name)]


_WAN_BLOCK = (*(f"{side}.{o}" for side in ("self_attn", "cross_attn") for o in "qkvo"), "ffn.0", "ffn.2")


def _wan_musubi(info: AdapterInfo, base: Path | None) -> list[Finding]:
    """diffusers' musubi-tuner reader of Wan (`_convert_musubi_wan_lora_to_diffusers`, 0.42) takes blocks 0…n-1, each
    with all ten modules, and nothing else: any other file it refuses with a KeyError or an IndexError."""
    arch = _transformer(info)
    if arch is None or arch["name"] != "Wan" or info.format != "kohya":
        return []
    rels = [n.removeprefix("transformer.") for n in info.modules if n.startswith("transformer.")]
    blocks = {int(n.split(".")[1]) for n in rels if n.startswith("blocks.")}
    missing = [f"blocks.{i}.{m}" for i in range(len(blocks)) for m in _WAN_BLOCK if f"blocks.{i}.{m}" not in rels]
    outside = [n for n in rels if not n.startswith("blocks.")]
    if not missing and not outside:
        return []
    what = f"lacks {missing[0]}" if missing else f"has {outside[0]} outside the blocks"
    message = f"diffusers' musubi-tuner reader of Wan refuses this file (it takes every block's ten modules and nothing else; this one {what}); convert with 'loractl convert --to diffusers'"  # fmt: skip
    return [error("unknown-module", message)]


# diffusers 0.42's Flux.2 reader of kohya files (`_convert_kohya_flux2_lora_to_diffusers`) renames these and warns
# of the rest ("Unsupported keys"), which it leaves out (shown in tests/test_interop_flux2.py)
_FLUX2_KOHYA_READ = re.compile(
    r"^transformer\.(double_blocks\.|single_blocks\.|img_in$|txt_in$|time_in\.|final_layer\.linear$)"
)
_CONVERT = "convert with 'loractl convert --to diffusers', which diffusers loads whole"


def _dit_readers(info: AdapterInfo, base: Path | None) -> list[Finding]:
    """What diffusers' Flux.2 and HunyuanVideo readers of kohya and original-layout files get wrong (0.42)."""
    arch = _transformer(info)
    if arch is None or arch["name"] not in ("Flux.2", "HunyuanVideo") or info.format not in ("kohya", "original"):
        return []
    name = arch["name"]
    dit = sorted(n for n in info.modules if n.startswith("transformer."))
    if name == "HunyuanVideo" and info.format == "kohya":
        return [error("unknown-module", f"diffusers has no reader for kohya / musubi-tuner HunyuanVideo files: it loads none of these modules; {_CONVERT}")]  # fmt: skip
    if name == "HunyuanVideo" and not any(n.split(".")[-1].endswith("_attn_qkv") for n in dit):
        return [error("unknown-module", f"diffusers converts an original-layout HunyuanVideo file only when it adapts an img_attn_qkv or txt_attn_qkv module: it loads none of this file's; {_CONVERT}")]  # fmt: skip
    leaves = {k.rpartition(".")[0].rpartition(".")[2] for m in info.modules.values() for k in m.keys.values()}
    if info.format == "original" and "lora_down" in leaves:
        reader = "kohya reader" if name == "Flux.2" else "reader, which takes lora_A/lora_B keys only,"
        return [error("unknown-module", f"diffusers reads {name}'s lora_down/lora_up files with its {reader} and loads none of this file's modules; {_CONVERT}")]  # fmt: skip
    out = []
    if name == "Flux.2" and info.format == "kohya":
        out += [error("unknown-module", f"diffusers' Flux.2 reader of kohya files leaves this module out (it warns 'Unsupported keys'); {_CONVERT}", n)
                for n in dit if not _FLUX2_KOHYA_READ.match(n)]  # fmt: skip
    if info.format == "original" and "transformer.final_layer.adaLN_modulation.1" in info.modules:
        how = "without the (shift, scale) → (scale, shift) swap its model converter makes" if name == "Flux.2" \
            else "swapping the halves of its A as well as its B"  # fmt: skip
        out.append(error("swapped-halves", f"diffusers' {name} reader renames this module to norm_out.linear {how}: its outputs differ from the adapter's; {_CONVERT}", "transformer.final_layer.adaLN_modulation.1"))  # fmt: skip
    refiner = [n for n in dit if n.endswith("self_attn_qkv")] if info.format == "original" else []
    out += [error("split-rank", f"diffusers' HunyuanVideo reader splits this fused module's A in three by rank as well as its B by rows: not the adapter's ΔW; {_CONVERT}", n) for n in refiner]  # fmt: skip
    return out


def _kohya_layout(info: AdapterInfo, base: Path | None) -> list[Finding]:
    """sd-scripts (and ComfyUI's kohya names) know a diffusion transformer by its original module names only."""
    arch = _transformer(info)
    if arch is None or arch["layout"] != "diffusers":
        return []
    message = f"sd-scripts names {arch['name']}'s modules as the original repository does (lora_unet_double_blocks_0_img_attn_qkv, q/k/v fused): it would not load this diffusers-named module; convert with 'loractl convert --to kohya', which fuses them exactly"  # fmt: skip
    return [error("unknown-module", message, name) for name in sorted(info.modules) if name.startswith("transformer.")]


def _mlx_names(info: AdapterInfo, base: Path | None) -> list[Finding]:
    """An mlx file under transformers' names where mlx-lm's differ (GPT-2's `model.h.N`): mlx-lm refuses it."""
    from .errors import LoractlError
    from .formats.mlx import mlx_name

    if info.format != "mlx":
        return []  # loractl's conversion writes mlx-lm's names
    out = []
    for name, m in sorted(info.modules.items()):
        stored = m.keys["A"].rpartition(".")[0]
        try:
            expected = mlx_name(name, m.fan_in_fan_out, base)
        except LoractlError:
            continue  # GPT-2 or GPT-BigCode: only --base tells
        if expected != stored:
            message = f"mlx-lm names this module {expected!r} and refuses {stored!r}; convert it again with " \
                "'loractl convert --to mlx', which writes mlx-lm's names"  # fmt: skip
            out.append(error("unknown-module", message, name))
    return out


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest `--max-lora-rank` vLLM takes that holds `rank` (a rank-12 adapter needs 16), None above 512."""
    return next((m for m in VLLM_MAX_LORA_RANKS if m >= rank), None)


def _vllm_rank(info: AdapterInfo, base: Path | None) -> list[Finding]:
    top = max((m.rank for m in info.modules.values()), default=0)
    if top <= VLLM_DEFAULT_MAX_RANK:
        return []
    needed = vllm_max_lora_rank(top)
    if needed is None:
        return [
            error(
                "rank-above-limit",
                f"rank {top} is above {VLLM_MAX_LORA_RANKS[-1]}, the largest --max-lora-rank vLLM takes: it "
                "refuses the adapter; shrink it (loractl resize) or merge it into the base (loractl merge)",
            )
        ]
    return [
        warning(
            "rank-above-limit",
            f"rank {top} is above vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_RANK}, which refuses it: start "
            f"vLLM with --max-lora-rank {needed} (it takes only {', '.join(map(str, VLLM_MAX_LORA_RANKS))}), or "
            "shrink it (loractl resize)",
        )
    ]


def _vllm_skips(key: str) -> bool:
    """The base's embeddings PEFT saves beside an embed_tokens / lm_head LoRA: vLLM skips them (its own are used)."""
    return key.endswith((".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight"))


_VLLM_FULL = "make it refuse the adapter (its modules_to_save takes only a classification head: classifier, score)"
_GGUF_FULL = "are refused by convert_lora_to_gguf.py, except norms, which llama.cpp skips at load"
_RULES: dict[str, list[_Rule]] = {
    "peft": [],
    "llamacpp": [
        _dora("llama.cpp", "convert_lora_to_gguf.py refuses the magnitude; a GGUF LoRA has no place for it"),
        _conv("llama.cpp", "it refuses a conv module's factors as the wrong shape"),
        _bias("llama.cpp", "convert_lora_to_gguf.py refuses it; a GGUF LoRA has no place for it"),
        _full_tensors("llama.cpp", _GGUF_FULL), _one_alpha_file, _gguf_names,
    ],
    "mlx": [
        _conv("mlx-lm", "it refuses to make a LoRA layer of a convolution"),
        _bias("mlx-lm", "it refuses the tensor; its LoRA layers have lora_a and lora_b only"),
        _full_tensors("mlx-lm", "are refused by its adapter loader"), _mlx_names,
    ],
    "diffusers": [_full_tensors("diffusers", "make load_lora_weights refuse the file", keep=_bfl_norm), _kohya_alphas,
                  _pipeline_component, _transformer_dropped, _wan_musubi, _dit_readers],
    "kohya": [
        _dora("sd-scripts", "a kohya file has no place for it"), _bias("sd-scripts", "a kohya file has no place for it"), _embedding("sd-scripts"),
        _full_tensors("sd-scripts", "have no place in a kohya file"), _kohya_layout,
    ],
    "vllm": [
        _dora("vLLM", "it refuses the adapter: 'vLLM does not yet support DoRA'"),
        _conv("vLLM", "its LoRA layers are linear, embedding and MoE ones; the engine refuses 4-D factors"),
        _bias("vLLM", "it refuses the adapter: 'vLLM does not support LoRA bias'"),
        _full_tensors("vLLM", _VLLM_FULL, keep=_vllm_skips),
        _vllm_rank,
    ],
}  # fmt: skip
