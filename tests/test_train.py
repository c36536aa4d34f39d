"""scripts/train.py on CPU under torchrun (2 gloo ranks, context parallel): the loss goes down,
the outputs are written, and a resumed run reaches bitwise the state of an uninterrupted one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

# A tiny model and task: a few seconds per run besides start-up.
TINY = ["--seq-len", "128", "--min-seq-len", "24", "--batch", "8", "--pairs", "2", "--queries", "2",
        "--keys", "4", "--values", "8", "--filler", "8", "--layers", "2", "--hidden", "64", "--heads", "2",
        "--kv-heads", "1", "--intermediate", "128", "--moba-chunk", "16", "--moba-topk", "2",
        "--lr", "1e-2", "--warmup", "1", "--eval-batches", "1"]


def train(*args: str, nproc: int = 2) -> tuple[dict, str]:
    """Run scripts/train.py under torchrun (its own free rendezvous port); return the summary
    (the last line printed) and the whole output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [REPO] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           os.path.join(REPO, "scripts", "train.py"), *TINY, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"train.py failed ({proc.returncode}):\n{out[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), out


# Several train.py runs in one process (start-up, mostly imports, costs more than a tiny run):
# each a fresh process group and fresh torch.compile state (caches and counters).
_RUNS = """
import json, os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "scripts"))
import torch
import train
for argv in json.loads(sys.argv[2]):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    print("[runs] " + json.dumps(train.main(argv)), flush=True)
"""


def train_runs(*argvs: list[str], timeout: float = 300) -> list[dict]:
    """``scripts/train.py`` once per ``argv`` (each after ``TINY``), one after the other in one
    plain ``python`` process (a world of one); return their summaries."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [REPO] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    cmd = [sys.executable, "-c", _RUNS, REPO, json.dumps([[*TINY, *argv] for argv in argvs])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = [json.loads(line[len("[runs] "):]) for line in proc.stdout.splitlines()
                 if line.startswith("[runs] ")]
    assert len(summaries) == len(argvs), proc.stdout[-3000:]
    return summaries


def load_checkpoint(path: str, tmp_path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dst = tmp_path / (os.path.basename(path) + ".pt")
    dcp_to_torch_save(path, dst)
    return torch.load(dst, weights_only=False)


def flat(state, prefix=""):
    if isinstance(state, dict):
        for k, v in state.items():
            yield from flat(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], state


def test_train_learns_writes_outputs_and_resumes_exactly(tmp_path):
    full_ckpt, split_ckpt = tmp_path / "ckpt_full", tmp_path / "ckpt_split"
    out_full, out_split = tmp_path / "out_full", tmp_path / "out_split"

    # Uninterrupted: 12 steps, held-out evaluation every 6, checkpoints every 3 and at the end.
    summary, _ = train("--steps", "12", "--eval-every", "6", "--out-dir", str(out_full),
                       "--ckpt-dir", str(full_ckpt), "--ckpt-every", "3")
    assert sorted(os.listdir(full_ckpt)) == [f"step_{n:07d}" for n in (3, 6, 9, 12)]
    rows = json.loads((out_full / "metrics.json").read_text())["rows"]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 12 and summary["steps"] == 12 and summary["cp"] == 2 and summary["dp"] == 1
    # From about log(vocab) = 3.9 nats the loss first falls towards log(values) = 2.1 (the answer is
    # one of the queried key's values), which takes a few steps; later, retrieval takes it lower.
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    assert [r["step"] for r in rows if "eval_acc" in r] == [6, 12]
    assert 0.0 <= summary["eval_acc"] <= 1.0 and summary["tokens_per_s"] > 0
    assert len(summary["peak_mem_gib_per_rank"]) == 2
    for name in ("metrics.csv", "metrics.json", "summary.json", "train_curves.png"):
        assert (out_full / name).stat().st_size > 0, name
    assert (out_full / "train_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out_full / "metrics.csv").read_text().splitlines()[0].startswith("step,loss,eval_loss,eval_acc")

    # Interrupted: a new launch resumes the same 12-step schedule from the step-6 checkpoint (as
    # if the run had died after it) and stops after step 9 (checkpointed).
    split_ckpt.mkdir()
    shutil.copytree(full_ckpt / "step_0000006", split_ckpt / "step_0000006")
    resumed, out = train("--steps", "12", "--stop-after", "9", "--eval-every", "6", "--out-dir",
                         str(out_split), "--ckpt-dir", str(split_ckpt), "--resume")
    assert "resumed at step 6" in out and resumed["steps"] == 9
    rows_split = json.loads((out_split / "metrics.json").read_text())["rows"]
    assert [r["loss"] for r in rows_split] == losses[:9]  # bitwise: steps 7-9 ran after the resume
    assert rows_split[5]["eval_acc"] == rows[5]["eval_acc"]  # step 6's, from the checkpoint
    assert sorted(os.listdir(split_ckpt)) == ["step_0000006", "step_0000009"]

    a = dict(flat(load_checkpoint(str(full_ckpt / "step_0000009"), tmp_path)))
    b = dict(flat(load_checkpoint(str(split_ckpt / "step_0000009"), tmp_path)))
    assert a.keys() == b.keys()
    assert any(k.startswith("model.") for k in a) and any(k.startswith("optim.state") for k in a)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_train_full_attention_data_parallel(tmp_path):
    """--cp 1: two data-parallel replicas without context parallelism, full attention."""
    summary, _ = train("--steps", "2", "--cp", "1", "--attn", "full", "--out-dir", str(tmp_path))
    assert summary["dp"] == 2 and summary["cp"] == 1 and summary["attn"] == "full"
    assert (tmp_path / "train_curves.png").exists()


def test_generate_script_on_train_checkpoints(tmp_path):
    """train.py (one process, a few steps, MoBA and full attention) -> generate.py on both
    checkpoints: the weights load exactly, answers equal the uncached forward's, outputs written."""
    import sys

    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import generate as gen

    small = ["--seq-len", "64", "--batch", "4", "--layers", "1", "--moba-chunk", "8", "--steps", "3",
             "--eval-every", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [REPO] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    ckpts = {attn: tmp_path / f"ckpt_{attn}" for attn in ("moba", "full")}
    train_runs(*([*small, "--attn", attn, "--out-dir", str(tmp_path / f"train_{attn}"), "--ckpt-dir",
                  str(ckpts[attn])] for attn in ckpts))

    # Weights: exactly those saved (DCP converted to a torch.save file independently).
    model, settings, label = gen.load_checkpoint(str(ckpts["moba"]), torch.device("cpu"), torch.float32)
    assert label == "moba 8/2" and settings["seq_len"] == 64
    saved = load_checkpoint(str(ckpts["moba"] / "step_0000003"), tmp_path)["model"]
    for name, p in model.state_dict().items():
        assert torch.equal(p, saved["lm." + name]), name

    # Answers by cached generation equal the argmax of the uncached forward on the same tokens.
    task = gen.task_of(settings, 256)
    ids, _, _ = gen.make_batch(task, 2 * 256, seed=0, split="eval", dp_rank=0, step=0)
    ids = ids.view(2, 256)
    got = gen.answer_by_generation(model, ids, task.n_queries)
    q0 = 256 - 2 * task.n_queries
    seq = ids.clone()
    seq[:, q0 + 1::2] = got  # the model's own answers fed back, as in generation
    with torch.no_grad():
        logits = torch.cat([model(input_ids=seq[i:i + 1], use_cache=False).logits for i in range(2)])
    assert torch.equal(logits[:, q0::2].argmax(-1), got)

    out = tmp_path / "gen"
    cmd = [sys.executable, os.path.join(REPO, "scripts", "generate.py"), "--ckpt", str(ckpts["moba"]),
           "--ckpt", str(ckpts["full"]), "--length-factors", "1,4", "--sequences", "4", "--batch", "2",
           "--out-dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["label"] for r in summary["results"]] == ["moba 8/2", "full"]
    for r in summary["results"]:
        assert [x["length"] for x in r["rows"]] == [64, 256]
        assert all(0.0 <= x["accuracy"] <= 1.0 and x["answers"] == 8 for x in r["rows"])
    assert json.loads((out / "generate_results.json").read_text()) == summary
    assert (out / "generate_results.md").read_text().startswith("| model |")
    assert (out / "generate_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_compile_one_process(tmp_path):
    """--compile on one process (no CP; aot_eager, which builds no C++): every decoder layer is one
    graph (no graph break) and the losses are those of the eager run, with and without activation
    checkpointing (which must stay outside the traced forward: transformers' hub-kernel RMSNorm
    breaks the graph inside a checkpoint region)."""
    small = ["--seq-len", "64", "--batch", "4", "--steps", "3", "--eval-every", "0"]
    compiled_args = ["--compile", "--compile-backend", "aot_eager"]
    extras = {"eager": [], "compiled": compiled_args, "compiled_ckpt": [*compiled_args, "--checkpointing"]}
    summaries = train_runs(*([*small, *extra, "--out-dir", str(tmp_path / name)]
                             for name, extra in extras.items()))
    runs = {}
    for name, summary in zip(extras, summaries):
        rows = json.loads((tmp_path / name / "metrics.json").read_text())["rows"]
        runs[name] = summary, [r["loss"] for r in rows if "loss" in r]
    eager, eager_losses = runs["eager"]
    assert eager["compile"] is None
    for name in ("compiled", "compiled_ckpt"):
        compiled, compiled_losses = runs[name]
        assert compiled["compile"] == "aot_eager" and compiled["graph_breaks"] == 0, name
        assert len(compiled_losses) == 3
        assert max(abs(a - b) for a, b in zip(compiled_losses, eager_losses)) <= 1e-5, (name, compiled_losses,
                                                                                        eager_losses)


def test_chunked_mlp_is_the_same_function_with_the_same_gradients():
    """train.py --mlp-chunk: a Llama MLP run in checkpointed chunks along the sequence gives the
    unchunked output and gradients (float64), and keeps its parameter names."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    from train_mlp import chunk_mlps
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = LlamaMLP(cfg).double()

    chunked, plain = Layer(), Layer()
    plain.load_state_dict(chunked.state_dict())
    chunk_mlps([chunked], 7)
    assert list(chunked.state_dict()) == list(plain.state_dict())
    x = torch.randn(1, 50, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(1, 50, 16, dtype=torch.float64)
    y, y_ref = chunked.mlp(x), plain.mlp(x)
    assert (y - y_ref).abs().max() < 1e-12
    grads = torch.autograd.grad(y, [x, *chunked.parameters()], g)
    ref = torch.autograd.grad(y_ref, [x, *plain.parameters()], g)
    for a, b in zip(grads, ref):
        assert (a - b).abs().max() < 1e-12
