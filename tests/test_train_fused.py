"""The fused training kernels: LoraLinear's one-node matmul over bf16 and 4-bit bases (float32 compute), and
the fused RMSNorm / gated MLP, each against a dense float64 reference, PEFT, or transformers' eager modules."""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import pytest
import torch
from oracles import oracle
from torch import nn

from loractl.errors import UsageError
from loractl.train import LoraLinear
from loractl.train.base_matmul import ENV, matmul_dtype
from loractl.train.fused_blocks import fuse

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def lora_over(base: nn.Module, seed: int = 0) -> LoraLinear:
    layer = LoraLinear(base, rank=4, alpha=8.0, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        layer.lora_B.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return layer


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def test_matmul_dtype_by_device_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    from loractl.train import base_matmul

    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(base_matmul, "cpu_has_bf16_units", lambda: False)
    assert matmul_dtype(torch.float32, CPU) == torch.float32
    assert matmul_dtype(torch.bfloat16, CPU) == torch.float32  # no bf16 units: upcast
    assert matmul_dtype(torch.bfloat16, CUDA) == torch.bfloat16  # tensor cores keep bf16
    monkeypatch.setattr(base_matmul, "cpu_has_bf16_units", lambda: True)
    assert matmul_dtype(torch.float16, CPU) == torch.float16
    monkeypatch.setenv(ENV, "float32")
    assert matmul_dtype(torch.bfloat16, CUDA) == torch.float32
    monkeypatch.setenv(ENV, "native")
    monkeypatch.setattr(base_matmul, "cpu_has_bf16_units", lambda: False)
    assert matmul_dtype(torch.bfloat16, CPU) == torch.bfloat16
    monkeypatch.setenv(ENV, "fast")
    with pytest.raises(UsageError, match=ENV):
        matmul_dtype(torch.bfloat16, CPU)


def test_matmul_dtype_per_shape_is_the_faster_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    from loractl.train import base_matmul

    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(base_matmul, "MEASURED", {})
    timed: list[tuple[tuple[int, int], torch.dtype]] = []

    def fake(shape: tuple[int, int], native: torch.dtype) -> base_matmul.Choice:
        timed.append((shape, native))
        native_s = 1.0 if shape[0] > 100 else 3.0  # native faster for the big shape only
        return base_matmul.Choice(shape, native, 2.0, native_s, 1.0)

    monkeypatch.setattr(base_matmul, "_measure", fake)
    assert matmul_dtype(torch.bfloat16, CPU, (512, 64)) == torch.bfloat16
    assert matmul_dtype(torch.bfloat16, CPU, (64, 512)) == torch.float32
    assert matmul_dtype(torch.bfloat16, CPU, torch.Size([512, 64])) == torch.bfloat16
    assert matmul_dtype(torch.float16, CPU, (512, 64)) == torch.float16
    assert matmul_dtype(torch.bfloat16, CUDA, (64, 512)) == torch.bfloat16  # measured on CPUs only
    assert timed == [((512, 64), torch.bfloat16), ((64, 512), torch.bfloat16), ((512, 64), torch.float16)]
    monkeypatch.setenv(ENV, "native")
    assert matmul_dtype(torch.bfloat16, CPU, (64, 512)) == torch.bfloat16  # the override wins


def test_measured_choice_times_both_ways_once() -> None:
    from loractl.train import base_matmul

    choice = base_matmul.measured_choice((96, 64), torch.bfloat16, torch.get_num_threads())
    assert choice.float32_s > 0 and choice.native_s > 0 and choice.dtype in (torch.float32, torch.bfloat16)
    assert choice.flops == 4 * base_matmul.PROBE_TOKENS * 96 * 64
    assert base_matmul.measured_choice((96, 64), torch.bfloat16, torch.get_num_threads()) is choice  # cached


def test_a_compiled_layer_takes_the_choice_measured_before_compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch.compile the trace runs on fake tensors, so a measurement inside it timed nothing (once it
    reported 44 TFLOP/s and chose float32 for SmolLM2's q/k/v/o): `--compile` measures each frozen weight first,
    eagerly, and a trace only looks the choice up."""
    from loractl.train import base_matmul
    from loractl.train.loop import _compile

    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(base_matmul, "MEASURED", {})
    timed: list[bool] = []

    def fake(shape: tuple[int, int], native: torch.dtype) -> base_matmul.Choice:
        timed.append(torch.compiler.is_compiling())
        return base_matmul.Choice(shape, native, 2.0, 1.0 if shape == (48, 24) else 3.0, 1.0)

    monkeypatch.setattr(base_matmul, "_measure", fake)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = lora_over(nn.Linear(24, 48).bfloat16()), lora_over(nn.Linear(48, 24).bfloat16(), 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down(self.up(x))

    class Model(nn.Module):
        _no_split_modules: ClassVar[list[str]] = ["Block"]

        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Block()])

    model = Model()
    x = torch.randn(2, 24).bfloat16()
    eager = model.layers[0](x)
    monkeypatch.setattr(base_matmul, "MEASURED", {})
    timed.clear()
    _compile(model)
    assert timed == [False, False]  # both weights measured eagerly, before any trace
    compiled = model.layers[0](x)
    assert timed == [False, False]  # the trace measured nothing
    assert torch.equal(compiled, eager)  # bf16 for up, float32 for down, as chosen eagerly
    assert [c.dtype for c in base_matmul.MEASURED.values()] == [torch.bfloat16, torch.float32]


@pytest.mark.parametrize("bias", [False, True])
def test_bf16_base_computes_in_float32_like_a_dense_reference(bias: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "float32")
    torch.manual_seed(0)
    layer = lora_over(nn.Linear(24, 40, bias=bias).to(torch.bfloat16))
    x = torch.randn(3, 5, 24).to(torch.bfloat16).requires_grad_()
    grad_out = torch.randn(3, 5, 40).to(torch.bfloat16)
    out = layer(x)
    out.backward(grad_out)
    # float64 reference from the same stored values
    w = layer.base_layer.weight.double()
    a, b = layer.lora_A.detach().double().requires_grad_(), layer.lora_B.detach().double().requires_grad_()
    xd = x.detach().double().requires_grad_()
    ref = xd @ w.t() + layer.scale * (xd @ a.t()) @ b.t()
    if bias:
        ref = ref + layer.base_layer.bias.double()
    ref.backward(grad_out.double())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref.to(torch.bfloat16), rtol=0, atol=0)  # one rounding, of a float32 sum
    assert rel(layer.lora_A.grad, a.grad) < 1e-6 and rel(layer.lora_B.grad, b.grad) < 1e-6
    assert rel(x.grad, xd.grad.to(torch.bfloat16)) < 1e-2  # bf16 input gradient: bf16 rounding


def test_bf16_base_matches_peft_on_a_float32_copy_of_its_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """PEFT's LoRA over the same bf16 weights held in float32: the same output (rounded) and factor gradients."""
    monkeypatch.setenv(ENV, "float32")
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(24, 40, bias=False))
    dense[0].weight.data = dense[0].weight.data.to(torch.bfloat16).float()  # bf16-representable values
    twin = peft.get_peft_model(copy.deepcopy(dense), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    ours = lora_over(copy.deepcopy(dense[0]).to(torch.bfloat16))
    theirs = twin.base_model.model[0]
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(4, 24).to(torch.bfloat16)
    grad_out = torch.randn(4, 40).to(torch.bfloat16)
    out, ref = ours(x), twin(x.float())
    out.backward(grad_out)
    ref.backward(grad_out.float())
    torch.testing.assert_close(out, ref.to(torch.bfloat16), rtol=0, atol=0)
    assert rel(ours.lora_A.grad, theirs.lora_A["default"].weight.grad) < 1e-6
    assert rel(ours.lora_B.grad, theirs.lora_B["default"].weight.grad) < 1e-6


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_bf16_native_base_runs_the_low_rank_path_in_bf16_near_a_dense_reference(
    bias: bool, dropout: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frozen matmuls in bf16: the low-rank products too (bf16 from the float32 factors), the term added in the
    frozen matmul's epilogue. Within bf16 rounding of a float64 reference and of the float32 path, factor
    gradients in float32."""
    monkeypatch.setenv(ENV, "native")
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(48, 40, bias=bias).to(torch.bfloat16), 4, 8.0, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 5, 48).to(torch.bfloat16).requires_grad_()
    grad_out = torch.randn(3, 5, 40).to(torch.bfloat16)
    torch.manual_seed(2)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    out.backward(grad_out)
    assert out.dtype == x.grad.dtype == torch.bfloat16
    assert [t.dtype for t in saved if t.shape == (15, 4)] == [torch.bfloat16]  # h = x·Aᵀ kept in bf16
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32
    # float64 reference from the same stored values and the same dropout mask (the same draws: shape, dtype, seed)
    torch.manual_seed(2)
    mask = layer.dropout(torch.ones_like(x)).double()
    w = layer.base_layer.weight.double()
    a, b = layer.lora_A.detach().double().requires_grad_(), layer.lora_B.detach().double().requires_grad_()
    xd = x.detach().double().requires_grad_()
    ref = xd @ w.t() + layer.scale * (xd * mask) @ a.t() @ b.t()
    if bias:
        ref = ref + layer.base_layer.bias.double()
    ref.backward(grad_out.double())
    assert rel(out, ref) < 2**-8  # one bf16 rounding of the output, and the term's own
    assert rel(layer.lora_A.grad, a.grad) < 2e-2 and rel(layer.lora_B.grad, b.grad) < 2e-2  # bf16 products
    assert rel(x.grad, xd.grad) < 2e-2
    layer.lora_A.grad = layer.lora_B.grad = x.grad = None
    monkeypatch.setenv(ENV, "float32")  # the float32 path PEFT computes without autocast
    torch.manual_seed(2)
    assert rel(out, layer(x)) < 2**-7  # a bf16 rounding apart


def test_bf16_native_base_matches_peft_under_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    """PEFT over the same bf16 weights under torch.autocast(bf16) (its float32 factors cast per product): the same
    output and factor gradients to bf16 rounding."""
    monkeypatch.setenv(ENV, "native")
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(48, 40, bias=False).to(torch.bfloat16))
    twin = peft.get_peft_model(copy.deepcopy(dense), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    ours = lora_over(copy.deepcopy(dense[0]))
    theirs = twin.base_model.model[0]
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
    assert theirs.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(16, 48).to(torch.bfloat16)
    grad_out = torch.randn(16, 40).to(torch.bfloat16)
    out = ours(x)
    out.backward(grad_out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = twin(x)
    ref.backward(grad_out)
    assert rel(out, ref) < 2**-7
    assert rel(ours.lora_A.grad, theirs.lora_A["default"].weight.grad) < 1e-2
    assert rel(ours.lora_B.grad, theirs.lora_B["default"].weight.grad) < 1e-2


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_base_computes_with_its_dequantized_weight(quant_type: str) -> None:
    bnb = oracle("bitsandbytes", "bitsandbytes", "qlora")
    torch.manual_seed(0)
    dense = nn.Linear(64, 48, bias=False)
    quantized = bnb.nn.Linear4bit(64, 48, bias=False, compute_dtype=torch.float32, quant_type=quant_type)
    quantized.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type=quant_type)
    quantized = quantized.to("cpu")
    layer = lora_over(quantized)
    w = bnb.functional.dequantize_4bit(quantized.weight.data, quantized.weight.quant_state).double()
    x = torch.randn(6, 64, requires_grad=True)
    grad_out = torch.randn(6, 48)
    layer(x).backward(grad_out)
    xd = x.detach().double().requires_grad_()
    a, b = layer.lora_A.detach().double().requires_grad_(), layer.lora_B.detach().double().requires_grad_()
    ref = xd @ w.t() + layer.scale * (xd @ a.t()) @ b.t()
    ref.backward(grad_out.double())
    assert rel(layer(x), ref) < 1e-6
    assert (
        rel(x.grad, xd.grad) < 1e-6 and rel(layer.lora_A.grad, a.grad) < 1e-6 and rel(layer.lora_B.grad, b.grad) < 1e-6
    )
    torch.testing.assert_close(layer(x), layer._autograd_forward(x))  # bitsandbytes' own float32 matmul


def test_dropout_keeps_the_base_path_undropped() -> None:
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 8), rank=4, alpha=4.0, dropout=0.5).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 16, requires_grad=True)
    torch.manual_seed(3)
    out = layer(x)
    out.square().sum().backward()
    grads = x.grad.clone(), layer.lora_A.grad.clone()
    x.grad, layer.lora_A.grad = None, None
    torch.manual_seed(3)  # the same dropout mask through autograd's own graph
    ref = layer._autograd_forward(x)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grads[0], x.grad)
    torch.testing.assert_close(grads[1], layer.lora_A.grad)


def tiny_llama(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return transformers.LlamaForCausalLM(config).to(dtype)


def test_fused_blocks_give_the_eager_forward_and_its_gradients() -> None:
    eager = tiny_llama()
    fused = copy.deepcopy(eager)
    assert fuse(fused) == 9 and fuse(fused) == 0  # 2 layers x (2 norms + MLP + attention) + final norm; once only
    assert isinstance(fused.model.norm, type(eager.model.norm))
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    out, ref = fused(ids, use_cache=False).logits, eager(ids, use_cache=False).logits
    assert torch.equal(out, ref)  # op for op transformers' forward
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), eager.parameters(), strict=True):
        assert rel(p.grad, q.grad) < 1e-5, name


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])  # fmt: skip
def test_silu_gate_node_is_eager_bit_for_bit_in_any_dtypes(dtypes: tuple[torch.dtype, torch.dtype]) -> None:
    """The node writes its products into buffers it made, except where eager's product would promote the dtype."""
    import torch.nn.functional as F

    from loractl.train.fused_blocks import _SiluGate

    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(4, 6, 10, generator=g).to(d) for d in dtypes)
    grad = torch.randn(4, 6, 10, generator=g)
    sides = []
    for run in (lambda a, b: _SiluGate.apply(a, b), lambda a, b: F.silu(a) * b):
        a, b = gate.clone().requires_grad_(), up.clone().requires_grad_()
        out = run(a, b)
        out.backward(grad.to(out.dtype))
        sides.append((out, a.grad, b.grad))
    for ours, eager in zip(*sides, strict=True):
        assert ours.dtype == eager.dtype and torch.equal(ours, eager)


class CountedAttention:
    """Counts the fused attention node's forwards (the test must know the fused path ran, not a fallback)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from loractl.train import fused_blocks

        self.calls, forward = 0, fused_blocks._CausalAttention.forward

        def counted(*args: Any) -> Any:
            self.calls += 1
            return forward(*args)

        monkeypatch.setattr(fused_blocks._CausalAttention, "forward", staticmethod(counted))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_attention_gives_the_eager_forward_and_gradients_as_near_float64(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Grouped-query attention (6 heads, 2 key/value heads): the fused node's output is transformers' bit for bit
    (the same rotary code, the same flash kernel); its gradients are eager's to float rounding in float32, and in
    bf16 (the backward run in float32) no farther from a float64 model's than eager's own."""
    counted = CountedAttention(monkeypatch)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=2)  # fmt: skip
    eager = transformers.LlamaForCausalLM(config).to(dtype)
    fused, exact = copy.deepcopy(eager), copy.deepcopy(eager).double()
    fuse(fused)
    ids = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(0))
    out, ref, ref64 = (m(ids, use_cache=False).logits for m in (fused, eager, exact))
    assert counted.calls == 2 and torch.equal(out, ref)
    for logits in (out, ref, ref64):
        logits.double().square().sum().backward()
    pairs = list(zip(fused.named_parameters(), eager.parameters(), exact.parameters(), strict=True))
    if dtype == torch.float32:
        for (name, p), q, _ in pairs:
            assert rel(p.grad, q.grad) < 1e-5, name
    else:  # every other op rounds to bf16 alike: over all gradients, the two are as far from float64
        grads = [
            torch.cat([m.grad.double().flatten() for m in side])
            for side in zip(*[(p, q, x) for (_, p), q, x in pairs], strict=True)
        ]
        assert rel(grads[0], grads[2]) <= 1.1 * rel(grads[1], grads[2])
        assert not torch.equal(grads[0], grads[1])  # the float32 backward did run


def test_fused_attention_node_backward_in_float32_is_nearer_float64_than_sdpa_s_bf16_one() -> None:
    """The node alone in bf16 against transformers' rotary + SDPA in bf16, both against float64: the same output,
    and q, k, v gradients at most as far from float64's (its backward runs in float32, SDPA's rounds in bf16)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from loractl.train.fused_blocks import _CausalAttention

    g = torch.Generator().manual_seed(0)
    shapes = ((2, 6, 33, 16), (2, 2, 33, 16), (2, 2, 33, 16))
    q, k, v = (torch.randn(s, generator=g).to(torch.bfloat16).requires_grad_() for s in shapes)
    angle = torch.arange(33.0)[:, None] * torch.rand(8, generator=g)[None, :]
    cos, sin = (f(torch.cat([angle, angle], -1))[None].expand(2, 33, 16) for f in (torch.cos, torch.sin))
    upstream = torch.randn(2, 6, 33, 16, generator=g)

    def eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        rq, rk = apply_rotary_pos_emb(q, k, cos.to(q.dtype), sin.to(q.dtype))
        return nn.functional.scaled_dot_product_attention(rq, rk, v, is_causal=True, scale=0.25, enable_gqa=True)

    ours = _CausalAttention.apply(q, k, v, cos.bfloat16(), sin.bfloat16(), 0.25, apply_rotary_pos_emb)
    assert torch.equal(ours, eager(q, k, v))
    fused_grads = torch.autograd.grad(ours.double().mul(upstream).sum(), (q, k, v))
    sdpa_grads = torch.autograd.grad(eager(q, k, v).double().mul(upstream).sum(), (q, k, v))
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact_grads = torch.autograd.grad(eager(*exact).mul(upstream).sum(), exact)
    for name, mine, sdpa, want in zip("qkv", fused_grads, sdpa_grads, exact_grads, strict=True):
        assert rel(mine, want) <= rel(sdpa, want), name
        assert rel(mine, want) < 1e-2, name


def test_fused_attention_leaves_a_mask_or_a_cache_to_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Padding (an attention mask), packed rows (restarting positions) and a key/value cache take transformers' own
    forward: the same logits."""
    counted = CountedAttention(monkeypatch)
    eager = tiny_llama()
    fused = copy.deepcopy(eager)
    fuse(fused)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    assert torch.equal(fused(ids, attention_mask=mask, use_cache=False).logits,
                       eager(ids, attention_mask=mask, use_cache=False).logits)  # fmt: skip
    assert torch.equal(fused(ids).logits, eager(ids).logits)  # use_cache defaults to True: a cache is built
    packed = torch.tensor([list(range(4)) + list(range(7))] * 2)  # two examples per row: transformers masks them
    assert torch.equal(fused(ids, position_ids=packed, use_cache=False).logits,
                       eager(ids, position_ids=packed, use_cache=False).logits)  # fmt: skip
    assert counted.calls == 0


def test_fused_norm_and_gate_gradients_match_a_float64_reference() -> None:
    from loractl.train.fused_blocks import _RMSNorm, _SiluGate

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 7, 32, generator=g, requires_grad=True), torch.randn(32, generator=g, requires_grad=True)
    gate, up = (
        torch.randn(3, 7, 40, generator=g, requires_grad=True),
        torch.randn(3, 7, 40, generator=g, requires_grad=True),
    )
    upstream_n, upstream_m = torch.randn(3, 7, 32, generator=g), torch.randn(3, 7, 40, generator=g)
    (_RMSNorm.apply(x, w, 1e-6) * upstream_n).sum().backward()
    (_SiluGate.apply(gate, up) * upstream_m).sum().backward()
    xd, wd, gd, ud = (t.detach().double().requires_grad_() for t in (x, w, gate, up))
    ((xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + 1e-6) * wd) * upstream_n.double()).sum().backward()
    ((gd * torch.sigmoid(gd) * ud) * upstream_m.double()).sum().backward()
    for ours, ref in ((x, xd), (w, wd), (gate, gd), (up, ud)):
        assert rel(ours.grad, ref.grad) < 1e-6


def test_fused_blocks_save_less_for_the_backward_pass() -> None:
    def saved_bytes(model: nn.Module) -> int:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, 97, (4, 64), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.model.layers[0](model.model.embed_tokens(ids).requires_grad_(),
                                  position_embeddings=model.model.rotary_emb(torch.zeros(1), torch.arange(64)[None]))  # fmt: skip
        return sum(seen.values())

    eager = tiny_llama()
    fused = copy.deepcopy(eager)
    fuse(fused)
    assert saved_bytes(fused) < 0.8 * saved_bytes(eager)


def test_autocast_runs_the_eager_forward() -> None:
    eager = tiny_llama()
    fused = copy.deepcopy(eager)
    fuse(fused)
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out: Any = fused(ids).logits
        ref: Any = eager(ids).logits
    assert torch.equal(out, ref)
