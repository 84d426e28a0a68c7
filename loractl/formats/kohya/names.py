"""kohya's flattened names (`lora_unet_down_blocks_0_…`) back to module paths, and forward.

kohya replaces every '.' of `prefix.module_path` by '_', which cannot be undone by string
manipulation because module names contain '_' themselves (FORMATS.md §2.2). Three sources
resolve them, in order: the base checkpoint's own tensor names (`--base`), the name map
loractl writes into its kohya files, and a vocabulary of segment names used by transformers
and diffusers models: the reading with the fewest known segments wins (`q_proj` over
`q.proj`), and a name with no reading, or two equally short ones, needs `--base`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from ...errors import UsageError

# kohya prefix → canonical component prefix (diffusers pipeline component, or none).
PREFIXES = {
    "lora_unet_": "unet.",
    "lora_te_": "text_encoder.",
    "lora_te1_": "text_encoder.",
    "lora_te2_": "text_encoder_2.",
    "lora_te3_": "text_encoder_3.",
    "lycoris_": "",
}
PREFIX_RE = re.compile(r"^(lora_unet_|lora_te[123]?_|lycoris_)")

# Segment names of transformers / diffusers / SGM / BFL module trees; a segment is one of these or
# a number. "self" (BERT) and "wi" (T5 v1.0) are left out: they would tie with Llama's `self_attn`
# and T5 v1.1's `wi_0`.
_WORDS = """
    model layers layer self_attn attn attention q_proj k_proj v_proj o_proj qkv_proj gate_proj up_proj down_proj
    gate_up_proj mlp embed_tokens lm_head norm input_layernorm post_attention_layernorm transformer h c_attn c_proj
    c_fc wte wpe ln_1 ln_2 ln_f encoder decoder query key value output dense intermediate embeddings
    word_embeddings classifier out_proj fc1 fc2 dense_h_to_4h dense_4h_to_h query_key_value experts
    block_sparse_moe w1 w2 w3 wq wk wv wo feed_forward tok_embeddings language_model score shared_expert gate
    text_model token_embedding position_embedding final_layer_norm layer_norm1 layer_norm2 text_projection
    block SelfAttention EncDecAttention DenseReluDense q k v o wi_0 wi_1 shared
    unet down_blocks up_blocks mid_block attentions resnets transformer_blocks attn1 attn2 to_q to_k to_v to_out
    ff net proj proj_in proj_out norm1 norm2 norm3 conv1 conv2 conv_shortcut time_emb_proj downsamplers upsamplers
    conv conv_in conv_out time_embedding linear_1 linear_2 add_embedding
    input_blocks middle_block output_blocks emb_layers in_layers out_layers skip_connection time_embed label_emb op
    single_transformer_blocks add_q_proj add_k_proj add_v_proj to_add_out ff_context norm1_context linear
    proj_mlp x_embedder context_embedder time_text_embed timestep_embedder guidance_embedder text_embedder norm_out
    double_blocks single_blocks img_attn txt_attn qkv img_mlp txt_mlp img_mod txt_mod lin linear1 linear2
    modulation final_layer adaLN_modulation img_in txt_in time_in vector_in guidance_in in_layer out_layer
    blocks cross_attn ffn k_img v_img head time_projection text_embedding time_embedding img_emb
    joint_blocks x_block context_block t_embedder y_embedder noise_refiner context_refiner
    double_stream_modulation_img double_stream_modulation_txt single_stream_modulation
    individual_token_refiner input_embedder c_embedder to_qkv_mlp_proj linear_in linear_out
"""
VOCABULARY = frozenset(_WORDS.split())


def flatten(module: str) -> tuple[str, str]:
    """(kohya name, kohya prefix) of a canonical module path."""
    for prefix, component in PREFIXES.items():
        if component and module.startswith(component) and prefix != "lora_te1_":
            return prefix + module[len(component) :].replace(".", "_"), prefix
    return "lycoris_" + module.replace(".", "_"), "lycoris_"


def split_prefix(name: str) -> tuple[str, str]:
    """(kohya prefix, flattened body) of a kohya module name."""
    match = PREFIX_RE.match(name)
    if not match:
        raise UsageError(f"{name!r} has no kohya prefix (lora_unet_, lora_te_, lycoris_)")
    return match.group(1), name[match.end() :]


def resolve(names: Iterable[str], *, base: Path | None, recorded: dict[str, str]) -> dict[str, str]:
    """Module path for each kohya module name; `UsageError` naming the first one that cannot be resolved."""
    names = list(names)
    if base is not None:
        return _from_base(names, base)
    out = {}
    for name in names:
        if name in recorded:
            out[name] = recorded[name]
            continue
        prefix, body = split_prefix(name)
        readings = _shortest_readings(body.split("_"))
        if len(readings) != 1:
            why = f"reads as {' or '.join('.'.join(r) for r in readings)}" if readings else "has unknown segment names"
            raise UsageError(
                f"kohya name {name!r} {why}: cannot tell which '_' stood for '.'",
                hint="pass --base BASE (the base checkpoint) so names are matched against its tensor names",
            )
        out[name] = PREFIXES[prefix] + ".".join(readings[0])
    return out


def _shortest_readings(tokens: list[str]) -> list[list[str]]:
    """The readings of `tokens` as known segments (numbers or VOCABULARY words) with the fewest segments."""
    best: list[list[list[str]] | None] = [None] * len(tokens) + [[[]]]
    for start in range(len(tokens) - 1, -1, -1):
        options: list[list[str]] = []
        for end in range(start + 1, len(tokens) + 1):
            segment = "_".join(tokens[start:end])
            rest = best[end]
            if rest and (segment.isdigit() or segment in VOCABULARY):
                options += [[segment, *r] for r in rest]
        shortest = min((len(o) for o in options), default=0)
        best[start] = [o for o in options if len(o) == shortest] or None
    return best[0] or []


def _from_base(names: list[str], base: Path) -> dict[str, str]:
    """Match each name against the base checkpoint's `<module>.weight` names."""
    from ...io.checkpoint import Checkpoint

    with Checkpoint(base) as ckpt:
        modules = [n[: -len(".weight")] for n in ckpt.names if n.endswith(".weight")]
    tables: dict[str, dict[str, set[str]]] = {}
    out = {}
    for name in names:
        prefix, body = split_prefix(name)
        component = PREFIXES[prefix]
        if component not in tables:
            tables[component] = _flat_table(modules, component)
        matches = tables[component].get(body, set())
        if len(matches) != 1:
            what = "matches no weight" if not matches else f"matches several weights ({', '.join(sorted(matches))})"
            raise UsageError(
                f"kohya name {name!r} {what} of the base {base}",
                hint="check that the base given is the checkpoint the adapter was trained on (for a pipeline, its unet or "
                "text encoder checkpoint)",
            )
        out[name] = component + next(iter(matches))
    return out


def _flat_table(modules: list[str], component: str) -> dict[str, set[str]]:
    """Flattened name → module paths relative to `component` (a base may or may not carry the component prefix)."""
    table: dict[str, set[str]] = {}
    for m in modules:
        rel = m[len(component) :] if component and m.startswith(component) else m
        table.setdefault(rel.replace(".", "_"), set()).add(rel)
    return table
