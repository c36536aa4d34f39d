"""Train a small Llama-style model with context-parallel MoBA on a long-context retrieval task.

    torchrun --nproc-per-node=2 scripts/train.py                 # CPU preset: gloo, float32, minutes
    torchrun --nproc-per-node=2 scripts/train.py --preset gpu    # 2 GPUs: NCCL, bf16, 512K tokens

The model is an HF ``LlamaForCausalLM`` built from a config (random init, nothing downloaded)
with ``attn_implementation="moba_dist"``. The task (``train_data.py``) hides key-value pairs in
a long sequence and asks for the values of some keys at the end: the answer sits, on average,
half a sequence back, so a query must find the right block among all past blocks.

Parallelism: the ranks form a DeviceMesh ``(dp, cp)``. The ``cp`` ranks of a data-parallel
replica hold contiguous slices of the same packed batch (``moba_dist.hf.context_parallel``,
``cp.shard``); different replicas train on different batches. Parameters are sharded with
FSDP2 over all ranks; gradients are summed over ``cp`` and averaged over ``dp`` (see
``train_step``).

Outputs in ``--out-dir``: ``metrics.csv`` / ``metrics.json`` (loss, held-out loss and accuracy,
tokens/s, step time, peak memory per step), ``train_curves.png``, ``summary.json``; the last
line printed is the same summary as JSON. Checkpoints (``--ckpt-dir``) are written with
``torch.distributed.checkpoint`` and resumed with ``--resume``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import socket
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from train_data import RetrievalTask, make_batch
from train_log import MetricsLog
from train_loss import chunked_lm_loss, retrieval_counts
from train_mlp import chunk_mlps

PRESETS = {
    # 2 CPU cores, gloo, float32: a few minutes end to end, accuracy far above chance.
    "cpu": dict(seq_len=512, min_seq_len=32, batch=4, pairs=4, queries=4, keys=4, values=16, filler=16,
                layers=1, hidden=128, heads=8, kv_heads=4, intermediate=384, moba_chunk=32,
                moba_topk=4, steps=500, lr=3e-3, warmup=20, eval_every=50, eval_batches=16,
                checkpointing=False, loss_chunk=4096, rope_theta=10000.0),
    # 2 H200s, NCCL, bf16: one 512K-token sequence per step, sharded over both GPUs.
    "gpu": dict(seq_len=524288, min_seq_len=None, batch=1, pairs=16, queries=16, keys=16, values=16,
                filler=64,
                layers=8, hidden=1024, heads=8, kv_heads=2, intermediate=2816, moba_chunk=4096,
                moba_topk=12, steps=4, lr=1e-3, warmup=20, eval_every=0, eval_batches=1,
                checkpointing=True, loss_chunk=16384, rope_theta=1e6),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="defaults for every option left unset (see PRESETS)")
    p.add_argument("--attn", choices=("moba", "full"), default="moba",
                   help="MoBA in every layer, or exact causal attention in every layer (ring under CP)")
    p.add_argument("--cp", type=int, default=None, help="context-parallel ranks (default: all); dp = world // cp")  # noqa: E501
    p.add_argument("--steps", type=int)
    p.add_argument("--seq-len", type=int, help="tokens per sequence")
    p.add_argument("--min-seq-len", type=int,
                   help="training sequences have log-uniform lengths in [min-seq-len, seq-len], packed "
                        "(held-out sequences are seq-len long); 0: all seq-len")
    p.add_argument("--batch", type=int,
                   help="tokens per data-parallel replica and step, in units of seq-len (packed)")
    p.add_argument("--moba-chunk", type=int, help="MoBA block size")
    p.add_argument("--moba-topk", type=int, help="MoBA blocks per query, own block included")
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int, help="linear warm-up steps, then cosine decay to lr / 10")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, help="held-out evaluation every N steps (0: at the end only)")
    p.add_argument("--eval-batches", type=int, help="held-out batches per data-parallel replica")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="activation checkpointing of the decoder layers")
    p.add_argument("--mlp-chunk", type=int, default=None,
                   help="run each MLP over the sequence in chunks of N tokens, each checkpointed "
                        "(scripts/train_mlp.py; 0: off; default: 131072 when a sequence exceeds 524288 "
                        "tokens, else off)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder layer (one device: one graph per layer, MoBA a custom op "
                        "in it; under CP the attention runs eagerly between two graphs)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of --compile")
    p.add_argument("--out-dir", default="runs/train")
    p.add_argument("--ckpt-dir", default=None, help="write checkpoints here (torch.distributed.checkpoint)")
    p.add_argument("--ckpt-every", type=int, default=0, help="checkpoint every N steps (0: at the end only)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --ckpt-dir")
    p.add_argument("--memory-snapshot", default=None, metavar="PATH",
                   help="CUDA: record allocations during the last step, dump the snapshot to PATH "
                        "(torch.cuda.memory._dump_snapshot format) and PATH.md (live at the peak, by site); "
                        "that step is not timed")
    p.add_argument("--stop-after", type=int, default=None,
                   help="end this launch after step N (checkpointed) of the --steps schedule; --resume later")
    task = p.add_argument_group("task")
    task.add_argument("--pairs", type=int, help="key-value pairs per sequence")
    task.add_argument("--queries", type=int, help="queried keys at the end of each sequence")
    task.add_argument("--keys", type=int, help="key vocabulary")
    task.add_argument("--values", type=int, help="value vocabulary (chance accuracy = 1 / values)")
    task.add_argument("--filler", type=int, help="filler vocabulary")
    model = p.add_argument_group("model")
    model.add_argument("--layers", type=int)
    model.add_argument("--hidden", type=int)
    model.add_argument("--heads", type=int)
    model.add_argument("--kv-heads", type=int)
    model.add_argument("--intermediate", type=int)
    model.add_argument("--rope-theta", type=float)
    model.add_argument("--loss-chunk", type=int, help="rows per LM-head chunk of the loss")
    for action in p._actions:  # --help shows what each preset sets
        if action.dest in PRESETS["cpu"]:
            values = ", ".join(f"{name}: {PRESETS[name][action.dest]}" for name in sorted(PRESETS))
            action.help = f"{action.help or ''} (preset {values})".lstrip()
            action.default = argparse.SUPPRESS if action.default is None else action.default
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if not hasattr(args, key):
            setattr(args, key, None)
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.resume and not args.ckpt_dir:
        p.error("--resume needs --ckpt-dir")
    if args.mlp_chunk is None:
        args.mlp_chunk = 131072 if args.seq_len > 524288 else 0
    return args


# ----------------------------------------------------------------------------------------------
# Processes, mesh, model


def init_distributed() -> torch.device:
    """Join the process group (torchrun's environment, or a world of one for plain ``python``)."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="localhost",
                          MASTER_PORT=str(port))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def build_model(args, task: RetrievalTask, device: torch.device) -> nn.Module:
    """A randomly initialized Llama (identical on every rank: same seed) on ``device``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    import moba_dist.hf

    moba_dist.hf.register()
    cfg = LlamaConfig(
        vocab_size=task.vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, max_position_embeddings=args.seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        tie_word_embeddings=False, use_cache=False, bos_token_id=None, eos_token_id=None,
    )
    cfg.moba_chunk_size = args.moba_chunk
    cfg.moba_topk = args.moba_topk
    # Full attention = the hybrid schedule with every layer full (runs the ring under CP).
    cfg.moba_all_full = args.attn == "full"
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="moba_dist", dtype=torch.float32)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.mlp_chunk:
        chunk_mlps(model.model.layers, args.mlp_chunk)
    return model.to(device)


class LossModel(nn.Module):
    """The LM plus the chunked loss, so that FSDP's root hooks cover the LM head as well.

    ``forward`` returns this rank's loss share (``what="loss"``) or its retrieval counts
    (``what="counts"``, see ``train_loss.retrieval_counts``).
    """

    def __init__(self, lm: nn.Module, loss_chunk: int):
        super().__init__()
        self.lm = lm
        self.loss_chunk = loss_chunk

    def forward(self, input_ids, position_ids, shift_labels, num_items=None, what: str = "loss"):
        hidden = self.lm.model(input_ids=input_ids, position_ids=position_ids).last_hidden_state[0]
        weight = self.lm.lm_head.weight
        if what == "counts":
            return retrieval_counts(hidden, weight, shift_labels[0], self.loss_chunk)
        return chunked_lm_loss(hidden, weight, shift_labels[0], num_items, self.loss_chunk)


def shard_model(model: LossModel, world_mesh, device: torch.device) -> None:
    """FSDP2 over all ranks: each decoder layer is one unit, the root holds embeddings and head."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    for layer in model.lm.model.layers:
        fully_shard(layer, mesh=world_mesh, mp_policy=mp)
    fully_shard(model, mesh=world_mesh, mp_policy=mp)


def compile_layers(lm: nn.Module, backend: str) -> None:
    """``torch.compile`` every decoder layer in place (parameter names unchanged, so checkpoints
    load either way). Without CP a layer is one graph (moba_dist's attention is a custom op in
    it, ``moba_dist/ops.py``); under CP the attention's collectives run eagerly, outside the
    graph (one graph break per layer).

    Under activation checkpointing the checkpoint wraps the compiled forward instead of being
    traced into it: transformers checkpoints inside ``forward``, and tracing that puts every
    side effect of the layer inside a checkpoint region, which dynamo refuses (transformers 5.25's
    hub-kernel RMSNorm sets a context variable there: one graph break per layer)."""
    for layer in lm.model.layers:
        if not getattr(layer, "gradient_checkpointing", False):
            layer.compile(backend=backend)
            continue
        layer.gradient_checkpointing = False  # HF's wrapper now runs the plain forward
        compiled = torch.compile(layer.forward, backend=backend)

        def forward(*args, _compiled=compiled, _layer=layer, **kwargs):
            if _layer.training and torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(_compiled, *args, use_reentrant=False, **kwargs)
            return _compiled(*args, **kwargs)

        layer.forward = forward


def graph_breaks() -> int:
    """Graph breaks torch.compile has met in this process so far, over all its compilations
    (every layer, training and evaluation, each retry of a frame): 0 means none anywhere."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


# ----------------------------------------------------------------------------------------------
# Batches and steps


def model_inputs(ids, pos, labels, cp) -> dict:
    """This rank's inputs: its slice of the packed batch under CP, else the whole batch."""
    if cp is not None:
        inputs = cp.shard(ids, position_ids=pos, labels=labels)
        return dict(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                    shift_labels=inputs["shift_labels"], num_items=inputs["num_items_in_batch"])
    import moba_dist.hf

    shift = moba_dist.hf.shift_labels(labels, pos)
    return dict(input_ids=ids, position_ids=pos, shift_labels=shift, num_items=(shift != -100).sum())


class Runner:
    """Owns the mesh, the sharded model and the optimizer; runs steps and evaluations."""

    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        cp = args.cp or self.world
        if cp < 1 or self.world % cp:
            raise ValueError(f"--cp must divide the world size ({self.world}), got {cp}")
        self.cp, self.dp = cp, self.world // cp
        self.mesh = init_device_mesh(device.type, (self.dp, self.cp), mesh_dim_names=("dp", "cp"))
        self.dp_rank = self.mesh["dp"].get_local_rank()
        self.cp_group = self.mesh["cp"].get_group() if cp > 1 else None
        self.task = RetrievalTask(seq_len=args.seq_len, n_pairs=args.pairs, n_queries=args.queries,
                                  n_keys=args.keys, n_values=args.values, n_filler=args.filler,
                                  min_seq_len=args.min_seq_len or None)
        lm = build_model(args, self.task, device)
        self.n_params = sum(p.numel() for p in lm.parameters())
        self.model = LossModel(lm, args.loss_chunk)
        # One flat mesh of all dp x cp ranks for FSDP: parameters and optimizer state are sharded
        # over every rank, and a gradient reduction over it covers both dimensions at once.
        shard_model(self.model, init_device_mesh(device.type, (self.world,), mesh_dim_names=("dp_cp",)),
                    device)
        if args.compile:
            compile_layers(lm, args.compile_backend)
        self.optim = torch.optim.AdamW(self.model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                       weight_decay=0.1, eps=1e-8)

    @contextlib.contextmanager
    def context(self):
        """``moba_dist.hf.context_parallel`` over the cp group (None when cp == 1)."""
        if self.cp_group is None:
            yield None
            return
        import moba_dist.hf

        with moba_dist.hf.context_parallel(group=self.cp_group) as cp:
            yield cp

    def batch(self, split: str, index: int):
        ids, pos, labels = make_batch(self.task, self.args.batch * self.args.seq_len, seed=self.args.seed,
                                      split=split,
                                      dp_rank=self.dp_rank, step=index)
        return ids.to(self.device), pos.to(self.device), labels.to(self.device)

    def lr_at(self, step: int) -> float:
        a = self.args
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        t = (step - a.warmup) / max(1, a.steps - a.warmup)
        return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))

    def train_step(self, step: int) -> float:
        """One optimizer step on the batch of ``step``; returns the global mean training loss."""
        for group in self.optim.param_groups:
            group["lr"] = self.lr_at(step)
        ids, pos, labels = self.batch("train", step)
        with self.context() as cp:
            share = self.model(**model_inputs(ids, pos, labels, cp))
            # `share` is this rank's part of its replica's loss: the sum of the shares over the cp
            # ranks is the replica's mean loss, because every rank divides its summed token losses
            # by the replica's global label count. The replica's gradient is therefore the SUM of
            # the cp ranks' gradients (the attention collectives route each rank's contribution to
            # K/V back to the rank that owns those tokens), and the model's gradient is the MEAN
            # over dp of the replica gradients. FSDP reduces by averaging over all dp * cp ranks,
            # so backpropagating cp * share makes that average sum over cp and average over dp.
            (share * self.cp).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        loss = share.detach().float().reshape(1)
        dist.all_reduce(loss)
        return float(loss) / self.dp

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Held-out answer loss and accuracy: each replica evaluates its own ``eval_batches``
        batches; under CP the rank that holds a query's position scores it; counts are summed
        over all ranks."""
        self.model.eval()
        counts = torch.zeros(3, dtype=torch.float64, device=self.device)
        for i in range(self.args.eval_batches):
            ids, pos, labels = self.batch("eval", i)
            with self.context() as cp:
                counts += self.model(**model_inputs(ids, pos, labels, cp), what="counts")
        self.model.train()
        dist.all_reduce(counts)
        return float(counts[0] / counts[2]), float(counts[1] / counts[2])

    # ------------------------------------------------------------------------------------------
    # Checkpoints: model, optimizer, step and per-rank RNG state in one DCP checkpoint; the
    # metrics so far beside it (the data stream is a function of the step, see train_data.py).

    def _state(self, step: int) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optim)
        state = {"model": model_sd, "optim": optim_sd, "step": torch.tensor(step),
                 f"rng_cpu_rank{self.rank}": torch.get_rng_state()}
        if self.device.type == "cuda":
            state[f"rng_cuda_rank{self.rank}"] = torch.cuda.get_rng_state(self.device)
        return state

    def save(self, step: int, log: MetricsLog) -> str:
        path = os.path.join(self.args.ckpt_dir, f"step_{step:07d}")
        dcp.save(self._state(step), checkpoint_id=path)
        if self.rank == 0:
            with open(os.path.join(path, "train_state.json"), "w") as f:
                json.dump({"step": step, "args": vars(self.args), "rows": log.as_list()}, f)
        dist.barrier()
        return path

    def load_latest(self) -> tuple[int, MetricsLog]:
        found = [None]
        if self.rank == 0:
            found[0] = latest_checkpoint(self.args.ckpt_dir)
        dist.broadcast_object_list(found)
        path = found[0]
        if path is None:
            raise FileNotFoundError(f"no checkpoint in {self.args.ckpt_dir}")
        with open(os.path.join(path, "train_state.json")) as f:
            meta = json.load(f)
        check_resumable(meta["args"], vars(self.args))
        state = self._state(0)
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self.model, self.optim, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        torch.set_rng_state(state[f"rng_cpu_rank{self.rank}"])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state[f"rng_cuda_rank{self.rank}"], self.device)
        step = int(state["step"])
        log = MetricsLog(meta["rows"])
        log.truncate(step)
        return step, log


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """The complete checkpoint (its DCP ``.metadata`` and our state written) of the latest step."""
    if not os.path.isdir(ckpt_dir):
        return None
    done = [d for d in sorted(os.listdir(ckpt_dir)) if d.startswith("step_")
            and os.path.exists(os.path.join(ckpt_dir, d, ".metadata"))
            and os.path.exists(os.path.join(ckpt_dir, d, "train_state.json"))]
    return os.path.join(ckpt_dir, done[-1]) if done else None


_RESUME_KEYS = ("seq_len", "min_seq_len", "batch", "pairs", "queries", "keys", "values", "filler", "layers", "hidden",  # noqa: E501
                "heads", "kv_heads", "intermediate", "seed", "attn", "moba_chunk", "moba_topk")


def check_resumable(saved: dict, now: dict) -> None:
    diff = {k: (saved.get(k), now.get(k)) for k in _RESUME_KEYS if saved.get(k) != now.get(k)}
    if diff:
        raise ValueError(f"checkpoint was written with different settings (saved, now): {diff}")


# ----------------------------------------------------------------------------------------------


def cudnn_builds() -> tuple[int, float]:
    """cuDNN attention graphs built so far in this process and the seconds that took (0, 0.0
    without the cuDNN backend): a step that builds graphs is not a steady-state step."""
    from moba_dist.kernels import backend_installed, get_backend

    if not (torch.cuda.is_available() and backend_installed("cudnn")):
        return 0, 0.0
    try:
        info = get_backend(torch.device("cuda"), torch.bfloat16, 128, name="cudnn").cache_info()
    except ValueError:  # installed, but cannot run here
        return 0, 0.0
    return info["builds"], info["build_seconds"]


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class layer_memory_timeline:
    """Allocated and peak GPU memory after each decoder layer's forward (its recompute under
    checkpointing included) and after each layer's backward: what one layer leaves alive into
    the next. Written to ``PATH.layers.md``."""

    def __init__(self, layers, device: torch.device):
        self.device, self.rows, self.handles = device, [], []
        for i, layer in enumerate(layers):
            self.handles.append(layer.register_forward_hook(lambda _m, _a, out, i=i: self._forward(i, out)))

    def _forward(self, i: int, out) -> None:
        self._note(f"layer {i} forward" + ("" if torch.is_grad_enabled() else " (no grad)"))
        out = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(out, torch.Tensor) and out.requires_grad:  # fires as the layer's backward starts
            out.register_hook(lambda g: self._note(f"layer {i} backward starts"))

    def _note(self, what: str) -> None:
        self.rows.append((what, torch.cuda.memory_allocated(self.device) / 2**30,
                          torch.cuda.max_memory_allocated(self.device) / 2**30))

    def close(self, path: str, rank: int) -> None:
        for h in self.handles:
            h.remove()
        path = path if rank == 0 else f"{path}.rank{rank}"
        with open(path + ".layers.md", "w") as f:
            f.write("| after | allocated GiB | peak so far GiB |\n|---|---:|---:|\n")
            f.writelines(f"| {w} | {a:.2f} | {p:.2f} |\n" for w, a, p in self.rows)


def write_memory_snapshot(path: str, base_bytes: int, rank: int) -> None:
    """Dump the recorded allocator history of this step (see ``scripts/memory_profile.py``)."""
    import pickle

    from memory_profile import peak_report

    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    snap["base_bytes"] = base_bytes
    path = path if rank == 0 else f"{path}.rank{rank}"
    with open(path, "wb") as f:
        pickle.dump(snap, f)
    with open(path + ".md", "w") as f:
        f.write(peak_report(snap, base_bytes, top=25) + "\n")


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = init_distributed()
    if device.type == "cpu" and "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    run = Runner(args, device)
    rank0 = run.rank == 0
    task = run.task
    tokens_per_step = run.dp * args.batch * args.seq_len
    title = (f"{args.attn} attention" + (f" (MoBA chunk {args.moba_chunk}, top-k {args.moba_topk})"
                                         if args.attn == "moba" else "")
             + f", {args.seq_len} tokens/seq, dp {run.dp} x cp {run.cp}")
    meta = {"title": title, "chance": task.chance, "args": vars(args), "world": run.world,
            "dp": run.dp, "cp": run.cp, "params": run.n_params, "device": str(device)}
    if rank0:
        print(f"[train] {title}; {run.n_params / 1e6:.2f}M params, vocab {task.vocab_size}, "
              f"{tokens_per_step} tokens/step, {task.n_pairs} pairs and {task.n_queries} queries per "
              f"sequence, chance accuracy {task.chance:.3f}", flush=True)

    start, log = 0, MetricsLog()
    if args.resume:
        start, log = run.load_latest()
        if rank0:
            print(f"[train] resumed at step {start} from {args.ckpt_dir}", flush=True)

    def evaluate(step: int) -> None:
        loss, acc = run.evaluate()
        log.update(step, eval_loss=loss, eval_acc=acc)
        if rank0:
            log.write(args.out_dir, meta, chance=task.chance, title=title)

    end = min(args.steps, args.stop_after) if args.stop_after else args.steps
    bar = None
    if rank0:
        from tqdm import tqdm

        bar = tqdm(total=end, initial=min(start, end), desc="train", dynamic_ncols=True, file=sys.stderr)
    step_times, run_peak = [], 0
    seen_builds = cudnn_builds()
    for step in range(start, end):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        snap = args.memory_snapshot and device.type == "cuda" and step == end - 1
        if snap:
            snap_base = torch.cuda.memory_allocated(device)
            timeline = layer_memory_timeline(run.model.lm.model.layers, device)
            # Python stacks of allocations only (context="alloc"): recording free stacks too made
            # a checkpoint recompute fail inside cross_entropy on torch 2.11 (SystemError).
            torch.cuda.memory._record_memory_history(max_entries=4_000_000, context="alloc",
                                                     stacks="python")
        if device.type == "cuda":  # per-step peaks; the run's peak is their maximum
            run_peak = max(run_peak, torch.cuda.max_memory_allocated(device))
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        try:
            loss = run.train_step(step)  # ends with a loss all-reduce: a sync point
        finally:
            if snap:
                timeline.close(args.memory_snapshot, run.rank)
        if snap:
            try:
                write_memory_snapshot(args.memory_snapshot, snap_base, run.rank)
            except Exception:  # a failed report must not lose the run
                traceback.print_exc()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        if not snap:  # recording slows the step: it is not timed
            step_times.append(dt)
        done = step + 1
        log.update(done, loss=loss, lr=run.lr_at(step), tokens_per_s=tokens_per_step / dt, step_time_s=dt,
                   peak_mem_gib=peak_memory_gib(device))
        if rank0 and device.type == "cuda":
            builds = cudnn_builds()
            print(f"[train] step {done}: {dt:.2f} s, peak {peak_memory_gib(device):.2f} GiB, cuDNN graphs "
                  f"built {builds[0] - seen_builds[0]} ({builds[1] - seen_builds[1]:.1f} s)", flush=True)
            seen_builds = builds
        if args.eval_every and done % args.eval_every == 0 and done < end:
            evaluate(done)
        if args.ckpt_dir and args.ckpt_every and done % args.ckpt_every == 0 and done < end:
            run.save(done, log)
        if bar is not None:
            row = log.rows[done]
            post = {"loss": f"{loss:.3f}", "tok/s": f"{tokens_per_step / dt:.3g}"}
            if "eval_acc" in row:
                post["acc"] = f"{row['eval_acc']:.3f}"
            bar.set_postfix(post)
            bar.update(1)
    if bar is not None:
        bar.close()

    final = max(start, end)
    if final not in log.rows or "eval_acc" not in log.rows[final]:
        evaluate(final)
    if args.ckpt_dir and start < end:
        run.save(final, log)

    peaks = [None] * run.world
    if device.type == "cuda":
        run_peak = max(run_peak, torch.cuda.max_memory_allocated(device))
    peak = run_peak / 2**30 if device.type == "cuda" else peak_memory_gib(device)
    dist.all_gather_object(peaks, round(peak, 3))
    timed = step_times[1:] if len(step_times) > 1 else step_times  # the first step warms up
    step_time = statistics.median(timed) if timed else float("nan")
    row = log.rows[final]
    last = [r["loss"] for r in log.as_list() if "loss" in r][-10:]
    summary = {
        "attn": args.attn, "moba_chunk": args.moba_chunk, "moba_topk": args.moba_topk,
        "seq_len": args.seq_len, "batch": args.batch, "world": run.world, "dp": run.dp, "cp": run.cp,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": "bfloat16" if device.type == "cuda" else "float32", "params": run.n_params,
        "steps": final, "tokens_per_step": tokens_per_step, "step_time_s": round(step_time, 4),
        "tokens_per_s": round(tokens_per_step / step_time, 1) if timed else None,
        "peak_mem_gib_per_rank": peaks,
        "peak_mem_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "max RSS",
        "final_loss": round(sum(last) / len(last), 4) if last else None,  # mean of the last 10 steps
        "compile": args.compile_backend if args.compile else None,
        "graph_breaks": graph_breaks() if args.compile else None,
        "eval_loss": round(row["eval_loss"], 4), "eval_acc": round(row["eval_acc"], 4),
        "chance_acc": round(task.chance, 4), "wall_s": round(time.perf_counter() - t_start, 1),
    }
    if rank0:
        log.write(args.out_dir, {**meta, "summary": summary}, chance=task.chance, title=title)
        with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(f"[train] held-out retrieval accuracy {row['eval_acc']:.3f} (chance {task.chance:.3f}); "
              f"curves in {os.path.join(args.out_dir, 'train_curves.png')}", flush=True)
        print(f"[train] peak memory per rank {peaks} GiB ({summary['peak_mem_kind']}), median step "
              f"{summary['step_time_s']} s", flush=True)
        print(json.dumps(summary), flush=True)
    dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
