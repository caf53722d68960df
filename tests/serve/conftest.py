"""Fixtures of the serving tests: a tiny random Llama with eight adapters saved to a temporary folder (by fastpeft
and by PEFT), the real `fastpeft serve` in a subprocess on a free localhost port, and offline references
(model.generate with only the request's adapter active)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import fastpeft as fp  # noqa: E402
from fastpeft.serve import tiny  # noqa: E402

CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=32768)  # long requests outlive a test
ADAPTERS = {  # name -> (how it is made, config); the IA3 ones first, so the LoRA checkpoints load into layers an
    # IA3 adapter already wraps (the IA3 layer then wraps the LoRA layer)
    "ia3": ("fastpeft", lambda: fp.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                             feedforward_modules=["down_proj"])),
    "peft_ia3": ("peft_ia3", None),
    "lora1": ("fastpeft", lambda: fp.LoRAConfig(r=1, target_modules=["q_proj"])),
    "lora4": ("fastpeft", lambda: fp.LoRAConfig(r=4, target_modules="all-linear")),
    "lora16": ("fastpeft", lambda: fp.LoRAConfig(r=16, target_modules=["q_proj", "o_proj", "down_proj"])),
    "rslora": ("fastpeft", lambda: fp.LoRAConfig(r=8, target_modules=["k_proj", "up_proj"], use_rslora=True)),
    "dora": ("fastpeft", lambda: fp.LoRAConfig(r=4, target_modules=["q_proj", "gate_proj"], use_dora=True)),
    "peft_lora": ("peft", None),
}


def _randomize(model, name: str, seed: int) -> None:
    """Non-zero adapter weights (IA3 vectors around 1), so every adapter changes the answers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(f".{name}"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "ia3" in pname else 0.0))


def _peft_adapter(model_dir: str, directory: str, kind: str) -> None:
    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    if kind == "peft":
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                 init_lora_weights=False)
    else:
        config = peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                init_ia3_weights=False)
    model = peft.get_peft_model(base, config)
    model.save_pretrained(directory)


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> dict:
    """{"model": folder, "adapters": {name: folder}}: the tiny model, its tokenizer and eight adapters."""
    root = tmp_path_factory.mktemp("serve")
    model_dir = str(root / "tiny")
    model = tiny.build_model(seed=0, **CONFIG)
    model.save_pretrained(model_dir)
    tiny.byte_tokenizer().save_pretrained(model_dir)
    adapters = {}
    for i, (name, (kind, make)) in enumerate(ADAPTERS.items()):
        directory = adapters[name] = str(root / "adapters" / name)
        if kind == "fastpeft":
            fp.add_adapter(model, name, make())
            _randomize(model, name, seed=10 + i)
            fp.save_adapter(model, directory, name)
            fp.delete_adapter(model, name)
        else:
            _peft_adapter(model_dir, directory, kind)
    return {"model": model_dir, "adapters": adapters, "root": str(root)}


@pytest.fixture(scope="session")
def reference(served):
    """reference(prompt_ids, adapter or None, max_new_tokens) -> the tokens offline greedy generate gives with only
    that adapter active."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(served["model"]).eval()
    for name, path in served["adapters"].items():
        fp.load_adapter(model, path, name=name)
    model.eval()

    def run(prompt, adapter, max_new_tokens):
        ids = torch.tensor([list(prompt)])
        with contextlib.ExitStack() as stack:
            if adapter in (None, "__base__"):
                stack.enter_context(fp.disable_adapters(model))
            else:
                fp.set_active_adapters(model, adapter)
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, ids.shape[1]:].tolist()
    run.model = model
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`fastpeft serve` in a subprocess; .url, .client (httpx), .stop()."""

    def __init__(self, model_dir: str, adapters: dict[str, str], *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "fastpeft", "serve", "--model", model_dir, "--port", str(self.port),
                "--device", "cpu", *extra]
        for name, path in adapters.items():
            args += ["--adapter", f"{name}={path}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.log = open(os.path.join(os.path.dirname(model_dir), f"server-{self.port}.log"), "w+")
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.client = httpx.Client(base_url=self.url, timeout=60)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fastpeft serve exited with {self.process.returncode}:\n{self.output()}")
            with contextlib.suppress(httpx.TransportError):
                if self.client.get("/health").status_code == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"fastpeft serve did not answer within 90 s:\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-5000:]

    def alive(self) -> bool:
        return self.process.poll() is None and self.client.get("/health").status_code == 200

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="session")
def server(served):
    """The server with all eight adapters loaded."""
    s = Server(served["model"], served["adapters"], "--served-model-name", "tiny")
    yield s
    s.stop()


def encode(text: str) -> list[int]:
    """What the byte tokenizer gives for a prompt: <s> then the UTF-8 bytes."""
    return [256] + list(text.encode("utf-8"))
