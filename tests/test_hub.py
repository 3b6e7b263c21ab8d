"""Push to the Hub against a local fake Hub (127.0.0.1 only), and the model card's content.

The fake implements the endpoints huggingface_hub's create_repo + create_branch + upload_folder use when
hf_xet is off (HF_HUB_DISABLE_XET): /api/repos/create, /api/validate-yaml, preupload (answering
"regular" for every file, so contents travel base64 inside the commit) and commit (NDJSON).
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import wq
from wq.hub import HubPushError, model_card, push_to_hub


class FakeHub:
    def __init__(self, fail_commit: bool = False):
        self.repos: dict[str, dict] = {}  # repo_id -> {"private", "branches": {rev: {path: bytes}}}
        self.requests: list[tuple[str, str]] = []
        self.fail_commit = fail_commit
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, code: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                self._send(404, {"error": "not implemented in the fake hub"})

            def do_POST(self):
                path = self.path.split("?")[0]
                hub.requests.append(("POST", path))
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                base = f"http://127.0.0.1:{self.server.server_address[1]}"
                if path == "/api/repos/create":
                    req = json.loads(body)
                    rid = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    if rid in hub.repos:
                        return self._send(409, {"error": "You already created this model repo"})
                    hub.repos[rid] = {"private": req.get("visibility") == "private" or req.get("private"),
                                      "branches": {"main": {}}}
                    return self._send(200, {"url": f"{base}/{rid}"})
                if path == "/api/validate-yaml":
                    return self._send(200, {"errors": [], "warnings": []})
                parts = path.split("/")  # /api/models/{org}/{name}/{op}/{rev}
                if len(parts) >= 7 and parts[1] == "api" and parts[2] == "models":
                    rid, op, rev = f"{parts[3]}/{parts[4]}", parts[5], "/".join(parts[6:])
                    if rid not in hub.repos:
                        return self._send(404, {"error": "Repository not found"})
                    if op == "branch":
                        hub.repos[rid]["branches"].setdefault(rev, dict(hub.repos[rid]["branches"]["main"]))
                        return self._send(200, {})
                    if op == "preupload":
                        files = json.loads(body)["files"]
                        return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                           "shouldIgnore": False} for f in files]})
                    if op == "commit":
                        if hub.fail_commit:
                            return self._send(500, {"error": "simulated outage"})
                        if rev not in hub.repos[rid]["branches"]:
                            return self._send(404, {"error": f"Invalid rev id: {rev}"})
                        for line in body.decode().splitlines():
                            item = json.loads(line)
                            if item["key"] == "file":
                                v = item["value"]
                                hub.repos[rid]["branches"][rev][v["path"]] = base64.b64decode(v["content"])
                            elif item["key"] != "header":
                                return self._send(400, {"error": f"fake hub does not take {item['key']}"})
                        return self._send(200, {"commitUrl": f"{base}/{rid}/commit/{'a' * 40}",
                                                "commitOid": "a" * 40})
                self._send(404, {"error": f"fake hub: no route {path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def hub_env(monkeypatch):
    """Online, xet off, a dummy token; the server is on loopback only."""
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(c, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")


EVAL = {
    "baseline": {"ppl": {"prideprejudice": {"ppl": 28.5, "nll_sum": 1.0, "tokens": 20480, "seqlen": 512}},
                 "tasks": {"arc_austen": {"acc": 0.61}}},
    "W4G128": {"ppl": {"prideprejudice": {"ppl": 31.2, "nll_sum": 1.0, "tokens": 20480, "seqlen": 512}},
               "tasks": {"arc_austen": {"acc": 0.58}}},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    wq.quantize_model(model, "W4G32", progress=False)
    recipe = wq.QuantConfig(model="HuggingFaceTB/SmolLM2-135M-Instruct", scheme="W4G32", algo="rtn",
                            format=["gptq"])
    out = tmp_path_factory.mktemp("hub") / "ckpt"
    wq.save(model, out, format="gptq", config=recipe, extra={"eval": EVAL})
    return out


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in d.rglob("*") if p.is_file()}


def test_push_uploads_every_file_and_card(checkpoint, hub_env):
    with FakeHub() as hub:
        url = push_to_hub(checkpoint, "me/tiny-W4G32", private=True, endpoint=hub.url)
    assert url.endswith("me/tiny-W4G32")
    repo = hub.repos["me/tiny-W4G32"]
    assert repo["private"]
    local = _files(checkpoint)
    assert {"config.json", "model.safetensors", "wq.json", "README.md"} <= set(local)
    assert repo["branches"]["main"] == local  # every file, byte for byte
    card = local["README.md"].decode()
    assert "| scheme | `W4G32` |" in card and "| algorithm | `rtn` |" in card
    assert "python -m wq.quantize HuggingFaceTB/SmolLM2-135M-Instruct --scheme W4G32 --algo rtn" in card
    assert "| perplexity prideprejudice (seqlen 512) | 28.5 | 31.2 | +9.47% |" in card
    assert "| arc_austen accuracy | 0.61 | 0.58 | -0.0300 |" in card
    assert "vllm serve me/tiny-W4G32" in card


def test_push_to_branch(checkpoint, hub_env):
    with FakeHub() as hub:
        push_to_hub(checkpoint, "me/tiny-branch", revision="w4", endpoint=hub.url)
    assert "wq.json" in hub.repos["me/tiny-branch"]["branches"]["w4"]
    assert ("POST", "/api/models/me/tiny-branch/branch/w4") in hub.requests


def test_failed_upload_keeps_checkpoint_and_says_how_to_retry(checkpoint, hub_env):
    before = {k: v for k, v in _files(checkpoint).items() if k != "README.md"}
    with FakeHub(fail_commit=True) as hub, pytest.raises(HubPushError) as err:
        push_to_hub(checkpoint, "me/tiny-fail", endpoint=hub.url)
    msg = str(err.value)
    assert "intact" in msg and f"python -m wq.hub {checkpoint} me/tiny-fail" in msg
    after = _files(checkpoint)
    assert all(after[k] == v for k, v in before.items())
    assert wq.load(checkpoint) is not None


def test_offline_refuses_before_any_request(checkpoint, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE"):
        push_to_hub(checkpoint, "me/x", endpoint="http://127.0.0.1:9")


def test_card_front_matter_has_model_index(checkpoint):
    import yaml

    card = model_card(checkpoint, "me/tiny")
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    metrics = front["model-index"][0]["results"][0]["metrics"]
    assert {"type": "perplexity", "name": "perplexity prideprejudice (seqlen 512)", "value": 31.2} in metrics


def test_card_without_eval_says_so(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96)
    model = LlamaForCausalLM(cfg).eval()
    wq.quantize_model(model, "W3G32", progress=False)
    wq.save(model, tmp_path / "o", format=["compressed-tensors", "wq"])
    card = model_card(tmp_path / "o", "me/t")
    assert "Not evaluated" in card
    assert 'subfolder="compressed-tensors"' in card and 'subfolder="wq"' in card
    assert "does not load this checkpoint" in card  # W3 asymmetric: vLLM has no 3-bit zero points
