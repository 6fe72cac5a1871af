"""Loading a checkpoint never runs code from it: every `.pt` file that we or DeepSpeed read is a weights_only load
under a short allowlist; a file that needs more is refused (naming the file and the global) by resume, export,
evaluate, average and the universal conversion, unless the user passes --trust-checkpoint. Model configs and
tokenizer folders never run custom code.

The attack: a checkpoint file replaced by a pickle whose `__reduce__` writes a marker file. The marker must never
appear unless the user trusted the checkpoint.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_helpers import REPO, cpu_env
from resume_helpers import STEPS, checkpoint, command, losses, overrides, run, shared_run, tail
from torch.serialization import get_unsafe_globals_in_checkpoint

from dist_train.checkpoint import safe_load
from dist_train.checkpoint.client_file import client_payload, load_client_file
from dist_train.checkpoint.rng import set_rng_state
from dist_train.checkpoint.verify import write_files_list
from dist_train.checkpoint.weights import checkpoint_weights
from dist_train.config import ConfigError, ModelConfig
from dist_train.tools import average, evaluate, export

CLIENT, MODEL, OPTIM = "client_rank00000.pt", "mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"
ZERO2 = ("deepspeed.zero_stage=2",)


class Payload:
    """Unpickles by running `code` (through builtins.eval, so the pickle needs no module of this test)."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return eval, (self.code,)


def plant(file: Path, marker: Path, save=torch.save) -> None:
    """Replace `file` by a pickle that writes `marker` when loaded and then returns the original content (kept
    beside the run folder), so that a trusted load goes on to work: the marker is the only effect. `save(obj,
    path)` writes it (default: a torch zip file)."""
    original = marker.parent / "originals" / file.name
    original.parent.mkdir(exist_ok=True)
    file.rename(original)
    save(Payload(f"(__import__('pathlib').Path({str(marker)!r}).write_text('ran'), "
                 f"__import__('torch').load({str(original)!r}, weights_only=False))[1]"), file)


def tampered_copy(reference: Path, out: Path, last_step: int, files: tuple[str, ...]) -> Path:
    """A copy of `reference` whose checkpoints end at `last_step`, with `files` of that checkpoint planted."""
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns("DONE", "metrics.jsonl", "summary.json", "wandb"))
    for ckpt in (out / "checkpoints").glob("step_*"):
        if int(ckpt.name[5:]) > last_step:
            shutil.rmtree(ckpt)
    (out / "checkpoints" / "latest").write_text(f"step_{last_step:08d}\n")
    for name in files:
        plant(checkpoint(out, last_step) / name, out.parent / "MARKER")
    if files:  # the attacker also rewrites the sizes and hashes that a resume verifies (plain JSON)
        write_files_list(checkpoint(out, last_step), {})
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shard_dir):
    """2 processes, ZeRO-2, fp32, checkpoints at steps 2, 4, 6 (the kill test's uninterrupted run)."""
    return shared_run(tmp_path_factory, shard_dir, "zero2_x2", 2, *ZERO2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shard_dir, reference):
    """Real 2-process checkpoints of ZeRO stages 0-3 in fp32 and bf16 (two of them shared with other modules)."""
    short = ("train.max_steps=2",)
    return {"zero0_bf16": shared_run(tmp_path_factory, shard_dir, "zero0_bf16_x2", 2, "deepspeed.zero_stage=0",
                                     "precision=bf16", *short),
            "zero1_bf16": shared_run(tmp_path_factory, shard_dir, "zero1_bf16_x2", 2, "deepspeed.zero_stage=1",
                                     "precision=bf16", *short),
            "zero2_fp32": reference,
            "zero3_fp32": shared_run(tmp_path_factory, shard_dir, "zero3_x2", 2, "deepspeed.zero_stage=3")}


# -- the loader itself -----------------------------------------------------------------------------------------

def test_a_pickle_that_would_run_code_is_refused_naming_file_and_global_and_trust_lifts_it(tmp_path):
    marker, file = tmp_path / "MARKER", tmp_path / "evil.pt"
    torch.save({"weights": Payload(f"__import__('pathlib').Path({str(marker)!r}).write_text('ran')")}, file)
    with pytest.raises(safe_load.UnsafeCheckpointError, match=rf"{file} needs builtins.eval .*--trust-checkpoint"):
        safe_load.safe_load(file)
    with pytest.raises(safe_load.UnsafeCheckpointError, match=rf"{file} needs builtins.eval"):
        safe_load.check_folder(tmp_path)
    with safe_load.checkpoint_reads(), pytest.raises(safe_load.UnsafeCheckpointError):
        torch.load(file, weights_only=False)  # what DeepSpeed calls: forced to weights_only
    assert torch.load is safe_load._torch_load and not marker.exists()  # the guard is gone after the block
    safe_load.safe_load(file, trust=True)
    assert marker.read_text() == "ran"


def test_deepspeeds_own_reads_and_the_universal_conversion_are_weights_only(reference, tmp_path):
    """DeepSpeed's checkpoint engine, zero_to_fp32 and ds_to_universal (in its own process) each refuse the
    planted optimizer file when they read it, without our folder scan in front of them."""
    run_dir = tampered_copy(reference, tmp_path / "run", STEPS, (OPTIM,))
    ckpt, marker = checkpoint(run_dir, STEPS), tmp_path / "MARKER"
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with safe_load.checkpoint_reads():
        with pytest.raises(safe_load.UnsafeCheckpointError, match=rf"{ckpt / OPTIM} needs builtins.eval"):
            TorchCheckpointEngine().load(str(ckpt / OPTIM))
        with pytest.raises(safe_load.UnsafeCheckpointError, match=rf"{ckpt / OPTIM} needs builtins.eval"):
            get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    proc = subprocess.run([sys.executable, "-m", "dist_train.checkpoint.safe_load", "-m",
                           "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt), "--output_folder",
                           str(tmp_path / "universal"), "--inject_missing_state", "--num_extract_workers", "1",
                           "--num_merge_workers", "1"], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{ckpt / OPTIM} needs builtins.eval" in proc.stderr
    assert not marker.exists()


def test_client_files_hold_json_and_tensors_and_restore_the_rng_streams(tmp_path):
    import random

    loader = {"consumed_samples": 24, "seed": 3, "sources": [{"path": "x", "weight": 1.0, "num_tokens": 9}]}
    torch.save(client_payload(loader, world_size=2), tmp_path / "client_rank00000.pt")
    assert get_unsafe_globals_in_checkpoint(tmp_path / "client_rank00000.pt") == []  # no global, not even numpy
    expected = (random.random(), np.random.rand(), torch.rand(1))
    client = load_client_file(tmp_path / "client_rank00000.pt")
    assert client["loader"] == loader and client["world_size"] == 2
    set_rng_state(client["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def write_old_client_file(path: Path) -> None:
    """Rewrite a client file in the format before this change: a pickled dict holding the RNG tuples and arrays."""
    new = load_client_file(path)
    version, mt, gauss = new["rng"]["python"]
    state = new["rng"]["numpy"]
    numpy_legacy = ("MT19937", np.asarray(state["state"]["key"], dtype=np.uint32), state["state"]["pos"],
                    state["has_gauss"], state["gauss"])
    rng = {"python": (version, tuple(mt), gauss), "numpy": numpy_legacy, "torch": new["rng"]["torch"]}
    torch.save({"loader": new["loader"], "rng": rng, "world_size": new["world_size"]}, path)


# -- the tools -------------------------------------------------------------------------------------------------

def tool_runs(run_dir: Path, out: Path, trust: bool) -> dict[str, list[str]]:
    flag = ["--trust-checkpoint"] if trust else []
    return {"export": ["--run", str(run_dir), "--out", str(out / "hf"), *flag],
            "evaluate": ["--run", str(run_dir), "--max-samples", "4", "--unigram-tokens", "1000", *flag],
            "average": ["--run", str(run_dir), "--last", "2", "--out", str(out / "avg"), *flag]}


TOOLS = {"export": export.main, "evaluate": evaluate.main, "average": average.main}


@pytest.mark.slow
@pytest.mark.parametrize("planted", [CLIENT, MODEL, OPTIM])
def test_export_evaluate_and_average_refuse_a_planted_file_naming_it(reference, tmp_path, capsys, planted):
    run_dir = tampered_copy(reference, tmp_path / "run", STEPS, (planted,))
    for tool, argv in tool_runs(run_dir, tmp_path, trust=False).items():
        assert TOOLS[tool](argv) == 2, tool
        err = capsys.readouterr().err
        assert f"{checkpoint(run_dir, STEPS) / planted} needs builtins.eval" in err, (tool, err)
        assert "--trust-checkpoint" in err
    assert not (tmp_path / "MARKER").exists()
    assert not (tmp_path / "hf").exists() and not (tmp_path / "avg").exists()


NOT_A_TORCH_ZIP = {"legacy-torch-save": lambda obj, path: torch.save(obj, path, _use_new_zipfile_serialization=False),
                   "plain-pickle": lambda obj, path: path.write_bytes(pickle.dumps(obj))}  # protocol 4: STACK_GLOBAL


@pytest.mark.slow
@pytest.mark.parametrize("save", sorted(NOT_A_TORCH_ZIP))
def test_a_refusal_names_exactly_the_planted_file_and_its_global(reference, tmp_path, capsys, save):
    """A planted model-states file that is no torch zip: the refusal names it, with the one global it needs, and
    no other file (the clean optimizer files need only allowlisted DeepSpeed classes)."""
    run_dir = tampered_copy(reference, tmp_path / "run", STEPS, ())
    ckpt = checkpoint(run_dir, STEPS)
    plant(ckpt / MODEL, tmp_path / "MARKER", NOT_A_TORCH_ZIP[save])
    write_files_list(ckpt, {})
    with pytest.raises(safe_load.UnsafeCheckpointError) as refused:
        safe_load.check_folder(ckpt)
    assert refused.value.problems == {str(ckpt / MODEL): ["builtins.eval"]}
    assert export.main(["--run", str(run_dir), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    print(err)
    assert f"export: refused to load a checkpoint that could run code when read: {ckpt / MODEL} needs builtins.eval " \
           f"(outside the allowlist" in err
    assert not (tmp_path / "MARKER").exists() and not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_trust_checkpoint_lifts_the_refusal_of_the_tools(reference, tmp_path, capsys):
    run_dir = tampered_copy(reference, tmp_path / "run", STEPS, (MODEL, OPTIM))
    for tool, argv in tool_runs(run_dir, tmp_path, trust=True).items():
        assert TOOLS[tool](argv) == 0, tool
        err = capsys.readouterr().err
        assert f"--trust-checkpoint: loading {checkpoint(run_dir, STEPS) / OPTIM} with pickle" in err, tool
    assert (tmp_path / "MARKER").read_text() == "ran"
    trusted, clean = checkpoint_weights(checkpoint(run_dir, STEPS), trust=True), checkpoint_weights(
        checkpoint(reference, STEPS))
    assert all(torch.equal(trusted.get(n), clean.get(n)) for n in clean.names)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["zero0_bf16", "zero1_bf16", "zero2_fp32", "zero3_fp32"])
def test_every_file_of_zero_0_to_3_fp32_and_bf16_checkpoints_loads_under_the_allowlist(runs, run):
    ckpt = Path(runs[run]) / "checkpoints" / (Path(runs[run]) / "checkpoints" / "latest").read_text().strip()
    files = safe_load.checkpoint_files(ckpt)
    assert len(files) >= 3, files
    assert safe_load.unsafe_files(files) == {}
    with safe_load.checkpoint_reads():
        for file in files:
            torch.load(file, map_location="cpu", weights_only=False)
    weights = checkpoint_weights(ckpt)
    assert all(weights.get(name).isfinite().all() for name in weights.names)
    if run.endswith("_bf16"):  # the fp32 master weights, rounded, are the bf16 weights the module trained with
        module = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
        assert sorted(module) == sorted(weights.names)
        assert all(torch.equal(weights.get(name).to(module[name].dtype), module[name]) for name in module)


# -- resume ----------------------------------------------------------------------------------------------------

def resume(run_dir: Path, shard_dir: Path, *args: str, launcher: str = "torchrun") -> tuple[int, str]:
    """Re-run the reference's command (2 processes) in `run_dir`: it resumes from `latest`."""
    log = run_dir / "train.log"
    rc = run(command(overrides(shard_dir, run_dir, *ZERO2), nproc=2, launcher=launcher, args=args), log)
    return rc, tail(log, 20000)


@pytest.mark.slow
def test_resume_refuses_a_planted_checkpoint_and_trust_checkpoint_lifts_it(reference, shard_dir, tmp_path):
    run_dir = tampered_copy(reference, tmp_path / "run", STEPS - 2, (CLIENT, MODEL, OPTIM))
    ckpt, marker = checkpoint(run_dir, STEPS - 2), tmp_path / "MARKER"
    rc, log = resume(run_dir, shard_dir, launcher="deepspeed")  # torchrun reports every failure as 1
    assert rc == 2, log
    for name in (CLIENT, MODEL, OPTIM):
        assert f"{ckpt / name} needs builtins.eval" in log
    assert not marker.exists()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == ckpt.name

    rc, log = resume(run_dir, shard_dir, "--trust-checkpoint")
    assert rc == 0, log
    assert marker.read_text() == "ran"
    for name in (CLIENT, MODEL, OPTIM):  # the reads themselves went through the guard, which logged them
        assert f"--trust-checkpoint: loading {ckpt / name} with pickle" in log
    ours, theirs = losses(run_dir), losses(reference)
    assert ours == {s: theirs[s] for s in (STEPS - 1, STEPS)}


@pytest.mark.slow
def test_a_checkpoint_in_the_client_format_before_this_change_still_resumes(reference, shard_dir, tmp_path):
    run_dir = tampered_copy(reference, tmp_path / "run", STEPS - 2, ())
    for file in checkpoint(run_dir, STEPS - 2).glob("client_rank*.pt"):
        write_old_client_file(file)
        assert "numpy._core.multiarray._reconstruct" in get_unsafe_globals_in_checkpoint(file)
    write_files_list(checkpoint(run_dir, STEPS - 2), {})  # as the save before this change listed them
    rc, log = resume(run_dir, shard_dir)
    assert rc == 0, log
    assert "--trust-checkpoint" not in log
    ours, theirs = losses(run_dir), losses(reference)
    assert ours == {s: theirs[s] for s in (STEPS - 1, STEPS)}
    a, b = checkpoint_weights(checkpoint(run_dir, STEPS)), checkpoint_weights(checkpoint(reference, STEPS))
    assert all(torch.equal(a.get(n), b.get(n)) for n in b.names)


# -- custom code in model configs and tokenizer folders --------------------------------------------------------

def test_an_hf_config_that_names_custom_code_is_refused_and_never_runs(shard_dir, tmp_path):
    marker = tmp_path / "MARKER"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "custom.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                      "from transformers import LlamaConfig\n"
                                      "class Custom(LlamaConfig):\n    model_type = 'custom_llama'\n")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "custom_llama", "auto_map": {"AutoConfig": "custom.Custom", "AutoModelForCausalLM": "custom.M"},
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "vocab_size": 2048, "max_position_embeddings": 256}))
    from dist_train.model.build import build_model
    from dist_train.model.count import count_params

    cfg = ModelConfig(hf_config=str(folder))
    for build in (build_model, count_params, lambda m: export.hf_config(m, 0)):
        with pytest.raises(ConfigError, match=r"model.hf_config: .*config.json names custom code .*never runs"):
            build(cfg)
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--config",
                           str(REPO / "configs" / "tiny.yaml"), f"data.path={shard_dir}", f"model.hf_config={folder}",
                           f"run.out_dir={tmp_path / 'run'}"], env=cpu_env(), capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "names custom code" in proc.stderr and "trust_remote_code is off" in proc.stderr
    assert not marker.exists()


def test_a_tokenizer_folder_that_names_custom_code_is_refused_and_never_runs(tokenizer_dir, tmp_path):
    from dist_train.formats.errors import FormatError
    from dist_train.formats.tokenizer_folder import load_tokenizer

    marker, folder = tmp_path / "MARKER", tmp_path / "tok"
    shutil.copytree(tokenizer_dir, folder)
    (folder / "custom.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                      "from transformers import PreTrainedTokenizerFast\n"
                                      "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="CustomTokenizer", auto_map={"AutoTokenizer": [None, "custom.CustomTokenizer"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match=r"tokenizer folder .* names custom code .*never runs"):
        load_tokenizer(folder)
    assert not marker.exists()
