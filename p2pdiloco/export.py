"""From a checkpoint to a Hugging Face model folder, and text sampled from either.

A peer's checkpoint (``checkpoint.pt``, see :mod:`p2pdiloco.checkpoint`) holds the global
parameters as one flat fp32 vector, the run config they were trained with and the tokenizer's
files. :func:`export_checkpoint` turns it into a folder that plain ``transformers`` loads offline::

    model = AutoModelForCausalLM.from_pretrained(OUTDIR)
    tokenizer = AutoTokenizer.from_pretrained(OUTDIR)

Steps: read and check the file (:func:`read_checkpoint`: a p2pdiloco checkpoint, its config, its
state digest), build the Llama of its ``run.model`` and load the *global* parameters into it
(:func:`global_model`; the inner, peer-local parameters are not in a checkpoint and would not be
the run's model anyway), then :func:`save_hf_folder`: weights, ``config.json``,
``generation_config.json`` and the tokenizer, written to a temporary folder beside ``OUTDIR`` and
renamed into place, so ``OUTDIR`` is either absent, the previous export, or complete.

Checkpoints saved before the config and tokenizer were embedded need the recipe they were trained
with (``--config``; its fingerprint must match) and take the tokenizer from the local cache.

:func:`load_for_sampling` and :func:`generate` back ``p2pdiloco sample``: they accept a checkpoint
or an exported folder.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch

from p2pdiloco import checkpoint
from p2pdiloco.errors import CheckpointError, ConfigError, ExportError

# The sampling defaults written into generation_config.json (what `model.generate()` uses when
# given no options) and used by `p2pdiloco sample`.
TEMPERATURE = 0.8
TOP_K = 50
MODEL_MARKER = "config.json"  # a folder holding it is a model folder (an earlier export)


@dataclasses.dataclass
class LoadedCheckpoint:
    """A checked checkpoint: its file, the model and data sections it was trained with, its state."""

    path: Path
    model_cfg: Any  # p2pdiloco.config.ModelConfig
    data_cfg: Any  # p2pdiloco.config.DataConfig, for a tokenizer the checkpoint does not carry
    state: dict

    @property
    def epoch(self) -> int:
        return int(self.state["epoch"])

    @property
    def run_name(self) -> str | None:
        return (self.state.get("config") or {}).get("name")


def checkpoint_file(path: str | Path) -> Path:
    """The ``checkpoint.pt`` meant by ``path``: the file itself, or the one in that folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        file = path / checkpoint.FILENAME
        if not file.is_file():
            raise CheckpointError(f"{path} holds no {checkpoint.FILENAME}: give the folder a peer saved with "
                                  f"--checkpoint-dir (simulate: OUT/checkpoint), or the file itself")
        return file
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: give a checkpoint folder (join --checkpoint-dir, "
                              f"simulate's OUT/checkpoint, a coordinator's --backup-dir) or its {checkpoint.FILENAME}")
    return path


def read_checkpoint(path: str | Path, recipe: str | None = None, overrides: list[str] | None = None) -> LoadedCheckpoint:
    """Read and check a checkpoint (folder or file) for export.

    ``recipe`` (a TOML file or bundled name, with ``overrides``) is only needed for checkpoints that
    carry no run config; if given for one that does, it must be the same run config.
    """
    from pydantic import ValidationError

    from p2pdiloco.config import DataConfig, ModelConfig, load_recipe

    file = checkpoint_file(path)
    state = checkpoint.read(file)
    saved = state.get("config")
    if recipe is not None:
        run = load_recipe(recipe, overrides).run
        if run.fingerprint() != state.get("fingerprint"):
            raise ConfigError(f"--config {recipe} is not the run config of checkpoint {file} (fingerprint "
                              f"{run.fingerprint()}, the checkpoint's {state.get('fingerprint')}): give the recipe "
                              f"and --set overrides it was trained with" + (", or no --config" if saved else ""))
        model_cfg, data_cfg = run.model, run.data
    elif isinstance(saved, dict):
        # Only the sections export needs are validated, not the whole RunConfig: a newer p2pdiloco
        # may add or drop swarm-wide settings without making older checkpoints unexportable.
        try:
            model_cfg = ModelConfig.model_validate(saved.get("model", {}))
            data_cfg = DataConfig.model_validate(saved.get("data", {}))
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise CheckpointError(f"checkpoint {file} holds a run config this version cannot use ({where}: "
                                  f"{first['msg']}): pass --config with the recipe it was trained with") from None
    else:
        raise CheckpointError(f"checkpoint {file} carries no run config (saved by an older p2pdiloco): pass "
                              f"--config with the recipe it was trained with (and its --set overrides)")
    _check_state(file, state)
    return LoadedCheckpoint(file, model_cfg, data_cfg, state)


def _check_state(file: Path, state: dict) -> None:
    """The global state's tensors are well formed and match the digest saved with them."""
    from p2pdiloco.outer import state_digest

    params = state.get("params")
    if not isinstance(params, torch.Tensor) or params.ndim != 1 or params.dtype != torch.float32:
        raise CheckpointError(f"checkpoint {file} has no global parameters (a malformed 'params'): restore a copy")
    tensors = [params, state.get("momentum")] + ([state["buffer"]] if state.get("buffer") is not None else [])
    if not all(isinstance(t, torch.Tensor) and t.shape == params.shape for t in tensors):
        raise CheckpointError(f"checkpoint {file} has a malformed outer state: restore a copy")
    if not isinstance(state.get("epoch"), int) or state_digest(state["epoch"], *tensors, pending=state.get("pending", 0)) != state.get("state_hash"):
        raise CheckpointError(f"checkpoint {file} does not match its digest (damaged?): restore a copy")


def global_model(loaded: LoadedCheckpoint):
    """The run's ``LlamaForCausalLM`` holding the checkpoint's global parameters, in eval mode (CPU)."""
    from p2pdiloco.model import build_model, count_parameters
    from p2pdiloco.outer import load_flat_parameters

    model = build_model(loaded.model_cfg)
    size = count_parameters(model)
    if loaded.state["params"].numel() != size:
        raise CheckpointError(f"checkpoint {loaded.path} holds {loaded.state['params'].numel()} parameters but its "
                              f"model config builds {size}: pass --config with the recipe it was trained with")
    load_flat_parameters(model, loaded.state["params"])
    return model.eval()


def checkpoint_tokenizer(loaded: LoadedCheckpoint, cache_dir: str | Path | None = None):
    """The run's tokenizer: the files embedded in the checkpoint, else the local cache's (built
    there from the run's data config if missing, as ``join`` would)."""
    from transformers import PreTrainedTokenizerFast

    files = loaded.state.get("tokenizer")
    if isinstance(files, dict) and files:
        with tempfile.TemporaryDirectory(prefix="p2pdiloco-tokenizer-") as tmp:
            for name, text in files.items():
                if Path(name).name != name:  # names come from a file: never write outside tmp
                    raise CheckpointError(f"checkpoint {loaded.path} has a malformed tokenizer: restore a copy")
                Path(tmp, name).write_text(text, encoding="utf-8")
            tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp)
    else:
        from p2pdiloco import corpus
        from p2pdiloco.config import PeerConfig

        cache = Path(cache_dir if cache_dir is not None else PeerConfig().cache_dir).expanduser()
        tokenizer = corpus.load_tokenizer(loaded.data_cfg, loaded.model_cfg.vocab_size, cache)
    if len(tokenizer) > loaded.model_cfg.vocab_size:
        raise CheckpointError(f"the tokenizer of checkpoint {loaded.path} has {len(tokenizer)} tokens, more than the "
                              f"model's {loaded.model_cfg.vocab_size}: pass --config with the recipe it was trained with")
    return tokenizer


# ----------------------------------------------------------------------------- writing the folder


def _is_model_folder(path: Path) -> bool:
    return (path / MODEL_MARKER).is_file()


def check_outdir(outdir: Path, force: bool) -> None:
    """Refuse an ``outdir`` whose contents an export would destroy.

    New or empty: fine. An earlier export: replaced only with ``force``. Anything else: never, so
    that a mistyped path cannot wipe a folder of other files.
    """
    outdir = Path(outdir).expanduser()
    if outdir.exists() and not outdir.is_dir():
        raise ExportError(f"{outdir} is a file: give a folder for the model")
    if not outdir.is_dir() or not any(outdir.iterdir()):
        return
    if not _is_model_folder(outdir):
        raise ExportError(f"{outdir} is not empty and holds no earlier model export (no {MODEL_MARKER}): give a new "
                          f"or empty folder")
    if not force:
        raise ExportError(f"{outdir} already holds a model: give a new folder, or pass --force to replace it")


def save_hf_folder(model, tokenizer, outdir: Path, *, force: bool = False) -> Path:
    """Write ``model`` and ``tokenizer`` as a Hugging Face folder at ``outdir``, atomically.

    The exported ``config.json`` turns the KV cache on (training keeps it off) and names the
    tokenizer's EOS/pad tokens, and ``generation_config.json`` samples by default, so that
    ``model.generate()`` is useful as loaded. ``model`` itself is left as it was.
    """
    from transformers import GenerationConfig

    outdir = Path(outdir).expanduser()
    check_outdir(outdir, force)
    outdir.parent.mkdir(parents=True, exist_ok=True)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    changed = dict(use_cache=True, eos_token_id=eos, pad_token_id=pad)
    before = {key: getattr(model.config, key, None) for key in changed}
    generation_before = model.generation_config
    tmp = outdir.with_name(f".{outdir.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()  # not mkdtemp: its mode 0700 would become the export's, where mkdir honours the umask
    try:
        for key, value in changed.items():
            setattr(model.config, key, value)
        model.generation_config = GenerationConfig(do_sample=True, temperature=TEMPERATURE, top_k=TOP_K,
                                                   eos_token_id=eos, pad_token_id=pad)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        umask = os.umask(0)
        os.umask(umask)
        for file in tmp.iterdir():  # durable before the rename makes them visible
            file.chmod(0o666 & ~umask)  # safetensors writes its file 0600; the export is for sharing
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        _move_into_place(tmp, outdir)
    finally:
        for key, value in before.items():
            setattr(model.config, key, value)
        model.generation_config = generation_before
        shutil.rmtree(tmp, ignore_errors=True)
    return outdir


def _move_into_place(tmp: Path, outdir: Path) -> None:
    """Rename the finished ``tmp`` to ``outdir``; an earlier ``outdir`` is set aside first and
    deleted last, so a crash in between leaves it (hidden, ``.NAME.old-PID``) rather than nothing."""
    old = None
    if outdir.exists():
        old = outdir.with_name(f".{outdir.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(outdir, old)
    os.rename(tmp, outdir)
    dir_fd = os.open(outdir.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(source: str | Path, outdir: str | Path, *, force: bool = False, cache_dir: str | Path | None = None,
                      recipe: str | None = None, overrides: list[str] | None = None) -> dict:
    """``p2pdiloco export``: the checkpoint at ``source`` as a Hugging Face folder at ``outdir``.
    Returns what was exported (epoch, run name, parameter count, folder)."""
    outdir = Path(outdir).expanduser()
    check_outdir(outdir, force)  # before the work, not after it
    loaded = read_checkpoint(source, recipe, overrides)
    model = global_model(loaded)
    save_hf_folder(model, checkpoint_tokenizer(loaded, cache_dir), outdir, force=force)
    return dict(epoch=loaded.epoch, run=loaded.run_name, parameters=int(loaded.state["params"].numel()),
                checkpoint=str(loaded.path), outdir=str(outdir))


# ----------------------------------------------------------------------------- sampling


def resolve_device(name: str) -> torch.device:
    """``--device``: ``auto`` is the first CUDA GPU if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ExportError(f"--device {name} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExportError(f"--device {name} but no CUDA GPU is visible: use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ExportError(f"--device {name} but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def load_for_sampling(source: str | Path, *, device: torch.device, cache_dir: str | Path | None = None,
                      recipe: str | None = None, overrides: list[str] | None = None):
    """``(model, tokenizer)`` from an exported folder (it has a ``config.json``) or a checkpoint."""
    path = Path(source).expanduser()
    if path.is_dir() and _is_model_folder(path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            model = AutoModelForCausalLM.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as e:  # noqa: BLE001 - any loader failure has the same fix
            raise ExportError(f"could not load the model folder {path} ({type(e).__name__}): give a folder written by "
                              f"p2pdiloco export, or a checkpoint") from None
    else:
        loaded = read_checkpoint(path, recipe, overrides)
        model, tokenizer = global_model(loaded), checkpoint_tokenizer(loaded, cache_dir)
        model.config.use_cache = True  # generation, not training
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float = TEMPERATURE,
             top_k: int = TOP_K, seed: int = 0) -> list[str]:
    """Each prompt followed by up to ``max_new_tokens`` sampled tokens, as text.

    ``temperature`` 0 decodes greedily; ``top_k`` 0 samples from the whole vocabulary. An empty
    prompt starts from the end-of-text token, i.e. at the start of a document. Generation stops at
    end-of-text or at the model's context length (``max_seq_len``: it was never trained beyond).
    """
    device = next(model.parameters()).device
    context = model.config.max_position_embeddings
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)  # also seeds every CUDA device
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k) if temperature > 0 else dict(do_sample=False)
    texts = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        start = 0
        if not ids:
            if eos is None:
                raise ExportError("an empty --prompt needs a tokenizer with an end-of-text token: give a prompt")
            ids, start = [eos], 1
        if len(ids) >= context:
            raise ExportError(f"the prompt is {len(ids)} tokens but the model's context is {context}: shorten it")
        input_ids = torch.tensor([ids], device=device)
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=min(max_new_tokens, context - len(ids)),
                             eos_token_id=eos, pad_token_id=pad, **sampling)
        texts.append(tokenizer.decode(out[0, start:].tolist(), skip_special_tokens=True))
    return texts
