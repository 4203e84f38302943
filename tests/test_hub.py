"""Bundles on the Hub: a bundle repo with two LLM types in a pre-filled Hub cache (the layout
huggingface_hub writes), offline; `models push --dry-run`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_af3.errors import OptionsError

from .conftest import ROOT, free_port, noise, run_cli, wait_up

REPO = "acme/af3-tiny-edge"
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def two_bundles(tiny_ckpt, tmp_path_factory):
    from edge_af3.export import export

    root = tmp_path_factory.mktemp("hubb")
    return [export(tiny_ckpt, root / q, quant=q, encoder_precision="fp32", verify=False) for q in ("f32", "q8_0")]


@pytest.fixture(scope="module")
def staged_repo(two_bundles, tmp_path_factory):
    """The repo `models push` would upload, staged by its own code."""
    from edge_af3.hub_publish import card, stage

    out = tmp_path_factory.mktemp("repo")
    root = stage(two_bundles, out)
    (out / "README.md").write_text(card(root, REPO))
    return out


def fill_hub_cache(cache, staged, only=None):
    """`staged`'s files (or `only` of them) as huggingface_hub keeps a downloaded snapshot:
    blobs by hash, the snapshot's files as relative links to them, refs/main."""
    repo = cache / f"models--{REPO.replace('/', '--')}"
    snap = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    for f in sorted(p for p in staged.rglob("*") if p.is_file()):
        rel = f.relative_to(staged).as_posix()
        if only is not None and rel not in only:
            continue
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f.resolve(), blob)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snap


def env_for(tmp_path, cache):
    return {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "EDGE_AF3_CACHE": str(tmp_path / "edge")}


def test_the_repo_lists_both_variants(staged_repo, two_bundles):
    m = json.loads((staged_repo / "manifest.json").read_text())
    assert set(m["variants"]["llm"]) == {"f32", "q8_0"} and set(m["variants"]["encoder"]) == {"fp32"}
    assert {"llm-f32.gguf", "llm-q8_0.gguf", "encoder.onnx", "manifest.json", "README.md"} <= {
        p.name for p in staged_repo.iterdir()
    }
    assert set(m["files"]) == {
        n
        for n in (p.relative_to(staged_repo).as_posix() for p in staged_repo.rglob("*"))
        if n not in ("manifest.json", "README.md")
    }


def test_pull_takes_one_variant_and_never_the_others_files(staged_repo, tmp_path):
    """Only the q8_0 variant's files are in the cache: `models pull REPO --quant q8_0` makes its
    bundle offline (the f32 GGUF is never needed), linking into the Hub cache, and it answers;
    asking for f32 offline says what is missing."""
    from edge_af3.hub import files_for

    m = json.loads((staged_repo / "manifest.json").read_text())
    need = files_for(m, "q8_0", "fp32")
    assert "llm-f32.gguf" not in need and "llm-q8_0.gguf" in need
    cache = tmp_path / "hub"
    fill_hub_cache(cache, staged_repo, only={"manifest.json", *need})
    clip = tmp_path / "c.wav"
    import soundfile as sf

    sf.write(clip, noise(2.0, seed=4), 16000)
    env = env_for(tmp_path, cache)
    res = run_cli("models", "pull", REPO, "--quant", "q8_0", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    made = list((tmp_path / "edge" / "bundles").iterdir())
    assert len(made) == 1 and made[0].name.startswith("hub--acme--af3-tiny-edge-q8_0-fp32-")
    assert os.path.islink(made[0] / "llm-q8_0.gguf") and not (made[0] / "llm-f32.gguf").exists()
    res = run_cli("ask", "-m", str(made[0]), str(clip), "What is it?", "--max-new-tokens", "3", "--json", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["timings"]["audio_tokens"] == 50
    res = run_cli("models", "pull", REPO, "--quant", "f32", env=env)
    assert res.returncode != 0 and "llm-f32.gguf not in the Hub cache" in res.stderr + res.stdout


def test_auto_takes_the_best_that_fits_and_a_tampered_file_is_caught(staged_repo, tmp_path):
    cache = tmp_path / "hub"
    snap = fill_hub_cache(cache, staged_repo)
    env = env_for(tmp_path, cache)
    res = run_cli("models", "pull", REPO, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "LLM f32 (the best that fits)" in res.stderr  # a few MB: the best quality fits anywhere
    gguf = (snap / "llm-q8_0.gguf").resolve()
    data = bytearray(gguf.read_bytes())
    data[-100] ^= 0xFF  # same size, other bytes
    gguf.write_bytes(bytes(data))
    res = run_cli("models", "pull", REPO, "--quant", "q8_0", env=env)
    assert res.returncode != 0 and "does not match its sha256" in res.stderr + res.stdout


def test_push_dry_run_lists_the_files_and_renders_the_card(two_bundles, tmp_path):
    res = run_cli("models", "push", str(two_bundles[0]), REPO, "--also", str(two_bundles[1]), "--dry-run", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(res.stdout)
    assert not r["uploaded"] and {"llm-f32.gguf", "llm-q8_0.gguf", "encoder.onnx", "README.md"} <= set(r["files"])
    assert r["total_bytes"] == sum(r["files"].values())
    card = r["card"]
    assert "**Licence**: the licence of the source checkpoint" in card  # a local folder: said, not invented
    layout = json.loads((two_bundles[0] / "manifest.json").read_text())["encoder"]["attention"]
    assert f"edge-af3 ask -m {REPO}" in card and f"| f32 | fp32 | {layout} |" in card and "| q8_0 | fp32 |" in card
    assert "GiB" in card
    bad = run_cli("models", "push", str(two_bundles[0]), "not-a-repo", "--dry-run")
    assert bad.returncode != 0 and "ORG/NAME" in bad.stderr + bad.stdout


def test_licence_of_a_known_source_is_carried_over():
    from edge_af3.hub_publish import licence

    assert "NVIDIA OneWay Noncommercial" in licence({"source": {"id": "nvidia/audio-flamingo-3-hf"}})


def test_two_encoder_precisions_of_one_llm(two_bundles, tiny_ckpt, tmp_path):
    """An f32 LLM with an fp32 and a mixed encoder: the LLM staged once, the second encoder in its
    own folder; pulling `--encoder-precision mixed` offline gets that encoder and loads."""
    from edge_af3.export import export
    from edge_af3.hub_publish import stage

    mixed = export(tiny_ckpt, tmp_path / "mixed", quant="f32", encoder_precision="mixed", verify=False)
    staged = tmp_path / "repo"
    root = stage([two_bundles[0], mixed], staged)
    assert set(root["variants"]["encoder"]) == {"fp32", "mixed"} and list(root["variants"]["llm"]) == ["f32"]
    assert (staged / "encoder-mixed" / "encoder.onnx").is_file() and (staged / "llm-f32.gguf").is_file()
    cache = tmp_path / "hub"
    fill_hub_cache(cache, staged)
    env = env_for(tmp_path, cache)
    res = run_cli("models", "pull", REPO, "--encoder-precision", "mixed", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    (made,) = (tmp_path / "edge" / "bundles").iterdir()
    m = json.loads((made / "manifest.json").read_text())
    assert m["encoder"] == {**root["variants"]["encoder"]["mixed"]} and m["encoder"]["precision"] == "mixed"
    plan = run_cli("plan", str(made), "--device", "cpu", "--json", env=env)
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert json.loads(plan.stdout)["items"]["encoder weights"] > 0  # the subfolder's encoder counted
    # the same precision in the other attention layout: a different graph, refused, not dropped
    layout = json.loads((two_bundles[0] / "manifest.json").read_text())["encoder"]["attention"]
    other = "batched" if layout == "per-head" else "per-head"
    b = export(
        tiny_ckpt, tmp_path / other, quant="f32", encoder_precision="fp32", encoder_attention=other, verify=False
    )
    with pytest.raises(
        OptionsError, match=f"two bundles hold different fp32 encoders \\(attention {layout} and {other}"
    ):
        stage([two_bundles[0], b], tmp_path / "repo2")


UNITS = [ROOT / "deploy/jetson/edge-af3.service", ROOT / "deploy/jetson/edge-af3-listen.service"]
UNITS.append(ROOT / "deploy/systemd/edge-af3.service")


def _unit(path: Path) -> dict[str, list[str]]:
    """A unit file's `Key=value` lines by key (repeated keys in order), comments and sections left out."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_deploy_units_are_valid_systemd(tmp_path):
    """systemd's own checker on each unit, the venv path pointed at this one's edge-af3 (it checks
    that the program exists): any unknown key, bad value or missing program is printed, so output
    fails the test."""
    exe = Path(sys.executable).parent / "edge-af3"
    assert exe.is_file()
    for unit in UNITS:
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace("/opt/edge-af3/.venv/bin/edge-af3", str(exe)))
        res = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True)
        assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), (unit.name, res.stdout + res.stderr)


def test_jetson_deployment_commands_run_here(staged_repo, tmp_path):
    """What deploy/jetson/ runs — the unit's pull + serve command lines, the compose file's command —
    run on this CPU against a bundle repo in the Hub cache the unit's HF_HOME names, offline: the
    variant is pulled, serve answers over HTTP (the official SDK), and a second start reuses the
    pulled bundle. (No Jetson, no Docker daemon here: the image and the TensorRT build are not run.)"""
    import openai
    import yaml

    unit = _unit(UNITS[0])
    var = tmp_path / "var"
    env = dict(os.environ, HF_HUB_OFFLINE="1", EDGE_AF3_MODEL=REPO)
    for line in unit["Environment"]:
        key, value = line.split("=", 1)
        env[key] = value.replace("/var/lib/edge-af3", str(var))
    env.pop("HF_HUB_CACHE", None)
    fill_hub_cache(Path(env["HF_HOME"]) / "hub", staged_repo)
    port = free_port()

    def argv(line: str) -> list[str]:
        words = line.replace("${EDGE_AF3_MODEL}", REPO).split()
        assert words[0] == "/opt/edge-af3/.venv/bin/edge-af3", line
        return [sys.executable, "-m", "edge_af3", *words[1:]]

    (pre,) = unit["ExecStartPre"]
    res = subprocess.run(argv(pre), capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (made,) = (var / "cache" / "bundles").iterdir()
    serve = argv(unit["ExecStart"][0])
    compose = yaml.safe_load((ROOT / "deploy/jetson/compose.yaml").read_text())
    assert compose["services"]["serve"]["command"] == serve[3:]  # the container runs the same server
    assert compose["services"]["listen"]["command"][:2] == ["listen", "--mic"]
    docker = (ROOT / "deploy/jetson/Dockerfile").read_text()
    assert "ENV EDGE_AF3_CACHE=/data/edge-af3 HF_HOME=/data/huggingface" in docker and "VOLUME /data" in docker
    assert compose["x-edge-af3"]["volumes"] == ["edge-af3-data:/data"]  # caches and engine in the volume
    serve[serve.index("--host") + 1], serve[serve.index("--port") + 1] = "127.0.0.1", str(port)
    for start in (1, 2):
        log = tmp_path / f"serve{start}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(serve, stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            wait_up(proc, f"http://127.0.0.1:{port}/health", 180, lambda: log.read_text()[-2000:])
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
            reply = client.chat.completions.create(
                model=client.models.list().data[0].id,
                messages=[{"role": "user", "content": "Say hi."}],
                max_tokens=3,
                temperature=0,
            )
            assert reply.usage.completion_tokens >= 1
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        assert [p.name for p in (var / "cache" / "bundles").iterdir()] == [made.name]  # no second bundle
    res = subprocess.run(
        [sys.executable, "-m", "edge_af3", *compose["services"]["listen"]["command"], "--help"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-2000:]  # the listen service's options exist
