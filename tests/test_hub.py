"""``--push_to_hub`` / ``hf_weyl.recipe.hub.push_folder`` against a local stand-in of the Hub's upload API.

The stand-in (``HubStandIn``) implements the four endpoints ``huggingface_hub`` uses to create a
repo and commit regular (non-LFS) files: ``POST /api/repos/create``, ``POST /api/validate-yaml``
(the README's metadata; the stand-in checks its ``model-index`` shape), ``POST .../preupload/<rev>``
and ``POST .../commit/<rev>`` (ndjson, base64 file contents); every other request is answered 404
and recorded, so an unexpected call fails the test.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_recipes import fresh_accelerate_state, load_recipe, one_thread  # noqa: F401  (autouse fixtures: clean accelerate state, one thread)


def _metadata_errors(readme: str) -> list[str]:
    """What the Hub would reject in a README's YAML header (the parts the recipes write)."""
    import yaml

    if not readme.startswith("---\n"):
        return ["README.md has no YAML metadata header"]
    meta = yaml.safe_load(readme.split("---\n")[1])
    errors = []
    for entry in meta.get("model-index", []):
        for result in entry.get("results", []):
            if not result.get("task", {}).get("type"):
                errors.append("model-index result without task.type")
            if not {"type", "name"} <= set(result.get("dataset", {})):
                errors.append("model-index result without dataset.type/name")
            for metric in result.get("metrics", []):
                if "type" not in metric or not isinstance(metric.get("value"), (int, float)):
                    errors.append(f"bad metric {metric}")
    return errors


class HubStandIn:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "files": {path: bytes}, "commits": [msg]}
        self.unexpected: list[str] = []
        self.auth_headers: list[str | None] = []
        self.validated: list[list[str]] = []  # errors found in each README.md metadata check
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _json(self, code: int, obj) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_POST(self):
                stand_in.auth_headers.append(self.headers.get("Authorization"))
                body = self._body()
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    req = json.loads(body)
                    repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    if "/" not in repo_id:
                        repo_id = f"stand-in-user/{repo_id}"
                    stand_in.repos.setdefault(repo_id, {"private": req.get("visibility") == "private" or bool(req.get("private")), "files": {}, "commits": []})
                    return self._json(200, {"url": f"{stand_in.url}/{repo_id}", "name": repo_id, "id": repo_id})
                if path == "/api/validate-yaml":
                    errors = _metadata_errors(json.loads(body)["content"])
                    stand_in.validated.append(errors)
                    return self._json(400 if errors else 200, {"errors": [{"message": e} for e in errors], "warnings": []})
                if path.startswith("/api/models/") and "/preupload/" in path:
                    files = json.loads(body)["files"]
                    return self._json(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
                    ]})
                if path.startswith("/api/models/") and "/commit/" in path:
                    repo_id = path[len("/api/models/"):].split("/commit/")[0]
                    if repo_id not in stand_in.repos:
                        return self._json(404, {"error": f"Repository {repo_id} not found"})
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    repo = stand_in.repos[repo_id]
                    for item in lines:
                        if item["key"] == "header":
                            repo["commits"].append(item["value"]["summary"])
                        elif item["key"] == "file":
                            repo["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        else:
                            stand_in.unexpected.append(f"commit item {item['key']}")
                    oid = f"{len(repo['commits']):040x}"
                    return self._json(200, {"commitUrl": f"{stand_in.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                                            "success": True})
                stand_in.unexpected.append(f"POST {self.path}")
                return self._json(404, {"error": "not implemented by the stand-in"})

            def do_GET(self):
                stand_in.unexpected.append(f"GET {self.path}")
                return self._json(404, {"error": "not implemented by the stand-in"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "HubStandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub_stand_in(monkeypatch):
    # huggingface_hub >= 2.x fetches an "agent harnesses" registry from ENDPOINT on its first request in a process
    # (unless cached in HF_HOME within a day): with ENDPOINT pointed at the stand-in that GET would be recorded as
    # unexpected, depending on test order and the cache. Start every test with the in-process registry resolved.
    try:
        from huggingface_hub.utils import _detect_agent
    except ImportError:  # older huggingface_hub: no agent detection
        pass
    else:
        monkeypatch.setattr(_detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}}, raising=False)
    with HubStandIn() as stand_in:
        yield stand_in


def _fake_output_folder(root: Path) -> Path:
    out = root / "run"
    (out / "plots").mkdir(parents=True)
    (out / "checkpoints" / "step_2").mkdir(parents=True)
    (out / "README.md").write_text("---\ntags:\n- adamw_weyl\n---\n# card\n")
    (out / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (out / "config.json").write_text('{"model_type": "gpt2"}')
    (out / "plots" / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n fake")
    (out / "checkpoints" / "step_2" / "optimizer.bin").write_bytes(b"state")
    return out


def test_push_folder_uploads_everything_but_checkpoints(tmp_path, hub_stand_in, monkeypatch):
    from huggingface_hub import constants

    from hf_weyl.recipe.hub import push_folder

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    out = _fake_output_folder(tmp_path)
    url = push_folder(out, "me/tiny-model", token="hf_test_token", private=True, endpoint=hub_stand_in.url)

    assert url == f"{hub_stand_in.url}/me/tiny-model"
    repo = hub_stand_in.repos["me/tiny-model"]
    assert repo["private"] is True
    assert set(repo["files"]) == {"README.md", "model.safetensors", "config.json", "plots/loss.png"}
    for name, content in repo["files"].items():
        assert content == (out / name).read_bytes(), name
    assert repo["commits"] and "AdamW²" in repo["commits"][0]
    assert set(hub_stand_in.auth_headers) == {"Bearer hf_test_token"}
    assert hub_stand_in.validated == [[]]
    assert hub_stand_in.unexpected == []


def test_push_folder_refuses_a_folder_without_card(tmp_path, hub_stand_in):
    from hf_weyl.recipe.hub import push_folder

    with pytest.raises(FileNotFoundError, match="README.md"):
        push_folder(tmp_path, "me/x", endpoint=hub_stand_in.url)
    assert hub_stand_in.repos == {}


def test_recipe_push_to_hub_uploads_the_run_folder(tmp_path, hub_stand_in, monkeypatch, capsys):
    """``--push_to_hub`` at the end of a recipe run: the Hub-ready folder arrives, checkpoints do not."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub_stand_in.url)
    out = tmp_path / "gpt2-tiny"
    load_recipe("pretrain_gpt2_openwebtext").main([
        "--preset", "tiny", "--output_dir", str(out), "--max_train_steps", "2", "--eval_steps", "2",
        "--max_eval_batches", "1", "--checkpointing_steps", "2", "--push_to_hub", "--hub_model_id", "me/gpt2-tiny",
        "--hub_token", "hf_secret",
    ])
    repo = hub_stand_in.repos["me/gpt2-tiny"]
    expected = {"README.md", "model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "all_results.json", "train_log.json", "plots/loss.png", "plots/cap.png"}
    assert expected <= set(repo["files"])
    assert not any(name.startswith("checkpoints/") for name in repo["files"])
    for name in expected:
        assert repo["files"][name] == (out / name).read_bytes(), name
    assert b"adamw_weyl" in repo["files"]["README.md"] and b"model-index" in repo["files"]["README.md"]
    assert b"hf_secret" not in repo["files"]["README.md"]  # the token never lands in the reproduce command
    assert hub_stand_in.validated == [[]]
    assert hub_stand_in.unexpected == []
    assert f"Pushed to {hub_stand_in.url}/me/gpt2-tiny" in capsys.readouterr().out


def test_push_folder_refuses_a_diverged_run(tmp_path, hub_stand_in, monkeypatch):
    """``all_results.json`` with a NaN (a diverged run): nothing is created or uploaded, one line says why."""
    from huggingface_hub import constants

    from hf_weyl.recipe.errors import UserError
    from hf_weyl.recipe.hub import push_folder

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    out = _fake_output_folder(tmp_path)
    (out / "all_results.json").write_text(json.dumps({"eval_loss": float("nan"), "perplexity": float("inf"), "step": 2}))
    with pytest.raises(UserError, match=r"not pushing .*: training diverged \(eval_loss is nan, perplexity is inf\)"):
        push_folder(out, "me/x", endpoint=hub_stand_in.url)
    assert hub_stand_in.repos == {}
    (out / "all_results.json").write_text(json.dumps({"eval_loss": 1.5, "step": 2, "tau": None}))
    push_folder(out, "me/x", endpoint=hub_stand_in.url)  # finite: pushed
    assert "all_results.json" in hub_stand_in.repos["me/x"]["files"]


def test_recipe_push_to_hub_refuses_a_diverged_run_and_keeps_its_folder(tmp_path, hub_stand_in, monkeypatch, capsys):
    """lr 1e30 with AdamW: NaN. The run ends with one line and exit code 2; the folder (card: diverged) stays, the
    repository (created at start-up) gets no file."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub_stand_in.url)
    out = tmp_path / "gpt2-nan"
    with pytest.raises(SystemExit) as exc:
        load_recipe("pretrain_gpt2_openwebtext").main([
            "--preset", "tiny", "--output_dir", str(out), "--optimizer", "adamw", "--learning_rate", "1e30",
            "--max_train_steps", "2", "--eval_steps", "2", "--max_eval_batches", "1", "--push_to_hub",
            "--hub_model_id", "me/gpt2-nan"])
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == [f"pretrain_gpt2_openwebtext.py: error: --push_to_hub: not pushing '{out}': training diverged "
                      "(eval_loss is nan, perplexity is nan, train_loss is nan), and a Hub repository must not report "
                      "that as a result; the folder is kept as it is (its model card says diverged); train again, e.g. "
                      "from an earlier checkpoint with a lower --learning_rate"]
    assert hub_stand_in.repos["me/gpt2-nan"]["files"] == {} and hub_stand_in.repos["me/gpt2-nan"]["commits"] == []
    assert (out / "model.safetensors").is_file() and "Training diverged" in (out / "README.md").read_text()
