"""Why the Qwen3.5 adapters declare their language model unpackable: in transformers'
Qwen3.5, two sequences packed in one row (varlen attention, positions restarting) cannot be
run as each alone. The Gated DeltaNet layers' delta rule refuses sequence bounds without
flash-linear-attention, and their short convolution takes none even with it (it spans the
bound); with full attention only, the same packed call gives each sequence alone. If a
transformers release keeps packed sequences apart in those layers, these tests fail, and the
adapter can allow packing."""
import importlib

import pytest
import torch

pytest.importorskip("transformers")

from vsops.integrations import adapter_for, register_reference_varlen_attention  # noqa: E402
from vsops.integrations.testing import tiny_qwen_vl_config  # noqa: E402

MODEL_TYPES = ["qwen3_5", "qwen3_5_moe"]


def language_model(model_type, layer_types=None):
    try:
        _, model_cls = adapter_for(model_type).classes()
    except ImportError as e:
        pytest.skip(str(e))
    config = tiny_qwen_vl_config(model_type, attn_implementation=register_reference_varlen_attention(), layers=4)
    if layer_types is not None:
        config.text_config.layer_types = layer_types
    torch.manual_seed(0)
    return model_cls(config).eval().model.language_model


def packed_and_alone(lm, lengths=(5, 7)):
    """The hidden states of sequences of ``lengths`` packed in one row, and of each alone."""
    torch.manual_seed(1)
    hidden = lm.config.hidden_size
    parts = [torch.randn(1, n, hidden) for n in lengths]
    positions = [torch.arange(n).view(1, 1, n).expand(3, 1, n) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        packed = lm(inputs_embeds=torch.cat(parts, 1), position_ids=torch.cat(positions, 2), attention_mask=None,
                    use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths),
                    max_length_k=max(lengths)).last_hidden_state
        alone = [lm(inputs_embeds=x, position_ids=p, use_cache=False).last_hidden_state for x, p in zip(parts, positions)]
    return packed, torch.cat(alone, 1)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_its_linear_attention_layers_cannot_take_packed_sequences(model_type):
    assert adapter_for(model_type).unpackable
    lm = language_model(model_type)
    if importlib.util.find_spec("fla") is None:
        with pytest.raises(ValueError, match="can't keep packed sequences apart"):
            packed_and_alone(lm)
        return
    packed, alone = packed_and_alone(lm)
    assert not torch.allclose(packed[:, 5:], alone[:, 5:], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_its_convolution_spans_packed_sequence_bounds(model_type):
    lm = language_model(model_type)
    layer = next(layer.linear_attn for layer in lm.layers if hasattr(layer, "linear_attn"))
    conv = importlib.import_module(type(layer).__module__).causal_conv1d_fn
    weight = layer.conv1d.weight.squeeze(1)
    torch.manual_seed(2)
    x = torch.randn(1, weight.shape[0], 12)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    with torch.no_grad():
        # The keywords the layer hands it in a packed call.
        packed = conv(x, weight, layer.conv1d.bias, activation=layer.activation, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
        alone = torch.cat([conv(x[..., a:b], weight, layer.conv1d.bias, activation=layer.activation)
                           for a, b in ((0, 5), (5, 12))], -1)
    torch.testing.assert_close(packed[..., :5], alone[..., :5])
    # The second sequence's first outputs read the first sequence's last inputs.
    assert not torch.allclose(packed[..., 5:8], alone[..., 5:8], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(packed[..., 8:], alone[..., 8:])  # the kernel is 4 wide


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_with_full_attention_only_packed_sequences_stay_apart(model_type):
    packed, alone = packed_and_alone(language_model(model_type, ["full_attention"] * 4))
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
