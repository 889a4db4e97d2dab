"""Would packing K seeds into one vectorized model pay on this CPU? A measurement, not a feature.

    python bench/pack_probe.py --batch 4 32 --members 4 --steps 60

Times one training step (forward, backward, Adam) of bnctl's seed_cnn with BN for K members:
  sequential  K separate models stepped one after another in this process (what --jobs 1 does per run)
  vmap        the K members' weights and BN buffers stacked (torch.func.stack_module_state) and stepped
              as one: vmap(grad(functional_call)) plus one Adam over the stacked tensors
  bnctl       what bnctl/packed.py does: K ordinary models and Adams; each step stacks their weights and
              buffers, runs packed.vmapped_step, writes the running statistics back and steps each Adam
and prints CPU time (user+sys of this process) and wall time per member-step, with the load average,
all on one intra-op thread (as bnctl trains small batches on a shared machine). Each member gets its
own batch. "runs/hour" is 3600 / (steps per run x seconds per member-step), for the notebook's 2 epochs
of 50,000 images at that batch. Two processes (--jobs 2) would each do the sequential figure on their
own core: on an idle 2-core machine that doubles sequential throughput, on a loaded one it does not.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[4, 32])
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, stack_module_state, vmap

    from bnctl import packed
    from bnctl.config import ModelConfig
    from bnctl.models import build_model

    torch.set_num_threads(1)
    k = args.members
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores; torch {torch.__version__}, "
          f"1 thread, seed_cnn + BN, {k} members, {args.steps} timed steps after 5 warm-up")
    print("| batch | arm | CPU ms / member-step | wall ms / member-step | runs/hour (2 epochs of 50k, CPU time) |")
    print("|---:|---|---:|---:|---:|")
    for batch in args.batch:
        torch.manual_seed(0)
        models = [build_model(ModelConfig(), num_classes=10, image_size=(32, 32)).to(memory_format=torch.channels_last)
                  for _ in range(k)]
        xs = torch.randn(k, batch, 3, 32, 32)
        ys = torch.randint(0, 10, (k, batch))

        # sequential
        opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in models]

        def seq_step():
            for m, o, x, y in zip(models, opts, xs, ys):
                loss = F.cross_entropy(m(x.contiguous(memory_format=torch.channels_last)), y)
                o.zero_grad(set_to_none=True)
                loss.backward()
                o.step()

        # vmap
        base = build_model(ModelConfig(), num_classes=10, image_size=(32, 32)).to("meta")
        params, buffers = stack_module_state(models)
        params = {n: p.detach().clone().requires_grad_(False) for n, p in params.items()}
        buffers = {n: b.clone() for n, b in buffers.items()}
        leaves = list(params.values())
        vopt = torch.optim.Adam(leaves, lr=1e-3)

        def loss_of(p, b, x, y):
            out = functional_call(base, (p, b), (x,))
            return F.cross_entropy(out, y)

        grads_of = vmap(grad(loss_of), in_dims=(0, 0, 0, 0), randomness="different")

        def vmap_step():
            g = grads_of(params, buffers, xs, ys)
            for name, leaf in params.items():
                leaf.grad = g[name]
            vopt.step()

        # bnctl/packed.py's way: the members stay plain models with their own optimizers.
        members = [build_model(ModelConfig(), num_classes=10, image_size=(32, 32)).to(memory_format=torch.channels_last)
                   for _ in range(k)]
        member_opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in members]
        packed_step = packed.vmapped_step(members[0])
        p_names = [n for n, _ in members[0].named_parameters()]
        b_names = [n for n, _ in members[0].named_buffers()]

        def bnctl_step():
            ps = [list(m.parameters()) for m in members]
            bs = [list(m.buffers()) for m in members]
            sp = {n: torch.stack([p[j].detach() for p in ps]) for j, n in enumerate(p_names)}
            sb = {n: torch.stack([b[j] for b in bs]) for j, n in enumerate(b_names)}
            g, _ = packed_step(sp, sb, xs, ys)
            for k_, (m, o) in enumerate(zip(members, member_opts)):
                with torch.no_grad():
                    for j, buf in enumerate(bs[k_]):
                        buf.copy_(sb[b_names[j]][k_])
                for j, p in enumerate(ps[k_]):
                    p.grad = g[p_names[j]][k_]
                o.step()

        for label, step in (("sequential", seq_step), ("vmap", vmap_step), ("bnctl", bnctl_step)):
            for _ in range(5):
                step()
            c0, w0 = cpu_s(), time.perf_counter()
            for _ in range(args.steps):
                step()
            c, w = (cpu_s() - c0) / (args.steps * k), (time.perf_counter() - w0) / (args.steps * k)
            steps_per_run = 2 * 50_000 // batch
            print(f"| {batch} | {label} | {1e3 * c:.2f} | {1e3 * w:.2f} | {3600 / (steps_per_run * c):.1f} |",
                  flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f} (1 min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
