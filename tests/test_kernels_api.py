"""The functional API at package level: ``from rlhf_engine.kernels import token_logprobs`` and the others."""
import importlib

import pytest

import rlhf_engine.kernels as K


def test_every_export_is_its_modules_function():
    assert K.__all__ == sorted(K._EXPORTS) and len(K.__all__) == 11
    for name, module in K._EXPORTS.items():
        fn = getattr(K, name)
        assert fn is getattr(importlib.import_module(f"rlhf_engine.kernels.{module}"), name)
        assert callable(fn) and fn.__doc__, name
        assert name in dir(K)


def test_from_import_and_unknown_names():
    from rlhf_engine.kernels import flash_attention, ppo_loss_with_grads  # noqa: F401
    from rlhf_engine.kernels import decode_attention  # the module, whose function shares its name

    assert decode_attention.__name__ == "rlhf_engine.kernels.decode_attention"
    assert callable(decode_attention.decode_attention)
    with pytest.raises(AttributeError, match="no_such_kernel"):
        K.no_such_kernel  # noqa: B018
