"""One launch of bench/distributed_overhead.py: train one or more methods through scale_rank.train under one
engine (the same loop users run), with the controller instrumented from outside the library.

    torchrun --nproc_per_node 2 bench/distributed_worker.py OUT_DIR WARMUP [--in-turn] section.key=value ... [:: ...]

Items separated by "::" are several runs in the same processes: one after another (the traffic sweep and
the memory launches), or with --in-turn side by side, one optimizer step at a time (the step-time
comparison): each run's train() in its own thread, and a `Turns` schedule lets exactly one of them work at a
time, handing over at train()'s observer after every step, the order of the runs rotating every step. So
every run meets the same machine state as its neighbours, step after step (separate launches of the same code
differ by several percent: each process's heap, page faults and cache state are its own). Set-up, the last
step's evaluation and export run in turn too, so both ranks issue their collectives in the same order.
What it records, per rank and run, into OUT_DIR/rec.rank<R>.json:
- the wall time of every optimizer step (from the moment train()'s loop gets control back from the observer
  to its next observer call, so one step is forward + backward + observe + optimizer step + apply +
  zero_grad + the loop's per-step logging, telemetry and loss all-reduce), and the process's CPU time over
  the same span (time.process_time: what the process computed, without the time it waited for a core or
  for the other rank, so far less sensitive to other jobs on a shared machine);
- the wall and CPU time of every RankController.observe() and apply() call (both wrapped), and of its
  parts: the method's before_step/partial_sums/absorb/decide/apply, the controller's collectives
  (Collective.all_reduce_sum/broadcast, waiting for the other rank included) and the engine's
  ShardAccess.write (under ZeRO it all-gathers the edited parameter); the loop's loss all-reduce too;
- controller.comm.bytes_moved and .calls after every step;
- the bytes of every tensor the method keeps (exact);
- memory (separate runs only; with --in-turn the process holds every run at once): VmRSS just before and
  just after RankController.__init__ (the method's state, e.g. the sensitivity EMAs, is allocated in bind()
  there), also both after malloc_trim(0), and the same pair at the end of the last step; ru_maxrss (peak RSS)
  once the controller is built (model, engine and controller set-up), after which the peak is restarted
  (echo 5 > /proc/self/clear_refs), and ru_maxrss again when the last optimizer step ends (the training peak,
  before evaluation and export); VmRSS after every step;
- sizes: adapter parameters (global), total capacity (components), local scored entries.

With WARMUP <= 0 only the sizes and the controller's traffic matter (the O(total rank) sweep).
"""
from __future__ import annotations

import json
import resource
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scale_rank import controller as controller_module  # noqa: E402
import scale_rank.train as train_module  # noqa: E402
from scale_rank.comm import Collective  # noqa: E402
from scale_rank.config import load_config  # noqa: E402
from scale_rank.engine import exit_processes  # noqa: E402
from scale_rank.train import train  # noqa: E402


def vm_rss_kib(field: str = "VmRSS") -> int:
    """This process's current resident set size (KiB), from /proc (no tracemalloc, no allocator hooks).
    field "RssAnon": the anonymous part only (heap, tensors), without file-backed pages such as the code
    of libtorch that a method's first call of a kernel maps in."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def trimmed_rss_kib() -> int:
    """VmRSS after glibc's malloc_trim(0) gives freed heap pages back: closer to the live allocations (the
    heap otherwise keeps pages that temporaries used)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return vm_rss_kib()


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM, and with it ru_maxrss) at the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def tensor_bytes(obj, seen: set[int], depth: int = 0) -> int:
    """Bytes of the tensors an object keeps in its attributes (lists, tuples, dicts and nested helper
    objects such as the SensitivityTracker included; adapter layers, the comm and access objects not)."""
    if depth > 3 or id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Parameter) or isinstance(obj, torch.nn.Module):
        return 0  # the model's own tensors, identical for every method
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(item, seen, depth + 1) for item in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(item, seen, depth + 1) for item in obj.values())
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("scale_rank.") \
            and not type(obj).__module__.startswith(("scale_rank.comm", "scale_rank.shards",
                                                     "scale_rank.engine_shards", "scale_rank.config")):
        return sum(tensor_bytes(v, seen, depth + 1) for k, v in vars(obj).items() if k != "layers")
    return 0


def timed_into(store: list, fn, step_of):
    """`fn`, recording (step, seconds) of every call into `store`."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        store.append((step_of(), time.perf_counter() - start))
        return out
    return wrapper


def split_items(items: list[str]) -> list[list[str]]:
    """Config items of several runs, separated by "::", as one list per run."""
    groups: list[list[str]] = [[]]
    for item in items:
        if item == "::":
            groups.append([])
        else:
            groups[-1].append(item)
    return groups


class Turns:
    """Several runs in threads, one working at a time: run `i` works while the schedule points at it.

    The schedule holds (step, run) for steps 1..T, the runs of step s in the order rotated by s - 1. A run
    hands over at the observer of each of its steps but the last, and when its train() returns (so its set-up
    happens before its first step, and its evaluation and export after its last, each in its turn). A failing
    run ends the schedule: the others raise instead of waiting for ever.
    """

    def __init__(self, runs: int, steps: int):
        self.schedule = [(step, (step - 1 + k) % runs) for step in range(1, steps + 1) for k in range(runs)]
        self.position, self.failed = 0, False
        self.changed = threading.Condition()

    def wait(self, run: int) -> None:
        with self.changed:
            self.changed.wait_for(lambda: self.failed or self.current() == run)
            if self.failed:
                raise RuntimeError("another run in this launch failed")

    def hand_over(self) -> None:
        with self.changed:
            self.position += 1
            self.changed.notify_all()

    def fail(self) -> None:
        with self.changed:
            self.failed = True
            self.changed.notify_all()

    def current(self) -> int | None:
        return self.schedule[self.position][1] if self.position < len(self.schedule) else None


def main() -> int:
    out_dir, warmup, *items = sys.argv[1:]
    warmup = int(warmup)
    in_turn = bool(items) and items[0] == "--in-turn"
    groups = split_items(items[1:] if in_turn else items)  # several runs in this launch
    local = threading.local()  # the record of the run this thread trains

    class Current:
        """The record of the calling thread's run, as a dict."""
        def __getitem__(self, key):
            return local.record[key]

        def __setitem__(self, key, value):
            local.record[key] = value

        def get(self, key, default=None):
            return local.record.get(key, default)

        def setdefault(self, key, default):
            return local.record.setdefault(key, default)

    cur = Current()

    def step_now() -> int:
        return len(cur["step_end"]) + 1  # the optimizer step in progress (1-based)

    Controller = controller_module.RankController
    orig_init, orig_observe, orig_apply = Controller.__init__, Controller.observe, Controller.apply

    def init(self, *args, **kwargs):
        if in_turn:
            orig_init(self, *args, **kwargs)
        else:
            before, before_trimmed = vm_rss_kib(), trimmed_rss_kib()
            before_anon = vm_rss_kib("RssAnon")
            orig_init(self, *args, **kwargs)
            cur["rss_controller_init_kib"] = vm_rss_kib() - before
            cur["rss_controller_init_trimmed_kib"] = trimmed_rss_kib() - before_trimmed
            cur["anon_controller_init_trimmed_kib"] = vm_rss_kib("RssAnon") - before_anon
            # peak so far (model build, engine set-up, controller), then restart the peak for training
            cur["maxrss_setup_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            cur["peak_reset"] = reset_peak_rss()
        cur["method_state_bytes"] = tensor_bytes(self.method, set())
        tracker = getattr(self.method, "tracker", None)
        cur["scored_local_entries"] = int(tracker.index.numel()) if tracker is not None else 0
        cur["adapter_params"] = sum(l.r_max * (l.d_in + l.d_out + 1) for l in self.layers)
        cur["capacity"] = int(self.method.layout.n_components)
        cur["modules"] = len(self.layers)
        cur["sum_d_in"] = sum(l.d_in for l in self.layers)
        # the method's own parts and the engine's writes, timed (instance attributes shadow the class)
        for name in ("before_step", "partial_sums", "absorb", "decide", "apply"):
            setattr(self.method, name, timed_into(cur["parts"].setdefault(name, []),
                                                  getattr(self.method, name), step_now))
        self.access.write = timed_into(cur["parts"].setdefault("access.write", []), self.access.write,
                                       step_now)

    def observe(self, *args, **kwargs):
        cur["in_training"] = True
        start, cpu = time.perf_counter(), time.process_time()
        orig_observe(self, *args, **kwargs)
        cur["observe_s"].append(time.perf_counter() - start)
        cur["observe_cpu_s"].append(time.process_time() - cpu)

    def apply(self, *args, **kwargs):
        start, cpu = time.perf_counter(), time.process_time()
        orig_apply(self, *args, **kwargs)
        cur["apply_s"].append(time.perf_counter() - start)
        cur["apply_cpu_s"].append(time.process_time() - cpu)

    Controller.__init__, Controller.observe, Controller.apply = init, observe, apply
    # the controller's collectives (time in them includes waiting for the other rank) and, for reference,
    # the loop's own one-scalar all-reduce of the loss every step (the same for every method)
    for name in ("all_reduce_sum", "broadcast"):
        def timed_comm(self, tensor, _orig=getattr(Collective, name)):
            start = time.perf_counter()
            out = _orig(self, tensor)
            cur["parts"].setdefault("collectives", []).append((step_now(), time.perf_counter() - start))
            return out
        setattr(Collective, name, timed_comm)
    # the engine's own phases, to see where a difference between methods comes from: the engine train()
    # builds (whatever its class) gets timed versions of its methods
    orig_make_engine = train_module.make_engine

    def make_engine(*args, **kwargs):
        engine = orig_make_engine(*args, **kwargs)
        for name in ("forward", "backward", "step", "zero_grad"):
            def timed_engine(*call_args, _orig=getattr(engine, name), _name=name, **call_kwargs):
                start = time.perf_counter()
                out = _orig(*call_args, **call_kwargs)
                if cur.get("in_training"):
                    cur["parts"].setdefault("engine." + _name, []).append((step_now(), time.perf_counter() - start))
                return out
            setattr(engine, name, timed_engine)
        return engine
    train_module.make_engine = make_engine
    orig_mean = train_module._mean_over_ranks

    def mean_over_ranks(value):
        start = time.perf_counter()
        out = orig_mean(value)
        cur["loss_allreduce_s"].append(time.perf_counter() - start)
        return out
    train_module._mean_over_ranks = mean_over_ranks

    turns = None
    if in_turn:
        steps = {load_config(None, items).train.total_steps for items in groups}
        if len(steps) != 1:
            raise SystemExit(f"--in-turn runs must take the same number of steps, not {sorted(steps)}")
        turns = Turns(len(groups), steps.pop())

    def run(index: int, items: list[str], records: list) -> None:
        """Train run `index` (in its turns with --in-turn); its record goes to records[index]."""
        cfg = load_config(None, items)
        local.record = dict(items=items, warmup=warmup, observe_s=[], apply_s=[], observe_cpu_s=[], apply_cpu_s=[],
                            step_start=[None], step_start_cpu=[None], step_end=[], step_end_cpu=[], bytes=[],
                            calls=[], rss_kib=[], parts={}, loss_allreduce_s=[])

        def observer(step, controller, loss, total=cfg.train.total_steps):
            cur["step_end"].append(time.perf_counter())
            cur["step_end_cpu"].append(time.process_time())
            cur["bytes"].append(controller.comm.bytes_moved)
            cur["calls"].append(controller.comm.calls)
            if not in_turn:
                cur["rss_kib"].append(vm_rss_kib())
            if step == total:
                cur["in_training"] = False  # evaluation's forwards are not steps
                cur["ranks_end"] = int(sum(controller.method.ranks().tolist()))
                if not in_turn:
                    cur["maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                    cur["rss_end_kib"] = vm_rss_kib()
                    cur["rss_end_trimmed_kib"] = trimmed_rss_kib()
                    cur["anon_end_trimmed_kib"] = vm_rss_kib("RssAnon")
                return
            if in_turn:
                turns.hand_over()
                turns.wait(index)
            cur["step_start"].append(time.perf_counter())  # the loop gets control back: the next step begins
            cur["step_start_cpu"].append(time.process_time())

        if turns is not None:
            turns.wait(index)
        try:
            result = train(cfg, progress=False, observer=observer)
        except BaseException:
            if turns is not None:
                turns.fail()
            raise
        cur["loss_end"] = result.losses[-1]
        records[index] = local.record
        if turns is not None:
            turns.hand_over()

    records: list = [None] * len(groups)
    if in_turn:
        threads = [threading.Thread(target=run, args=(i, items, records)) for i, items in enumerate(groups)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if any(record is None for record in records):
            return 1
    else:
        for index, items in enumerate(groups):
            run(index, items, records)
    rank = dist.get_rank() if dist.is_initialized() else 0
    info = {"rank": rank, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "threads": torch.get_num_threads()}
    (Path(out_dir) / f"rec.rank{rank}.json").write_text(json.dumps({**info, "runs": records}))
    return 0


if __name__ == "__main__":
    exit_processes(main())
