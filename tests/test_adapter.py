"""The canonical model: ΔW against a dense reference, structural checks, the content hash."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from loractl.adapter import Adapter, LoraModule
from loractl.errors import AdapterError
from loractl.info import scale_from_alpha
from tests.helpers import qv_adapter, random_module


def test_linear_delta_is_scale_b_a_in_float32() -> None:
    m = random_module(6, 5, 3, alpha=1.5, dtype=torch.bfloat16)
    expected = (m.B.double() @ m.A.double()) * (1.5 / 3)
    delta = m.delta_weight()
    assert delta.dtype == torch.float32 and delta.shape == (6, 5)
    torch.testing.assert_close(delta.double(), expected, rtol=1e-6, atol=1e-6)


def test_fan_in_fan_out_delta_is_in_conv1d_layout() -> None:
    m = random_module(6, 5, 3, fan_in_fan_out=True)
    conv1d_weight = torch.zeros(5, 6)  # GPT-2 Conv1D stores (in, out): y = x @ W
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    y = x @ (conv1d_weight + m.delta_weight())
    torch.testing.assert_close(y, x @ (m.scale * (m.B @ m.A)).T)


def test_embedding_delta_is_num_embeddings_by_dim() -> None:
    m = random_module(7, 11, 2, kind="embedding")  # A (r, num_embeddings), B (dim, r)
    ids = torch.tensor([0, 3, 10])
    looked_up = F.embedding(ids, m.delta_weight())
    torch.testing.assert_close(looked_up, m.scale * (F.embedding(ids, m.A.T) @ m.B.T))


def test_conv_delta_matches_the_two_convolutions() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 3, 3, generator=g), torch.randn(5, 3, 1, 1, generator=g)
    m = LoraModule(A=a, B=b, scale=0.5, alpha=1.5, kind="conv")
    x = torch.randn(2, 4, 8, 8, generator=g)
    two_convs = F.conv2d(F.conv2d(x, a, padding=1), b) * 0.5
    torch.testing.assert_close(F.conv2d(x, m.delta_weight(), padding=1), two_convs, rtol=1e-4, atol=1e-4)


def test_scale_from_alpha_plain_and_rslora() -> None:
    assert scale_from_alpha(16, 8) == 2.0
    assert scale_from_alpha(16, 4, rslora=True) == 8.0


def test_check_rejects_rank_mismatch_and_non_finite_scale() -> None:
    m = random_module(4, 4, 2)
    with pytest.raises(AdapterError, match="rank mismatch"):
        dataclasses.replace(m, B=torch.zeros(4, 3)).check("x")
    with pytest.raises(AdapterError, match="not finite"):
        dataclasses.replace(m, scale=float("nan")).check("x")
    with pytest.raises(AdapterError, match="2-D"):
        dataclasses.replace(m, A=torch.zeros(2)).check("x")
    Adapter(modules={"x": m}).check()


def test_content_hash_ignores_dict_order_and_file_order() -> None:
    a = qv_adapter()
    reordered = Adapter(
        modules=dict(reversed(list(a.modules.items()))),
        full_tensors={"lm_head.weight": torch.ones(3, 2), "norm.weight": torch.ones(2)},
        meta=a.meta,
    )
    forward = dataclasses.replace(reordered, full_tensors=dict(reversed(list(reordered.full_tensors.items()))))
    assert reordered.content_hash() == forward.content_hash()
    assert dataclasses.replace(a, modules=reordered.modules).content_hash() == a.content_hash()


def test_content_hash_sees_every_bit_scale_dtype_shape_and_name() -> None:
    a = qv_adapter()
    name, m = next(iter(a.modules.items()))
    flipped = m.A.clone()
    flipped.view(torch.int32)[0, 0] ^= 1  # one mantissa bit
    variants = [
        {name: dataclasses.replace(m, A=flipped)},
        {name: dataclasses.replace(m, scale=m.scale * (1 + 2**-52))},
        {name: dataclasses.replace(m, A=m.A.to(torch.float64))},
        {name: dataclasses.replace(m, fan_in_fan_out=True)},
        {name: dataclasses.replace(m, bias=torch.zeros(m.out_features))},
        {name + "x": m},
    ]
    hashes = {a.content_hash()}
    for change in variants:
        modules = {k: v for k, v in a.modules.items() if k != name} | change
        hashes.add(dataclasses.replace(a, modules=modules).content_hash())
    assert len(hashes) == len(variants) + 1


def test_content_hash_of_a_view_equals_its_contiguous_copy() -> None:
    m = random_module(4, 6, 2)
    transposed_view = m.A.T.contiguous().T  # same values, non-contiguous storage
    assert not transposed_view.is_contiguous()
    a = Adapter(modules={"x": m})
    assert (
        dataclasses.replace(a, modules={"x": dataclasses.replace(m, A=transposed_view)}).content_hash()
        == a.content_hash()
    )


def test_with_lineage_returns_a_copy() -> None:
    a = qv_adapter()
    b = a.with_lineage({"op": "test"})
    assert a.lineage == () and b.lineage == ({"op": "test"},)
    assert b.modules is a.modules


def test_num_parameters_counts_factors_magnitudes_biases_and_full_tensors() -> None:
    m = dataclasses.replace(random_module(6, 5, 3), magnitude=torch.ones(6), bias=torch.zeros(6))
    a = Adapter(modules={"x": m}, full_tensors={"head.weight": torch.zeros(2, 5)})
    assert a.num_parameters() == 3 * 5 + 6 * 3 + 6 + 6 + 10
    assert a.dtypes == {"F32"}
