"""Hub ids wherever a model or tower is named, resolved offline from a Hugging Face cache the test builds.

The cache holds the mini checkpoints in huggingface_hub's layout (`HF_HOME/hub/models--org--name/{blobs, refs,
snapshots/<commit>}`, snapshot files symlinked to blobs). huggingface_hub reads HF_HOME and HF_HUB_OFFLINE at
import, so the loads run in one child process with HF_HUB_OFFLINE=1 and HF_HOME set (`_child`), which reports
back as JSON; each test below checks one part of its report.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llava.hub import HubId, ModelNotFoundError, parse_hub_id, resolve_dir, resolve_file

REPO = Path(__file__).resolve().parents[1]
STUDENT, TEACHER, TOWER, LLM = "tiny-org/llava-student", "tiny-org/llava-teacher", "tiny-org/siglip", "tiny-org/qwen-llm"


def add_to_cache(hf_home: Path, repo_id: str, source: Path, refs: tuple[str, ...] = ("main",)) -> str:
    """Copy the files of `source` into the hub cache under `repo_id` as huggingface_hub lays them out -> commit."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return commit


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tokenizer):
    """HF_HOME with a LLaVA student and teacher, a SigLIP tower and a plain Qwen2 LLM; plus local copies of the
    originals and a projector-only checkpoint (local) whose base LLM and tower are named by hub id."""
    from llava.model.multimodal_encoder.siglip_encoder import load_image_processor
    from llava.tiny.fixtures import mini_llava, save_mini_checkpoint, save_projector_only

    root = tmp_path_factory.mktemp("hub")
    hf_home = root / "hf"
    student = mini_llava(tokenizer, num_layers=1, seed=1)
    teacher = mini_llava(tokenizer, num_layers=2, hidden=48, role="teacher", seed=2)
    teacher.get_model().vision_tower.load_state_dict(student.get_model().vision_tower.state_dict())
    local = {"student": save_mini_checkpoint(student, tokenizer, root / "student"),
             "teacher": save_mini_checkpoint(teacher, tokenizer, root / "teacher")}
    tower = root / "siglip"
    student.get_vision_tower().vision_tower.save_pretrained(tower)
    load_image_processor(student.get_vision_tower().config).save_pretrained(tower)
    student.config.mm_vision_tower, student.config.mm_vision_config = TOWER, None  # the tower only by hub id
    llm, proj = save_projector_only(student, tokenizer, root / "pretrain")
    config = json.loads((llm / "config.json").read_text())  # a plain Qwen2 LLM, as on the hub: no tower of its own
    config = {k: v for k, v in config.items() if not k.startswith("mm_")} | {"model_type": "qwen2"}
    (llm / "config.json").write_text(json.dumps(config))
    local |= {"tower": tower, "llm": llm, "proj": proj}
    add_to_cache(hf_home, STUDENT, local["student"], refs=("main", "v1"))
    add_to_cache(hf_home, TEACHER, local["teacher"])
    add_to_cache(hf_home, TOWER, tower)
    add_to_cache(hf_home, LLM, llm)
    return hf_home, {k: str(v) for k, v in local.items()}


@pytest.fixture(scope="module")
def report(hub, tmp_path_factory):
    """Run `_child` offline against the cache; its JSON report."""
    hf_home, local = hub
    out = tmp_path_factory.mktemp("child") / "report.json"
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
        env.pop(var, None)
    code = f"import test_hub_ids; test_hub_ids._child({json.dumps(local)!r}, {str(out)!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=out.parent, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(out.read_text())


def _child(local_json: str, out: str) -> None:
    """The offline side: every entry point given hub ids; writes {check: result} to `out`."""
    import torch

    from aligntI_patch.arguments import DistillArguments
    from aligntI_patch.distill import check_configs, load_teacher
    from llava.model.builder import load_pretrained_model
    from llava.model.multimodal_encoder.builder import resolve_vision_config
    from llava.model.multimodal_encoder.siglip_encoder import load_image_processor
    from llava.train.arguments import ModelArguments, TrainingArguments
    from llava.train.train import build_model

    local = json.loads(local_json)

    def same(a, b) -> bool:
        sa, sb = a.state_dict(), b.state_dict()
        return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

    def error(fn) -> str:
        try:
            fn()
        except ModelNotFoundError as err:
            return str(err)
        return "no error"

    report = {}
    _, expected, _, _ = load_pretrained_model(local["student"], device="cpu")
    for name in (STUDENT, f"{STUDENT}@v1"):
        tok, model, processor, _ = load_pretrained_model(name, device="cpu")
        report[f"model_path {name}"] = [same(model, expected), processor.size["height"], len(tok)]

    # projector-only checkpoint: the base LLM and the tower (config, weights, image processor) by hub id
    _, on_base, processor, _ = load_pretrained_model(local["proj"], model_base=LLM, device="cpu")
    report["model_base + mm_vision_tower"] = [same(on_base, expected), processor.size["height"]]

    # training: student LLM and --vision_tower by hub id
    train_args = TrainingArguments(output_dir=str(Path(out).parent / "train"), use_cpu=True, report_to="none")
    built = build_model(ModelArguments(model_name_or_path=LLM, vision_tower=TOWER), train_args)
    report["vision_tower"] = [same(built.get_vision_tower(), expected.get_vision_tower()),
                              load_image_processor(TOWER).size["height"]]

    # distillation: check_configs reads both config.json files, load_teacher the teacher
    args = DistillArguments(output_dir=str(Path(out).parent / "distill"), teacher_model_path=TEACHER, use_cpu=True,
                            report_to="none")
    check_configs(args, ModelArguments(model_name_or_path=STUDENT))
    _, teacher = load_teacher(args, torch.device("cpu"))
    _, teacher_expected, _, _ = load_pretrained_model(local["teacher"], device="cpu")
    report["teacher"] = same(teacher, teacher_expected)

    # errors: not in the cache while offline, and a local path that does not exist
    missing = DistillArguments(output_dir=str(Path(out).parent / "d2"), teacher_model_path="tiny-org/not-cached",
                               use_cpu=True, report_to="none")
    report["errors"] = {
        "model_path": error(lambda: load_pretrained_model("tiny-org/not-cached", device="cpu")),
        "revision": error(lambda: load_pretrained_model(f"{STUDENT}@v2", device="cpu")),
        "teacher": error(lambda: check_configs(missing, ModelArguments(model_name_or_path=STUDENT))),
        "tower": error(lambda: resolve_vision_config(_tower_config("google/siglip-not-cached"))),
        "local": error(lambda: load_pretrained_model("./checkpoints/llava-qwen2-tinny", device="cpu")),
    }
    Path(out).write_text(json.dumps(report))


def _tower_config(name: str):
    from types import SimpleNamespace

    return SimpleNamespace(mm_vision_tower=name, mm_vision_config=None)


def test_model_path_by_hub_id_and_revision(report):
    """load_pretrained_model (and every CLI on it: --model-path) from the cache, at main and at a tag."""
    assert report[f"model_path {STUDENT}"] == [True, 32, report[f"model_path {STUDENT}"][2]]
    assert report[f"model_path {STUDENT}@v1"] == report[f"model_path {STUDENT}"]


def test_model_base_and_config_tower_by_hub_id(report):
    """--model-base and a `mm_vision_tower` with no embedded config: config, weights and image processor."""
    assert report["model_base + mm_vision_tower"] == [True, 32]


def test_training_student_and_vision_tower_by_hub_id(report):
    assert report["vision_tower"] == [True, 32]


def test_teacher_by_hub_id(report):
    assert report["teacher"] is True


def test_offline_errors_name_the_argument_and_the_case(report, hub):
    errors = report["errors"]
    cache = str(hub[0] / "hub")
    for key, arg in (("model_path", "--model-path"), ("teacher", "--teacher_model_path"),
                     ("tower", "vision tower (--vision_tower / mm_vision_tower)")):
        assert errors[key].startswith(f"{arg} '"), errors[key]
        assert "is not in the local Hugging Face cache" in errors[key] and cache in errors[key], errors[key]
        assert "HF_HUB_OFFLINE=1" in errors[key] and "hf download" in errors[key], errors[key]
    assert "not-cached" in errors["model_path"] and "siglip-not-cached" in errors["tower"]
    assert "mm_vision_config" in errors["tower"]  # why the tower's own files were needed
    assert "tiny-org/llava-student at revision 'v2' is not in the local" in errors["revision"], errors["revision"]
    assert "hf download tiny-org/llava-student --revision v2" in errors["revision"], errors["revision"]
    assert errors["local"].startswith("--model-path './checkpoints/llava-qwen2-tinny' is not a local directory: ")
    assert "does not exist" in errors["local"] and "cache" not in errors["local"]


# ---- in process: no hub involved -----------------------------------------------------------------------------


def test_what_counts_as_a_hub_id():
    assert parse_hub_id("Qwen/Qwen2-0.5B") == HubId("Qwen/Qwen2-0.5B")
    assert parse_hub_id("google/siglip-so400m-patch14-384@main") == HubId("google/siglip-so400m-patch14-384", "main")
    assert parse_hub_id("org/name@refs/pr/1") == HubId("org/name", "refs/pr/1")
    for path in ("siglip", "./org/name", "../org/name", "/models/org/name", "~/org/name", "a/b/c", "org/name@",
                 "org/na me"):
        assert parse_hub_id(path) is None, path


def test_local_directories_win_and_missing_paths_say_so(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    (tmp_path / "org" / "name" / "config.json").write_text("{}")
    (tmp_path / "checkpoints" / "llava-qwen2-tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_dir("org/name", "--model-path") == "org/name"  # a folder spelled like a hub id is the folder
    assert resolve_file("org/name", "config.json", "--model-path") == os.path.join("org/name", "config.json")
    assert resolve_file("org/name", "preprocessor_config.json", "--x", required=False) is None
    with pytest.raises(ModelNotFoundError, match=r"--x 'org/name' has no preprocessor_config.json"):
        resolve_file("org/name", "preprocessor_config.json", "--x")
    with pytest.raises(ModelNotFoundError, match=r"^--teacher_model_path './checkpoints/llava-qwen2-tinny' is not a "
                                                 r"local directory: .* does not exist \(in .*checkpoints: "
                                                 r"llava-qwen2-tiny\)$"):
        resolve_dir("./checkpoints/llava-qwen2-tinny", "--teacher_model_path")
    with pytest.raises(ModelNotFoundError, match=r"'siglip' is not a local directory.*a hub id is written 'org/name'"):
        resolve_dir("siglip", "--vision_tower")
    shutil.copy(tmp_path / "org" / "name" / "config.json", tmp_path / "file")
    with pytest.raises(ModelNotFoundError, match="'file' is a file, not a local directory"):
        resolve_dir("file", "--model-path")
