"""Generate with a model trained by scripts/train.py (or an HF model) and measure retrieval by
generation at the training length and beyond it.

    python scripts/generate.py --ckpt runs/ckpt_moba --ckpt runs/ckpt_full --out-dir runs/generate
    python scripts/generate.py --model path/to/hf_model --seq-len 512 --pairs 4 --queries 4 ...

Each ``--ckpt`` is a ``--ckpt-dir`` of train.py (its latest complete checkpoint is used) or one
``step_*`` directory in it: the model settings and the task come from the checkpoint's
``train_state.json``, the weights from its ``torch.distributed.checkpoint`` files, loaded into
one process (no process group). ``--model`` loads ``AutoModelForCausalLM.from_pretrained`` with
``attn_implementation="moba_dist"``; its config must carry the ``moba_*`` fields, and the task
is given by the task options.

Evaluation (``scripts/train_data.py``, ``RetrievalTask``): held-out sequences of ``L = f x
seq_len`` tokens for each factor ``f`` of ``--length-factors`` (default 1, 4, 16: the training
length, and 4x and 16x it, with the same number of pairs and queries, so the pairs sit further
apart). Each sequence is prefilled through its first queried key with a ``MoBACache``; the
model then answers greedily: its answer is fed back, followed by the next queried key, and so
on. Accuracy is the fraction of answers equal to the stored value (chance ``1 / values``).

Outputs in ``--out-dir``: ``generate_results.json`` and ``generate_results.md`` (accuracy, tokens,
seconds per model and length), ``generate_accuracy.png``; the last line printed is the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train import PRESETS, build_model, latest_checkpoint  # noqa: E402
from train_data import RetrievalTask, make_batch  # noqa: E402

_TASK_KEYS = ("seq_len", "pairs", "queries", "keys", "values", "filler")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_argument_group("models (one or more)")
    src.add_argument("--ckpt", action="append", default=[], help="train.py --ckpt-dir, or a step_* dir in it")
    src.add_argument("--model", action="append", default=[], help="HF model directory (from_pretrained)")
    src.add_argument("--label", action="append", default=[], help="names for the models, in order")
    p.add_argument("--out-dir", default="runs/generate")
    p.add_argument("--length-factors", default="1,4,16", help="context lengths as multiples of seq-len")
    p.add_argument("--sequences", type=int, default=16, help="held-out sequences per length")
    p.add_argument("--batch", type=int, default=4, help="sequences generated together")
    p.add_argument("--seed", type=int, default=1234, help="seed of the held-out sequences")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float64"), default=None,
                   help="default: bfloat16 on CUDA, float32 on the CPU")
    task = p.add_argument_group("task (for --model; a checkpoint brings its own)")
    for key in _TASK_KEYS:
        task.add_argument("--" + key.replace("_", "-"), type=int, default=PRESETS["cpu"][key])
    args = p.parse_args(argv)
    if not args.ckpt and not args.model:
        p.error("give at least one --ckpt or --model")
    return args


def task_of(settings: dict, seq_len: int | None = None) -> RetrievalTask:
    return RetrievalTask(seq_len=seq_len or settings["seq_len"], n_pairs=settings["pairs"],
                         n_queries=settings["queries"], n_keys=settings["keys"], n_values=settings["values"],
                         n_filler=settings["filler"])


def load_checkpoint(path: str, device: torch.device, dtype: torch.dtype):
    """``(model, train args, label)`` of a train.py checkpoint, in one process."""
    import torch.distributed.checkpoint as dcp

    step_dir = path if os.path.exists(os.path.join(path, ".metadata")) else latest_checkpoint(path)
    if step_dir is None:
        raise FileNotFoundError(f"no complete checkpoint in {path}")
    with open(os.path.join(step_dir, "train_state.json")) as f:
        saved = argparse.Namespace(**json.load(f)["args"])
    saved.checkpointing = False
    model = build_model(saved, task_of(vars(saved)), torch.device("cpu"))
    # train.py saves get_state_dict(LossModel): the LM's parameters under "model", prefixed "lm.".
    state = {"model": {"lm." + k: v for k, v in model.state_dict().items()}}
    dcp.load(state, checkpoint_id=step_dir, no_dist=True)
    model.load_state_dict({k[3:]: v for k, v in state["model"].items()})
    label = f"{saved.attn}" + (f" {saved.moba_chunk}/{saved.moba_topk}" if saved.attn == "moba" else "")
    return model.to(device=device, dtype=dtype).eval(), vars(saved), label


def load_hf(path: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    import moba_dist.hf

    moba_dist.hf.register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="moba_dist", dtype=dtype)
    return model.to(device).eval(), os.path.basename(os.path.normpath(path))


@torch.no_grad()
def answer_by_generation(model, ids: torch.Tensor, n_queries: int) -> torch.Tensor:
    """Greedy answers ``[B, n_queries]`` to the queries at the end of same-length sequences
    ``ids [B, L]``: prefill through the first queried key, then feed back each answer followed by
    the next queried key (two tokens into the cache per query)."""
    from moba_dist.hf import MoBACache, cache_kwargs

    q0 = ids.shape[1] - 2 * n_queries  # first queried key (train_data.RetrievalTask.sequence)
    cache = MoBACache(model.config, max_cache_len=ids.shape[1])
    ck = cache_kwargs(model, cache)  # cache= or past_key_values=, as the transformers in use
    logits = model(input_ids=ids[:, :q0 + 1], **ck, logits_to_keep=1).logits[:, -1]
    answers = [logits.argmax(-1)]
    for i in range(1, n_queries):
        step = torch.stack([answers[-1], ids[:, q0 + 2 * i]], 1)
        logits = model(input_ids=step, **ck, logits_to_keep=1).logits[:, -1]
        answers.append(logits.argmax(-1))
    return torch.stack(answers, 1)


def evaluate(model, settings: dict, factors: list[int], args, device, bar) -> list[dict]:
    rows = []
    for f in factors:
        task = task_of(settings, f * settings["seq_len"])
        ids, _, _ = make_batch(task, task.seq_len * args.sequences, seed=args.seed, split="eval", dp_rank=0,
                               step=f)
        ids = ids.view(args.sequences, task.seq_len).to(device)
        q0 = task.seq_len - 2 * task.n_queries
        want = ids[:, q0 + 1::2]
        correct, t0 = 0, time.perf_counter()
        for a in range(0, args.sequences, args.batch):
            got = answer_by_generation(model, ids[a:a + args.batch], task.n_queries)
            correct += int((got == want[a:a + args.batch]).sum())
            bar.update(1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rows.append({"factor": f, "length": task.seq_len, "accuracy": correct / want.numel(),
                     "answers": want.numel(), "seconds": round(time.perf_counter() - t0, 3)})
    return rows


def plot(results: list[dict], chance: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.plot([x["length"] for x in r["rows"]], [x["accuracy"] for x in r["rows"]], marker="o",
                label=r["label"])
    ax.axhline(chance, color="grey", linestyle="--", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("retrieval accuracy by generation")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Length generalisation (trained at {results[0]['rows'][0]['length']} tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: list[dict], chance: float) -> str:
    factors = [x["factor"] for x in results[0]["rows"]]
    cols = [f"{f}x ({x['length']})" for f, x in zip(factors, results[0]["rows"])]
    head = "| model | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(factors) + 1)]
    for r in results:
        lines.append(f"| {r['label']} | " + " | ".join(f"{x['accuracy']:.3f}" for x in r["rows"]) + " |")
    return "\n".join(lines) + f"\n\nRetrieval accuracy by greedy generation; chance {chance:.3f}.\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    factors = [int(f) for f in args.length_factors.split(",")]
    sources = [("ckpt", p) for p in args.ckpt] + [("model", p) for p in args.model]
    from tqdm import tqdm

    batches = -(-args.sequences // args.batch)
    bar = tqdm(total=len(sources) * len(factors) * batches, desc="generate", dynamic_ncols=True,
               file=sys.stderr)
    results, chance = [], None
    for i, (kind, path) in enumerate(sources):
        if kind == "ckpt":
            model, settings, label = load_checkpoint(path, device, dtype)
        else:
            model, label = load_hf(path, device, dtype)
            settings = {k: getattr(args, k) for k in _TASK_KEYS}
        if i < len(args.label):
            label = args.label[i]
        chance = task_of(settings).chance
        rows = evaluate(model, settings, factors, args, device, bar)
        results.append({"label": label, "source": path, "seq_len": settings["seq_len"], "rows": rows})
        del model
    bar.close()
    os.makedirs(args.out_dir, exist_ok=True)
    summary = {"results": results, "chance": chance, "device": str(device),
               "dtype": str(dtype).split(".")[-1], "sequences": args.sequences, "seed": args.seed}
    with open(os.path.join(args.out_dir, "generate_results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(args.out_dir, "generate_results.md"), "w") as f:
        f.write(markdown(results, chance))
    plot(results, chance, os.path.join(args.out_dir, "generate_accuracy.png"))
    print(markdown(results, chance), flush=True)
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
