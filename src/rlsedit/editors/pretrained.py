"""An editor saved on its own, as peft saves an adapter: ``save_pretrained`` / ``from_pretrained``.

A folder holds three files, all safetensors + JSON (nothing is unpickled on load):

* ``editor_config.json`` — the method, its config, the model it was made on (spec, name,
  fingerprint, widths), the edited layers, the context prefixes, the counters, and per kept
  batch its edit ids and diagnostics; the sha256 of the two tensor files;
* ``editor_state.safetensors`` — :meth:`Editor.state_dict`: ``W_0``, ``E[kkᵀ]``, the method's
  state and each edited layer's current ``W``;
* ``editor_history.safetensors`` — each kept batch's ``K`` and ``V`` (``batches.<i>.layers.<l>.K``),
  what :meth:`Editor.undo` needs.

Loading rebuilds the editor on the given base model bit for bit: same weights, same solver
state, so the next ``partial_fit`` gives the same result as it would have without the save.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import InvalidRequestError, StateCorruptError, StateMismatchError
from ..files import atomic_replace, file_sha256
from .record import EditRecord
from .registry import get_editor_class

if TYPE_CHECKING:
    from .base import Editor

FORMAT = "rlsedit-editor"
FORMAT_VERSION = 1
CONFIG_FILE = "editor_config.json"
STATE_FILE = "editor_state.safetensors"
HISTORY_FILE = "editor_history.safetensors"


def _sha256(path: Path) -> str:
    return file_sha256(path)[0]


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # safetensors wants dense, contiguous, unshared CPU tensors
    plain = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    atomic_replace(path, lambda tmp: save_file(plain, str(tmp)))


def save_editor(editor: "Editor", directory: str | os.PathLike) -> Path:
    """Write ``editor`` into ``directory`` (created if needed; its editor files are replaced)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    editor._prepare()
    _write_tensors(directory / STATE_FILE, editor.state_dict())
    history = {f"batches.{i}.{name}": t for i, record in enumerate(editor.history_)
               for name, t in record.tensors.items()}
    _write_tensors(directory / HISTORY_FILE, history)
    lm = editor.lm
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "rlsedit_version": __version__,
        "method": editor.name,
        "config": editor.config.to_dict(),
        "model": {"spec": lm.spec, "name": lm.name, "fingerprint": lm.fingerprint, "d_k": lm.d_k,
                  "d_model": lm.d_model, "n_layers": lm.n_layers},
        "layers": list(editor.layers),
        "prefixes": list(editor.prefixes_),
        "n_edits": editor.n_edits_,
        "n_batches": editor.n_batches_,
        "n_submitted": editor.n_submitted_,
        "keep_history": editor.keep_history,
        "batches": [{"ids": list(r.ids), "info": r.info} for r in editor.history_],
        "live": {edit_id: list(place) for edit_id, place in editor.live_.items()},
        "sha256": {STATE_FILE: _sha256(directory / STATE_FILE), HISTORY_FILE: _sha256(directory / HISTORY_FILE)},
    }
    atomic_replace(directory / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(config, indent=2, sort_keys=True)))
    return directory


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise InvalidRequestError(f"{directory} holds no saved editor ({CONFIG_FILE} is missing)")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateCorruptError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise StateCorruptError(f"{path} is not an rlsedit editor file")
    if config.get("format_version") != FORMAT_VERSION:
        raise StateMismatchError(f"{path} has format version {config.get('format_version')}; this rlsedit reads "
                                 f"{FORMAT_VERSION}")
    for name, want in config.get("sha256", {}).items():
        if not (directory / name).is_file() or _sha256(directory / name) != want:
            raise StateCorruptError(f"{directory / name} is missing or does not match its sha256 in {CONFIG_FILE}")
    return config


def load_editor(lm, directory: str | os.PathLike, *, expected_class: "type[Editor] | None" = None,
                progress: bool = False) -> "Editor":
    """The editor saved in ``directory``, rebuilt on ``lm`` (see the module docstring)."""
    directory = Path(directory)
    config = _read_config(directory)
    editor_cls = get_editor_class(config["method"])
    if expected_class is not None and editor_cls is not expected_class:
        raise StateMismatchError(f"{directory} holds a {config['method']!r} editor, not {expected_class.name!r}; "
                                 f"load it with {editor_cls.__name__}.from_pretrained")
    model = config["model"]
    if model["fingerprint"] != lm.fingerprint:
        raise StateMismatchError(
            f"{directory} was made on model {model['name']!r} (weights {model['fingerprint'][:12]}…), "
            f"not on {lm.name!r} ({lm.fingerprint[:12]}…); load it on the model it was made on")
    try:
        method_config = editor_cls.config_class.from_dict(config["config"])
    except ValueError as exc:
        raise StateCorruptError(f"{directory / CONFIG_FILE}: config: {exc}") from None
    if list(editor_cls.layers_for(lm, method_config)) != config["layers"]:
        raise StateMismatchError(f"{directory}: layers {config['layers']} differ from its config's layers")
    tensors = load_file(str(directory / STATE_FILE))
    moments = ({l: tensors[f"layers.{l}.mom2"] for l in config["layers"]}
               if editor_cls.needs_moments else None)
    editor = editor_cls(lm, method_config, moments=moments, prefixes=config["prefixes"], progress=progress,
                        keep_history=config["keep_history"])
    editor.load_state_dict(tensors, n_edits=config["n_edits"], n_batches=config["n_batches"])
    editor.n_submitted_ = config["n_submitted"]
    history = load_file(str(directory / HISTORY_FILE))
    for i, batch in enumerate(config["batches"]):
        prefix = f"batches.{i}."
        editor.history_.append(EditRecord(ids=tuple(batch["ids"]), info=batch["info"],
                                          tensors={k[len(prefix):]: v for k, v in history.items()
                                                   if k.startswith(prefix)}))
    editor.live_ = {edit_id: (int(b), int(c)) for edit_id, (b, c) in config["live"].items()}
    return editor
