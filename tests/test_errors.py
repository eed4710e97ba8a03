"""Bad input: a clear error naming the layer and the value at fault, raised early, and
nothing left behind - no hook, no ring memory."""
import gc

import pytest
import torch
import torch.nn as nn
import torchvision

import fastcap
from fastcap import _ext
from conftest import hook_count


@pytest.fixture
def model():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def assert_clean(model):
    gc.collect()
    assert hook_count(model) == 0
    assert _ext.live_host_bytes() == 0 and _ext.live_pinned_bytes() == 0


def raises_at_construction(model, exc, match, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fastcap.capture(model, *args, **kwargs)
    assert_clean(model)


def raises_in_forward(model, exc, match, x, *args, **kwargs):
    with pytest.raises(exc, match=match):
        with torch.no_grad(), fastcap.capture(model, *args, **kwargs):
            model(x)
    assert_clean(model)


def test_unknown_layer_suggests_close_names(model):
    raises_at_construction(model, ValueError, r"unknown layer 'layer5'.*did you mean 'layer[1-4]'", "layer5")
    raises_at_construction(model, ValueError, r"unknown layer 'layer1.0.conv3'.*'layer1.0.conv[12]'",
                           ["fc", "layer1.0.conv3"])


def test_unknown_layer_suggests_the_full_names_it_ends(model):
    """A name given without its parents (HF models' `h.1` for `transformer.h.1`) is suggested whole."""
    nested = nn.Sequential()
    nested.add_module("transformer", nn.Sequential())
    nested.transformer.add_module("h", nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    raises_at_construction(nested, ValueError, r"unknown layer 'h\.1' in Sequential: did you mean "
                           r"'transformer\.h\.1'\?$", "h.1")
    raises_at_construction(nested, ValueError, r"layer pattern 'h\.\*' matches no module of Sequential; did "
                           r"you mean 'transformer\.h\.\*'\?$", "h.*")
    raises_at_construction(model, ValueError, r"unknown layer '0\.downsample' in ResNet: did you mean "
                           r"'layer2\.0\.downsample', 'layer3\.0\.downsample', 'layer4\.0\.downsample'\?$",
                           "0.downsample")
    raises_at_construction(model, ValueError, r"unknown layer 'conv2' in ResNet: did you mean 'layer1\.0\.conv2', "
                           r"'layer1\.1\.conv2', \.\.\. \('\*\*\.conv2' for all 8\)\?$", "conv2")
    raises_at_construction(model, ValueError, r"layer pattern '0\.conv\*' matches no module of ResNet; did you "
                           r"mean '\*\*\.0\.conv\*'\?$", "0.conv*")


def test_glob_matching_nothing(model):
    raises_at_construction(model, ValueError, r"layer pattern 'block\*' matches no module", "block*")
    raises_at_construction(model, ValueError, r"'layer\*\.9' matches no module", "layer*.9")


def test_alias_of_a_glob_with_many_matches(model):
    raises_at_construction(model, ValueError, r"alias 'feat' must name one module.*'layer\*' matches 4",
                           {"feat": "layer*"})


def test_bad_types(model):
    raises_at_construction(model, TypeError, r"layers must be a str, a list of str or a dict", 42)
    raises_at_construction(model, TypeError, r"layer names must be str, got int: 3", ["fc", 3])
    raises_at_construction(model, TypeError, r"layer 'fc': channel_dim must be an int, got str: 'x'",
                           "fc", reduce="mean", channel_dim="x")
    raises_at_construction(model, TypeError, r"layer 'fc': k must be an int, got float: 2.5",
                           "fc", reduce="topk", k=2.5)
    raises_at_construction(model, TypeError, r"dtype must be a torch.dtype, got str: 'half'", "fc", dtype="half")
    raises_at_construction(model, TypeError, r"layer 'fc': reduce must be a str, got int: 3", "fc", reduce=3)
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got str"):
        fastcap.capture("resnet", "fc")


def test_empty_layer_list(model):
    raises_at_construction(model, ValueError, r"layers is empty", [])


def test_unknown_reduce_mode(model):
    raises_at_construction(model, ValueError, r"layer 'fc': unknown reduce mode 'median'", "fc", reduce="median")
    raises_at_construction(model, ValueError, r"layer 'layer2': unknown reduce mode 'median'",
                           ["fc", "layer2"], reduce={"layer2": "median"})
    # A language-model mode without tokens= says what it needs.
    raises_at_construction(model, ValueError, r"layer 'layer2': reduce='max' works on tokens: pass tokens=",
                           ["fc", "layer2"], reduce={"layer2": "max"})
    raises_at_construction(model, ValueError, r"reduce=\{'layer9': \.\.\.\} names a layer that is not captured",
                           ["fc"], reduce={"layer9": "mean"})


def test_missing_or_bad_k(model):
    raises_at_construction(model, ValueError, r"layer 'fc': reduce='topk' needs k", "fc", reduce="topk")
    raises_at_construction(model, ValueError, r"layer 'fc': k must be >= 1, got 0", "fc", reduce="topk", k=0)


def test_k_out_of_range_names_layer_and_shape(model):
    raises_in_forward(model, ValueError,
                      r"layer 'layer1': k=65 is out of range for its 64 channels \(output shape \(2, 64, 8, 8\)",
                      torch.randn(2, 3, 32, 32), ["layer1", "layer4"], reduce="topk", k=65)


def test_channel_dim_that_does_not_fit(model):
    raises_in_forward(model, ValueError,
                      r"layer 'layer4': channel_dim=4 does not fit its output of shape \(2, 512, 1, 1\)",
                      torch.randn(2, 3, 32, 32), "layer4", reduce="mean", channel_dim=4)
    raises_in_forward(model, ValueError, r"layer 'fc': channel_dim=0 does not fit its output of shape \(2, 10\)",
                      torch.randn(2, 3, 32, 32), "fc", reduce="topk", k=2, channel_dim=0)


class NoTensor(nn.Module):
    def forward(self, x):
        return ("no", {"tensor": None})


def test_module_output_with_no_tensor():
    model = nn.Sequential(nn.Linear(3, 3), NoTensor())
    raises_in_forward(model, ValueError, r"layer '1': its output tuple\(str, dict\{'tensor': NoneType\}\) holds no tensor",
                      torch.randn(2, 3), ["0", "1"])
    raises_in_forward(model, ValueError, r"layer '1': select=5 does not fit its output", torch.randn(2, 3),
                      "1", select=5)


def test_error_in_forward_keeps_what_was_captured_and_removes_hooks(model):
    # layer4 fails on the first batch, after layer1 was captured. Even when the error is
    # caught inside the with-block, the hooks are gone at once.
    cap = fastcap.capture(model, ["layer1", "layer4"], reduce={"layer1": "mean", "layer4": "mean"},
                          channel_dim={"layer1": 1, "layer4": 4})
    with torch.no_grad(), cap:
        with pytest.raises(ValueError, match=r"layer 'layer4': channel_dim=4"):
            model(torch.randn(2, 3, 32, 32))
        assert hook_count(model) == 0
        model(torch.randn(2, 3, 32, 32))  # runs uncaptured
    assert cap.result()["layer1"].shape == (2, 64)
    assert_clean(model)
